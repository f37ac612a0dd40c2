"""repa.data.synthetic, repa.data.build, repa.data.verify and the `repa data` command (tiny sizes)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repa.cli import main
from repa.data.build import build_shards, center_crop_adm, file_sha256
from repa.data.stream import iter_eval_batches
from repa.data.synthetic import class_name, render_image, write_synthetic_dataset
from repa.data.verify import inspect_shards, verify_shards
from repa.utils.files import temporary_path
from tests.test_data_fakes import FakeEncoder, FakeTokenizer

NUM_IMAGES, RESOLUTION, NUM_CLASSES = 40, 16, 4


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    # Larger than the target so the crop has work to do.
    write_synthetic_dataset(root, num_images=NUM_IMAGES, resolution=24, num_classes=NUM_CLASSES, seed=1)
    return root


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_is_byte_identical_for_a_seed(tmp_path):
    for name in ("a", "b"):
        write_synthetic_dataset(tmp_path / name, num_images=12, resolution=16, num_classes=3, seed=5)
    write_synthetic_dataset(tmp_path / "c", num_images=12, resolution=16, num_classes=3, seed=6)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 12 and len({f.parent for f in files}) == 3
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files)


def test_synthetic_classes_are_separable_by_colour():
    """A nearest-centroid classifier on the colour of each image's most saturated pixels."""

    def histogram(index: int) -> tuple[np.ndarray, int]:
        pixels, label = render_image(index, resolution=32, num_classes=10, seed=0)
        flat = pixels.reshape(-1, 3).astype(np.float32)
        saturation = flat.max(1) - flat.min(1)
        return flat[np.argsort(saturation)[-40:]].mean(0), label

    train = [histogram(i) for i in range(200)]
    test = [histogram(i) for i in range(200, 300)]
    centroids = np.stack([np.mean([h for h, y in train if y == c], axis=0) for c in range(10)])
    correct = [np.argmin(((centroids - h) ** 2).sum(1)) == y for h, y in test]
    assert np.mean(correct) > 0.8
    # ... while images of one class still vary (position, size, background).
    assert not np.array_equal(render_image(0, resolution=32)[0], render_image(10, resolution=32)[0])


# ----------------------------------------------------------------------------- ADM crop


def test_adm_crop_without_resizing_cuts_the_centre():
    # 6 wide x 3 high, each pixel = its column index; short side 3 == resolution: no resize.
    columns = np.tile(np.arange(6, dtype=np.uint8)[None, :, None], (3, 1, 3))
    cropped = center_crop_adm(Image.fromarray(columns), 3)
    assert cropped.shape == (3, 3, 3)
    assert cropped[0, :, 0].tolist() == [1, 2, 3]  # left offset (6 - 3) // 2 = 1


