# ruff: noqa: F811 (fixtures imported from the training tests are parameters here)
"""Read only what the step needs: the method declares its batch fields, the loop passes them to
the stream, and the stream never reads the rest; repa's shards read by webdataset itself."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from repa.data import shards as shard_format
from repa.data.shards import DeferredMember, expand_shard_urls
from repa.data.stream import StreamError, iter_eval_batches, make_train_stream, png_decoder
from repa.train.logging import read_metrics
from repa.train.loop import train
from tests.test_train import RESOLUTION, encoder_file, tiny_config  # noqa: F401 (a fixture)
from tests.test_train_repae import vae_file  # noqa: F401 (fixture)

GARBAGE_PNG = b"\x89PNG\r\n\x1a\n this is no image at all"


def _replace_pngs(folder: Path) -> int:
    """Every PNG member of every shard replaced by garbage (the manifest's sha256 then no longer
    match, which only `repa data verify` checks). Returns how many were replaced."""
    replaced = 0
    for url in expand_shard_urls(str(folder)):
        with tarfile.open(url) as archive:
            members = [(member, archive.extractfile(member).read()) for member in archive]
        with tarfile.open(url, "w") as archive:
            for member, data in members:
                if member.name.endswith(f".{shard_format.IMAGE}"):
                    data, member.size = GARBAGE_PNG, len(GARBAGE_PNG)
                    replaced += 1
                archive.addfile(member, io.BytesIO(data))
    return replaced


@pytest.fixture(scope="module")
def cached_garbage_shards(tmp_path_factory, vae_file, encoder_file):
    """32 samples with latents and features cached by the test run's own tokenizer and encoder
    (so the loop uses the caches), whose PNG members are then all replaced by garbage."""
    from repa.data.build import build_shards
    from repa.data.synthetic import write_synthetic_dataset
    from repa.encoders import create_encoder
    from repa.tokenizers import create_tokenizer

    root = tmp_path_factory.mktemp("garbage")
    write_synthetic_dataset(root / "images", num_images=32, resolution=RESOLUTION, num_classes=4, seed=0)
    tokenizer = create_tokenizer(vae_file, resolution=RESOLUTION).eval()
    encoder = create_encoder(encoder_file, resolution=RESOLUTION).eval()
    with torch.no_grad():
        build_shards(
            str(root / "images"), root / "shards", resolution=RESOLUTION, shard_size=4, workers=0,
            tokenizer=tokenizer, encoder=encoder,
        )  # fmt: skip
    assert _replace_pngs(root / "shards") == 32
    return root / "shards"


def repa_config(shards, output_dir, encoder, vae, **run):
    config = tiny_config(str(shards), output_dir, encoder=encoder, **run)
    config.model.name = "SiT-S/2"  # 8x8 latents of the f2 VAE -> 4x4 tokens, like the encoder's
    config.run.method = "repa"
    config.tokenizer.tokenizer = vae
    config.data.num_workers = 2
    return config


def test_cached_latents_and_features_train_without_reading_a_png(
    cached_garbage_shards,
    encoder_file,
    vae_file,
    tmp_path,
    capsys,
):
    run = train(
        repa_config(cached_garbage_shards, tmp_path / "cached", encoder_file, vae_file,
                    max_train_steps=4, checkpointing_steps=4)
    )  # fmt: skip
    assert "latents cached in the shards, encoder tokens cached in the shards; images not read" in (
        capsys.readouterr().out
    )
    records = read_metrics(run.run_dir)
    assert [record["step"] for record in records] == [1, 2, 3, 4]
    assert all(record["data_skipped"] == 0 for record in records)  # not one skip
    assert all(np.isfinite(record["loss"]) for record in records)


def test_the_same_shards_with_the_encoder_on_the_fly_skip_everything_and_stop(
    cached_garbage_shards,
    encoder_file,
    vae_file,
    tmp_path,
    capsys,
):
    config = repa_config(cached_garbage_shards, tmp_path / "fly", encoder_file, vae_file, max_train_steps=4)
    config.data.use_cached_features = False  # the encoder runs on the images: they must be decoded
    failed = r"samples in a row failed to decode \(.*reading labels, images, latents\).*last error: .*PNG"
    with pytest.raises(StreamError, match=failed):
        train(config)
    decoder = png_decoder()  # declared in the run's output
    assert f"encoder tokens computed every step; images decoded by {decoder}" in capsys.readouterr().out


def test_the_stream_reads_no_member_it_was_not_asked_for(cached_garbage_shards, monkeypatch):
    """Asked for the latents only, the stream reads neither the (garbage) PNGs nor the features:
    each sample's deferred reads are its latents and its source key."""
    reads = []
    read = DeferredMember.read
    monkeypatch.setattr(DeferredMember, "read", lambda self: reads.append(self.size) or read(self))
    stream = make_train_stream(
        str(cached_garbage_shards), batch_size_per_rank=4, num_workers=0, shuffle_buffer=4,
        fields={"latents"}, num_batches=8,
    )  # fmt: skip
    stream.dataset.defer_over = 16  # every member but the label is left in the file until read
    batches = list(stream)
    assert stream.num_skipped == 0 and len(batches) == 8
    assert all(b.images is None and b.features is None and b.moments.shape == (4, 8, 8, 8) for b in batches)
    assert len(reads) == 2 * 4 * 8
    assert len(GARBAGE_PNG) not in reads  # no PNG member was read
    features = make_train_stream(
        str(cached_garbage_shards), batch_size_per_rank=4, num_workers=1, fields={"latents", "features"},
        num_batches=3,
    )  # fmt: skip
    batches = list(features)
    assert features.num_skipped == 0 and batches[0].features.dtype == torch.float16
    assert batches[0].images is None and batches[0].labels.shape == (4,)


