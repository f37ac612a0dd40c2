"""FID-vs-training-step curves of several runs, and the speed-up over a baseline run.

    result = build_curves(["runs/repa", "runs/sit"], "curves/", ref="ref.npz", num_samples=10_000,
                          baseline="runs/sit")
    result.speedup["runs/repa"]  # {"step": 100000, "ratio_steps": 7.0, ...}

For every complete checkpoint of every run (folders with COMPLETE.json) the EMA model is
sampled and scored; each result is cached in `RUN/eval/step-XXXXXXXX-<hash>.json`, the hash
covering the sampler settings, sample count, seed, label scheme, metrics, feature spaces
(with their weights) and the reference, so rerunning only evaluates new checkpoints. Each
checkpoint's ema.safetensors is verified against its COMPLETE.json checksum before it is
sampled: a damaged one stops the curves with an error naming the file (a curve with a silent
hole, or a point from damaged weights, would mislead); restore it, or move it aside to skip it.

Outputs in the output folder:
  curves.csv / curves.json   run, step, images_seen (= step x global batch from the run's
                             config), hours (COMPLETE.json time minus the run's start), metrics
  <metric>_vs_step.png/.svg  one line per run (matplotlib, Agg backend)
  curves.json["speedup"]     per run: the first evaluated step at which the run's metric is at
                             least as good as the baseline's best, and baseline_best_step /
                             that step ("the N-times faster" figure), or "not reached"
Run start: the first metrics.jsonl record's "time" when the trainer logs one, otherwise the
earliest of config.yaml's and environment.json's modification times and the first checkpoint's
COMPLETE time (a resumed run rewrites config.yaml, so hours then count from the resume at worst).

The scoring is pluggable: pass an `Evaluator` built with `feature_fn=` (metric "fd") to score in
the feature space of any network, e.g. the CPU demo's small evaluator instead of Inception.

Arms and seeds (docs/comparisons.md): runs whose resolved configs differ only in the seed (and
bookkeeping: names, checkpoint and logging cadence, BOOKKEEPING below) form an arm; `arms=`
names them explicitly and refuses runs that differ in anything else. Per arm and step:
the mean over seeds and a 95% interval (repa.eval.stats: t-interval, bootstrap from 5 seeds),
shaded in the plots, in arms.csv and as `<metric>_arm_{mean,low,high}` columns of curves.csv;
the arm speed-up over the baseline's arm with a bootstrap interval over seeds (`arm_speedup`).
Compute axes: steps, images seen, hours and training FLOPs (repa.analysis.compute from the
run's config and its targets.json: what the step computed and what it read from the cache).
A `Classifier` adds `class_accuracy`: the share of samples it assigns to their sampled class.
`sampling_seeds=K` re-scores each run's last checkpoint with K sample sets (evaluation noise).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from repa.eval.checkpoints import Generator, load_generator
from repa.eval.metrics import Evaluator
from repa.eval.references import ReferenceStats, fingerprint
from repa.eval.sample import SamplerSettings, class_labels, generate_images, generate_share
from repa.eval.stats import mean_interval, speedup_interval
from repa.precision import resolve_precision
from repa.runs import COMPLETE, checkpoint_name, list_checkpoints
from repa.utils.files import write_bytes_atomic

HIGHER_IS_BETTER = {"is", "precision", "recall", "class_accuracy"}
# Config fields that do not change what a run learns: runs differing only in these (and the
# seed) are seeds of one arm. Anything else, including fields added later, separates arms.
BOOKKEEPING = {
    "run": {
        "seed", "output_dir", "exp_name", "max_train_steps", "checkpointing_steps",
        "keep_checkpoints", "keep_every", "resume", "max_nonfinite_steps", "step_timeout",
        "long_phase_timeout", "dist_timeout", "lease_stale_after", "log_every", "sample_every",
        "sample_steps", "sample_cfg_scale", "eval_every", "eval_ref", "eval_metrics",
        "eval_num_samples", "eval_num_steps", "eval_cfg_scale", "report_to", "wandb_project",
        "wandb_mode", "compile",
    },
    "data": {"num_workers"},
    "encoder": {"encoder_cache_dir"},
    "model": {"grad_checkpointing"},
}  # fmt: skip
ROW_KEYS = ("run", "arm", "seed", "step", "images_seen", "hours", "train_flops")


@dataclass
class Classifier:
    """A class-conditional check: `fn` maps uint8 images (B, 3, H, W) to logits (B, classes).
    `name` identifies it in cached results (change it when the network changes)."""

    name: str
    fn: object

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> Classifier:
        """A TorchScript file (torch.jit.save) taking uint8 images and returning logits: it owns
        its preprocessing, so any classifier of real data fits."""
        module = torch.jit.load(str(path), map_location=device).eval()
        return cls(f"{Path(path).name}:{fingerprint(path)}", module)


# ---- one model, one checkpoint -------------------------------------------------------------------


def evaluate_generator(
    generator: Generator,
    evaluator: Evaluator,
    ref: str | os.PathLike | ReferenceStats,
    *,
    num_samples: int,
    settings: SamplerSettings,
    seed: int = 0,
    labels: str = "balanced",
    batch_size: int = 64,
    device: torch.device | str | None = None,
    rank: int = 0,
    world_size: int = 1,
    classifier: Classifier | None = None,
) -> dict[str, float]:
    """Sample `num_samples` images in memory (streamed, never written) and score them; with a
    `classifier` (one process), also `class_accuracy`: the share of samples it assigns to the
    class they were sampled for.

    With world_size > 1 every process of torch.distributed's default group calls this: each
    samples its share (`batch_size` per process) and computes its features, and the scores of the
    whole set come back on every process (`Evaluator.evaluate_share`); only rank 0 needs `ref`.
    """
    device = torch.device(device or evaluator.device)
    generator.to(device)
    if world_size > 1:
        if classifier is not None:
            raise ValueError("class accuracy is computed on one process (world_size 1)")
        indices, images = generate_share(
            generator, num_samples, settings, seed=seed, labels=labels, batch_size=batch_size,
            rank=rank, world_size=world_size, device=device,
        )  # fmt: skip
        return evaluator.evaluate_share(images, indices, ref, rank=rank, world_size=world_size)
    images = generate_images(
        generator, num_samples, settings, seed=seed, labels=labels, batch_size=batch_size, device=device
    )
    if classifier is None:
        return evaluator.evaluate(images, ref)
    # the labels generate_images drew, in its order: the classifier sees each batch on its way
    wanted = torch.from_numpy(class_labels(num_samples, generator.num_classes, seed, labels))
    hits = [0, 0]  # correct, seen

    def classified(batches):
        for batch in batches:
            with torch.no_grad():
                predicted = classifier.fn(batch).argmax(dim=1).cpu()
            hits[0] += int((predicted == wanted[hits[1] : hits[1] + len(batch)]).sum())
            hits[1] += len(batch)
            yield batch

    metrics = evaluator.evaluate(classified(images), ref)
    return {**metrics, "class_accuracy": hits[0] / max(hits[1], 1)}


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: torch.nn.Module,
    *,
    resolution: int,
    num_samples: int,
    ref: str | os.PathLike | ReferenceStats,
    evaluator: Evaluator,
    settings: SamplerSettings,
    path_type: str = "linear",
    seed: int = 0,
    labels: str = "balanced",
    batch_size: int = 64,
    device: torch.device | str | None = None,
    rank: int = 0,
    world_size: int = 1,
    captions: tuple[torch.Tensor, torch.Tensor | None, list[str]] | None = None,
) -> dict[str, float]:
    """Score an in-memory SiT (e.g. the EMA model during training, `--eval-every`).

    Build the Evaluator and the reference statistics once (`evaluator.reference(ref)`) and pass
    the result as `ref`, so each call pays only for sampling and sample features. The model's
    train/eval mode is restored afterwards. rank / world_size: spread over the processes of
    torch.distributed's default group, all of which call this (see `evaluate_generator`).
    captions: a text model's (embeddings (N, L, D), mask (N, L), texts), sample i drawing caption i.
    """
    was_training = model.training
    model.eval()
    try:
        generator = Generator(model, tokenizer, resolution, path_type)
        if captions is not None:
            generator, labels = generator.with_captions(*captions), "ordered"
        with torch.no_grad():
            return evaluate_generator(
                generator,
                evaluator,
                ref,
                num_samples=num_samples,
                settings=settings,
                seed=seed,
                labels=labels,
                batch_size=batch_size,
                device=device,
                rank=rank,
                world_size=world_size,
            )
    finally:
        model.train(was_training)


def _ref_identity(ref: str | os.PathLike | ReferenceStats) -> object:
    if isinstance(ref, ReferenceStats):
        source = fingerprint(ref.source) if ref.source and Path(ref.source).exists() else ref.source
        return {"stats": source, "count": ref.count, "keys": sorted(ref.gaussians)}
    return fingerprint(ref)


def result_key(
    evaluator: Evaluator,
    ref,
    num_samples: int,
    settings: SamplerSettings,
    seed: int,
    labels: str,
    classifier: Classifier | None = None,
) -> str:
    """Hash of everything that changes an evaluation result except the weights."""
    record = {
        "metrics": evaluator.metrics,
        "spaces": sorted(space.name for space in evaluator.spaces.values()),
        "ref": _ref_identity(ref),
        "num_samples": num_samples,
        "settings": settings.resolved(evaluator.device).to_dict(),  # never "auto": what ran
        "seed": seed,
        "labels": labels,
    }
    if classifier is not None:  # absent otherwise, so results cached before classifiers still match
        record["classifier"] = classifier.name
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:12]


def evaluate_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    evaluator: Evaluator,
    ref: str | os.PathLike | ReferenceStats,
    *,
    num_samples: int,
    settings: SamplerSettings,
    seed: int = 0,
    labels: str = "balanced",
    batch_size: int = 64,
    device: torch.device | str | None = None,
    use_cache: bool = True,
    classifier: Classifier | None = None,
) -> dict:
    """Metrics of one complete checkpoint, read from RUN/eval/ when already computed."""
    run_dir = Path(run_dir)
    key = result_key(evaluator, ref, num_samples, settings, seed, labels, classifier)
    cache_file = run_dir / "eval" / f"{checkpoint_name(step)}-{key}.json"
    if use_cache and cache_file.is_file():
        return json.loads(cache_file.read_text())
    generator = load_generator(run_dir, checkpoint_step=step, device=device or evaluator.device)
    metrics = evaluate_generator(
        generator,
        evaluator,
        evaluator.reference(ref),
        num_samples=num_samples,
        settings=settings,
        seed=seed,
        labels=labels,
        batch_size=batch_size,
        device=device,
        classifier=classifier,
    )
    record = {"step": step, "metrics": metrics, "key": key}
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(cache_file, json.dumps(record, indent=1).encode())
    return record


# ---- runs ----------------------------------------------------------------------------------------


def run_start_time(run_dir: Path) -> float | None:
    """Wall-clock start of a run (see the module docstring)."""
    metrics_file = run_dir / "metrics.jsonl"
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            if line.strip():
                first = json.loads(line)
                if isinstance(first.get("time"), (int, float)):
                    return float(first["time"])
                break
    candidates = [
        (run_dir / name).stat().st_mtime
        for name in ("config.yaml", "environment.json")
        if (run_dir / name).is_file()
    ]
    found = list_checkpoints(run_dir / "checkpoints")
    if found:
        candidates.append(json.loads((found[0][1] / COMPLETE).read_text())["time"])
    return min(candidates) if candidates else None


def global_batch_size(run_dir: Path) -> int | None:
    import yaml

    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        return None
    config = yaml.safe_load(config_file.read_text()) or {}
    return (config.get("data") or {}).get("batch_size")


@dataclass
class CurvesResult:
    rows: list[dict]
    speedup: dict[str, dict]
    baseline: str | None
    metric: str
    files: dict[str, Path] = field(default_factory=dict)
    arms: dict[str, list[str]] = field(default_factory=dict)  # arm -> its runs
    arm_rows: list[dict] = field(default_factory=list)  # per arm and step: mean, interval
    arm_speedup: dict[str, dict] = field(default_factory=dict)  # per arm, with an interval
    baseline_arm: str | None = None
    sampling_spread: dict[str, dict] = field(default_factory=dict)  # per run: K sample sets


def speedup_table(rows: list[dict], baseline: str, metric: str) -> dict[str, dict]:
    """For each run: first step reaching the baseline's best `metric`, and the step/image ratios."""
    higher = metric in HIGHER_IS_BETTER
    better_or_equal = (lambda a, b: a >= b) if higher else (lambda a, b: a <= b)
    base_rows = [r for r in rows if r["run"] == baseline and r.get(metric) is not None]
    if not base_rows:
        raise ValueError(f"baseline run {baseline!r} has no evaluated checkpoints with {metric}")
    best = (max if higher else min)(r[metric] for r in base_rows)
    best_row = min((r for r in base_rows if r[metric] == best), key=lambda r: r["step"])
    table: dict[str, dict] = {}
    for run in dict.fromkeys(r["run"] for r in rows):
        run_rows = sorted(
            (r for r in rows if r["run"] == run and r.get(metric) is not None), key=lambda r: r["step"]
        )
        reached = next((r for r in run_rows if better_or_equal(r[metric], best)), None)
        entry = {"baseline_best": best, "baseline_best_step": best_row["step"]}
        if reached is None:
            entry.update(step=None, ratio_steps=None, ratio_images=None, status="not reached")
        elif reached["step"] == 0:  # already there before training: no finite ratio
            entry.update(step=0, value=reached[metric], ratio_steps=None, ratio_images=None, status="reached")
        else:
            ratio_images = None
            if reached.get("images_seen") and best_row.get("images_seen"):
                ratio_images = best_row["images_seen"] / reached["images_seen"]
            entry.update(
                step=reached["step"],
                value=reached[metric],
                ratio_steps=best_row["step"] / reached["step"],
                ratio_images=ratio_images,
                status="reached",
            )
        table[run] = entry
    return table


