"""`repa demo`: the whole research loop at toy scale, on a CPU, offline, through the real code paths.

1. data      class-conditional synthetic images (repa.data.synthetic); two more disjoint sets:
             one trains the evaluator, one is the Frechet reference
2. teacher   a small hybrid ViT trained to classify the training images, saved as a local encoder
             file and loaded back through repa.encoders like any pretrained encoder
             (`--encoder dinov2-s` uses the real DINOv2 instead, when it can be downloaded);
             then the shards (repa.data.build), with the teacher's tokens cached
3. training  one run per arm and seed, identical in data, model and steps (repa.train.loop.train,
             pixel-space tokenizer); arms (ARMS): a plain SiT baseline and REPA by default,
             `--arms sit,repa,repa-random-teacher` adds the control with a random-weight
             teacher, any registered method name is an arm; `--seeds K` trains K seeds each
4. scoring   every checkpoint's EMA model sampled and scored with a Frechet distance in the
             feature space of a separately trained evaluator CNN (never the teacher), plus FID
             when Inception weights are available, and the class accuracy of the samples by
             that CNN (repa.eval.curves); arms of several seeds get 95% intervals
5. probe     CKNNA to the teacher and linear-probe accuracy per SiT layer (repa.eval.probe)
6. report    FD-vs-step plot with bands, sample grids, metrics table, speed-up with its
             interval, class accuracy, probe plot; report.md linking them

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
    probe_images: int = 250  # images of the holdout set the probe reads


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
    probe_images=64,
)

# An arm of the demo: a name -> config overrides ("section.field": value) on the demo's config.
# "{teacher}" is the demo's teacher encoder, "{vae}" the small VAE REPA-E starts from,
# "{align_depth}" and "{sra_teacher_depth}" block depths of the demo's size (see _substitutions).
# A registered training method's name not listed here is an arm too: that method with the teacher.
ARMS: dict[str, dict[str, object]] = {
    "sit": {"run.method": "sit", "encoder.encoder": "none"},
    "repa": {"run.method": "repa", "encoder.encoder": "{teacher}"},
    # the control: the teacher's architecture with seeded random weights (repa.encoders, NAME:random)
    "repa-random-teacher": {"run.method": "repa", "encoder.encoder": "{teacher}:random"},
    # 16x16 latents of the small VAE -> SiT-S/2 gives the teacher's 8x8 tokens
    "repa-e": {
        "run.method": "repa-e",
        "encoder.encoder": "{teacher}",
        "tokenizer.tokenizer": "{vae}",
        "model.name": "SiT-S/2",
    },
    # SRA and the dispersive loss as published: no external encoder, each against the plain SiT
    # (with --encoder they add to REPA; train those with `repa train`)
    "sra": {
        "run.method": "sra",
        "encoder.encoder": "none",
        "objective.sra_student_depth": "{align_depth}",
        "objective.sra_teacher_depth": "{sra_teacher_depth}",
    },
    "dispersive": {
        "run.method": "dispersive",
        "encoder.encoder": "none",
        "objective.dispersive_weight": 0.5,  # the DDT code's default (temperature 1, its default too)
    },
}
DEFAULT_ARMS = ("sit", "repa")


def arm_overrides(arm: str) -> dict[str, object]:
    """The config overrides of an arm (ARMS, or a registered method with the teacher)."""
    if arm in ARMS:
        return ARMS[arm]
    from repa.train.methods import method_names

    if arm in method_names():
        return {"run.method": arm, "encoder.encoder": "{teacher}"}
    raise ValueError(
        f"--arms: unknown arm {arm!r}; choose from {', '.join(ARMS)} or a training method "
        f"({', '.join(method_names())})"
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
    arms: tuple[str, ...] = DEFAULT_ARMS  # ARMS names or training methods; the first is the baseline
    seeds: int = 1  # training seeds per arm: seed, seed + 1, ...

    def arm_list(self) -> list[str]:
        arms = list(dict.fromkeys(self.arms))
        if self.with_repa_e and "repa-e" not in arms:
            arms.append("repa-e")
        for arm in arms:
            arm_overrides(arm)  # an unknown name fails before any work
        if self.seeds < 1:
            raise ValueError(f"--seeds {self.seeds}: at least 1")
        return arms


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
    options: DemoOptions,
    shards: Path,
    name: str,
    method: str = "sit",
    encoder: str = "none",
    tokenizer="pixels",
    *,
    seed: int | None = None,
    overrides: dict[str, object] | None = None,
):
    """The demo's config for one run; `overrides` ("section.field": value) make it an arm."""
    from repa.config import ExperimentConfig

    size = options.size
    values = {
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
            "seed": options.seed if seed is None else seed,
            "log_every": 10,
            "sample_every": 0,
        },
    }
    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".")
        values.setdefault(section, {})[key] = value  # e.g. "objective", which the base leaves default
    return ExperimentConfig.from_dict(values)


