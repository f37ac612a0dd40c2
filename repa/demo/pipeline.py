"""`repa demo`: the whole research loop at toy scale, on a CPU, offline, through the real code paths.

1. data      class-conditional synthetic images (repa.data.synthetic); two more disjoint sets:
             one trains the evaluator, one is the Frechet reference
2. teacher   a small hybrid ViT trained to classify the training images, saved as a local encoder
             file and loaded back through repa.encoders like any pretrained encoder
             (`--encoder dinov2-s` uses the real DINOv2 instead, when it can be downloaded);
             then the shards (repa.data.build), with the teacher's tokens cached
3. training  a plain SiT baseline and a REPA run, identical in seed, data order, model, steps
             (repa.train.loop.train, pixel-space tokenizer); optionally a REPA-E run
4. scoring   every checkpoint's EMA model sampled and scored with a Frechet distance in the
             feature space of a separately trained evaluator CNN (never the teacher), plus FID
             when Inception weights are available (repa.eval.curves)
5. report    FD-vs-step plot, sample grids, metrics table, speed-up, report.md linking them

Deterministic for a given seed: every stage has a fixed number of steps (no time budgets).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image


@dataclass
class DemoSize:
    """How big each stage is. `full` is sized for at most 12 minutes on a 2-core CPU without native
    bf16 (fp32 throughout), `quick` for tests; the README has the measured times.

    Where the full size's time goes, and why it is what it is: the two SiT runs and the scoring
    are all the model's matrix products (~31 GFLOP per batch-64 step, ~0.16 GFLOP per sample
    and ODE step). Batch 32 for 500 steps shows the same curve as batch 64 (the baseline's FD
    falls from ~290 to ~20 between steps 200 and 500, REPA ends ~22% lower in both) at half the
    cost; 250 scored samples per checkpoint keep the metric's noise floor (real vs real images)
    far below the gap between the runs; the teacher and the evaluator reach 100% test accuracy
    well before the steps given here.
    """

    resolution: int = 32
    num_classes: int = 10
    train_images: int = 4000
    evaluator_images: int = 2000
    reference_images: int = 1000
    shard_size: int = 250
    teacher_steps: int = 200
    evaluator_steps: int = 200
    # the diffusion model: SiT-S/4 narrowed (1.9M parameters), 8x8 tokens on 32x32 pixels
    hidden_size: int = 128
    depth: int = 6
    num_heads: int = 4
    align_depth: int = 2
    projector_dim: int = 256
    batch_size: int = 32
    learning_rate: float = 5e-4
    ema_decay: float = 0.99
    train_steps: int = 500
    checkpoint_every: int = 100
    eval_samples: int = 250
    sample_steps: int = 16
    grid_samples: int = 64
    vae_steps: int = 300  # --with-repa-e: reconstruction pretraining of the small VAE


FULL = DemoSize()
QUICK = DemoSize(
    train_images=256,
    evaluator_images=256,
    reference_images=128,
    shard_size=32,
    teacher_steps=30,
    evaluator_steps=30,
    hidden_size=32,
    depth=2,
    num_heads=2,
    align_depth=1,
    projector_dim=32,
    batch_size=16,
    train_steps=20,
    checkpoint_every=10,
    eval_samples=64,
    sample_steps=4,
    grid_samples=16,
    vae_steps=10,
)


@dataclass
class DemoOptions:
    output: Path = Path("demo_output")
    seed: int = 0
    quick: bool = False
    with_repa_e: bool = False
    encoder: str = ""  # "" trains the demo teacher; or a registry name (dinov2-s, needs the weights)
    mixed_precision: str = "auto"  # repa.precision: bf16 only where the CPU multiplies it natively
    size: DemoSize = field(default_factory=DemoSize)


def _log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_image_folder(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """An ImageNet-layout folder -> uint8 (N, 3, H, W) and int64 labels, in sorted order."""
    from repa.data.build import list_image_folder

    items, _ = list_image_folder(folder)
    images = np.stack([np.asarray(Image.open(item.path).convert("RGB")) for item in items])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.tensor(
        [item.label for item in items]
    )


def make_data(options: DemoOptions) -> dict[str, Path]:
    from repa.data.synthetic import write_synthetic_dataset

    size, root = options.size, options.output / "data"
    folders = {}
    for name, count, seed_offset in (
        ("train", size.train_images, 0),
        ("evaluator", size.evaluator_images, 1),
        ("reference", size.reference_images, 2),
        ("holdout", size.eval_samples, 3),  # real images scored like samples: the FD noise floor
    ):
        folders[name] = root / name
        write_synthetic_dataset(
            folders[name],
            num_images=count,
            resolution=size.resolution,
            num_classes=size.num_classes,
            seed=options.seed * 1000 + seed_offset,
        )
    return folders


def make_shards(options: DemoOptions, folders: dict[str, Path], encoder_spec: str) -> Path:
    """The training shards, with the teacher's tokens cached as the README's recipe caches
    DINOv2's: the REPA run then never runs the teacher (a quarter of its step on a CPU). Built
    once the teacher exists; both runs read the same shards in the same order."""
    from repa.data.build import build_shards
    from repa.encoders import create_encoder

    size = options.size
    encoder = create_encoder(encoder_spec, resolution=size.resolution).eval()
    build_shards(
        str(folders["train"]),
        options.output / "data" / "shards",
        resolution=size.resolution,
        shard_size=size.shard_size,
        workers=2,
        encoder=encoder,
    )
    return options.output / "data" / "shards"


def experiment_config(
    options: DemoOptions, shards: Path, name: str, method: str, encoder: str, tokenizer="pixels"
):
    from repa.config import ExperimentConfig

    size = options.size
    return ExperimentConfig.from_dict(
        {
            "model": {
                "name": "SiT-S/4",
                "hidden_size": size.hidden_size,
                "depth": size.depth,
                "num_heads": size.num_heads,
                "align_depth": size.align_depth,
                "projector_dim": size.projector_dim,
                "num_classes": size.num_classes,
            },
            "data": {
                "data": str(shards),
                "resolution": size.resolution,
                "batch_size": size.batch_size,
                "num_workers": 1,
                "shuffle_buffer": 500,
            },
            "tokenizer": {"tokenizer": tokenizer},
            "encoder": {"encoder": encoder},
            "optim": {"learning_rate": size.learning_rate, "ema_decay": size.ema_decay},
            "vae": {"lpips_weight": 0.0},
            "run": {
                "method": method,
                "output_dir": str(options.output / "runs"),
                "exp_name": name,
                "max_train_steps": size.train_steps,
                "checkpointing_steps": size.checkpoint_every,
                "keep_checkpoints": size.train_steps // size.checkpoint_every + 1,
                "mixed_precision": options.mixed_precision,
                "seed": options.seed,
                "log_every": 10,
                "sample_every": 0,
            },
        }
    )


def run_demo(options: DemoOptions) -> dict:
    """Run every stage; returns the summary also written to OUTPUT/summary.json."""
    from repa.demo.networks import evaluator_feature_fn, train_demo_encoder, train_evaluator
    from repa.encoders import create_encoder
    from repa.encoders.local import save_local_encoder
    from repa.eval.curves import build_curves
    from repa.eval.metrics import Evaluator
    from repa.eval.sample import SamplerSettings
    from repa.train.loop import train

    size, output = options.size, options.output
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    _log("1/5 synthetic data")
    folders = make_data(options)
    train_images, train_labels = load_image_folder(folders["train"])
    evaluator_images, evaluator_labels = load_image_folder(folders["evaluator"])
    reference_images, reference_labels = load_image_folder(folders["reference"])
    timings["data"] = time.perf_counter() - started

    mark = time.perf_counter()
    if options.encoder:
        _log(f"2/5 teacher: {options.encoder} from the encoder registry")
        encoder_spec, teacher_info = options.encoder, {"name": options.encoder}
        create_encoder(encoder_spec, resolution=size.resolution)  # fails early, with the weights message
    else:
        _log(f"2/5 teacher: training a hybrid ViT for {size.teacher_steps} steps")
        teacher, save_kwargs = train_demo_encoder(
            train_images,
            train_labels,
            evaluator_images,
            evaluator_labels,
            resolution=size.resolution,
            num_classes=size.num_classes,
            steps=size.teacher_steps,
            seed=options.seed,
        )
        encoder_path = output / "encoder" / "demo-encoder.safetensors"
        encoder_path.parent.mkdir(parents=True, exist_ok=True)
        save_local_encoder(str(encoder_path), teacher.model, **save_kwargs)
        encoder_spec = str(encoder_path)
        teacher_info = {
            "path": str(encoder_path),
            "test_accuracy": teacher.test_accuracy,
            "steps": teacher.steps,
        }
    timings["teacher"] = time.perf_counter() - mark

    mark = time.perf_counter()
    _log("2/5 training shards, with the teacher's tokens cached")
    folders["shards"] = make_shards(options, folders, encoder_spec)
    timings["shards"] = time.perf_counter() - mark

    mark = time.perf_counter()
    _log(f"3/5 evaluator CNN: {size.evaluator_steps} steps on a disjoint image set")
    evaluator_net = train_evaluator(
        evaluator_images,
        evaluator_labels,
        reference_images,
        reference_labels,
        num_classes=size.num_classes,
        steps=size.evaluator_steps,
        seed=options.seed + 1,
    )
    timings["evaluator"] = time.perf_counter() - mark

    configs = {
        "sit": experiment_config(options, folders["shards"], "sit", "sit", "none"),
        "repa": experiment_config(options, folders["shards"], "repa", "repa", encoder_spec),
    }
    if options.with_repa_e:
        mark = time.perf_counter()
        _log(f"4/5 pretraining a small VAE for REPA-E ({size.vae_steps} steps)")
        vae_path = _pretrain_vae(options, train_images)
        timings["vae_pretraining"] = time.perf_counter() - mark
        configs["repa-e"] = experiment_config(
            options, folders["shards"], "repa-e", "repa-e", encoder_spec, str(vae_path)
        )
        configs["repa-e"].model.name = "SiT-S/2"  # 16x16 latents -> the teacher's 8x8 tokens
    if options.encoder:  # a registry encoder's token grid at 32px need not match the SiT's 8x8
        for config in configs.values():
            config.model.align_resample = True
    run_dirs = {}
    for name, config in configs.items():
        mark = time.perf_counter()
        _log(f"4/5 training {name}: {size.train_steps} steps")
        result = train(config)
        if result.preempted:  # a Ctrl-C stops training gracefully; the demo's comparison stops with it
            raise KeyboardInterrupt(f"stopped while training {name} (step {result.step})")
        run_dirs[name] = result.run_dir
        timings[f"train_{name}"] = time.perf_counter() - mark

    mark = time.perf_counter()
    _log("5/5 sampling and scoring every checkpoint")
    metrics = ["fd"] + (["fid"] if _inception_available() else [])
    evaluator = Evaluator(
        metrics,
        feature_fn=evaluator_feature_fn(evaluator_net.model),
        feature_name=f"demo-evaluator-seed{options.seed}",
        device="cpu",
        cache_dir=False,
    )
    settings = SamplerSettings(mode="ode", method="euler", num_steps=size.sample_steps, cfg_scale=1.0)
    curves = build_curves(
        list(run_dirs.values()),
        output / "report",
        ref=str(folders["reference"]),
        evaluator=evaluator,
        num_samples=size.eval_samples,
        settings=settings,
        baseline=run_dirs["sit"],
        metric="fd",
        seed=options.seed,
        device="cpu",
        progress=False,
    )
    real_fd = float(evaluator.evaluate(str(folders["holdout"]), str(folders["reference"]))["fd"])
    grids = {
        name: _sample_grid(run_dir, output / "report" / f"samples_{name}.png", size, settings)
        for name, run_dir in run_dirs.items()
    }
    timings["scoring"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - started

    summary = {
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "teacher": teacher_info,
        "evaluator": {"test_accuracy": evaluator_net.test_accuracy, "steps": evaluator_net.steps},
        "metric": curves.metric,
        "rows": curves.rows,
        "speedup": {Path(k).name: v for k, v in curves.speedup.items()},
        "real_vs_real_fd": real_fd,
        "files": {k: str(v) for k, v in curves.files.items()},
        "grids": {k: str(v) for k, v in grids.items()},
        "seconds": timings,
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    write_report(output, summary)
    _log(f"done in {timings['total'] / 60:.1f} min: {output / 'report.md'}")
    return summary


def _pretrain_vae(options: DemoOptions, images: torch.Tensor) -> Path:
    """The small VAE REPA-E starts from, saved with its latent statistics as a tokenizer file."""
    from repa.demo.networks import pretrain_demo_vae
    from repa.tokenizers import compute_latent_stats, save_latent_stats

    size = options.size
    vae = pretrain_demo_vae(images, resolution=size.resolution, steps=size.vae_steps, seed=options.seed + 2)
    path = options.output / "vae" / "demo-vae.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(vae.autoencoder_state_dict(), path)
    stats = compute_latent_stats(
        vae, images.split(256), generator=torch.Generator().manual_seed(options.seed)
    )
    save_latent_stats(path.with_name("demo-vae-latents-stats.pt"), stats["mean"], stats["std"])
    return path


def _inception_available() -> bool:
    from repa.eval.features import resolve_inception_weights

    try:
        resolve_inception_weights(None)
        return True
    except Exception:  # noqa: BLE001 - offline without weights: FD only, as documented
        return False


def _sample_grid(run_dir: Path, path: Path, size: DemoSize, settings) -> Path:
    from repa.eval.checkpoints import load_generator
    from repa.eval.sample import generate_images
    from repa.utils.images import save_image_grid

    generator = load_generator(run_dir, device="cpu")
    # balanced labels: every row of num_classes images holds each class once
    batches = generate_images(
        generator, size.grid_samples, settings, seed=12345, labels="balanced", device="cpu"
    )
    columns = size.num_classes if size.grid_samples >= size.num_classes else None
    return save_image_grid(torch.cat(list(batches)), path, columns=columns)


def write_report(output: Path, summary: dict) -> Path:
    """report.md: what ran, the curve, the table, the speed-up, the grids."""
    metric = summary["metric"]
    lines = [
        "# repa demo report",
        "",
        f"Plain SiT vs REPA on synthetic {summary['options']['size']['resolution']}px images, "
        f"{summary['options']['size']['train_steps']} steps each, same seed, data order and model. "
        f"Scored by `{metric}`: a Frechet distance in the features of a separately trained evaluator CNN "
        f"(test accuracy {summary['evaluator']['test_accuracy']:.1%}); lower is better. The same "
        f"number of real held-out images scores {summary['real_vs_real_fd']:.3f} (the metric's floor).",
    ]
    plot = next((Path(p) for p in summary["files"].values() if str(p).endswith(".png")), None)
    if plot is not None:
        lines += ["", f"![{metric} vs step]({plot.relative_to(output)})"]
    lines += ["", "| run | step | images seen | " + metric + " |", "|---|---|---|---|"]
    for row in summary["rows"]:
        lines.append(
            f"| {row['run']} | {row['step']} | {row.get('images_seen', '')} "
            f"| {row.get(metric, float('nan')):.3f} |"
        )
    lines += ["", "## Speed-up over the baseline", ""]
    for run, entry in summary["speedup"].items():
        if run == "sit":  # the baseline itself
            continue
        if entry.get("status") == "reached" and entry.get("ratio_steps"):
            lines.append(
                f"- {run}: reaches the baseline's best {metric} ({entry['baseline_best']:.3f} at step "
                f"{entry['baseline_best_step']}) at step {entry['step']}: "
                f"{entry['ratio_steps']:.2f}x fewer steps"
            )
        else:
            lines.append(
                f"- {run}: {entry.get('status', 'n/a')} (baseline best {entry.get('baseline_best')})"
            )
    last_step = max(row["step"] for row in summary["rows"])
    final = {row["run"]: row.get(metric) for row in summary["rows"] if row["step"] == last_step}
    if "sit" in final and final["sit"]:
        for run, value in final.items():
            if run != "sit" and value is not None:
                change = (value - final["sit"]) / final["sit"]
                lines.append(
                    f"- {run} at the last checkpoint (step {last_step}): {metric} {value:.3f} vs the "
                    f"baseline's {final['sit']:.3f} ({change:+.0%})"
                )
    lines += ["", "## Samples (EMA, final checkpoint)", ""]
    for name, grid in summary["grids"].items():
        lines.append(f"- {name}: ![{name}]({Path(grid).relative_to(output)})")
    lines += ["", "## Where the time went (seconds)", ""]
    lines += [f"- {stage}: {seconds:.0f}" for stage, seconds in summary["seconds"].items()]
    teacher = summary["teacher"]
    if "test_accuracy" in teacher:
        lines += [
            "",
            f"Teacher (demo encoder) test accuracy: {teacher['test_accuracy']:.1%} "
            f"after {teacher['steps']} steps.",
        ]
    path = output / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