# ---- arms: runs that differ only in the seed ----------------------------------------------------


def read_run_config(run_dir: Path) -> dict:
    import yaml

    config_file = Path(run_dir) / "config.yaml"
    return (yaml.safe_load(config_file.read_text()) or {}) if config_file.is_file() else {}


def arm_signature(config: dict) -> dict:
    """The config without the seed and the BOOKKEEPING fields: equal signatures, one arm."""
    return {
        section: {k: v for k, v in values.items() if k not in BOOKKEEPING.get(section, ())}
        for section, values in config.items()
        if isinstance(values, dict)
    }


def _differences(a: dict, b: dict) -> list[str]:
    keys = sorted({(s, k) for c in (a, b) for s, values in c.items() for k in values})
    return [
        f"{s}.{k} ({a.get(s, {}).get(k)!r} vs {b.get(s, {}).get(k)!r})"
        for s, k in keys
        if a.get(s, {}).get(k) != b.get(s, {}).get(k)
    ]


def _arm_name(run_names: list[str]) -> str:
    """'repa-seed0', 'repa-seed1' -> 'repa': the names' common prefix without a seed ending."""
    if len(run_names) == 1:
        return run_names[0]
    prefix = os.path.commonprefix(run_names)
    stripped = re.sub(r"[-_.]*(seed|s)?[-_.]*$", "", prefix)
    return stripped or run_names[0]