def run_demo(options: DemoOptions) -> dict:
    """Run every stage; returns the summary also written to OUTPUT/summary.json."""
    from repa.demo.networks import evaluator_feature_fn, train_demo_encoder, train_evaluator
    from repa.encoders import create_encoder
    from repa.encoders.local import save_local_encoder
    from repa.eval.curves import Classifier, build_curves
    from repa.eval.metrics import Evaluator
    from repa.eval.sample import SamplerSettings
    from repa.train.loop import train

    size, output = options.size, options.output
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    _log("1/6 synthetic data")
    folders = make_data(options)
    train_images, train_labels = load_image_folder(folders["train"])
    evaluator_images, evaluator_labels = load_image_folder(folders["evaluator"])
    reference_images, reference_labels = load_image_folder(folders["reference"])
    timings["data"] = time.perf_counter() - started

    mark = time.perf_counter()
    if options.encoder:
        _log(f"2/6 teacher: {options.encoder} from the encoder registry")
        encoder_spec, teacher_info = options.encoder, {"name": options.encoder}
        create_encoder(encoder_spec, resolution=size.resolution)  # fails early, with the weights message
    else:
        _log(f"2/6 teacher: training a hybrid ViT for {size.teacher_steps} steps")
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
    _log("2/6 training shards, with the teacher's tokens cached")
    folders["shards"] = make_shards(options, folders, encoder_spec)
    timings["shards"] = time.perf_counter() - mark

    mark = time.perf_counter()
    _log(f"3/6 evaluator CNN: {size.evaluator_steps} steps on a disjoint image set")
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

    arms, seeds = options.arm_list(), list(range(options.seed, options.seed + options.seeds))
    substitutions = _substitutions(size, encoder_spec)
    if any("{vae}" in str(v) for arm in arms for v in arm_overrides(arm).values()):
        mark = time.perf_counter()
        _log(f"4/6 pretraining a small VAE for REPA-E ({size.vae_steps} steps)")
        substitutions["{vae}"] = str(_pretrain_vae(options, train_images))
        timings["vae_pretraining"] = time.perf_counter() - mark
    configs = {}  # (arm, seed) -> config
    for arm in arms:
        overrides = {key: _substitute(value, substitutions) for key, value in arm_overrides(arm).items()}
        for seed in seeds:
            name = arm if len(seeds) == 1 else f"{arm}-seed{seed}"
            configs[arm, seed] = experiment_config(
                options, folders["shards"], name, seed=seed, overrides=overrides
            )
            if options.encoder:  # a registry encoder's token grid at 32px need not match the SiT's
                configs[arm, seed].model.align_resample = True
    run_dirs: dict[tuple[str, int], Path] = {}
    for (arm, seed), config in configs.items():
        mark = time.perf_counter()
        _log(f"4/6 training {config.run.exp_name}: {size.train_steps} steps")
        result = train(config)
        if result.preempted:  # a Ctrl-C stops training gracefully; the demo's comparison stops with it
            raise KeyboardInterrupt(f"stopped while training {config.run.exp_name} (step {result.step})")
        run_dirs[arm, seed] = result.run_dir
        timings[f"train_{config.run.exp_name}"] = time.perf_counter() - mark

    mark = time.perf_counter()
    _log("5/6 sampling and scoring every checkpoint")
    metrics = ["fd"] + (["fid"] if _inception_available() else [])
    evaluator = Evaluator(
        metrics,
        feature_fn=evaluator_feature_fn(evaluator_net.model),
        feature_name=f"demo-evaluator-seed{options.seed}",
        device="cpu",
        cache_dir=False,
    )
    classifier = Classifier(f"demo-evaluator-seed{options.seed}", _classify_fn(evaluator_net.model))
    settings = SamplerSettings(mode="ode", method="euler", num_steps=size.sample_steps, cfg_scale=1.0)
    baseline_arm = arms[0]
    curves = build_curves(
        list(run_dirs.values()),
        output / "report",
        ref=str(folders["reference"]),
        evaluator=evaluator,
        num_samples=size.eval_samples,
        settings=settings,
        baseline=run_dirs[baseline_arm, seeds[0]],
        metric="fd",
        seed=options.seed,
        device="cpu",
        progress=False,
        arms={arm: [run_dirs[arm, seed] for seed in seeds] for arm in arms},
        classifier=classifier,
    )
    real_fd = float(evaluator.evaluate(str(folders["holdout"]), str(folders["reference"]))["fd"])
    grids = {
        arm: _sample_grid(run_dirs[arm, seeds[0]], output / "report" / f"samples_{arm}.png", size, settings)
        for arm in arms
    }
    timings["scoring"] = time.perf_counter() - mark

    mark = time.perf_counter()
    _log("6/6 probing every arm's final model against the teacher")
    probe = _probe_arms(options, {arm: run_dirs[arm, seeds[0]] for arm in arms}, folders, encoder_spec)
    timings["probe"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - started

    summary = {
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "arms": arms,
        "seeds": seeds,
        "baseline_arm": baseline_arm,
        "teacher": teacher_info,
        "evaluator": {"test_accuracy": evaluator_net.test_accuracy, "steps": evaluator_net.steps},
        "metric": curves.metric,
        "rows": curves.rows,
        "arm_rows": curves.arm_rows,
        "speedup": {Path(k).name: v for k, v in curves.speedup.items()},
        "arm_speedup": curves.arm_speedup,
        "real_vs_real_fd": real_fd,
        "files": {k: str(v) for k, v in curves.files.items()},
        "grids": {k: str(v) for k, v in grids.items()},
        "probe": probe,
        "seconds": timings,
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    write_report(output, summary)
    _log(f"done in {timings['total'] / 60:.1f} min: {output / 'report.md'}")
    return summary


def _classify_fn(evaluator_cnn: torch.nn.Module):
    """uint8 images (B, 3, H, W) -> the evaluator CNN's logits (its inputs in [-1, 1], as trained)."""

    @torch.no_grad()
    def classify(images_uint8: torch.Tensor) -> torch.Tensor:
        evaluator_cnn.eval()
        return evaluator_cnn(images_uint8.float() / 127.5 - 1.0)

    return classify


def _substitutions(size: DemoSize, encoder_spec: str) -> dict[str, object]:
    """The placeholders of ARMS. SRA's blocks scaled to the demo's depth: the student at REPA's
    tap (SRA for SiT-XL/2: 8 of 28, REPA's too), the teacher at 20/28 of the depth (SRA's 20),
    deeper than the student."""
    teacher = min(size.depth, max(size.align_depth + 1, round(size.depth * 20 / 28)))
    return {"{teacher}": encoder_spec, "{align_depth}": size.align_depth, "{sra_teacher_depth}": teacher}


def _substitute(value: object, substitutions: dict[str, object]) -> object:
    if isinstance(value, str):
        if value in substitutions:  # the whole value: the replacement as it is (a block depth)
            return substitutions[value]
        for placeholder, replacement in substitutions.items():
            value = value.replace(placeholder, str(replacement))
    return value


def _probe_arms(
    options: DemoOptions, run_dirs: dict[str, Path], folders: dict[str, Path], encoder_spec: str
) -> dict:
    """CKNNA to the teacher and linear-probe accuracy per layer for each arm's final model
    (first seed), on held-out images; one plot with a line per arm and noise level."""
    from repa.encoders import create_encoder
    from repa.eval.checkpoints import load_generator
    from repa.eval.probe import plot_probe, probe_generator, read_images

    size = options.size
    images, labels = read_images(folders["holdout"], size.probe_images, size.resolution)
    teacher = create_encoder(encoder_spec, resolution=size.resolution)
    rows = []
    for arm, run_dir in run_dirs.items():
        generator = load_generator(run_dir, device="cpu")
        for row in probe_generator(
            generator, teacher, images, labels, noise_levels=(0.0, 0.5), seed=options.seed
        ):
            rows.append({"run": arm, **row})
    plots = plot_probe(
        rows, options.output / "report", title=f"each arm's final model vs the teacher ({len(images)} images)"
    )
    return {"rows": rows, "files": [str(p) for p in plots], "images": len(images)}


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


def _interval_text(low, high, digits: int = 3, percent: bool = False) -> str:
    if low is None:
        return "none (one seed)"
    if percent:
        return f"[{low:.1%}, {high:.1%}]"
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def write_report(output: Path, summary: dict) -> Path:
    """report.md: what ran, the curves with their bands, the table, the speed-up with its
    interval, class accuracy, the probe, the grids."""
    metric = summary["metric"]
    arms = summary.get("arms") or list(dict.fromkeys(r["run"] for r in summary["rows"]))
    seeds = summary.get("seeds") or [summary["options"]["seed"]]
    baseline = summary.get("baseline_arm") or arms[0]
    size = summary["options"]["size"]

    def relative(path) -> str:
        return str(Path(path).relative_to(output))

    lines = [
        "# repa demo report",
        "",
        f"Arms {', '.join(arms)} on synthetic {size['resolution']}px images, {size['train_steps']} steps "
        f"each, {len(seeds)} training seed{'s' if len(seeds) > 1 else ''} per arm "
        f"({', '.join(map(str, seeds))}); "
        f"the same data, model and budget for every arm; `{baseline}` is the baseline. "
        f"Scored by `{metric}`: a Frechet distance in the features of a separately trained evaluator CNN "
        f"(test accuracy {summary['evaluator']['test_accuracy']:.1%}); lower is better. The same "
        f"number of real held-out images scores {summary['real_vs_real_fd']:.3f} (the metric's floor).",
        "",
    ]
    if len(seeds) == 1:
        lines += [
            "**One seed per arm: these figures have no interval.** A difference between arms may be "
            "seed noise (a lead at one checkpoint can vanish at the next); `repa demo --seeds 3` "
            "trains three seeds per arm and reports 95% intervals.",
        ]
    else:
        lines += [
            f"Each curve is the mean over {len(seeds)} seeds with its 95% interval shaded (t-interval; "
            "bootstrap from 5 seeds); faint lines are the single seeds.",
        ]
    files = summary["files"]
    if "png" in files:
        lines += ["", f"![{metric} vs step]({relative(files['png'])})"]
    others = [
        f"[{label}]({relative(files[key])})"
        for key, label in (
            (f"{metric}_vs_images_png", "images seen"),
            (f"{metric}_vs_hours_png", "wall-clock hours"),
            (f"{metric}_vs_flops_png", "training FLOPs"),
            ("class_accuracy_vs_step_png", "class accuracy vs step"),
        )
        if key in files
    ]
    if others:
        lines += ["", f"The same against {', '.join(others)}."]

    lines += ["", "## Per arm and step", ""]
    lines += [
        f"| arm | step | seeds | {metric} (mean) | 95% interval | class accuracy | 95% interval |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary.get("arm_rows", []):
        accuracy = row.get("class_accuracy")
        accuracy_interval = _interval_text(
            row.get("class_accuracy_low"), row.get("class_accuracy_high"), percent=True
        )
        lines.append(
            f"| {row['arm']} | {row['step']} | {row['seeds']} | {row.get(metric, float('nan')):.3f} "
            f"| {_interval_text(row.get(f'{metric}_low'), row.get(f'{metric}_high'))} "
            f"| {'' if accuracy is None else f'{accuracy:.1%}'} "
            f"| {accuracy_interval} |"
        )
    lines += [
        "",
        "Class accuracy: the share of generated samples the evaluator CNN assigns to the class they "
        "were sampled for (chance is one in the number of classes).",
    ]

    lines += ["", "## Speed-up over the baseline arm", ""]
    for arm, entry in summary.get("arm_speedup", {}).items():
        if arm == baseline:
            continue
        if entry.get("factor") is None:
            lines.append(f"- {arm}: {entry.get('status', 'n/a')} (the baseline's best {metric} "
                         f"{entry.get('baseline_best', float('nan')):.3f})")  # fmt: skip
            continue
        text = (
            f"- {arm}: reaches the baseline's best mean {metric} ({entry['baseline_best']:.3f} at step "
            f"{entry['baseline_best_step']:g}) at step {entry['step']:.0f} (interpolated): "
            f"{entry['factor']:.2f}x fewer steps"
        )
        if entry.get("low") is None:
            text += "; one seed per arm, so no interval."
        else:
            text += (
                f", 95% interval [{entry['low']:.2f}, {entry['high']:.2f}] over seeds "
                f"(bootstrap, {entry['reached_fraction']:.0%} of resamples reach the baseline's best)"
            )
            text += (
                ". **The interval includes 1: this speed-up is within the seed noise.**"
                if entry.get("includes_one")
                else ". The interval excludes 1."
            )
        if entry.get("factor_flops") is not None:
            text += f" Per training FLOP: {entry['factor_flops']:.2f}x."
        lines.append(text)
    last_step = max(row["step"] for row in summary["rows"])
    final = {
        row["arm"]: row for row in summary.get("arm_rows", []) if row["step"] == last_step and row.get(metric)
    }
    if baseline in final:
        base_value = final[baseline][metric]
        for arm, row in final.items():
            if arm != baseline:
                change = (row[metric] - base_value) / base_value
                lines.append(
                    f"- {arm} at the last checkpoint (step {last_step}): mean {metric} {row[metric]:.3f} "
                    f"{_interval_text(row.get(f'{metric}_low'), row.get(f'{metric}_high'))} vs the "
                    f"baseline's {base_value:.3f} ({change:+.0%})"
                )

    probe = summary.get("probe")
    if probe:
        lines += [
            "",
            "## Alignment probe",
            "",
            f"Each arm's final model (first seed) on {probe['images']} held-out images: CKNNA between "
            "its pooled hidden tokens and the teacher's after every block, and the held-out accuracy "
            "of a linear probe of the class, at noise levels t = 0 and 0.5 (`repa probe`).",
            "",
            f"![probe]({relative(probe['files'][0])})",
            "",
            "| arm | t | best CKNNA (block) | best linear probe (block) |",
            "|---|---|---|---|",
        ]
        for arm in dict.fromkeys(r["run"] for r in probe["rows"]):
            for t in dict.fromkeys(r["t"] for r in probe["rows"]):
                at = [r for r in probe["rows"] if r["run"] == arm and r["t"] == t]
                align = max(at, key=lambda r: r["cknna"])
                accuracy = max(at, key=lambda r: r["linear_probe"])
                lines.append(
                    f"| {arm} | {t:g} | {align['cknna']:.3f} ({align['layer']}) "
                    f"| {accuracy['linear_probe']:.1%} ({accuracy['layer']}) |"
                )

    lines += ["", "## Samples (EMA, final checkpoint, first seed)", ""]
    for name, grid in summary["grids"].items():
        lines.append(f"- {name}: ![{name}]({relative(grid)})")
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
