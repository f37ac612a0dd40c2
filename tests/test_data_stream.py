"""repa.data.stream: splitting, resampling, flips with cached moments, resume, damaged data (tiny sizes)."""

from __future__ import annotations

import contextlib
import gc
import io
import os
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repa.data import png
from repa.data import shards as shard_format
from repa.data.build import build_shards
from repa.data.shards import (
    DeferredMember,
    LocalShard,
    ShardFormatError,
    expand_shard_urls,
    iter_tar_members,
    member_bytes,
)
from repa.data.stream import RING_SLOTS, Batch, StreamError, iter_eval_batches, make_train_stream, parse_label
from repa.data.synthetic import write_synthetic_dataset
from tests.test_data_fakes import FakeTokenizer

NUM_IMAGES, RESOLUTION = 66, 16  # 9 shards of 8: the last holds only 2 samples


@pytest.fixture(scope="module")
def shard_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream")
    write_synthetic_dataset(root / "images", num_images=NUM_IMAGES, resolution=RESOLUTION, num_classes=4)
    build_shards(str(root / "images"), root / "plain", resolution=RESOLUTION, shard_size=8, workers=0)
    build_shards(
        str(root / "images"), root / "cached", resolution=RESOLUTION, shard_size=8, workers=0,
        tokenizer=FakeTokenizer(),
    )  # fmt: skip
    return {"root": root, "plain": root / "plain", "cached": root / "cached"}


@pytest.fixture(scope="module")
def shard_of_key(shard_dirs) -> dict[str, str]:
    mapping = {}
    for url in expand_shard_urls(str(shard_dirs["plain"])):
        for batch in iter_eval_batches([url], batch_size=8):
            mapping.update(dict.fromkeys(batch.keys, url))
    return mapping


def _take(stream, count: int) -> list:
    batches = []
    for batch in stream:
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


def test_two_ranks_two_workers_read_disjoint_shards_and_equal_batch_counts(shard_dirs, shard_of_key):
    urls = expand_shard_urls(str(shard_dirs["plain"]))
    shards_by_worker: dict[int, set[str]] = {}
    counts = []
    for rank in range(2):
        stream = make_train_stream(
            str(shard_dirs["plain"]), batch_size_per_rank=4, rank=rank, world_size=2, num_workers=2,
            seed=0, shuffle_buffer=8, num_batches=10,
        )  # fmt: skip
        batches = list(stream)
        counts.append(len(batches))
        for batch in batches:
            assert batch.images.shape == (4, 3, RESOLUTION, RESOLUTION) and batch.images.dtype == torch.uint8
            assert batch.labels.dtype == torch.int64
            shards_by_worker.setdefault(batch.worker, set()).update(shard_of_key[k] for k in batch.keys)
    # Equal counts although rank 0's workers own 3 + 2 shards (one of 2 samples) and rank 1's 2 + 2.
    assert counts == [10, 10]
    assert sorted(shards_by_worker) == [0, 1, 2, 3]  # global worker id = rank * 2 + worker
    for worker, shards in shards_by_worker.items():
        assert shards <= set(urls[worker::4])  # only its own shards, hence disjoint from the others


def test_missing_shard_files_are_named_at_start_up(shard_dirs, tmp_path):
    urls = expand_shard_urls(str(shard_dirs["plain"]))
    with pytest.raises(FileNotFoundError, match=r"1 of 2 training shards do not exist, e.g. \S*typo\.tar"):
        make_train_stream([urls[0], str(tmp_path / "typo.tar")], batch_size_per_rank=2, num_workers=4)


def test_the_shuffle_buffer_mixes_shards(shard_dirs, shard_of_key):
    def shard_runs(shuffle_buffer: int) -> tuple[int, int]:
        """(runs of consecutive samples from one shard, distinct shards) in the first 60 samples."""
        stream = make_train_stream(
            str(shard_dirs["plain"]), batch_size_per_rank=6, num_workers=0, shuffle_buffer=shuffle_buffer,
            num_batches=10,
        )  # fmt: skip
        shards = [shard_of_key[key] for batch in stream for key in batch.keys]
        return 1 + sum(a != b for a, b in zip(shards, shards[1:])), len(set(shards))

    runs, distinct = shard_runs(1)
    assert runs == distinct  # no buffer: each shard read straight through
    runs, distinct = shard_runs(32)
    assert runs > 3 * distinct  # a buffer of 32 over shards of 8 interleaves them


def test_fewer_shards_than_workers_use_fewer_workers(shard_dirs):
    with pytest.warns(UserWarning, match="9 shard.*using 4 worker"):
        stream = make_train_stream(
            str(shard_dirs["plain"]), batch_size_per_rank=2, world_size=2, num_workers=5
        )
    assert stream.num_workers == 4


def test_fewer_shards_than_ranks_fail_at_start_up(shard_dirs):
    with pytest.raises(ValueError, match="9 shard.*need at least 10 shards"):
        make_train_stream(str(shard_dirs["plain"]), batch_size_per_rank=2, world_size=10, num_workers=0)


