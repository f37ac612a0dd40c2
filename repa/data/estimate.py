"""The size of a `repa data build` before it starts, and the refusal of one that does not fit.

Cached encoder tokens are large next to the images they come from (DINOv2-B at 256 px: 256 x 768
fp16 = 384 KiB per image, about 0.5 TB for ImageNet, against roughly 100 KiB of PNG), so the
command prints the expected size of each component first and refuses a build whose missing
shards would not fit on the output's device (`--ignore-disk-space` builds anyway).

The estimate follows the shard layout: every tar member is a 512-byte header plus its data in
whole 512-byte blocks. Label and key members are sized exactly, PNGs from `ESTIMATE_IMAGES`
images spread over the source, and the cached arrays from what the tokenizer and encoder return
for one image (their shapes do not depend on the image); captions exactly, and their cached text
embeddings from one caption's (every caption is padded to the encoder's length).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from repa.data import shards as fmt
from repa.data.build import SourceItem, _model_name, _prepare_image, _run_batched, encode_captions

TAR_BLOCK, TAR_RECORD = 512, 10240  # tarfile's block and record sizes (stream mode pads to a record)
ESTIMATE_IMAGES = 32  # images PNG-encoded to estimate the image bytes
SIDECAR_BYTES, MANIFEST_BYTES_PER_SHARD = 600, 300  # about, per shard


class InsufficientDiskSpaceError(OSError):
    """The estimated output does not fit in the free space of the output folder's device."""


