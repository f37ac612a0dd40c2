"""`repa data verify` and `repa data inspect`: check shards against their manifest, and look at them."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from repa.data import shards as fmt


@dataclass
class VerifyReport:
    num_shards: int = 0
    num_samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _url_sha256(url: str) -> str:
    digest = hashlib.sha256()
    with fmt.open_url(url) as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _shard_folder(manifest_path: str) -> str:
    return manifest_path.rsplit("/", 1)[0] if "/" in manifest_path else "."


def verify_shards(shards: str) -> VerifyReport:
    """Decode every sample and check counts, classes, cache shapes and sha256 against the manifest."""
    from repa.data.stream import decode_sample

    report = VerifyReport()
    manifest_path = fmt.locate_manifest(shards)
    if manifest_path is None:
        local = not fmt.is_remote(shards) and "{" not in shards and "::" not in shards  # one path
        if local and not Path(shards.removeprefix("file://")).exists():
            report.problems.append(f"{shards}: no such file or folder")
        else:
            report.problems.append(f"{shards}: no {fmt.MANIFEST_NAME} found beside the shards")
        return report
    try:
        manifest = fmt.read_manifest(manifest_path)
    except (OSError, ValueError) as exn:
        report.problems.append(f"{manifest_path}: unreadable manifest: {exn}")
        return report
    folder = _shard_folder(manifest_path)
    listed = [f"{folder}/{entry['name']}" for entry in manifest["shards"]]
    if not shards.endswith(".json") and not Path(shards).is_dir():
        given = fmt.expand_shard_urls(shards)
        names_given = {url.rsplit("/", 1)[-1] for url in given}
        names_listed = {entry["name"] for entry in manifest["shards"]}
        for name in sorted(names_given - names_listed):
            report.problems.append(f"{name}: matches the pattern but is not in the manifest")
        for name in sorted(names_listed - names_given):
            report.problems.append(f"{name}: in the manifest but not matched by the pattern")

    fields = manifest["fields"]
    resolution, num_classes = manifest["resolution"], manifest["num_classes"]
    with_latents, with_features = "latents" in fields, "features" in fields
    class_counts: Counter[int] = Counter()
    for url, entry in zip(listed, manifest["shards"]):
        report.num_shards += 1
        try:
            digest = _url_sha256(url)
        except OSError as exn:
            report.problems.append(f"{entry['name']}: cannot read: {exn}")
            continue
        if digest != entry["sha256"]:
            report.problems.append(
                f"{entry['name']}: sha256 {digest[:12]}... != manifest {entry['sha256'][:12]}..."
            )
        count = 0
        errors: list[Exception] = []
        for sample in fmt.iter_tar_samples(
            url, handler=lambda exn, errors=errors: errors.append(exn) or True
        ):
            try:
                decoded = decode_sample(
                    sample, flip=False, with_latents=with_latents, with_features=with_features
                )
                _check_sample(decoded, manifest, sample, resolution, num_classes)
                if with_latents:
                    _check_sample(
                        decode_sample(sample, flip=True, with_latents=True, with_features=False),
                        manifest, sample, resolution, num_classes,
                    )  # fmt: skip
            except Exception as exn:  # noqa: BLE001 (report every kind of damage, keep going)
                errors.append(exn)
                continue
            count += 1
            class_counts[decoded["label"]] += 1
        for exn in errors[:5]:
            report.problems.append(f"{entry['name']}: {exn!r}")
        if len(errors) > 5:
            report.problems.append(f"{entry['name']}: ... and {len(errors) - 5} more errors")
        if count != entry["num_samples"]:
            report.problems.append(
                f"{entry['name']}: {count} good samples, manifest says {entry['num_samples']}"
            )
        report.num_samples += count
    if report.num_samples != manifest["num_samples"]:
        report.problems.append(
            f"total: {report.num_samples} good samples, manifest says {manifest['num_samples']}"
        )
    expected = {i: n for i, n in enumerate(manifest["counts_per_class"]) if n}
    if dict(class_counts) != expected:
        diffs = [
            f"class {c}: {class_counts.get(c, 0)} vs {expected.get(c, 0)}"
            for c in sorted(set(class_counts) | set(expected))
            if class_counts.get(c, 0) != expected.get(c, 0)
        ]
        report.problems.append("counts per class differ from the manifest: " + ", ".join(diffs[:10]))
    return report


def _check_sample(
    decoded: dict[str, Any],
    manifest: dict[str, Any],
    sample: dict[str, Any],
    resolution: int,
    num_classes: int,
) -> None:
    where = f"sample {sample.get('__key__')}"
    if tuple(decoded["image"].shape) != (resolution, resolution, 3):
        raise ValueError(
            f"{where}: image shape {tuple(decoded['image'].shape)} != ({resolution}, {resolution}, 3)"
        )
    if not 0 <= decoded["label"] < num_classes:
        raise ValueError(f"{where}: class {decoded['label']} outside [0, {num_classes})")
    for name, shape_key in (("moments", "latent_shape"), ("features", "feature_shape")):
        value = decoded[name]
        if value is not None:
            if list(value.shape) != manifest[shape_key]:
                raise ValueError(f"{where}: {name} shape {list(value.shape)} != {manifest[shape_key]}")
            if not np.isfinite(value).all():
                raise ValueError(f"{where}: non-finite {name}")


def inspect_shards(shards: str, grid_path: str | None = "inspect_grid.png", num_images: int = 64) -> str:
    """A text summary of a shard set; also writes a grid of its first `num_images` images."""
    from PIL import Image

    from repa.data.stream import iter_eval_batches

    lines = []
    manifest_path = fmt.locate_manifest(shards)
    manifest = fmt.read_manifest(manifest_path) if manifest_path else None
    if manifest is not None:
        counts = manifest["counts_per_class"]
        nonzero = [n for n in counts if n]
        lines += [
            f"manifest        {manifest_path}",
            f"shards          {manifest['num_shards']}  ({manifest['pattern']})",
            f"samples         {manifest['num_samples']}",
            f"resolution      {manifest['resolution']}",
            f"classes         {manifest['num_classes']}  (per class: min {min(nonzero, default=0)}, "
            f"max {max(nonzero, default=0)}, empty {len(counts) - len(nonzero)})",
            f"class names     {', '.join(manifest['class_names'][:8])}"
            + (" ..." if manifest["num_classes"] > 8 else ""),
            f"fields          {', '.join(f'{k}={v}' for k, v in manifest['fields'].items())}",
            f"latent shape    {manifest['latent_shape']}",
            f"feature shape   {manifest['feature_shape']}",
            f"shard bytes     {sum(s['bytes'] for s in manifest['shards']) / 2**20:.1f} MiB",
            f"options         {manifest['options']}",
        ]
    else:
        lines.append(f"{shards}: no manifest; summary of the samples read only")
    # A few samples from each of up to 8 evenly spaced shards, so the grid shows the whole set.
    urls = fmt.expand_shard_urls(shards)
    picked = [urls[round(i * (len(urls) - 1) / 7)] for i in range(8)] if len(urls) > 8 else urls
    per_shard = math.ceil(num_images / len(picked))
    images, labels = [], []
    for url in dict.fromkeys(picked):
        batch = next(iter_eval_batches([url], batch_size=per_shard), None)
        if batch is not None:
            images.extend(batch.images.permute(0, 2, 3, 1).numpy())  # (H, W, 3) each
            labels.extend(batch.labels.tolist())
    images, labels = images[:num_images], labels[:num_images]
    lines.append(
        f"grid samples    {len(images)} from {len(set(picked))} shard(s); classes {sorted(set(labels))[:16]}"
    )
    if grid_path and images:
        columns = math.ceil(math.sqrt(len(images)))
        rows = math.ceil(len(images) / columns)
        height, width = images[0].shape[:2]
        grid = np.zeros((rows * (height + 2), columns * (width + 2), 3), dtype=np.uint8)
        for position, image in enumerate(images):
            top, left = (position // columns) * (height + 2), (position % columns) * (width + 2)
            grid[top : top + height, left : left + width] = image
        Image.fromarray(grid).save(grid_path)
        lines.append(f"grid            {grid_path} ({rows}x{columns})")
    return "\n".join(lines)
