"""Image sets and their statistics: where reference images come from, and the on-disk cache.

An image set is named by a string:
  FILE.npz            a sample file or the ADM reference batch: `arr_0` uint8 (N, H, W, 3)
  DIR of shards       a folder with a shard manifest (repa data build), or a shard pattern
                      (`data/train-{000000..000099}.tar`, several joined by `::`)
  DIR of images       image files under it (recursively, sorted; repa.data.images's extensions),
                      all one size: read as they are, not cropped
Precomputed statistics are a `.npz` too: the ADM reference batch carries `mu`/`sigma` (pool3)
and `mu_s`/`sigma_s` (sFID) next to its images; our cache files (`ReferenceStats.save`) carry a
`repa_reference_stats` record naming the feature space they were computed in.

Cache: statistics of an image set are stored under `$REPA_EVAL_CACHE` (default
`~/.cache/repa/eval`) in a file named by a hash of (absolute path, size, modification time,
feature space name, features kept in full), so changing the set or the extractor's weights
recomputes them and nothing else does.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from repa.data.images import IMAGE_EXTENSIONS, list_images, load_image_batches
from repa.eval.frechet import Gaussian
from repa.eval.npz import iter_npz_rows, npz_members
from repa.utils.files import atomic_path

STATS_MARKER = "repa_reference_stats"
# ADM's reference batches (VIRTUAL_imagenet256_labeled.npz): pool3 and spatial statistics.
ADM_STATS_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}


def default_cache_dir() -> Path:
    return Path(os.environ.get("REPA_EVAL_CACHE", Path.home() / ".cache" / "repa" / "eval"))


# ---- image sources -------------------------------------------------------------------------------


def _is_shard_spec(source: str) -> bool:
    path = Path(source)
    if path.is_dir():
        from repa.data.shards import MANIFEST_NAME

        return (path / MANIFEST_NAME).is_file()
    return any(token in source for token in ("{", "::")) or source.endswith((".tar", ".json"))


def iter_image_batches(source: str | os.PathLike, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 (B, 3, H, W) batches of every image in `source` (see the module docstring), in order."""
    source = str(source)
    path = Path(source)
    if path.suffix == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"image set {path} not found")
        if "arr_0" not in npz_members(path):
            raise ValueError(f"{path} holds no images (no arr_0); it has {npz_members(path)}")
        for rows in iter_npz_rows(path, batch_size):  # (B, H, W, 3)
            if rows.dtype != np.uint8 or rows.ndim != 4 or rows.shape[-1] != 3:
                raise ValueError(
                    f"{path}: arr_0 must be uint8 (N, H, W, 3), got {rows.dtype} {rows.shape[1:]}"
                )
            yield torch.from_numpy(rows.copy()).permute(0, 3, 1, 2).contiguous()
        return
    if _is_shard_spec(source):
        from repa.data.stream import iter_eval_batches

        for batch in iter_eval_batches(source, batch_size=batch_size):
            yield batch.images
        return
    if path.is_dir():
        files = list_images(path)
        if not files:
            raise ValueError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no shard manifest")
        for batch in load_image_batches(files, batch_size):
            yield torch.from_numpy(batch)
        return
    raise FileNotFoundError(
        f"reference {source!r} is not an .npz, a folder of images or shards, or a shard pattern"
    )


def fingerprint(source: str | os.PathLike) -> dict:
    """What identifies an image set on disk: absolute path, total size, newest modification time."""
    source = str(source)
    path = Path(source)
    if path.is_file():
        files = [path]
    elif _is_shard_spec(source):
        from repa.data.shards import expand_shard_urls

        files = [Path(url) for url in expand_shard_urls(source)]
    elif path.is_dir():
        files = list_images(path)
    else:
        raise FileNotFoundError(f"image set {source!r} not found")
    stats = [f.stat() for f in files if f.exists()]
    return {
        "path": str(path.resolve()) if path.exists() else source,
        "files": len(files),
        "size": sum(s.st_size for s in stats),
        "mtime_ns": max((s.st_mtime_ns for s in stats), default=0),
    }


# ---- statistics ----------------------------------------------------------------------------------


@dataclass
class ReferenceStats:
    """Per feature set (key "SPACE_NAME/FEATURE"): a Gaussian, and for some the full features."""

    gaussians: dict[str, Gaussian] = field(default_factory=dict)
    features: dict[str, np.ndarray] = field(default_factory=dict)  # (N, F) float32
    source: str = ""
    count: int = 0

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        for key, gaussian in self.gaussians.items():
            arrays[f"{key}::mu"], arrays[f"{key}::sigma"] = gaussian.mu, gaussian.sigma
        for key, values in self.features.items():
            arrays[f"{key}::features"] = values
        meta = {"source": self.source, "count": self.count, "keys": sorted(self.gaussians)}
        arrays[STATS_MARKER] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:  # a handle: np.savez would append .npz
            np.savez(handle, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceStats:
        with np.load(path) as data:
            meta = json.loads(bytes(data[STATS_MARKER]).decode())
            stats = cls(source=meta["source"], count=meta["count"])
            for name in data.files:
                if "::" not in name:
                    continue
                key, part = name.rsplit("::", 1)
                if part == "features":
                    stats.features[key] = data[name]
            for key in meta["keys"]:
                stats.gaussians[key] = Gaussian(data[f"{key}::mu"], data[f"{key}::sigma"], meta["count"])
        return stats

    def merge(self, other: ReferenceStats) -> None:
        self.gaussians.update(other.gaussians)
        self.features.update(other.features)
        self.count = self.count or other.count
        self.source = self.source or other.source


def is_stats_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a .npz of precomputed statistics (ours, or ADM's mu/sigma)."""
    path = Path(path)
    if path.suffix != ".npz" or not path.is_file():
        return False
    members = set(npz_members(path))
    return STATS_MARKER in members or {"mu", "sigma"} <= members


def load_adm_stats(path: str | os.PathLike, inception_name: str) -> ReferenceStats:
    """The ADM reference batch's precomputed Inception statistics, keyed for `inception_name`.

    They were computed with TensorFlow's Inception graph, of which torch-fidelity's network is a
    port; FIDs against them are comparable with the ADM evaluator's up to that port's precision.
    """
    stats = ReferenceStats(source=str(path))
    with np.load(path) as data:
        for feature, (mu_key, sigma_key) in ADM_STATS_KEYS.items():
            if mu_key in data.files and sigma_key in data.files:
                stats.gaussians[f"{inception_name}/{feature}"] = Gaussian(
                    data[mu_key].astype(np.float64), data[sigma_key].astype(np.float64)
                )
    return stats


def cache_path(source: str | os.PathLike, space_name: str, keep: tuple[str, ...], cache_dir: Path) -> Path:
    """The cache file of one image set in one feature space."""
    key = json.dumps({"set": fingerprint(source), "space": space_name, "keep": sorted(keep)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return cache_dir / f"{Path(str(source).rstrip('/')).name}-{space_name}-{digest}.npz"