def tar_member_size(data_bytes: int) -> int:
    """A tar member's bytes: its 512-byte header and its data padded to whole blocks."""
    return TAR_BLOCK + -(-data_bytes // TAR_BLOCK) * TAR_BLOCK


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


@dataclass
class SizeEstimate:
    """Expected bytes of a build, per component (each with its tar headers)."""

    num_samples: int
    num_shards: int
    resolution: int
    components: dict[str, int]  # what -> bytes over all samples
    overhead: int  # every shard's end-of-archive blocks and record padding, sidecars, manifest
    missing: float  # fraction of the samples whose shard is not on disk yet
    sampled_images: int  # images PNG-encoded for the estimate

    @property
    def total(self) -> int:
        return sum(self.components.values()) + self.overhead

    @property
    def to_write(self) -> int:
        return round(self.total * self.missing)

    def describe(self, free: int | None = None) -> str:
        lines = [
            f"estimated output: {self.num_samples} samples in {self.num_shards} shards at {self.resolution} "
            f"px (PNG sizes from {self.sampled_images} images)"
        ]
        for what, size in [*self.components.items(), ("tar padding, sidecars, manifest", self.overhead)]:
            per_image = human_size(size / max(self.num_samples, 1))
            lines.append(f"  {what:<56} {human_size(size):>10}  ({per_image} per image)")
        lines.append(f"  {'total':<56} {human_size(self.total):>10}")
        if self.missing < 1:
            lines.append(f"  {'still to write':<56} {human_size(self.to_write):>10}")
        if free is not None:
            lines.append(f"  {'free on the output device':<56} {human_size(free):>10}")
        return "\n".join(lines)


def estimate_build_size(
    items: list[SourceItem],
    *,
    resolution: int,
    shard_size: int,
    tokenizer: Any = None,
    encoder: Any = None,
    latent_dtype: str = "float32",
    cache_flipped_features: bool = False,
    text_encoder: Any = None,
    missing: float = 1.0,
) -> SizeEstimate:
    """The bytes each component of a build of `items` will take (see the module docstring)."""
    step = max(1, len(items) // ESTIMATE_IMAGES)
    probes = items[::step][:ESTIMATE_IMAGES]
    prepared = [_prepare_image((item, resolution, index == 0)) for index, item in enumerate(probes)]
    png = sum(tar_member_size(len(data)) for data, _ in prepared) / len(prepared)
    labels_and_keys = sum(
        tar_member_size(len(str(item.label).encode())) + tar_member_size(len(item.key.encode()))
        for item in items
    )
    components = {"images (PNG, label, key)": round(png * len(items)) + labels_and_keys}
    one = prepared[0][1][None].copy()  # uint8 (1, R, R, 3), writable for torch
    if tokenizer is not None:
        moments = _run_batched(tokenizer, tokenizer.encode_moments, one, 1, latent_dtype)[0]  # (2C, h, w)
        shape = "x".join(map(str, moments.shape))
        what = f"latents {_model_name(tokenizer)} {latent_dtype} {shape}, and of the mirror"
        components[what] = 2 * tar_member_size(len(fmt.npy_bytes(moments))) * len(items)
    if encoder is not None:
        tokens = _run_batched(encoder, encoder, one, 1, np.float16)[0]  # (T, D)
        shape = "x".join(map(str, tokens.shape))
        copies = 2 if cache_flipped_features else 1
        mirror = ", and of the mirror" if copies > 1 else ""
        what = f"features {_model_name(encoder)} float16 {shape}{mirror}"
        components[what] = copies * tar_member_size(len(fmt.npy_bytes(tokens))) * len(items)
    if items[0].captions:
        captions = sum(tar_member_size(len(json.dumps(list(item.captions)).encode())) for item in items)
        components["captions (JSON)"] = captions
    if text_encoder is not None:
        embeddings, _ = encode_captions(text_encoder, [items[0].captions[0]], 1)  # (1, L, D)
        length, width = embeddings.shape[1:]
        per_count: dict[int, int] = {}  # captions per image -> bytes of its two members
        for count in {len(item.captions) for item in items}:
            per_count[count] = tar_member_size(
                len(fmt.npy_bytes(np.zeros((count, length, width), np.float16)))
            ) + tar_member_size(len(fmt.npy_bytes(np.zeros((count, length), bool))))
        what = f"text {_model_name(text_encoder)} float16 {length}x{width} per caption, and its mask"
        components[what] = sum(per_count[len(item.captions)] for item in items)
    num_shards = -(-len(items) // shard_size)
    # Stream mode ends a shard with two zero blocks and pads it to a whole record (half a record
    # on average).
    per_shard = 2 * TAR_BLOCK + TAR_RECORD // 2 + SIDECAR_BYTES + MANIFEST_BYTES_PER_SHARD
    return SizeEstimate(
        len(items), num_shards, resolution, components, num_shards * per_shard, missing, len(prepared)
    )


def check_disk_space(
    items: list[SourceItem],
    output_dir: Path,
    prefix: str,
    *,
    shard_size: int,
    report: Callable[[SizeEstimate, int], None] | None = None,
    ignore: bool = False,
    **options: Any,
) -> SizeEstimate | None:
    """Estimate the build, give it to `report(estimate, free bytes)`, and raise
    InsufficientDiskSpaceError when the shards not on disk yet would not fit (unless `ignore`).
    Every rank of a distributed build counts all missing shards: on a shared file system they
    fill one device. Returns None, estimating nothing, when every shard is there and no one asks."""
    num_shards = -(-len(items) // shard_size)
    missing_samples = sum(
        min(shard_size, len(items) - index * shard_size)
        for index in range(num_shards)
        if not (output_dir / fmt.shard_name(prefix, index)).exists()
    )
    if not missing_samples and report is None:
        return None
    estimate = estimate_build_size(
        items, shard_size=shard_size, missing=missing_samples / len(items), **options
    )
    free = shutil.disk_usage(output_dir).free
    if report is not None:
        report(estimate, free)
    if estimate.to_write > free and not ignore:
        raise InsufficientDiskSpaceError(
            f"the build needs about {human_size(estimate.to_write)} more in {output_dir} but its device has "
            f"{human_size(free)} free (per component: {estimate.describe()}); free some space, build "
            "elsewhere or cache fewer fields, or pass --ignore-disk-space to build anyway"
        )
    return estimate