def group_arms(
    run_dirs: list[Path],
    names: dict[Path, str],
    configs: dict[Path, dict],
    explicit: dict[str, list[Path]] | None = None,
) -> dict[str, list[Path]]:
    """Arms: the `explicit` ones (arm name -> runs) after checking that their runs differ only
    in the seed and bookkeeping, and the remaining runs grouped by equal signatures. Refuses an
    arm whose runs differ in anything else, or that holds one seed twice."""
    arms: dict[str, list[Path]] = {}
    placed: set[Path] = set()
    for arm, members in (explicit or {}).items():
        first = members[0]
        for other in members[1:]:
            differences = _differences(arm_signature(configs[first]), arm_signature(configs[other]))
            if differences:
                raise ValueError(
                    f"--arm {arm}: runs {names[first]} and {names[other]} differ in "
                    f"{'; '.join(differences)}; the runs of one arm may differ only in run.seed "
                    f"(and bookkeeping: names, checkpoint/logging cadence, max steps). Put them in "
                    f"separate arms."
                )
        arms[arm] = list(members)
        placed.update(members)
    groups: dict[str, list[Path]] = {}
    for run_dir in run_dirs:
        if run_dir not in placed:
            key = json.dumps(arm_signature(configs[run_dir]), sort_keys=True, default=str)
            groups.setdefault(key, []).append(run_dir)
    for members in groups.values():
        arm = _arm_name([names[m] for m in members])
        while arm in arms:
            arm += "'"
        arms[arm] = members
    for arm, members in arms.items():
        seeds = [(configs[m].get("run") or {}).get("seed") for m in members]
        repeated = sorted({s for s in seeds if seeds.count(s) > 1}, key=str)
        if repeated:
            runs = [names[m] for m, s in zip(members, seeds) if s in repeated]
            raise ValueError(
                f"arm {arm}: runs {runs} have the same config and the same seed {repeated}: they are "
                "not independent seeds (list one of them, or train it with another --seed)"
            )
    return arms


