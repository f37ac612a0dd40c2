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
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from repa.eval.checkpoints import Generator, load_generator
from repa.eval.metrics import Evaluator
from repa.eval.references import ReferenceStats, fingerprint
from repa.eval.sample import SamplerSettings, generate_images, generate_share
from repa.precision import resolve_precision
from repa.runs import COMPLETE, checkpoint_name, list_checkpoints
from repa.utils.files import write_bytes_atomic

HIGHER_IS_BETTER = {"is", "precision", "recall"}


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
) -> dict[str, float]:
    """Sample `num_samples` images in memory (streamed, never written) and score them.

    With world_size > 1 every process of torch.distributed's default group calls this: each
    samples its share (`batch_size` per process) and computes its features, and the scores of the
    whole set come back on every process (`Evaluator.evaluate_share`); only rank 0 needs `ref`.
    """
    device = torch.device(device or evaluator.device)
    generator.to(device)
    if world_size > 1:
        indices, images = generate_share(
            generator, num_samples, settings, seed=seed, labels=labels, batch_size=batch_size,
            rank=rank, world_size=world_size, device=device,
        )  # fmt: skip
        return evaluator.evaluate_share(images, indices, ref, rank=rank, world_size=world_size)
    images = generate_images(
        generator, num_samples, settings, seed=seed, labels=labels, batch_size=batch_size, device=device
    )
    return evaluator.evaluate(images, ref)


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
) -> dict[str, float]:
    """Score an in-memory SiT (e.g. the EMA model during training, `--eval-every`).

    Build the Evaluator and the reference statistics once (`evaluator.reference(ref)`) and pass
    the result as `ref`, so each call pays only for sampling and sample features. The model's
    train/eval mode is restored afterwards. rank / world_size: spread over the processes of
    torch.distributed's default group, all of which call this (see `evaluate_generator`).
    """
    was_training = model.training
    model.eval()
    try:
        generator = Generator(model, tokenizer, resolution, path_type)
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
    evaluator: Evaluator, ref, num_samples: int, settings: SamplerSettings, seed: int, labels: str
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
) -> dict:
    """Metrics of one complete checkpoint, read from RUN/eval/ when already computed."""
    run_dir = Path(run_dir)
    key = result_key(evaluator, ref, num_samples, settings, seed, labels)
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


def write_table(rows: list[dict], output_dir: Path) -> tuple[Path, Path]:
    columns = ["run", "step", "images_seen", "hours"]
    columns += sorted({k for r in rows for k in r} - set(columns) - {"run_dir"})
    csv_path = output_dir / "curves.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return csv_path, output_dir / "curves.json"


def plot_curves(rows: list[dict], metric: str, output_dir: Path, baseline: str | None = None) -> list[Path]:
    """`metric` against training step, one line per run; PNG and SVG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    for run in dict.fromkeys(r["run"] for r in rows):
        points = sorted((r["step"], r[metric]) for r in rows if r["run"] == run and r.get(metric) is not None)
        if points:
            steps, values = zip(*points)
            style = "--" if run == baseline else "-"
            axes.plot(
                steps, values, style, marker="o", label=run + (" (baseline)" if run == baseline else "")
            )
    axes.set_xlabel("training step")
    axes.set_ylabel(metric.upper() if metric in ("fid", "sfid", "fd", "is") else metric)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    paths = []
    for suffix in ("png", "svg"):
        path = output_dir / f"{metric}_vs_step.{suffix}"
        figure.savefig(path, dpi=150)
        paths.append(path)
    plt.close(figure)
    return paths


def _run_names(runs: list[Path]) -> dict[Path, str]:
    names = {run: run.name for run in runs}
    if len(set(names.values())) < len(runs):  # same folder names under different parents
        names = {run: str(run) for run in runs}
    return names


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
) -> CurvesResult:
    """Evaluate every complete checkpoint of `runs` (cached), write the table, plot and speed-up.

    metric: the one plotted and used for the speed-up (default: fid if evaluated, else the
    evaluator's first metric). baseline: one of `runs` (or an extra run, evaluated too);
    None: the single run whose config has no encoder (plain SiT) if there is exactly one,
    otherwise no speed-up is computed.
    """
    # the precision `auto` picks is part of each cached result's key
    settings = settings or SamplerSettings()
    if progress:
        print(f"sampling {resolve_precision(settings.precision, device or evaluator.device).summary()}")
    settings = settings.resolved(device or evaluator.device)
    run_dirs = [Path(r) for r in runs]
    if baseline is not None and Path(baseline).resolve() not in [r.resolve() for r in run_dirs]:
        run_dirs.append(Path(baseline))
    for run_dir in run_dirs:
        if not (run_dir / "checkpoints").is_dir():
            raise FileNotFoundError(f"{run_dir} is not a run directory (no checkpoints/ folder)")
    names = _run_names(run_dirs)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    reference = evaluator.reference(ref)  # computed (or read from cache) once for all checkpoints
    metric = metric or ("fid" if "fid" in evaluator.metrics else evaluator.metrics[0])
    metric = {"prc": "precision"}.get(metric, metric)

    rows: list[dict] = []
    for run_dir in run_dirs:
        start = run_start_time(run_dir)
        batch = global_batch_size(run_dir)
        for step, folder in list_checkpoints(run_dir / "checkpoints"):
            record = evaluate_checkpoint(
                run_dir,
                step,
                evaluator,
                reference,
                num_samples=num_samples,
                settings=settings,
                seed=seed,
                labels=labels,
                batch_size=batch_size,
                device=device,
            )
            saved_at = json.loads((folder / COMPLETE).read_text())["time"]
            row = {
                "run": names[run_dir],
                "step": step,
                "images_seen": step * batch if batch else None,
                "hours": (saved_at - start) / 3600 if start is not None else None,
                **{k: v for k, v in record["metrics"].items()},
            }
            rows.append(row)
            if progress:
                shown = ", ".join(
                    f"{k}={v:.4g}" for k, v in record["metrics"].items() if isinstance(v, float)
                )
                print(f"{names[run_dir]} step {step}: {shown}", flush=True)

    baseline_name = _pick_baseline(run_dirs, names, baseline)
    speedup = speedup_table(rows, baseline_name, metric) if baseline_name and rows else {}
    csv_path, json_path = write_table(rows, output_dir)
    summary = {
        "metric": metric,
        "baseline": baseline_name,
        "num_samples": num_samples,
        "settings": settings.to_dict(),
        "seed": seed,
        "labels": labels,
        "metrics": evaluator.metrics,
        "rows": rows,
        "speedup": speedup,
    }
    json_path.write_text(json.dumps(summary, indent=1))
    plots = plot_curves(rows, metric, output_dir, baseline_name) if rows else []
    result = CurvesResult(rows, speedup, baseline_name, metric, {"csv": csv_path, "json": json_path})
    for path in plots:
        result.files[path.suffix.lstrip(".")] = path
    if wandb_project:
        _log_wandb(result, wandb_project)
    return result


def _pick_baseline(run_dirs: list[Path], names: dict[Path, str], baseline) -> str | None:
    if baseline is not None:
        wanted = Path(baseline).resolve()
        return next(names[r] for r in run_dirs if r.resolve() == wanted)
    import yaml

    plain = []
    for run_dir in run_dirs:
        config = (
            yaml.safe_load((run_dir / "config.yaml").read_text())
            if (run_dir / "config.yaml").is_file()
            else {}
        )
        encoder = str(((config or {}).get("encoder") or {}).get("encoder", "")).strip().lower()
        if encoder in ("", "none"):
            plain.append(run_dir)
    return names[plain[0]] if len(plain) == 1 else None


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