def test_fields_are_checked(cached_garbage_shards):
    with pytest.raises(ValueError, match=r"unknown batch field\(s\) \['depth'\]"):
        make_train_stream(str(cached_garbage_shards), batch_size_per_rank=2, fields={"images", "depth"})
    with pytest.raises(ValueError, match="not both"):
        make_train_stream(
            str(cached_garbage_shards), batch_size_per_rank=2, fields={"images"}, with_latents=True
        )


def test_each_method_declares_the_fields_its_step_reads():
    from repa.train.methods.denoising import DenoisingMethod
    from repa.train.methods.repae import REPAEMethod

    def method(cls, encoders: int, text: bool = False):
        instance = cls.__new__(cls)  # only what batch_fields looks at
        instance.encoders = [object()] * encoders
        instance.teacher_attention = None  # HASTE's attention distillation (needs images) is off
        instance.text_conditioned = text
        return instance

    both, latents, features, none = (
        frozenset({"latents", "features"}), frozenset({"latents"}), frozenset({"features"}), frozenset()
    )  # fmt: skip
    repa, sit = method(DenoisingMethod, 1), method(DenoisingMethod, 0)
    assert repa.batch_fields(both) == both  # REPA on cached latents and features: no images
    assert repa.batch_fields(latents) == {"latents", "images"}  # the encoder runs on the images
    assert repa.batch_fields(features) == {"features", "images"}  # the tokenizer encodes them
    assert repa.batch_fields(none) == {"images"}
    assert sit.batch_fields(both) == latents  # SiT reads no features
    assert sit.batch_fields(none) == {"images"}
    text_sit = method(DenoisingMethod, 0, text=True)
    assert text_sit.batch_fields(latents) == {"latents", "text"}  # the cached caption tokens
    repae = method(REPAEMethod, 1)
    assert repae.batch_fields(both) == {"images", "features"}  # trains the VAE on the images
    assert repae.batch_fields(none) == {"images"}


def test_webdataset_reads_repa_shards_like_repa(cached_garbage_shards, tmp_path):
    """Users can bring their own webdataset tooling: `webdataset.WebDataset` finds the same
    samples, keys, labels and cached arrays in repa's shards as repa's reader (and the same
    pixels, on shards with real images)."""
    webdataset = pytest.importorskip("webdataset")
    from repa.data.build import build_shards
    from repa.data.synthetic import write_synthetic_dataset
    from tests.test_data_fakes import FakeTokenizer

    write_synthetic_dataset(tmp_path / "images", num_images=10, resolution=RESOLUTION, num_classes=3)
    build_shards(
        str(tmp_path / "images"), tmp_path / "shards", resolution=RESOLUTION, shard_size=4, workers=0,
        tokenizer=FakeTokenizer(),
    )  # fmt: skip
    for folder, images in ((tmp_path / "shards", True), (cached_garbage_shards, False)):
        urls = expand_shard_urls(str(folder))
        features = not images  # the garbage shards hold features, their PNGs nothing to compare
        ours = list(
            iter_eval_batches(
                urls, batch_size=1, with_latents=True, with_features=features, with_images=images
            )
        )
        dataset = webdataset.WebDataset(urls, shardshuffle=False)
        theirs = list(dataset.decode("rgb8") if images else dataset.decode())
        assert len(theirs) == len(ours) > 0
        for batch, sample in zip(ours, theirs):
            assert sample["key.txt"] == batch.keys[0]
            assert sample["cls"] == batch.labels[0].item()
            np.testing.assert_array_equal(sample["latent.npy"], batch.moments[0].numpy())
            assert sample["latent_flip.npy"].shape == sample["latent.npy"].shape
            if features:
                assert sample["features.npy"].dtype == np.float16
                np.testing.assert_array_equal(sample["features.npy"], batch.features[0].numpy())
            else:
                np.testing.assert_array_equal(sample["png"], batch.images[0].permute(1, 2, 0).numpy())