def parse_arm_option(values: Iterable[str]) -> dict[str, list[str]]:
    """`--arm NAME=RUN,RUN` (repeatable) -> {NAME: [RUN, RUN]}."""
    arms: dict[str, list[str]] = {}
    for value in values:
        name, sep, runs = value.partition("=")
        members = [r.strip() for r in runs.split(",") if r.strip()]
        if not sep or not name.strip() or not members:
            raise ValueError(f"--arm {value!r}: expected NAME=RUN[,RUN...]")
        if name.strip() in arms:
            raise ValueError(f"--arm {name.strip()} is given twice")
        arms[name.strip()] = members
    return arms


# ---- the compute axis ---------------------------------------------------------------------------

TARGETS = "targets.json"  # written by training: what a step read from the cache


def flops_per_step(run_dir: Path, config: dict) -> tuple[int | None, str]:
    """Training multiply-adds per optimiser step (per image x global batch) and a note."""
    targets_file = run_dir / TARGETS
    if not targets_file.is_file():
        return None, f"no {TARGETS} (trained before repa recorded what a step computes)"
    targets = json.loads(targets_file.read_text())
    try:
        from repa.analysis.compute import training_cost

        cost = training_cost(
            config, latents_cached=targets["latents_cached"], features_cached=targets["features_cached"]
        )
    except Exception as error:  # noqa: BLE001 - the other axes stand without this one
        return None, f"FLOPs not counted: {type(error).__name__}: {error}"
    batch = (config.get("data") or {}).get("batch_size")
    return cost.per_image * batch, json.dumps(cost.to_dict())


