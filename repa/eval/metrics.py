"""Sample-quality metrics against a reference set: FID, sFID, IS, precision/recall, FD-DINOv2.

    evaluator = Evaluator(["fid", "is", "prc"], inception_weights="weights-inception-....pth")
    scores = evaluator.evaluate("samples.npz", ref="VIRTUAL_imagenet256_labeled.npz")
    # {"fid": ..., "is": ..., "is_std": ..., "precision": ..., "recall": ...}

Metrics (name -> feature space / feature set / what is computed):
  fid        inception / pool     Fréchet distance of pool3 Gaussians
  sfid       inception / spatial  Fréchet distance of mixed_6/conv[:7] Gaussians (ADM's sFID)
  is         inception / logits   Inception Score (torch-fidelity's: 10 splits, shuffled, seed 2020)
  prc        inception / pool     improved precision and recall, k = 3 (torch-fidelity's)
  fd-dinov2  dinov2 / cls         Fréchet distance of DINOv2 ViT-L/14 class-token Gaussians
  fd         custom / features    Fréchet distance in a caller's feature space (`feature_fn=`)

Every Fréchet distance goes through `repa.eval.frechet.frechet_distance` (float64). Sample
statistics are accumulated in a stream (no 50k x 2048 array is needed for the Fréchet metrics);
IS and precision/recall keep their features. Reference statistics are computed once per
(image set, feature space) and cached on disk (see repa.eval.references).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from repa.eval.features import (
    INCEPTION_SHA256_PREFIX,
    CallableFeatures,
    DinoV2Features,
    FeatureSpace,
    InceptionFeatures,
)
from repa.eval.frechet import FeatureMoments
from repa.eval.references import (
    ReferenceStats,
    cache_path,
    default_cache_dir,
    fingerprint,
    is_stats_file,
    iter_image_batches,
    load_adm_stats,
)


@dataclass(frozen=True)
class MetricSpec:
    space: str  # "inception" | "dinov2" | "custom"
    feature: str  # feature set within the space
    kind: str  # "frechet" | "inception_score" | "precision_recall"
    description: str


METRICS: dict[str, MetricSpec] = {
    "fid": MetricSpec("inception", "pool", "frechet", "Fréchet Inception distance (pool3, 2048-d)"),
    "sfid": MetricSpec("inception", "spatial", "frechet", "spatial FID (mixed_6/conv, 7 channels)"),
    "is": MetricSpec("inception", "logits", "inception_score", "Inception Score"),
    "prc": MetricSpec("inception", "pool", "precision_recall", "improved precision and recall (k=3)"),
    "fd-dinov2": MetricSpec("dinov2", "cls", "frechet", "Fréchet distance in DINOv2 ViT-L/14 features"),
    "fd": MetricSpec("custom", "features", "frechet", "Fréchet distance in the caller's feature space"),
}
PRC_NEIGHBORHOOD = 3


def parse_metrics(metrics: str | Iterable[str]) -> list[str]:
    """'fid,is' or ["fid", "is"] -> validated names, in order, without duplicates."""
    names = [m.strip().lower() for m in (metrics.split(",") if isinstance(metrics, str) else metrics)]
    names = list(dict.fromkeys(name for name in names if name))
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric(s) {unknown or metrics!r}; choose from: {', '.join(METRICS)}")
    return names


@dataclass
class SetFeatures:
    """What one image set contributes: Gaussians per feature key, and features kept in full."""

    stats: ReferenceStats
    count: int


class Evaluator:
    """Builds the feature spaces a list of metrics needs (once) and scores image sets with them.

    metrics: names from METRICS. feature_fn / feature_name: the "fd" metric's feature space, any
    `fn(uint8 (B, 3, H, W)) -> (B, F)` (the CPU demo's evaluator network); `feature_name`
    identifies it in caches. spaces: prebuilt feature spaces by kind ("inception", "dinov2",
    "custom"), overriding the weights options. device: where features are computed (default:
    cuda if available). cache_dir: reference-statistics cache (None: $REPA_EVAL_CACHE or
    ~/.cache/repa/eval; False: no cache).
    """

    def __init__(
        self,
        metrics: str | Iterable[str] = ("fid",),
        *,
        inception_weights: str | os.PathLike | None = None,
        inception_sha256: str | None = INCEPTION_SHA256_PREFIX,
        dinov2_weights: str | os.PathLike | None = None,
        feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        feature_name: str = "custom",
        spaces: dict[str, FeatureSpace] | None = None,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        cache_dir: str | os.PathLike | None | bool = None,
        isc_splits: int = 10,
    ):
        self.metrics = parse_metrics(metrics)
        self.isc_splits = isc_splits
        self.batch_size = batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cache_dir = None if cache_dir is False else Path(cache_dir or default_cache_dir())
        self.spaces: dict[str, FeatureSpace] = dict(spaces or {})
        needed = {METRICS[name].space for name in self.metrics}
        if "custom" in needed and "custom" not in self.spaces:
            if feature_fn is None:
                raise ValueError("metric 'fd' needs feature_fn (a callable uint8 images -> (B, F) features)")
            self.spaces["custom"] = CallableFeatures(feature_fn, feature_name)
        if "inception" in needed and "inception" not in self.spaces:
            self.spaces["inception"] = InceptionFeatures(inception_weights, expected_sha256=inception_sha256)
        if "dinov2" in needed and "dinov2" not in self.spaces:
            self.spaces["dinov2"] = DinoV2Features("l", dinov2_weights)
        for space in self.spaces.values():
            if isinstance(space, torch.nn.Module):
                space.to(self.device)
        self._reference_memo: dict[str, ReferenceStats] = {}

    # ---- which features --------------------------------------------------------------------------
    def _key(self, metric: str) -> str:
        spec = METRICS[metric]
        return f"{self.spaces[spec.space].name}/{spec.feature}"

    def _needs(self, for_reference: bool) -> dict[str, tuple[set[str], set[str]]]:
        """space kind -> (features whose Gaussian is needed, features kept in full)."""
        needs: dict[str, tuple[set[str], set[str]]] = {}
        for metric in self.metrics:
            spec = METRICS[metric]
            gaussians, keep = needs.setdefault(spec.space, (set(), set()))
            if spec.kind == "frechet":
                gaussians.add(spec.feature)
            elif spec.kind == "precision_recall" or spec.kind == "inception_score" and not for_reference:
                keep.add(spec.feature)
        return {kind: need for kind, need in needs.items() if need[0] or need[1]}

    # ---- features of an image set ----------------------------------------------------------------
    def features(
        self, images: Iterable[torch.Tensor], needs: dict[str, tuple[set[str], set[str]]] | None = None
    ) -> SetFeatures:
        """Stream uint8 (B, 3, H, W) batches through every needed feature space.

        needs: space kind -> (features to summarise as Gaussians, features to keep in full);
        default: what this evaluator's metrics need from a sample set.
        """
        needs = self._needs(for_reference=False) if needs is None else needs
        moments, kept, count = self._accumulate(images, needs)
        features = {key: torch.cat(chunks).numpy() for key, chunks in kept.items()}
        return self._set_features(moments, features, count)

    def _accumulate(self, images: Iterable[torch.Tensor], needs: dict[str, tuple[set[str], set[str]]]):
        """(moments per (space kind, feature), kept float32 CPU chunks per (kind, feature), count)."""
        moments = {(kind, f): FeatureMoments() for kind, (gs, _) in needs.items() for f in gs}
        kept: dict[tuple[str, str], list[torch.Tensor]] = {
            (kind, f): [] for kind, (_, keep) in needs.items() for f in keep
        }
        count = 0
        for batch in images:
            batch = torch.as_tensor(batch)
            if batch.dtype != torch.uint8:
                raise TypeError(f"images must be uint8 (B, 3, H, W), got {batch.dtype}")
            count += batch.shape[0]
            for kind in needs:
                outputs = self.spaces[kind](batch.to(self.device))
                for (k, feature), accumulator in moments.items():
                    if k == kind:
                        accumulator.update(outputs[feature])
                for (k, feature), chunks in kept.items():
                    if k == kind:
                        chunks.append(outputs[feature].float().cpu())
        return moments, kept, count

    def _set_features(self, moments: dict, kept: dict[tuple[str, str], np.ndarray], count: int):
        stats = ReferenceStats(count=count)
        for (kind, feature), accumulator in moments.items():
            stats.gaussians[f"{self.spaces[kind].name}/{feature}"] = accumulator.gaussian()
        for (kind, feature), values in kept.items():
            stats.features[f"{self.spaces[kind].name}/{feature}"] = values
        return SetFeatures(stats, count)

    def evaluate_share(
        self,
        images: Iterable[torch.Tensor],
        indices: np.ndarray,
        ref: str | os.PathLike | ReferenceStats | None,
        *,
        rank: int,
        world_size: int,
    ) -> dict[str, float]:
        """Score a sample set spread over the processes of torch.distributed's default group.

        Every process passes its share: uint8 (B, 3, H, W) batches of the samples `indices` (int64,
        in batch order; `repa.eval.sample.generate_share`) and computes their features. The Gaussians'
        float64 sums are added over processes (one all-reduce each) and the features kept in full
        (IS, precision/recall) are gathered on process 0 and put in sample-index order, so the
        scores are those of one process scoring the whole set (Fréchet distances to float64
        rounding, the others exactly). Only process 0 needs `ref`; every process returns the scores.
        """
        import torch.distributed as dist

        needs = self._needs(for_reference=False)
        moments, kept, count = self._accumulate(images, needs)
        if count != len(indices):
            raise ValueError(f"{count} images for {len(indices)} sample indices")
        _sum_moments_over_ranks(moments, self.device)
        counted = torch.tensor([count], dtype=torch.int64, device=self.device)
        dist.all_reduce(counted)
        local = (
            indices,
            {key: torch.cat(chunks).numpy() if chunks else None for key, chunks in kept.items()},
        )
        shares = [None] * world_size if rank == 0 else None
        dist.gather_object(local, shares, dst=0)
        results: list[dict[str, float] | Exception | None] = [None]
        if rank == 0:
            try:
                order = np.argsort(np.concatenate([share for share, _ in shares]), kind="stable")
                gathered = {
                    key: np.concatenate([part[key] for _, part in shares if part[key] is not None])[order]
                    for key in kept
                }
                sample_features = self._set_features(moments, gathered, int(counted.item()))
                scores = self.score(sample_features, self.reference(ref))
                results = [{**scores, "num_samples": sample_features.count}]
            except Exception as error:  # every process raises it, none waits for scores that never come
                results = [error]
        dist.broadcast_object_list(results, src=0)
        if isinstance(results[0], Exception):
            raise results[0]
        return results[0]

    # ---- references ------------------------------------------------------------------------------
    def reference(self, ref: str | os.PathLike | ReferenceStats) -> ReferenceStats:
        """Statistics of the reference: a ReferenceStats, a stats file, or an image set (cached)."""
        if isinstance(ref, ReferenceStats):
            return ref
        ref = str(ref)
        # Memoised per (path, size, mtime): a rewritten reference set is read again.
        memo_key = json.dumps(fingerprint(ref), sort_keys=True)
        if memo_key in self._reference_memo:
            return self._reference_memo[memo_key]
        stats = ReferenceStats(source=ref)
        image_source = ref
        if is_stats_file(ref):
            from repa.eval.npz import npz_members
            from repa.eval.references import STATS_MARKER

            members = npz_members(ref)
            if STATS_MARKER in members:
                stats = ReferenceStats.load(ref)
                image_source = None
            else:  # the ADM reference batch: mu/sigma (and mu_s/sigma_s), usually with its images
                if "inception" in self.spaces:
                    stats = load_adm_stats(ref, self.spaces["inception"].name)
                image_source = ref if "arr_0" in members else None
        missing = self._missing(stats)
        if missing and image_source is None:
            raise ValueError(
                f"reference {ref} lacks statistics for {sorted(missing)} and holds no images to compute "
                "them from; pass an image set (npz with arr_0, folder, shards) as --ref"
            )
        for kind in sorted({kind for kind, _ in missing}):
            stats.merge(self._reference_space(image_source, kind))
        self._reference_memo[memo_key] = stats
        return stats

    def _missing(self, stats: ReferenceStats) -> set[tuple[str, str]]:
        missing = set()
        for kind, (gaussians, keep) in self._needs(for_reference=True).items():
            name = self.spaces[kind].name
            missing |= {(kind, f) for f in gaussians if f"{name}/{f}" not in stats.gaussians}
            missing |= {(kind, f) for f in keep if f"{name}/{f}" not in stats.features}
        return missing

    def _reference_space(self, source: str, kind: str) -> ReferenceStats:
        """All Gaussians of one feature space for an image set (+ kept features), from the cache."""
        space = self.spaces[kind]
        _, keep = self._needs(for_reference=True)[kind]
        path = None
        if self.cache_dir is not None:
            path = cache_path(source, space.name, tuple(sorted(keep)), self.cache_dir)
            if path.is_file():
                return ReferenceStats.load(path)
        # Summarise every Fréchet feature of the space (cheap once the forward has run), so that
        # another Fréchet metric in the same space later reuses this cache file.
        gaussians = {
            spec.feature
            for spec in METRICS.values()
            if spec.space == kind and spec.kind == "frechet" and spec.feature in space.provides
        }
        batches = iter_image_batches(source, self.batch_size)
        result = self.features(batches, needs={kind: (gaussians, keep)}).stats
        result.source = source
        if path is not None:
            result.save(path)
        return result

    # ---- scores ----------------------------------------------------------------------------------
    def score(self, samples: SetFeatures, reference: ReferenceStats) -> dict[str, float]:
        """Metric values of sample features against reference statistics."""
        from torch_fidelity.metric_isc import isc_features_to_metric
        from torch_fidelity.metric_prc import calculate_precision_recall_part

        results: dict[str, float] = {}
        for metric in self.metrics:
            spec, key = METRICS[metric], self._key(metric)
            if spec.kind == "frechet":
                results[metric] = samples.stats.gaussians[key].distance(reference.gaussians[key])
            elif spec.kind == "inception_score":
                scores = isc_features_to_metric(
                    torch.from_numpy(samples.stats.features[key]), splits=self.isc_splits
                )
                results["is"] = scores["inception_score_mean"]
                results["is_std"] = scores["inception_score_std"]
            elif spec.kind == "precision_recall":
                precision, recall = calculate_precision_recall_part(
                    torch.from_numpy(samples.stats.features[key]),
                    torch.from_numpy(reference.features[key]),
                    neighborhood=PRC_NEIGHBORHOOD,
                    batch_size=10000,
                )
                results["precision"], results["recall"] = float(precision), float(recall)
        return results

    def evaluate(
        self,
        samples: str | os.PathLike | np.ndarray | Iterable[torch.Tensor],
        ref: str | os.PathLike | ReferenceStats,
    ) -> dict[str, float]:
        """Score samples (an image set path, an (N, H, W, 3) uint8 array, or uint8 NCHW batches)."""
        reference = self.reference(ref)
        if isinstance(samples, (str, os.PathLike)):
            batches: Iterable[torch.Tensor] = iter_image_batches(samples, self.batch_size)
        elif isinstance(samples, np.ndarray):
            array = torch.from_numpy(samples).permute(0, 3, 1, 2)
            batches = array.split(self.batch_size)
        else:
            batches = samples
        sample_features = self.features(batches)
        results = self.score(sample_features, reference)
        results["num_samples"] = sample_features.count
        return results


def _sum_moments_over_ranks(moments: dict, device: torch.device) -> None:
    """Add every process's FeatureMoments sums in place (a process with no samples adds zeros)."""
    import torch.distributed as dist

    keys = sorted(moments)
    dims = torch.tensor(
        [0 if moments[key].total is None else moments[key].total.shape[0] for key in keys],
        dtype=torch.int64,
        device=device,
    )
    dist.all_reduce(dims, op=dist.ReduceOp.MAX)
    for key, dim in zip(keys, dims.tolist()):
        accumulator = moments[key]
        if accumulator.total is None:
            accumulator.total = torch.zeros(dim, dtype=torch.float64, device=device)
            accumulator.total_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        counted = torch.tensor([accumulator.count], dtype=torch.int64, device=accumulator.total.device)
        for tensor in (accumulator.total, accumulator.total_outer, counted):
            dist.all_reduce(tensor)
        accumulator.count = int(counted.item())


def evaluate_npz(
    samples: str | os.PathLike,
    ref: str | os.PathLike,
    metrics: str | Iterable[str] = ("fid",),
    **evaluator_options,
) -> dict[str, float]:
    """One-shot: `Evaluator(metrics, **options).evaluate(samples, ref)`."""
    return Evaluator(metrics, **evaluator_options).evaluate(samples, ref)