def test_adm_crop_halves_with_box_filter():
    # 8x8 -> (min 8 >= 4) 4x4 -> (min 4 >= 4) 2x2: each output pixel is the mean of a 4x4 quadrant.
    # Quadrant bases 0/40/80/120 plus +4 on a checkerboard: each quadrant's mean is base + 2 exactly.
    y, x = np.mgrid[0:8, 0:8]
    values = 40 * (x // 4) + 80 * (y // 4) + 4 * ((x + y) % 2)
    image = Image.fromarray(np.repeat(values[..., None], 3, axis=2).astype(np.uint8))
    cropped = center_crop_adm(image, 2)
    assert cropped[..., 0].tolist() == [[2, 42], [82, 122]]


def test_adm_crop_bicubic_branch_sizes_and_symmetry():
    # 10x5 at resolution 4: no halving (5 < 8); bicubic to 8x4; centre columns 2..5.
    constant = Image.new("RGB", (10, 5), (17, 99, 201))
    assert (center_crop_adm(constant, 4) == np.array([17, 99, 201])).all()
    # A left-right symmetric image stays symmetric (the crop is centred).
    ramp = np.abs(np.arange(10) - 4.5).astype(np.uint8) * 25
    symmetric = Image.fromarray(np.tile(ramp[None, :, None], (5, 1, 3)).astype(np.uint8))
    cropped = center_crop_adm(symmetric, 4)
    assert cropped.shape == (4, 4, 3) and np.array_equal(cropped, cropped[:, ::-1])
    # Odd sizes: 7x5 at 2 halves once to 3x2 (floors), then crops columns 0..1.
    assert center_crop_adm(Image.new("RGB", (7, 5)), 2).shape == (2, 2, 3)


def _bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of PIL's antialiased BICUBIC resize (Keys kernel, a = -0.5), computed here
    by hand from its definition: the kernel is stretched by the downscale factor, centred on
    (i + 0.5) * scale, cut to the pixels it covers, and normalised."""

    def keys(x: float, a: float = -0.5) -> float:
        x = abs(x)
        if x < 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        return (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0

    scale = in_size / out_size
    stretch = max(scale, 1.0)
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        centre = (i + 0.5) * scale
        first = max(int(centre - 2 * stretch + 0.5), 0)
        last = min(int(centre + 2 * stretch + 0.5), in_size)
        for j in range(first, last):
            weights[i, j] = keys((j + 0.5 - centre) / stretch)
        weights[i] /= weights[i].sum()
    return weights


def test_adm_crop_bicubic_numerics_by_hand():
    # 10 wide x 6 high, a dark/bright step between columns 4 and 5, resolution 4: no halving
    # (6 < 8), bicubic to round(10 * 4 / 6) = 7 wide x 4 high, centre columns (7 - 4) // 2 = 1..4.
    step = np.where(np.arange(10) < 5, 40, 200)
    image = Image.fromarray(np.tile(step[None, :, None], (6, 1, 3)).astype(np.uint8))
    expected_row = np.clip(np.rint(_bicubic_weights(10, 7) @ step), 0, 255)[1:5]  # overshoots the step
    cropped = center_crop_adm(image, 4).astype(int)
    assert cropped.shape == (4, 4, 3)
    # PIL works in fixed point: within one level of the exact weights.
    assert np.abs(cropped - expected_row[None, :, None]).max() <= 1, (cropped[0, :, 0], expected_row)


def test_adm_crop_vertical_offset_rounds_down():
    # 4 wide x 7 high at resolution 4: no resize, rows (7 - 4) // 2 = 1..4 (not 2..5).
    rows = np.tile(np.arange(7, dtype=np.uint8)[:, None, None], (1, 4, 3))
    assert center_crop_adm(Image.fromarray(rows), 4)[:, 0, 0].tolist() == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- image folders


def test_every_image_folder_reader_sees_the_same_files(tmp_path):
    """Shard building, reference sets and latent statistics read folders with one extension list."""
    from repa.data import images
    from repa.data.build import list_image_folder
    from repa.eval.references import fingerprint, iter_image_batches
    from repa.tokenizers.stats import iter_image_folder

    folder = tmp_path / "class-a"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for index, extension in enumerate(images.IMAGE_EXTENSIONS):
        Image.fromarray(pixels).save(folder / f"{index:02d}{extension}")
    Image.fromarray(pixels).save(folder / "upper.PNG", format="PNG")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".99.png.tmp-123").write_bytes(b"a half-written file")  # what atomic writes leave
    expected = sorted([*(f"{i:02d}{e}" for i, e in enumerate(images.IMAGE_EXTENSIONS)), "upper.PNG"])

    items, class_names = list_image_folder(tmp_path)
    assert class_names == ["class-a"] and sorted(item.key for item in items) == [
        f"class-a/{n}" for n in expected
    ]
    assert [path.name for path in images.list_images(tmp_path)] == expected
    assert fingerprint(tmp_path)["files"] == len(expected)
    assert sum(len(batch) for batch in iter_image_batches(tmp_path, batch_size=4)) == len(expected)
    assert sum(len(batch) for batch in iter_image_folder(tmp_path, resolution=4, batch_size=4)) == len(
        expected
    )


# ----------------------------------------------------------------------------- build


def _labels_by_key(shards: str) -> dict[str, int]:
    labels = {}
    for batch in iter_eval_batches(shards, batch_size=16):
        labels.update(zip(batch.keys, batch.labels.tolist()))
    return labels


def test_build_from_image_folder_and_manifest_counts(image_folder, tmp_path):
    result = build_shards(
        str(image_folder), tmp_path / "shards", resolution=RESOLUTION, shard_size=16, workers=0
    )
    assert result.pattern == "train-{000000..000002}.tar" and len(result.shards_written) == 3
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["num_samples"] == NUM_IMAGES and manifest["resolution"] == RESOLUTION
    assert manifest["class_names"] == [class_name(c, NUM_CLASSES) for c in range(NUM_CLASSES)]
    assert manifest["counts_per_class"] == [NUM_IMAGES // NUM_CLASSES] * NUM_CLASSES
    assert [s["num_samples"] for s in manifest["shards"]] == [16, 16, 8]
    for shard in manifest["shards"]:
        assert file_sha256(tmp_path / "shards" / shard["name"]) == shard["sha256"]
        assert sum(shard["counts_per_class"].values()) == shard["num_samples"]
    # Every sample's class is the folder its source key names; images are RESOLUTION square.
    labels = _labels_by_key(str(tmp_path / "shards"))
    assert len(labels) == NUM_IMAGES
    assert all(manifest["class_names"][label] == key.split("/")[0] for key, label in labels.items())
    batch = next(iter_eval_batches(str(tmp_path / "shards"), batch_size=4))
    assert batch.images.shape == (4, 3, RESOLUTION, RESOLUTION) and batch.images.dtype == torch.uint8
    # Shards mix classes (fixed permutation), instead of one class per shard.
    first_shard = next(iter_eval_batches(str(tmp_path / "shards/train-000000.tar"), batch_size=16))
    assert len(set(first_shard.labels.tolist())) > 1


def test_build_is_deterministic_across_worker_counts(image_folder, tmp_path):
    one = build_shards(str(image_folder), tmp_path / "a", resolution=RESOLUTION, shard_size=16, workers=0)
    two = build_shards(str(image_folder), tmp_path / "b", resolution=RESOLUTION, shard_size=16, workers=2)
    assert one.shards_written == two.shards_written
    for name in one.shards_written:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("kind", ["csv", "json"])
def test_build_from_flat_folder_with_labels_file(tmp_path, kind):
    flat = tmp_path / "flat"
    flat.mkdir()
    table = {}
    for index in range(6):
        Image.new("RGB", (20, 18), (40 * index, 0, 0)).save(flat / f"img{index}.jpg")
        table[f"img{index}.jpg"] = ["cat", "dog"][index % 2]
    if kind == "csv":
        labels = tmp_path / "labels.csv"
        labels.write_text("filename,label\n" + "".join(f"{k},{v}\n" for k, v in table.items()))
    else:
        labels = tmp_path / "labels.json"
        labels.write_text(json.dumps(table))
    build_shards(str(flat), tmp_path / "out", resolution=8, shard_size=4, workers=0, labels_file=str(labels))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["class_names"] == ["cat", "dog"] and manifest["counts_per_class"] == [3, 3]
    labels_by_key = _labels_by_key(str(tmp_path / "out"))
    assert labels_by_key == {k: ["cat", "dog"].index(v) for k, v in table.items()}


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _encoded(colour: tuple[int, int, int], fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20), colour).save(
        buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {})
    )
    return buffer.getvalue()


def test_build_from_existing_webdataset_shards(tmp_path):
    """img2dataset-style input: jpg + json label in one shard, webp/png + cls in another."""
    (tmp_path / "in").mkdir()
    with tarfile.open(tmp_path / "in" / "part-00000.tar", "w") as archive:
        for index in range(3):
            _add(archive, f"{index:05d}.jpg", _encoded((200, 10, 10), "JPEG"))
            _add(archive, f"{index:05d}.json", json.dumps({"key": f"{index:05d}", "label": 2}).encode())
            _add(archive, f"{index:05d}.txt", b"a caption to ignore")
    with tarfile.open(tmp_path / "in" / "part-00001.tar", "w") as archive:
        for index in range(3, 5):
            fmt = "WEBP" if index == 3 else "PNG"
            _add(archive, f"{index:05d}.{fmt.lower()}", _encoded((10, 200, 10), fmt))
            _add(archive, f"{index:05d}.cls", b"0")
    result = build_shards(
        str(tmp_path / "in" / "part-{00000..00001}.tar"),
        tmp_path / "out",
        resolution=8,
        shard_size=2,
        workers=0,
    )
    assert result.num_samples == 5 and len(result.shards_written) == 3
    labels = _labels_by_key(str(tmp_path / "out"))
    assert labels == {
        **{f"part-00000.tar/{i:05d}": 2 for i in range(3)},
        **{f"part-00001.tar/{i:05d}": 0 for i in range(3, 5)},
    }
    for batch in iter_eval_batches(str(tmp_path / "out"), batch_size=5):
        green = batch.images[:, 1].float().mean((1, 2)) > 100  # the png/webp images are green
        assert green.tolist() == [key.startswith("part-00001") for key in batch.keys]
    assert verify_shards(str(tmp_path / "out")).ok
    # The folder itself (no manifest there) is read the same way; so are our own shards.
    from_folder = build_shards(str(tmp_path / "in"), tmp_path / "out2", resolution=8, shard_size=2, workers=0)
    assert from_folder.num_samples == 5
    rebuilt = build_shards(str(tmp_path / "out"), tmp_path / "out3", resolution=4, shard_size=5, workers=0)
    assert rebuilt.num_samples == 5 and _labels_by_key(str(tmp_path / "out3"))


def test_build_caches_moments_of_image_and_mirror_and_features(image_folder, tmp_path):
    tokenizer, encoder = FakeTokenizer(), FakeEncoder()
    build_shards(
        str(image_folder), tmp_path, resolution=RESOLUTION, shard_size=16, workers=0,
        tokenizer=tokenizer, encoder=encoder, cache_flipped_features=True, latent_dtype="float16",
        encode_batch_size=3,  # 16 per shard: batches of 3, 3, 3, 3, 3 and 1
    )  # fmt: skip
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["latent_shape"] == [6, 4, 4] and manifest["feature_shape"] == [4, 3]
    assert manifest["options"]["cache_latents"] == "fake-tokenizer"
    urls = [str(tmp_path / s["name"]) for s in manifest["shards"]]
    for batch in iter_eval_batches(urls, batch_size=8, with_latents=True, with_features=True):
        assert batch.moments.dtype == torch.float32 and batch.features.dtype == torch.float16
        expected = tokenizer.encode_moments(batch.images)
        torch.testing.assert_close(batch.moments, expected.half().float())
        torch.testing.assert_close(batch.features, encoder(batch.images).half())
    # The flipped caches belong to the mirrored image.
    from repa.data.shards import iter_tar_samples, load_npy
    from repa.data.stream import decode_png

    sample = next(iter_tar_samples(urls[0]))
    mirrored = (
        torch.from_numpy(decode_png(sample["png"]).copy()).permute(2, 0, 1).flip(-1)[None]
    )  # (1, 3, H, W)
    flipped_moments = torch.from_numpy(load_npy(sample["latent_flip.npy"]).copy()).float()
    torch.testing.assert_close(flipped_moments, tokenizer.encode_moments(mirrored)[0].half().float())
    flipped_features = torch.from_numpy(load_npy(sample["features_flip.npy"]).copy())
    torch.testing.assert_close(flipped_features, encoder(mirrored)[0].half())


def test_build_with_registered_pixels_tokenizer(image_folder, tmp_path):
    tokenizers = pytest.importorskip("repa.tokenizers")
    tokenizer = tokenizers.create_tokenizer("pixels")
    build_shards(
        str(image_folder), tmp_path, resolution=RESOLUTION, shard_size=40, workers=0, tokenizer=tokenizer
    )
    batch = next(iter_eval_batches(str(tmp_path), batch_size=4, with_latents=True))
    assert batch.moments.shape[0] == 4 and batch.moments.shape[1] % 2 == 0
    assert verify_shards(str(tmp_path)).ok


def test_interrupted_build_leaves_no_partial_shard_and_resumes(image_folder, tmp_path):
    out = tmp_path / "out"
    # Crash while encoding the second shard (call 1 is the size estimate's, calls 2-3 are shard
    # 0: image and mirror).
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_shards(
            str(image_folder), out, resolution=RESOLUTION, shard_size=16, workers=0,
            tokenizer=FakeTokenizer(fail_on_call=4),
        )  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["train-000000.json", "train-000000.tar"]
    resumed = build_shards(
        str(image_folder), out, resolution=RESOLUTION, shard_size=16, workers=0, tokenizer=FakeTokenizer()
    )
    assert resumed.shards_skipped == ["train-000000.tar"]
    assert resumed.shards_written == ["train-000001.tar", "train-000002.tar"]
    # A damaged shard is rebuilt; an intact one is kept; leftover temporary files are removed:
    # the names the atomic-write helper gives a killed process's shard and sidecar, and the
    # names of builds before it.
    good = (out / "train-000002.tar").read_bytes()
    with open(out / "train-000001.tar", "r+b") as handle:
        handle.truncate(1000)
    leftovers = [temporary_path(out / name) for name in ("train-000002.tar", "train-000002.json")]
    for leftover in [*leftovers, out / "train-000002.tar.tmp-99999"]:
        leftover.with_name(leftover.name.replace(f"tmp-{os.getpid()}", "tmp-99999")).write_bytes(b"partial")
    again = build_shards(
        str(image_folder), out, resolution=RESOLUTION, shard_size=16, workers=0, tokenizer=FakeTokenizer()
    )
    assert again.shards_written == ["train-000001.tar"]
    assert (out / "train-000002.tar").read_bytes() == good
    assert not list(out.glob("*.tmp-*"))
    assert verify_shards(str(out)).ok
    # Different options change the fingerprint: everything is rebuilt.
    other = build_shards(str(image_folder), out, resolution=RESOLUTION, shard_size=16, workers=0)
    assert len(other.shards_written) == 3


def test_bad_build_arguments_are_refused_before_anything_is_written(image_folder, tmp_path):
    with pytest.raises(FileNotFoundError):
        build_shards(str(tmp_path / "no-such-folder"), tmp_path / "out", resolution=RESOLUTION)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="workers must be 0"):
        build_shards(str(image_folder), tmp_path / "out", resolution=RESOLUTION, workers=-1)
    with pytest.raises(ValueError, match="must be positive"):
        build_shards(str(image_folder), tmp_path / "out", resolution=RESOLUTION, encode_batch_size=0)
    assert not (tmp_path / "out").exists()
    assert verify_shards(str(tmp_path / "typo")).problems == [f"{tmp_path / 'typo'}: no such file or folder"]


def test_crash_while_writing_a_shard_leaves_no_file_under_its_name(image_folder, tmp_path, monkeypatch):
    from repa.data import build

    calls = []
    original = build._add_member

    def failing_add_member(archive, name, data):
        calls.append(name)
        if len(calls) == 20:  # inside the first shard's tar, after a few samples
            raise OSError("simulated crash while writing")
        original(archive, name, data)

    monkeypatch.setattr(build, "_add_member", failing_add_member)
    with pytest.raises(OSError, match="simulated crash"):
        build_shards(str(image_folder), tmp_path, resolution=RESOLUTION, shard_size=16, workers=0)
    assert not list(tmp_path.glob("*.tar")) and not list(tmp_path.glob("*.tmp-*"))


# ----------------------------------------------------------------------------- verify / inspect / CLI


def test_verify_detects_a_tampered_shard(image_folder, tmp_path):
    build_shards(str(image_folder), tmp_path, resolution=RESOLUTION, shard_size=16, workers=0)
    assert verify_shards(str(tmp_path)).ok
    assert verify_shards(str(tmp_path / "train-{000000..000002}.tar")).ok
    path = tmp_path / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF  # inside the first member's data (after its 512-byte header): a PNG byte
    path.write_bytes(bytes(data))
    report = verify_shards(str(tmp_path))
    assert not report.ok
    assert any("train-000001.tar: sha256" in problem for problem in report.problems)
    assert any("good samples, manifest says 16" in problem for problem in report.problems)
    assert main(["data", "verify", str(tmp_path)]) == 1
    # A pattern that misses a listed shard is reported too.
    assert not verify_shards(str(tmp_path / "train-{000000..000001}.tar")).ok


def test_cli_synthetic_build_verify_inspect(tmp_path, capsys):
    assert main(["data", "synthetic", str(tmp_path / "img"), "--num-images", "12", "--resolution", "16",
                 "--num-classes", "3"]) == 0  # fmt: skip
    assert main(["data", "build", str(tmp_path / "img"), str(tmp_path / "sh"), "--resolution", "16",
                 "--shard-size", "5", "--workers", "0"]) == 0  # fmt: skip
    assert "train-{000000..000002}.tar" in capsys.readouterr().out
    assert main(["data", "verify", str(tmp_path / "sh")]) == 0
    grid = tmp_path / "grid.png"
    assert main(["data", "inspect", str(tmp_path / "sh"), "--grid", str(grid), "--num-images", "6"]) == 0
    summary = capsys.readouterr().out
    assert "samples         12" in summary and grid.exists()
    with Image.open(grid) as image:
        assert image.size == (3 * 18, 2 * 18)  # 6 images of 16 px + 2 px gaps, 3 columns
    assert inspect_shards(str(tmp_path / "sh"), grid_path=None).count("\n") > 5
    assert os.path.exists(tmp_path / "sh" / "manifest.json")


@pytest.mark.slow
def test_build_split_over_two_processes_matches_one_process(image_folder, tmp_path):
    """torchrun with 2 processes: each builds (and encodes) its shards, rank 0 writes the manifest;
    the same bytes as one process."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "repa", "data", "build", str(image_folder), str(tmp_path / "two"),
        "--resolution", str(RESOLUTION), "--shard-size", "8", "--workers", "0", "--cache-latents", "pixels",
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.count("(3 shards written") + completed.stdout.count("(2 shards written") == 2
    from repa.tokenizers import create_tokenizer

    build_shards(
        str(image_folder), tmp_path / "one", resolution=RESOLUTION, shard_size=8, workers=0,
        tokenizer=create_tokenizer("pixels"),
    )  # fmt: skip
    two = json.loads((tmp_path / "two" / "manifest.json").read_text())
    one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert two["shards"] == one["shards"] and two["num_samples"] == NUM_IMAGES
    assert verify_shards(str(tmp_path / "two")).ok