# ---- seeds: means and intervals -----------------------------------------------------------------


def _metric_keys(rows: list[dict]) -> list[str]:
    keys = {k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return sorted(keys - set(ROW_KEYS) - {"num_samples"})


def arm_table(rows: list[dict], confidence: float = 0.95) -> list[dict]:
    """Per arm and step: the seeds' mean of every metric and axis, and each metric's interval
    (`<metric>_low/_high`, None with one seed), `seeds` the number of runs at that step."""
    table = []
    metrics = _metric_keys(rows)
    for arm in dict.fromkeys(r["arm"] for r in rows):
        arm_rows = [r for r in rows if r["arm"] == arm]
        for step in sorted({r["step"] for r in arm_rows}):
            at_step = [r for r in arm_rows if r["step"] == step]
            entry: dict = {"arm": arm, "step": step, "seeds": len(at_step)}
            for axis in ("images_seen", "hours", "train_flops"):
                values = [r[axis] for r in at_step if r.get(axis) is not None]
                entry[axis] = float(np.mean(values)) if len(values) == len(at_step) else None
            for metric in metrics:
                values = [r[metric] for r in at_step if r.get(metric) is not None]
                if not values:
                    continue
                interval = mean_interval(values, confidence, seed=step)
                entry[metric], entry[f"{metric}_low"], entry[f"{metric}_high"] = (
                    interval.mean,
                    interval.low,
                    interval.high,
                )
                entry[f"{metric}_interval"] = interval.method
            table.append(entry)
    return table


def arm_speedups(
    rows: list[dict], arms: dict[str, list[str]], baseline_arm: str, metric: str, seed: int = 0
) -> dict[str, dict]:
    """Per arm: the speed-up factor over the baseline arm with its bootstrap interval over
    seeds (repa.eval.stats.speedup_interval), on the steps every seed of both arms evaluated;
    also per image and per training FLOP (the factor times the ratio of per-step costs)."""
    higher = metric in HIGHER_IS_BETTER

    def curves(arm: str, steps: list[int]) -> np.ndarray:
        lookup = {(r["run"], r["step"]): r[metric] for r in rows if r.get(metric) is not None}
        return np.array([[lookup[(run, s)] for s in steps] for run in arms[arm]])

    def steps_of(arm: str) -> set[int]:
        per_run = [
            {r["step"] for r in rows if r["run"] == run and r.get(metric) is not None} for run in arms[arm]
        ]
        return set.intersection(*per_run) if per_run else set()

    def per_step(arm: str, axis: str) -> float | None:
        values = [r[axis] / r["step"] for r in rows if r["arm"] == arm and r["step"] and r.get(axis)]
        return float(np.mean(values)) if values else None

    table = {}
    for arm in arms:
        steps = sorted(steps_of(arm) & steps_of(baseline_arm))
        if len(steps) < 2:
            table[arm] = {"status": "fewer than two steps evaluated by every seed of both arms"}
            continue
        result = speedup_interval(
            steps, curves(baseline_arm, steps), curves(arm, steps), higher_is_better=higher, seed=seed
        )
        entry = {**result.to_dict(), "steps": steps}
        entry["status"] = "reached" if result.factor is not None else "not reached"
        for axis, name in (("images_seen", "images"), ("train_flops", "flops")):
            base_cost, arm_cost = per_step(baseline_arm, axis), per_step(arm, axis)
            scale = base_cost / arm_cost if base_cost and arm_cost else None
            for key in ("factor", "low", "high"):
                value = entry[key]
                entry[f"{key}_{name}"] = value * scale if value is not None and scale else None
        table[arm] = entry
    return table


def write_table(rows: list[dict], output_dir: Path, arm_rows: list[dict] | None = None) -> tuple[Path, Path]:
    """curves.csv: one row per run and step, with the arm's mean and interval of each metric at
    that step beside the run's own value (`<metric>_arm_mean/_low/_high`); arms.csv: one row per
    arm and step."""
    arm_rows = arm_rows or []
    lookup = {(a["arm"], a["step"]): a for a in arm_rows}
    metrics = _metric_keys(rows)
    table = []
    for row in rows:
        arm_entry = lookup.get((row.get("arm"), row["step"]), {})
        extra = {}
        for metric in metrics:
            if metric in arm_entry:
                extra[f"{metric}_arm_mean"] = arm_entry[metric]
                extra[f"{metric}_arm_low"] = arm_entry.get(f"{metric}_low")
                extra[f"{metric}_arm_high"] = arm_entry.get(f"{metric}_high")
        table.append({**row, **extra})
    columns = [c for c in ROW_KEYS if any(c in r for r in table)]
    columns += sorted({k for r in table for k in r} - set(columns) - {"run_dir"})
    csv_path = output_dir / "curves.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)
    if arm_rows:
        arm_columns = ["arm", "step", "seeds", "images_seen", "hours", "train_flops"]
        arm_columns += sorted({k for r in arm_rows for k in r} - set(arm_columns))
        with open(output_dir / "arms.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=arm_columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(arm_rows)
    return csv_path, output_dir / "curves.json"


AXES = {  # x axis -> (row key, label, file suffix)
    "step": ("step", "training step", "step"),
    "images": ("images_seen", "images seen", "images"),
    "hours": ("hours", "wall-clock hours", "hours"),
    "flops": ("train_flops", "training FLOPs (multiply-adds)", "flops"),
}


def _axis_label(metric: str) -> str:
    return metric.upper() if metric in ("fid", "sfid", "fd", "is") else metric.replace("_", " ")


def plot_curves(
    rows: list[dict],
    metric: str,
    output_dir: Path,
    baseline: str | None = None,
    arm_rows: list[dict] | None = None,
    axis: str = "step",
) -> list[Path]:
    """`metric` against an axis (step, images, hours, flops); PNG and SVG. An arm with several
    seeds is drawn as its mean with the interval shaded and each seed as a faint line; a
    single-seed arm as one line. `baseline`: the baseline arm (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, xlabel, suffix = AXES[axis]
    arm_rows = arm_rows if arm_rows is not None else arm_table(rows)
    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    for index, arm in enumerate(dict.fromkeys(r["arm"] for r in arm_rows)):
        colour = f"C{index}"
        points = sorted(
            (r[key], r[metric], r.get(f"{metric}_low"), r.get(f"{metric}_high"), r["seeds"])
            for r in arm_rows
            if r["arm"] == arm and r.get(metric) is not None and r.get(key) is not None
        )
        if not points:
            continue
        xs, means, lows, highs, seeds = zip(*points)
        seeds_max = max(seeds)
        label = arm + (" (baseline)" if arm == baseline else "")
        label += f", {seeds_max} seeds" if seeds_max > 1 else ""
        axes.plot(xs, means, "--" if arm == baseline else "-", marker="o", color=colour, label=label)
        if seeds_max > 1:
            shaded = [(x, lo, hi) for x, lo, hi in zip(xs, lows, highs) if lo is not None]
            if shaded:
                sx, slo, shi = zip(*shaded)
                axes.fill_between(sx, slo, shi, color=colour, alpha=0.2, linewidth=0)
            for run in dict.fromkeys(r["run"] for r in rows if r["arm"] == arm):
                run_points = sorted(
                    (r[key], r[metric])
                    for r in rows
                    if r["run"] == run and r.get(metric) is not None and r.get(key) is not None
                )
                if run_points:
                    axes.plot(*zip(*run_points), "-", color=colour, alpha=0.3, linewidth=0.8)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(_axis_label(metric))
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    paths = []
    for file_suffix in ("png", "svg"):
        path = output_dir / f"{metric}_vs_{suffix}.{file_suffix}"
        figure.savefig(path, dpi=150)
        paths.append(path)
    plt.close(figure)
    return paths


def _run_names(runs: list[Path]) -> dict[Path, str]:
    names = {run: run.name for run in runs}
    if len(set(names.values())) < len(runs):  # same folder names under different parents
        names = {run: str(run) for run in runs}
    return names


def _resolve_explicit_arms(
    explicit: dict[str, list[str | os.PathLike]], run_dirs: list[Path]
) -> dict[str, list[Path]]:
    """--arm members: a run directory path, or the folder name of one of the runs given. Paths
    not among the runs are added to them."""
    resolved: dict[str, list[Path]] = {}
    for arm, members in explicit.items():
        resolved[arm] = []
        for member in members:
            match = next(
                (r for r in run_dirs if r.resolve() == Path(member).resolve() or r.name == str(member)),
                None,
            )
            if match is None:
                if not (Path(member) / "checkpoints").is_dir():
                    raise FileNotFoundError(
                        f"--arm {arm}: {member} is neither one of the runs nor a run directory"
                    )
                match = Path(member)
                run_dirs.append(match)
            if any(match in members for members in resolved.values()):
                raise ValueError(f"--arm {arm}: {member} is already in an arm")
            resolved[arm].append(match)
    return resolved


def build_curves(
    runs: Iterable[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    ref: str | os.PathLike | ReferenceStats,
    evaluator: Evaluator,
    num_samples: int = 10_000,
    settings: SamplerSettings | None = None,
    baseline: str | os.PathLike | None = None,
    metric: str | None = None,
    seed: int = 0,
    labels: str = "balanced",
    batch_size: int = 64,
    device: torch.device | str | None = None,
    wandb_project: str | None = None,
    progress: bool = True,
    arms: dict[str, list[str | os.PathLike]] | None = None,
    classifier: Classifier | None = None,
    sampling_seeds: int = 0,
) -> CurvesResult:
    """Evaluate every complete checkpoint of `runs` (cached), write the tables, plots and speed-ups.

    metric: the one plotted and used for the speed-up (default: fid if evaluated, else the
    evaluator's first metric). baseline: one of `runs` (or an extra run, evaluated too);
    None: the single run whose config has no encoder (plain SiT) if there is exactly one,
    otherwise no speed-up is computed; its arm is the baseline arm.
    arms: arm name -> runs (paths or run folder names), checked to differ only in the seed;
    the other runs are grouped into arms by their configs.
    classifier: adds `class_accuracy` to every checkpoint's metrics.
    sampling_seeds: K > 1 re-scores each run's last checkpoint with K sample sets (sampling
    seeds seed, seed + 1, ...) and reports their spread (`sampling_spread`).
    """
    # the precision `auto` picks is part of each cached result's key
    settings = settings or SamplerSettings()
    if progress:
        print(f"sampling {resolve_precision(settings.precision, device or evaluator.device).summary()}")
    settings = settings.resolved(device or evaluator.device)
    run_dirs = [Path(r) for r in runs]
    if baseline is not None and Path(baseline).resolve() not in [r.resolve() for r in run_dirs]:
        run_dirs.append(Path(baseline))
    explicit = _resolve_explicit_arms(arms or {}, run_dirs)
    for run_dir in run_dirs:
        if not (run_dir / "checkpoints").is_dir():
            raise FileNotFoundError(f"{run_dir} is not a run directory (no checkpoints/ folder)")
    names = _run_names(run_dirs)
    configs = {run_dir: read_run_config(run_dir) for run_dir in run_dirs}
    arm_dirs = group_arms(run_dirs, names, configs, explicit)  # refuses before any sampling
    arm_of = {run_dir: arm for arm, members in arm_dirs.items() for run_dir in members}
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    reference = evaluator.reference(ref)  # computed (or read from cache) once for all checkpoints
    metric = metric or ("fid" if "fid" in evaluator.metrics else evaluator.metrics[0])
    metric = {"prc": "precision"}.get(metric, metric)
    common = dict(
        num_samples=num_samples,
        settings=settings,
        labels=labels,
        batch_size=batch_size,
        device=device,
        classifier=classifier,
    )

    rows: list[dict] = []
    flop_notes: dict[str, str] = {}
    for run_dir in run_dirs:
        start = run_start_time(run_dir)
        batch = global_batch_size(run_dir)
        step_flops, flop_notes[names[run_dir]] = flops_per_step(run_dir, configs[run_dir])
        for step, folder in list_checkpoints(run_dir / "checkpoints"):
            record = evaluate_checkpoint(run_dir, step, evaluator, reference, seed=seed, **common)
            saved_at = json.loads((folder / COMPLETE).read_text())["time"]
            row = {
                "run": names[run_dir],
                "arm": arm_of[run_dir],
                "seed": (configs[run_dir].get("run") or {}).get("seed"),
                "step": step,
                "images_seen": step * batch if batch else None,
                "hours": (saved_at - start) / 3600 if start is not None else None,
                "train_flops": step * step_flops if step_flops is not None else None,
                **{k: v for k, v in record["metrics"].items()},
            }
            rows.append(row)
            if progress:
                shown = ", ".join(
                    f"{k}={v:.4g}" for k, v in record["metrics"].items() if isinstance(v, float)
                )
                print(f"{names[run_dir]} step {step}: {shown}", flush=True)

    spread = {}
    if sampling_seeds > 1:
        spread = sampling_spread(run_dirs, names, evaluator, reference, metric, sampling_seeds, seed, common)

    baseline_name = _pick_baseline(run_dirs, names, baseline, arm_of)
    speedup = speedup_table(rows, baseline_name, metric) if baseline_name and rows else {}
    arms_by_name = {arm: [names[m] for m in members] for arm, members in arm_dirs.items()}
    arm_rows = arm_table(rows) if rows else []
    baseline_arm = next((arm_of[r] for r in run_dirs if names[r] == baseline_name), None)
    arm_speedup = (
        arm_speedups(rows, arms_by_name, baseline_arm, metric, seed=seed) if baseline_arm and rows else {}
    )
    csv_path, json_path = write_table(rows, output_dir, arm_rows)
    summary = {
        "metric": metric,
        "baseline": baseline_name,
        "baseline_arm": baseline_arm,
        "num_samples": num_samples,
        "settings": settings.to_dict(),
        "seed": seed,
        "labels": labels,
        "metrics": evaluator.metrics,
        "classifier": classifier.name if classifier else None,
        "rows": rows,
        "speedup": speedup,
        "arms": arms_by_name,
        "arm_rows": arm_rows,
        "arm_speedup": arm_speedup,
        "sampling_spread": spread,
        "flops": flop_notes,
    }
    json_path.write_text(json.dumps(summary, indent=1))
    result = CurvesResult(
        rows,
        speedup,
        baseline_name,
        metric,
        {"csv": csv_path, "json": json_path},
        arms_by_name,
        arm_rows,
        arm_speedup,
        baseline_arm,
        spread,
    )
    if arm_rows:
        result.files["arms_csv"] = output_dir / "arms.csv"
        plotted = [metric] + (["class_accuracy"] if metric != "class_accuracy" and classifier else [])
        for plotted_metric in plotted:
            for axis, (key, _, suffix) in AXES.items():
                if axis != "step" and not all(r.get(key) is not None for r in rows):
                    continue  # an axis some run cannot give (no batch size, no FLOP count)
                for path in plot_curves(rows, plotted_metric, output_dir, baseline_arm, arm_rows, axis):
                    kind = path.suffix.lstrip(".")
                    if plotted_metric != metric or axis != "step":
                        kind = f"{plotted_metric}_vs_{suffix}_{kind}"
                    result.files[kind] = path
    if wandb_project:
        _log_wandb(result, wandb_project)
    return result


def sampling_spread(
    run_dirs: list[Path],
    names: dict[Path, str],
    evaluator: Evaluator,
    reference,
    metric: str,
    count: int,
    seed: int,
    common: dict,
) -> dict[str, dict]:
    """Each run's last checkpoint scored with `count` sample sets (seeds seed .. seed+count-1):
    the evaluation's own noise, to set beside the spread over training seeds."""
    spread = {}
    for run_dir in run_dirs:
        found = list_checkpoints(run_dir / "checkpoints")
        if not found:
            continue
        step = found[-1][0]
        records = [
            evaluate_checkpoint(run_dir, step, evaluator, reference, seed=seed + k, **common)
            for k in range(count)
        ]
        values = [record["metrics"][metric] for record in records]
        interval = mean_interval(values)
        spread[names[run_dir]] = {
            "step": step,
            "metric": metric,
            "values": values,
            "sampling_seeds": list(range(seed, seed + count)),
            "std": float(np.std(values, ddof=1)),
            **{k: v for k, v in interval.to_dict().items() if k in ("mean", "low", "high", "method")},
        }
    return spread


def _pick_baseline(
    run_dirs: list[Path], names: dict[Path, str], baseline, arm_of: dict[Path, str] | None = None
) -> str | None:
    """The baseline run: the one given, else the run whose config has no encoder (plain SiT)
    when there is exactly one, or the first of them when they are the seeds of one arm."""
    if baseline is not None:
        wanted = Path(baseline).resolve()
        return next(names[r] for r in run_dirs if r.resolve() == wanted)
    plain = []
    for run_dir in run_dirs:
        config = read_run_config(run_dir)
        encoder = str((config.get("encoder") or {}).get("encoder", "")).strip().lower()
        if encoder in ("", "none"):
            plain.append(run_dir)
    if len(plain) == 1 or (plain and arm_of and len({arm_of[r] for r in plain}) == 1):
        return names[plain[0]]
    return None


def _log_wandb(result: CurvesResult, project: str) -> None:
    import sys

    try:
        import wandb

        run = wandb.init(project=project, job_type="curves", settings=wandb.Settings(init_timeout=90))
        columns = sorted({k for r in result.rows for k in r})
        run.log(
            {
                "curves": wandb.Table(
                    columns=columns, data=[[r.get(c) for c in columns] for r in result.rows]
                ),
                f"{result.metric}_vs_step": wandb.Image(str(result.files["png"]))
                if "png" in result.files
                else None,
            }
        )
        run.summary["speedup"] = result.speedup
        run.finish()
    except Exception as error:  # noqa: BLE001 - wandb is optional; the files are already written
        print(f"wandb logging failed ({error}); results are in {result.files['json']}", file=sys.stderr)