def test_requested_cache_missing_fails_at_start_up(shard_dirs):
    with pytest.raises(StreamError, match="--cache-latents"):
        make_train_stream(str(shard_dirs["plain"]), batch_size_per_rank=2, num_workers=0, with_latents=True)


def test_flip_uses_the_moments_of_the_flipped_image(shard_dirs):
    tokenizer = FakeTokenizer()
    stream = make_train_stream(
        str(shard_dirs["cached"]), batch_size_per_rank=8, num_workers=0, seed=1, shuffle_buffer=16,
        flip=True, with_latents=True, num_batches=6,
    )  # fmt: skip
    flips = []
    for batch in stream:
        # The moments always belong to the image as returned, mirrored or not.
        torch.testing.assert_close(batch.moments, tokenizer.encode_moments(batch.images))
        flips += batch.flipped.tolist()
    assert 0 < sum(flips) < len(flips)
    unflipped = make_train_stream(
        str(shard_dirs["cached"]), batch_size_per_rank=8, num_workers=0, with_latents=True, num_batches=3
    )
    assert not any(batch.flipped.any() for batch in unflipped)


def test_resume_is_deterministic_and_does_not_replay(shard_dirs):
    def stream(**kwargs):
        return make_train_stream(
            str(shard_dirs["plain"]), batch_size_per_rank=4, num_workers=2, seed=3, shuffle_buffer=8,
            flip=True, **kwargs,
        )  # fmt: skip

    first, again = _take(stream(), 6), _take(stream(), 6)
    assert [b.keys for b in first] == [b.keys for b in again]
    assert all(torch.equal(a.images, b.images) for a, b in zip(first, again))
    other_seed = _take(
        make_train_stream(str(shard_dirs["plain"]), batch_size_per_rank=4, num_workers=2, seed=4), 6
    )
    assert [b.keys for b in first] != [b.keys for b in other_seed]

    resumed = stream(resume_batches=6)
    resumed_batches = _take(resumed, 4)
    assert [b.keys for b in resumed_batches] == [b.keys for b in _take(stream(resume_batches=6), 4)]
    assert [b.keys for b in resumed_batches] != [b.keys for b in first[:4]]  # fresh draws, not a replay
    assert resumed.batches_seen == 10 and resumed.samples_seen == 40  # exact count across the restart

    # Iterating a stream again continues it, exactly as a stream resumed at that point would.
    epochs = stream(num_batches=3)
    assert len(list(epochs)) == 3
    second = list(epochs)
    assert [b.keys for b in second] == [b.keys for b in stream(resume_batches=3, num_batches=3)]
    assert epochs.state_dict()["batches_seen"] == 6
    restored = stream(num_batches=2)
    restored.load_state_dict(epochs.state_dict())
    assert [b.keys for b in restored] == [b.keys for b in stream(resume_batches=6, num_batches=2)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_stay_intact_while_the_consumer_holds_them(shard_dirs, num_workers, monkeypatch):
    """Workers reuse their shared batch slots; batches already handed out must never change, and
    members left in the shard file (deferred) must come back with the right bytes."""
    reference = {}
    for batch in iter_eval_batches(str(shard_dirs["cached"]), batch_size=8, with_latents=True):
        for row, key in enumerate(batch.keys):
            reference[key] = (batch.images[row], batch.moments[row])
    deferred_reads = []
    if num_workers == 0:  # count reads of deferred members (worker processes count in their own copy)
        read = DeferredMember.read
        monkeypatch.setattr(DeferredMember, "read", lambda self: deferred_reads.append(1) or read(self))
    num_batches = 3 * RING_SLOTS * max(1, num_workers) + 1  # every slot is reused several times
    stream = make_train_stream(
        str(shard_dirs["cached"]), batch_size_per_rank=4, num_workers=num_workers, seed=5,
        shuffle_buffer=8, with_latents=True, num_batches=num_batches,
    )  # fmt: skip
    stream.dataset.defer_over = 16  # PNGs, moments and source keys stay in the file; labels do not
    held = list(stream)  # all of them held at once
    assert len(held) == num_batches
    for batch in held:
        for row, key in enumerate(batch.keys):
            image, moments = reference[key]
            assert torch.equal(batch.images[row], image) and torch.equal(batch.moments[row], moments)
    if num_workers == 0:
        assert len(deferred_reads) == 3 * 4 * num_batches  # a PNG, its moments and its key per sample


def _write_sized_samples(path: Path, sizes: list[int]) -> None:
    with tarfile.open(path, "w") as archive:
        for index, size in enumerate(sizes):
            png = io.BytesIO()
            Image.new("RGB", (size, size), (index * 40 % 256, 0, 0)).save(png, format="PNG")
            for suffix, data in (("png", png.getvalue()), ("cls", b"0")):
                info = tarfile.TarInfo(f"{index:04d}.{suffix}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_sample_of_another_size_is_skipped(tmp_path, num_workers):
    _write_sized_samples(tmp_path / "mixed.tar", [16, 8, 16, 16])  # the second sample is smaller
    stream = make_train_stream(
        str(tmp_path / "mixed.tar"), batch_size_per_rank=3, num_workers=num_workers, shuffle_buffer=1,
        num_batches=2,
    )  # fmt: skip
    warns = pytest.warns(UserWarning, match=r"image of shape \(8, 8, 3\), expected \(16, 16, 3\)")
    with warns if num_workers == 0 else contextlib.nullcontext():  # workers warn in their process
        keys = [key for batch in stream for key in batch.keys]
    assert len(keys) == 6 and "0001" not in keys
    # Read in order, each batch of 3 takes one pass over the 4 samples: the odd one met twice.
    assert stream.num_skipped == 2


def test_the_manifest_sets_the_size_and_a_first_odd_sample_cannot(tmp_path, shard_dirs):
    """An odd sample met first must not decide the size: the manifest's resolution does, and
    without a manifest a stream where most samples are refused stops with an error."""
    shutil.copytree(shard_dirs["plain"], tmp_path / "with_manifest")
    odd_png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(odd_png, format="PNG")
    odd_keys = set()
    for url in expand_shard_urls(str(tmp_path / "with_manifest")):  # every shard starts with 8 px
        with tarfile.open(url) as archive:
            members = [(m, archive.extractfile(m).read()) for m in archive]
        assert members[0][0].name.endswith(".png") and members[2][0].name.endswith(".key.txt")
        odd_keys.add(members[2][1].decode())
        with tarfile.open(url, "w") as archive:
            for index, (member, data) in enumerate(members):
                if index == 0:
                    data, member.size = odd_png.getvalue(), len(odd_png.getvalue())
                archive.addfile(member, io.BytesIO(data))
    for num_workers in (0, 2):
        stream = make_train_stream(
            str(tmp_path / "with_manifest"), batch_size_per_rank=4, num_workers=num_workers, seed=1,
            shuffle_buffer=1, num_batches=30,
        )  # fmt: skip
        with pytest.warns(UserWarning) if num_workers == 0 else contextlib.nullcontext():
            batches = list(stream)
        assert all(batch.images.shape[-1] == RESOLUTION for batch in batches)
        assert not odd_keys & {key for batch in batches for key in batch.keys}

    _write_sized_samples(tmp_path / "no_manifest.tar", [8] + [16] * 20)
    stream = make_train_stream(
        str(tmp_path / "no_manifest.tar"), batch_size_per_rank=3, num_workers=0, shuffle_buffer=1
    )
    with (
        pytest.raises(StreamError, match="skipped for their shape.*one resolution"),
        pytest.warns(UserWarning),
    ):
        list(stream)


def _rewrite_shard(source: Path, target: Path, corrupt_member: str) -> None:
    """Copy a shard, flipping bytes in the middle of one member (a PNG: its IDAT data)."""
    with tarfile.open(source) as reader, tarfile.open(target, "w") as writer:
        for member in reader:
            data = reader.extractfile(member).read()
            if member.name == corrupt_member:
                data = bytearray(data)
                for position in range(len(data) // 2, len(data) // 2 + 8):
                    data[position] ^= 0x5A
                data = bytes(data)
            member.size = len(data)
            writer.addfile(member, io.BytesIO(data))


def test_corrupt_sample_is_skipped_with_a_warning_and_counted(shard_dirs, tmp_path):
    urls = expand_shard_urls(str(shard_dirs["plain"]))
    with tarfile.open(urls[0]) as archive:
        first_png = next(m.name for m in archive if m.name.endswith(".png"))
        bad_key = archive.extractfile(first_png.replace(".png", ".key.txt")).read().decode()
    _rewrite_shard(Path(urls[0]), tmp_path / "bad.tar", first_png)
    shutil.copy(urls[1], tmp_path / "good.tar")
    shards = [str(tmp_path / "bad.tar"), str(tmp_path / "good.tar")]

    # Samples read in order (shuffle_buffer=1), so the count follows from where the bad one lies:
    # first in bad.tar, met once in each pass before any of that shard's good samples.
    stream = make_train_stream(shards, batch_size_per_rank=3, num_workers=0, shuffle_buffer=1, num_batches=20)
    # The warning names the sample and its shard.
    with pytest.warns(UserWarning, match=r"skipping corrupt data .*: sample \S+ of \S*bad\.tar") as record:
        keys = [key for batch in stream for key in batch.keys]
    assert len(keys) == 60 and bad_key not in keys
    # 60 samples are 4 passes over the 15 good ones: the bad one was met 4 times, one warning each.
    assert stream.num_skipped == 4
    assert sum("skipping corrupt data" in str(warning.message) for warning in record) == 4

    # With worker processes the count travels with the batches. Worker 0 reads bad.tar alone: its
    # 6 of the 12 batches are 18 samples of its 7 good ones, so it started 3 passes, each with
    # the bad one; worker 1 (good.tar) skipped nothing.
    in_workers = make_train_stream(
        shards, batch_size_per_rank=3, num_workers=2, shuffle_buffer=1, num_batches=12
    )
    batches = list(in_workers)
    assert [batch.worker for batch in batches] == [0, 1] * 6
    assert bad_key not in [key for batch in batches for key in batch.keys]
    assert in_workers.num_skipped == 3


def _replace_member(source: Path, target: Path, name: str, data: bytes) -> None:
    """Copy a shard with the bytes of member `name` replaced by `data`."""
    with tarfile.open(source) as reader, tarfile.open(target, "w") as writer:
        for member in reader:
            payload = data if member.name == name else reader.extractfile(member).read()
            member.size = len(payload)
            writer.addfile(member, io.BytesIO(payload))


def _samples_in_order(path: Path) -> list[tuple[str, str]]:
    """(tar key, source key) of each sample of a shard, in file order."""
    with tarfile.open(path) as archive:
        return [
            (member.name.split(".")[0], archive.extractfile(member).read().decode())
            for member in archive
            if member.name.endswith(".key.txt")
        ]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_corrupt_label_or_cached_latent_is_skipped_and_counted_exactly(shard_dirs, tmp_path, num_workers):
    """Non-image members are data too: a garbage label and truncated cached latents make their
    samples corrupt like a damaged PNG. Each is skipped with one warning naming it, counted once
    each time it is met, and the stream goes on with the other samples."""
    urls = [Path(url) for url in expand_shard_urls(str(shard_dirs["cached"]))[:2]]
    samples = [_samples_in_order(url) for url in urls]
    # Neither is the last sample of its shard, so with in-order reading (shuffle_buffer=1) each is
    # met in a pass before that pass's last good sample completes the pass's last batch.
    (label_tar_key, label_key), (latent_tar_key, latent_key) = samples[0][0], samples[1][2]
    with tarfile.open(urls[1]) as archive:
        latents = archive.extractfile(f"{latent_tar_key}.{shard_format.LATENTS}").read()
    shards = [tmp_path / "bad-label.tar", tmp_path / "bad-latent.tar"]
    _replace_member(urls[0], shards[0], f"{label_tar_key}.{shard_format.LABEL}", b"\xff\xfe\x07\x00")
    _replace_member(
        urls[1], shards[1], f"{latent_tar_key}.{shard_format.LATENTS}", latents[: len(latents) // 2]
    )
    good_keys = {key for shard in samples for _, key in shard} - {label_key, latent_key}
    assert len(good_keys) == 14

    # Batches of 7, 4 of them: two passes over the 14 good samples. With two workers each reads
    # one shard (7 good samples), so each makes two batches: two passes over its shard too.
    passes = 2
    stream = make_train_stream(
        [str(shard) for shard in shards], batch_size_per_rank=7, num_workers=num_workers, shuffle_buffer=1,
        with_latents=True, num_batches=4,
    )  # fmt: skip
    with pytest.warns(UserWarning) if num_workers == 0 else contextlib.nullcontext() as record:
        batches = list(stream)
    keys = [key for batch in batches for key in batch.keys]
    assert sorted(keys) == sorted(list(good_keys) * passes)  # every good sample once a pass
    assert stream.num_skipped == 2 * passes  # each corrupt sample, once per pass
    assert all(batch.moments.shape == (7, 6, 4, 4) for batch in batches)
    if num_workers == 0:  # workers warn in their own process
        skips = [str(w.message) for w in record if "skipping corrupt data" in str(w.message)]
        assert len(skips) == 2 * passes
        assert sum(f"sample {label_tar_key} of {shards[0]}" in message for message in skips) == passes
        assert sum(f"sample {latent_tar_key} of {shards[1]}" in message for message in skips) == passes


def test_a_label_is_a_class_index_of_the_manifest_or_its_sample_is_corrupt(shard_dirs, tmp_path):
    """int() alone takes "-1" or "3_0" from damaged bytes, and a label past the manifest's classes
    would stop training in the class embedding: such samples are skipped and counted instead."""
    assert parse_label(b"3") == 3 and parse_label(b" 12\n") == 12
    for data in (b"-1", b"+3", b"3_0", b"3.0", b"", b"\xef\xbc\x93"):  # the last: a full-width 3
        with pytest.raises(ValueError, match="not a class index"):
            parse_label(data)
    with pytest.raises(ValueError, match="label 4 out of range: the manifest lists 4 classes"):
        parse_label(b"4", num_classes=4)

    data = tmp_path / "shards"
    shutil.copytree(shard_dirs["plain"], data)
    first = sorted(data.glob("*.tar"))[0]
    tar_key, key = _samples_in_order(first)[0]
    _replace_member(first, tmp_path / "relabelled.tar", f"{tar_key}.{shard_format.LABEL}", b"4")
    shutil.move(tmp_path / "relabelled.tar", first)
    # One batch of the other 65 samples, read in order: one pass, so the bad one is met once.
    stream = make_train_stream(
        str(data), batch_size_per_rank=NUM_IMAGES - 1, num_workers=0, shuffle_buffer=1, num_batches=1
    )
    with pytest.warns(UserWarning, match=rf"sample {tar_key} of \S*{first.name}: .*label 4 out of range"):
        (batch,) = list(stream)
    assert key not in batch.keys and stream.num_skipped == 1


def test_truncated_shard_is_skipped_after_its_readable_samples(shard_dirs, tmp_path):
    urls = expand_shard_urls(str(shard_dirs["plain"]))
    data = Path(urls[0]).read_bytes()
    (tmp_path / "truncated.tar").write_bytes(data[: len(data) // 2])
    shutil.copy(urls[1], tmp_path / "good.tar")
    errors = []
    readable = len(
        list(shard_format.iter_tar_samples(str(tmp_path / "truncated.tar"), handler=errors.append))
    )
    assert len(errors) == 1
    # Batches of one pass each (the truncated shard's readable samples and the good shard's 8),
    # read in order: 3 batches are 3 passes, each ending the truncated shard at its cut once.
    stream = make_train_stream(
        [str(tmp_path / "truncated.tar"), str(tmp_path / "good.tar")],
        batch_size_per_rank=readable + 8, num_workers=0, shuffle_buffer=1, num_batches=3,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="skipping corrupt data"):
        keys = {key for batch in stream for key in batch.keys}
    with tarfile.open(urls[0]) as archive:
        truncated_keys = {
            archive.extractfile(m).read().decode() for m in archive if m.name.endswith(".key.txt")
        }
    assert 0 < len(keys & truncated_keys) == readable < len(truncated_keys)  # its first samples only
    assert stream.num_skipped == 3


@pytest.mark.parametrize("num_workers", [0, 2])
def test_nothing_readable_stops_with_a_clear_error(tmp_path, num_workers):
    rng = np.random.default_rng(0)
    for index in range(2):
        (tmp_path / f"garbage-{index}.tar").write_bytes(rng.bytes(3000))
    stream = make_train_stream(
        str(tmp_path / "garbage-{0..1}.tar"), batch_size_per_rank=2, num_workers=num_workers, num_batches=5
    )
    # Warnings raised in worker processes do not reach pytest; the error itself does.
    warns = pytest.warns(UserWarning) if num_workers == 0 else contextlib.nullcontext()
    with pytest.raises(Exception, match="no readable samples"), warns:
        list(stream)


def test_all_samples_corrupt_stops_with_a_clear_error(tmp_path):
    with tarfile.open(tmp_path / "bad.tar", "w") as archive:
        for index in range(4):
            for suffix, data in (("png", b"\x89PNG not really"), ("cls", b"0")):
                info = tarfile.TarInfo(f"{index:04d}.{suffix}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    stream = make_train_stream(
        str(tmp_path / "bad.tar"), batch_size_per_rank=2, num_workers=0, shuffle_buffer=2
    )
    with pytest.raises(StreamError, match="in a row failed to decode"), pytest.warns(UserWarning):
        list(stream)


def test_eval_reader_yields_every_sample_once_in_order(shard_dirs, shard_of_key):
    keys = [key for batch in iter_eval_batches(str(shard_dirs["plain"]), batch_size=5) for key in batch.keys]
    assert len(keys) == NUM_IMAGES == len(set(keys))
    urls = expand_shard_urls(str(shard_dirs["plain"]))
    assert [urls.index(shard_of_key[k]) for k in keys] == sorted(urls.index(shard_of_key[k]) for k in keys)
    per_rank = [
        [key for batch in iter_eval_batches(str(shard_dirs["plain"]), batch_size=5, rank=r, world_size=2)
         for key in batch.keys]
        for r in range(2)
    ]  # fmt: skip
    assert sorted(per_rank[0] + per_rank[1]) == sorted(keys) and not set(per_rank[0]) & set(per_rank[1])


def test_pipe_urls_are_read(shard_dirs):
    url = expand_shard_urls(str(shard_dirs["plain"]))[0]
    batch = next(iter_eval_batches([f"pipe:cat {url}"], batch_size=8))
    assert len(batch) == 8


def test_fsspec_urls_are_streamed(shard_dirs):
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    urls = []
    for index, url in enumerate(expand_shard_urls(str(shard_dirs["cached"]))[:2]):
        urls.append(f"memory://stream-test/shard-{index}.tar")
        memory.pipe(urls[-1], Path(url).read_bytes())
    stream = make_train_stream(
        urls, batch_size_per_rank=4, num_workers=0, shuffle_buffer=4, with_latents=True, num_batches=6
    )
    batches = list(stream)
    assert len(batches) == 6 and stream.num_skipped == 0
    assert batches[0].moments is not None and batches[0].images.dtype == torch.uint8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_batches_are_pinned_on_cuda(shard_dirs):
    stream = make_train_stream(str(shard_dirs["plain"]), batch_size_per_rank=4, num_workers=1, num_batches=1)
    (batch,) = list(stream)
    assert batch.images.is_pinned() and batch.labels.is_pinned()


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_handles_long_names_and_detects_damage(tar_format, tmp_path):
    long_directory = "d" * 120 if tar_format != tarfile.USTAR_FORMAT else "d" * 60
    names = [f"{long_directory}/sample0.png", f"{long_directory}/sample0.cls", "sample1.png"]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as archive:
        directory = tarfile.TarInfo("a_directory")
        directory.type = tarfile.DIRTYPE
        archive.addfile(directory)  # not a regular file: skipped
        for index, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = 700 + index
            archive.addfile(info, io.BytesIO(bytes([index]) * info.size))
    data = buffer.getvalue()
    members = list(iter_tar_members(io.BytesIO(data)))
    assert [name for name, _ in members] == names
    assert [len(payload) for _, payload in members] == [700, 701, 702]
    damaged = bytearray(data)
    damaged[data.index(b"sample1.png") + 2] ^= 0x01  # a flipped bit in a header
    with pytest.raises(ShardFormatError, match="checksum"):
        list(iter_tar_members(io.BytesIO(bytes(damaged))))
    with pytest.raises(ShardFormatError, match="truncated"):
        list(iter_tar_members(io.BytesIO(data[:1800])))

    # Reading a local file with large members left in it: same names and bytes, same checks.
    path = tmp_path / "shard.tar"
    path.write_bytes(data)
    shard = LocalShard(str(path))
    with open(path, "rb") as stream:
        deferred = list(iter_tar_members(stream, defer_over=700, shard=shard))
    assert [name for name, _ in deferred] == names
    assert [type(payload) for _, payload in deferred] == [bytes, DeferredMember, DeferredMember]
    assert [member_bytes(payload) for _, payload in deferred] == [payload for _, payload in members]
    fd = shard.fd
    del deferred, shard
    gc.collect()
    with pytest.raises(OSError):  # closed with the last member that referred to it
        os.fstat(fd)
    for name, payload in [
        ("damaged.tar", bytes(damaged)),
        ("truncated.tar", data[: data.index(b"sample1.png") + 612]),  # in the last member's data
        ("no_padding.tar", data[: data.index(b"sample1.png") + 512 + 702 + 10]),  # in its padding
    ]:
        (tmp_path / name).write_bytes(payload)
        with (
            open(tmp_path / name, "rb") as stream,
            pytest.raises(ShardFormatError, match="checksum|truncated"),
        ):
            list(iter_tar_members(stream, defer_over=100, shard=LocalShard(str(tmp_path / name))))

    # A local path that is not a regular file (a FIFO) cannot be read by offset: streamed instead.
    fifo = tmp_path / "shard.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(data), daemon=True)
    writer.start()
    # Opened once, by the streaming reader (a second open would wait forever for a writer).
    samples = list(shard_format.iter_tar_samples(str(fifo), defer_over=100))
    writer.join(timeout=10)
    assert not writer.is_alive()
    assert [sorted(k for k in sample if not k.startswith("__")) for sample in samples] == [
        ["cls", "png"],
        ["png"],
    ]
    assert [sample["png"] for sample in samples] == [members[0][1], members[2][1]]  # bytes, not deferred


def test_fast_tar_checksum_equals_the_byte_sum():
    rng = np.random.default_rng(0)
    headers = [rng.integers(0, 256, 512, dtype=np.uint8).tobytes() for _ in range(200)]
    headers += [bytes(512), b"\xff" * 512]  # the extremes of the sum
    for header in headers:
        exact = sum(header[:148]) + sum(header[156:]) + 8 * 32  # the checksum field counts as spaces
        assert shard_format._header_sum_mod_65521(header) == exact % 65521


def test_a_full_dev_shm_is_named(shard_dirs, monkeypatch):
    """Workers build their batches in shared-memory slots; when /dev/shm has no room (Docker's
    64 MB default) the error says what to do."""
    from repa.data import stream as stream_module

    def no_room(*args, **kwargs):
        raise RuntimeError("unable to write to file </torch_1_2>: No space left on device (28)")

    monkeypatch.setattr(stream_module.BatchBuilder, "allocate", staticmethod(no_room))  # forked along
    stream = make_train_stream(str(shard_dirs["plain"]), batch_size_per_rank=4, num_workers=1, num_batches=1)
    with pytest.raises(StreamError, match=r"No space left.*--shm-size"):
        list(stream)


def test_worker_slots_are_reused_in_order(monkeypatch):
    import multiprocessing

    from repa.data import stream as stream_module

    semaphore = multiprocessing.get_context().Semaphore(RING_SLOTS)
    ring = stream_module._SlotRing(semaphore, local_worker=0)
    first = {"image": np.zeros((4, 4, 3), np.uint8), "moments": None, "features": None}
    slots = []
    for _ in range(2 * RING_SLOTS):
        _builder, slot = ring.take(2, first)
        slots.append(slot)
        semaphore.release()  # what the training process does once it has copied the batch out
    assert slots == list(range(RING_SLOTS)) * 2 and len(ring.slots) == RING_SLOTS
    assert all(tensor.is_shared() for slot in ring.slots for tensor in slot.values())


def test_copied_out_batches_reuse_memory_only_once_nothing_refers_to_it():
    from repa.data.stream import _RecycledBuffers

    recycled = _RecycledBuffers()
    shape = torch.Size([4, 8, 8, 3])
    batch = recycled.take("image", shape, torch.uint8)
    address = batch.data_ptr()
    del batch
    assert recycled.take("image", shape, torch.uint8).data_ptr() == address  # nothing held it: reused

    def pooled() -> set[int]:
        return {buffer.ctypes.data for buffer in recycled.idle["image"]}

    kept = {
        "view": lambda t: t.permute(0, 3, 1, 2)[:2],
        "numpy": lambda t: t.numpy(),
        "tensor": lambda t: t,
        "storage": lambda t: t.untyped_storage(),
        "a batch over it": lambda t: Batch(
            t, torch.zeros(4), None, None, ["k"] * 4, torch.zeros(4, dtype=bool)
        ),
    }
    for holder, keep in kept.items():
        batch = recycled.take("image", shape, torch.uint8)
        address = batch.data_ptr()
        held = keep(batch)
        del batch
        # every other buffer of the pool, then fresh memory: never the one still referred to
        others = [recycled.take("image", shape, torch.uint8) for _ in range(recycled.KEEP)]
        assert address not in {other.data_ptr() for other in others}, holder
        del others, held
        idle = pooled()
        assert address in idle and recycled.take("image", shape, torch.uint8).data_ptr() in idle, holder
    assert recycled.owned["image"] <= recycled.KEEP
    # More batches held than the pool keeps: fresh memory, every one distinct.
    held = [recycled.take("image", shape, torch.uint8) for _ in range(2 * recycled.KEEP)]
    assert len({batch.data_ptr() for batch in held}) == len(held)
    del held
    # Moved to shared memory in place (sent to another process): the batch keeps its contents in
    # its new memory, and the buffer it left is reused without touching them.
    batch = recycled.take("image", shape, torch.uint8)
    batch.fill_(3)
    batch.share_memory_()
    again = recycled.take("image", shape, torch.uint8)
    assert again.data_ptr() != batch.data_ptr()
    again.fill_(9)
    assert batch.is_shared() and bool((batch == 3).all())


def test_no_private_torch_api():
    """Nothing in repa/ calls into torch._C directly (private, and free to change in any torch
    release): the stream's slots and recycled buffers use public API only."""
    import re

    root = Path(__file__).resolve().parents[1] / "repa"
    private = re.compile(r"_storage_Use_Count|torch\._C\.")
    offenders = [
        f"{path.relative_to(root.parent)}:{number}"
        for path in sorted(root.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert offenders == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
def test_pin_memory_without_cuda_warns_and_streams_unpinned(shard_dirs):
    with pytest.warns(UserWarning, match="without CUDA"):
        stream = make_train_stream(
            str(shard_dirs["plain"]), batch_size_per_rank=4, num_workers=1, pin_memory=True, num_batches=2
        )
    batches = list(stream)
    assert len(batches) == 2 and not batches[0].images.is_pinned()


def test_a_batch_refuses_a_sample_of_another_shape():
    from repa.data.stream import collate

    def sample(key, size, moments=True):
        image = np.zeros((size, size, 3), np.uint8)
        return dict(image=image, label=0, moments=np.zeros((6, 4, 4)) if moments else None, features=None,
                    key=key, flipped=False)  # fmt: skip

    assert collate([sample("a", 16), sample("b", 16)]).images.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"sample b: image of shape \(8, 8, 3\), expected \(16, 16, 3\)"):
        collate([sample("a", 16), sample("b", 8)])
    with pytest.raises(ValueError, match="sample b: no moments"):
        collate([sample("a", 16), sample("b", 16, moments=False)])


def test_a_shard_cut_at_a_block_boundary_counts_its_lost_samples(shard_dirs, tmp_path):
    """A copy that stopped early at a 512-byte boundary reads as a clean, shorter tar; the
    manifest's count turns the silent loss into skipped samples, with a warning naming the shard."""
    data = tmp_path / "shards"
    shutil.copytree(shard_dirs["plain"], data)
    first = sorted(data.glob("*.tar"))[0]
    with tarfile.open(first) as archive:
        members = archive.getmembers()
    keys = list(dict.fromkeys(member.name.split(".")[0] for member in members))
    sixth = next(member for member in members if member.name.split(".")[0] == keys[5])
    assert sixth.offset % 512 == 0
    with open(first, "r+b") as handle:
        handle.truncate(sixth.offset)  # samples 6..8 cut off: 3 lost
    stream = make_train_stream(
        str(data), batch_size_per_rank=1, num_workers=0, shuffle_buffer=1, num_batches=NUM_IMAGES - 3 + 1
    )
    with pytest.warns(UserWarning, match=rf"{first.name} ended after 5 of its 8 samples"):
        batches = list(stream)
    assert len(batches) == NUM_IMAGES - 3 + 1  # one whole pass, then one sample of the next
    assert stream.num_skipped == 3


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _decoder_cases() -> dict[str, tuple[bytes, np.ndarray | None]]:
    """name -> (file bytes, the RGB array a decoder must return, or None: it must refuse them)."""
    import zlib

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)  # noise: stored in raw deflate blocks
    good = _png(rgb)
    idat = good.index(b"IDAT")
    length = int.from_bytes(good[idat - 4 : idat], "big")

    def flipped(position: int) -> bytes:
        data = bytearray(good)
        data[position] ^= 0xFF
        return bytes(data)

    # damaged image data under a recomputed CRC: only the decoder itself can notice
    payload = bytearray(good[idat + 4 : idat + 4 + length])
    for position in range(len(payload) // 2, len(payload) // 2 + 8):
        payload[position] ^= 0x5A
    recrc = zlib.crc32(b"IDAT" + bytes(payload)).to_bytes(4, "big")
    damaged_idat = good[: idat + 4] + bytes(payload) + recrc + good[idat + 8 + length :]
    jpeg = io.BytesIO()
    Image.fromarray(rgb).save(jpeg, format="JPEG")
    gray = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    gray_alpha = rng.integers(0, 256, (8, 8, 2), dtype=np.uint8)
    palette = Image.fromarray(rgb[:8, :8]).quantize(8)
    palette_png = io.BytesIO()
    palette.save(palette_png, format="PNG")
    return {
        "truncated": (good[: len(good) // 2], None),
        "truncated_in_the_header": (good[:20], None),
        "bad_crc_of_intact_ihdr": (flipped(29), None),  # the IHDR's CRC itself damaged
        # a flipped byte in the image data (stale CRC): pyspng decodes it to wrong pixels unchecked
        "bad_crc_damaged_idat": (flipped(idat + 4 + 40), None),
        "damaged_idat_with_matching_crc": (damaged_idat, None),
        "jpeg_named_png": (jpeg.getvalue(), None),
        "empty": (b"", None),
        "rgb": (good, rgb),
        "1x1": (_png(rgb[:1, :1]), rgb[:1, :1]),
        "grayscale": (_png(gray), np.repeat(gray[..., None], 3, axis=2)),
        "grayscale_alpha": (_png(gray_alpha, "LA"), np.repeat(gray_alpha[..., :1], 3, axis=2)),
        "rgba": (_png(rgba), rgba[..., :3]),  # alpha dropped, as PIL's convert("RGB")
        "palette": (palette_png.getvalue(), np.asarray(palette.convert("RGB"))),
    }


_DECODE_IN_A_SUBPROCESS = """
import json, sys
import numpy as np
from repa.data.png import decode_png
path, decoder, flip = sys.argv[1], sys.argv[2], sys.argv[3] == "flip"
try:
    image = decode_png(open(path, "rb").read(), flip=flip, decoder=decoder)
except Exception as exn:
    print(json.dumps({"refused": f"{type(exn).__name__}: {exn}"}))
else:
    np.save(path + ".npy", image)
    print(json.dumps({"contiguous": image.flags.c_contiguous}))
"""

_DECODERS = [
    "pil",
    pytest.param("pyspng", marks=pytest.mark.skipif(png.pyspng is None, reason="pyspng is not installed")),
]


@pytest.mark.parametrize("decoder", _DECODERS)
@pytest.mark.parametrize("case", list(_decoder_cases()))
def test_png_decoders_refuse_bad_data_and_decode_every_png_kind_in_a_subprocess(case, decoder, tmp_path):
    """Each input in its own process: a decoder crash (a C library's SIGSEGV) would show as the
    process's death instead of taking pytest down. Damaged data must raise (the stream counts it
    as a skip), never crash and never come out as wrong pixels; good PNGs of every colour type
    come out as the right (H, W, 3) uint8, C-contiguous, flipped or not."""
    import json
    import subprocess
    import sys

    data, expected = _decoder_cases()[case]
    path = tmp_path / "image.png"
    path.write_bytes(data)
    for flip in ("plain", "flip"):
        run = subprocess.run(
            [sys.executable, "-c", _DECODE_IN_A_SUBPROCESS, str(path), decoder, flip],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert run.returncode == 0, (
            f"{case}: the decoding process died ({run.returncode}): {run.stderr[-500:]}"
        )
        outcome = json.loads(run.stdout)
        if expected is None:
            assert "refused" in outcome, f"{case}: decoded instead of refused"
            assert outcome["refused"].startswith("ValueError"), outcome
        else:
            assert "refused" not in outcome, f"{case}: {outcome}"
            image = np.load(str(path) + ".npy")
            assert outcome["contiguous"] and image.dtype == np.uint8
            np.testing.assert_array_equal(image, expected[:, ::-1] if flip == "flip" else expected)


@pytest.mark.parametrize("decoder", _DECODERS)
def test_bad_pngs_are_counted_skips_in_a_loader_worker(tmp_path, decoder, monkeypatch):
    """The same inputs in a shard, read by a data-loader worker: every bad one a counted skip,
    the worker alive and the good ones in the batches (those of 8 x 8 px: a batch has one size)."""
    monkeypatch.setattr(png, "DECODER", decoder)  # the forked worker inherits it
    cases = {name: case for name, case in _decoder_cases().items() if name not in ("rgb", "1x1")}
    bad = [name for name, (_, expected) in cases.items() if expected is None]
    with tarfile.open(tmp_path / "cases.tar", "w") as archive:
        for index, (name, (data, _)) in enumerate(cases.items()):
            for suffix, payload in (("png", data), ("cls", b"0"), ("key.txt", name.encode())):
                info = tarfile.TarInfo(f"{index:04d}.{suffix}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    good = len(cases) - len(bad)
    stream = make_train_stream(
        str(tmp_path / "cases.tar"), batch_size_per_rank=good, num_workers=1, shuffle_buffer=1,
        num_batches=2,
    )  # fmt: skip
    batches = list(stream)
    assert [sorted(batch.keys) for batch in batches] == [sorted(set(cases) - set(bad))] * 2
    assert stream.num_skipped == 2 * len(bad)  # once per pass each
