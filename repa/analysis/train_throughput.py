"""Training-step throughput of SiT + REPA: the training loop's own step function, timed.

Every timed call is `StepRunner.run` (repa/train/step.py), the function repa/train/loop.py
calls once per optimiser step, on a method built as the loop builds it:
`get_method(config.method).build(MethodContext(...))` from an `ExperimentConfig` with the loop's
defaults (the benchmark sets only the model, its width overrides, the tap depth, the encoder,
the resolution and the batch size). This module never writes a step of its own, so whatever the
loop's step does (seeding, sampling, autocast, backward, clipping, the non-finite rule, AdamW,
the EMA) is what is timed. What the loop gets from its surroundings is stood in for: a tokenizer
that samples and normalises cached SD-VAE moments (with cached moments the loop never runs the
VAE), an encoder with random weights (only its cost matters), synthetic batches shaped as the
data stream yields them, one process, one micro-batch per step, and `torch.autocast` where the
loop uses accelerate's (on CPU the two are the same context).

The variants (model size x precision x cached / on-the-fly targets x compiled x attention kernel)
run round-robin in one process (repa.analysis.timing), so ratios between variants of one run
hold even when the machine is shared; figures of different runs or machines do not compare.

FLOP convention:
  step FLOPs = 2 x 3 x (forward multiply-adds of the velocity path per image) x batch
where the forward multiply-adds are `repa flops`'s (the DiT paper's count; projectors excluded),
x3 is forward + backward (the backward computes two products per forward product), and x2
counts a multiply-add as two FLOPs, as the matmul peak below does (2 n^3 per n x n product), so
that the two compare like with like. The projector's work is done but not counted, and the
encoder's only in `utilisation_including_encoder_forward`; the JSON gives both sizes.

Utilisation is achieved FLOP/s over the best matmul FLOP/s measured in the same run (2048 x 2048,
best of several tries, repeated every round), in the step's compute dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from repa.analysis.flops import count_flops, model_cost
from repa.analysis.timing import (
    cpu_share,
    interleaved_timings,
    measure_matmul_peak,
    median,
    memory_method,
    profile_ops,
)

if TYPE_CHECKING:
    from repa.config import ExperimentConfig
    from repa.train.step import StepOutcome, StepRunner

PRECISIONS = ("fp32", "bf16")
COMPUTE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class TrainBenchConfig:
    """What to measure. Defaults: S/2 and B/2 at 256px-equivalent latents, batch 8."""

    models: tuple[str, ...] = ("SiT-S/2", "SiT-B/2")
    precisions: tuple[str, ...] = PRECISIONS
    # (model, precision) pairs that are also timed with the encoder run on the images every step
    on_the_fly: tuple[tuple[str, str], ...] = (("SiT-B/2", "bf16"),)
    # (model, precision) pairs also timed through torch.compile (the loop's --compile), cached
    # targets; the compilation time is reported as the warm-up time. Off by default: on 2 CPU
    # cores compiling SiT-B/2's step takes minutes.
    compiled: tuple[tuple[str, str], ...] = ()
    # (model, precision) pairs also timed with torch's fused attention kernel instead of the
    # library's CPU bf16 default (two matmuls): the before/after of that change, side by side
    sdpa_attention: tuple[tuple[str, str], ...] = (("SiT-B/2", "bf16"),)
    batch_size: int = 8
    resolution: int = 256  # images; latents are resolution/8 with 4 channels (SD-VAE)
    align_depth: int = 4  # REPA's recommendation for B (S has as many blocks)
    encoder: str = "dinov2-b"  # built with random weights: only its cost matters here
    # ModelOptions fields (repa.config), e.g. tiny widths for a smoke test: they go through the
    # ExperimentConfig, so the model is built from the same options as the loop's
    model_overrides: dict = field(default_factory=dict)
    encoder_overrides: dict = field(default_factory=dict)  # timm kwargs (arch_overrides)
    warmup: int = 1
    repeats: int = 3
    peak_size: int = 2048
    peak_repeats: int = 5
    profile: str | None = "SiT-B/2 bf16 cached"  # variant profiled once after timing (None: none)
    seed: int = 0

    def __post_init__(self) -> None:
        pairs = (*self.on_the_fly, *self.compiled, *self.sdpa_attention)
        unknown = [p for p in (*self.precisions, *(p for _, p in pairs)) if p not in PRECISIONS]
        if unknown:
            raise ValueError(f"unknown precision(s) {unknown}; choose from {PRECISIONS}")
        missing = [m for m, _ in pairs if m not in self.models]
        if missing:
            raise ValueError(f"on-the-fly, compiled or sdpa variants name models not in `models`: {missing}")
        if self.repeats < 1 or self.warmup < 1:
            raise ValueError("need at least one warm-up round and one timed round")

    @property
    def latent_size(self) -> int:
        return self.resolution // 8

    def only(self, precisions: tuple[str, ...]) -> TrainBenchConfig:
        """These settings with every variant of another precision dropped (`repa bench` on a CPU
        where bf16 is emulated: its bf16 steps would take hours and measure nothing useful)."""
        kept = tuple(p for p in self.precisions if p in precisions)
        if not kept:
            raise ValueError(f"none of {self.precisions} is in {precisions}")
        keep = lambda pairs: tuple((m, p) for m, p in pairs if p in kept)  # noqa: E731
        # the cached-vs-on-the-fly comparison and the profile move to a kept precision; the fused
        # attention comparison is about the CPU's low-precision path and goes with it
        moved = lambda p: p if p in kept else kept[0]  # noqa: E731
        profile = self.profile
        if profile is not None:
            model, precision, targets = profile.split(" ", 2)
            profile = f"{model} {moved(precision)} {targets}"
        return dataclasses.replace(
            self,
            precisions=kept,
            on_the_fly=tuple(dict.fromkeys((m, moved(p)) for m, p in self.on_the_fly)),
            compiled=keep(self.compiled),
            sdpa_attention=keep(self.sdpa_attention),
            profile=profile,
        )


def autocast_for(precision: str, device_type: str = "cpu") -> Callable[[], contextlib.AbstractContextManager]:
    """The context the loop's `accelerator.autocast` is for --mixed-precision `precision`.
    Not accelerate's own: it keeps the precision in a process-wide singleton, and the benchmark
    times fp32 and bf16 side by side in one process."""
    if precision == "bf16":
        return lambda: torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def cached_moments_tokenizer():
    """The tokenizer's part in a step on cached SD-VAE moments: only `sample` and `normalize`
    run (z = mean + std * eps, times 0.18215), never the VAE itself."""
    from repa.tokenizers.base import LatentNorm, Tokenizer

    return Tokenizer(
        "cached-sd-vae-moments", latent_channels=4, downsample=8, latent_norm=LatentNorm(0.18215)
    )


def experiment_config(model: str, config: TrainBenchConfig) -> ExperimentConfig:
    """The loop's defaults (optimiser, EMA, transport, loss weights, label dropout, seed) with
    what this benchmark varies: the model and its overrides, the tap depth, the encoder, the
    resolution and the batch size."""
    from repa.config import ExperimentConfig

    defaults = ExperimentConfig()
    return dataclasses.replace(
        defaults,
        model=dataclasses.replace(
            defaults.model, name=model, align_depth=config.align_depth, **config.model_overrides
        ),
        encoder=dataclasses.replace(defaults.encoder, encoder=config.encoder),
        data=dataclasses.replace(defaults.data, resolution=config.resolution, batch_size=config.batch_size),
    ).validate()


class BenchModel:
    """One model's training state, built as repa/train/loop.py builds it: the SiT, its EMA and
    the training method (its parameter group, fused AdamW, learning-rate schedule, clipping).

    Every variant of this model trains this one state, each through its own StepRunner (its
    autocast, its forward module): one copy of the weights and AdamW moments per model rather
    than per variant keeps SiT-B/2's five variants within a small machine's memory, and the
    step's cost does not depend on which variant moved the weights last."""

    def __init__(
        self,
        name: str,
        config: TrainBenchConfig,
        encoder: torch.nn.Module,
        device: torch.device | None = None,
    ):
        from repa.models import create_model
        from repa.train.ema import EMA
        from repa.train.methods import get_method
        from repa.train.methods.base import MethodContext

        self.name = name
        self.device = device if device is not None else torch.device("cpu")
        self.experiment = experiment_config(name, config)
        method_class = get_method(self.experiment.method)
        tokenizer = cached_moments_tokenizer().to(self.device)
        self.overrides = self.experiment.model_overrides(
            input_size=config.latent_size,
            in_channels=tokenizer.latent_channels,
            projector_dims=[encoder.dim],
        )
        self.overrides.update(method_class.model_options)
        self.model = create_model(name, **self.overrides).to(self.device)
        context = MethodContext(self.experiment, tokenizer, [encoder], self.model, self.device)
        self.method = method_class.build(context)
        self.ema = EMA(self.model, decay=self.experiment.optim.ema_decay)
        self.steps = 0  # the step index the loop would pass: its seeds and learning rate follow it
        self._compiled: torch.nn.Module | None = None
        # torch.compile's backend: "eager" traces with dynamo but skips inductor's code generation
        # (the GPU benchmark's CPU dry run: it checks the path in seconds, not minutes)
        self.compile_backend = "inductor"
        self._runners: dict[tuple[str, bool], StepRunner] = {}

    def runner(self, precision: str, compiled: bool) -> StepRunner:
        """The loop's StepRunner for this precision; compiled=True runs the forward through
        torch.compile(model), as the loop does with --compile (the EMA follows the uncompiled
        module, as there)."""
        from repa.train.step import StepRunner

        key = (precision, compiled)
        if key not in self._runners:
            forward = self.model
            if compiled:
                if self._compiled is None:
                    self._compiled = torch.compile(self.model, backend=self.compile_backend)
                forward = self._compiled
            self._runners[key] = StepRunner(
                self.method,
                forward,
                self.model,
                self.ema,
                accumulation=1,  # one batch of --batch-size per step, the loop's default
                seed=self.experiment.run.seed,
                device=self.device,
                autocast=autocast_for(precision, self.device.type),
                scaler=None,  # the loop scales only fp16, which is not timed here
            )
        return self._runners[key]

    def step(self, batch, precision: str, compiled: bool = False, attention: str = "matmul") -> StepOutcome:
        """One training step: `StepRunner.run` on this batch. attention: the attention kernel on
        CPU in bf16 ("matmul", the library's default, or "sdpa", torch's fused kernel), for
        before/after comparisons. Returns the StepOutcome."""
        from repa.models.layers import Attention

        for module in self.model.modules():
            if isinstance(module, Attention):
                module.cpu_low_precision_kernel = attention
        outcome = self.runner(precision, compiled).run(self.steps, iter([batch]))
        self.steps += 1
        return outcome

    def state_bytes(self) -> int:
        """Weights, EMA copy and AdamW moments (gradients are freed between steps)."""
        tensors = [*self.model.parameters(), *self.model.buffers(), *self.ema.model.parameters()]
        for group in self.method.groups():
            for state in group.optimizer.state.values():
                tensors += [v for v in state.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def flops(self, config: TrainBenchConfig) -> dict[str, float]:
        """Multiply-adds per image of the velocity path and of the projectors, and step FLOPs."""
        from repa.models.layers import build_projector

        geometry = ("input_size", "in_channels")
        cost = model_cost(
            self.name,
            resolution=config.resolution,
            **{k: v for k, v in self.overrides.items() if k not in geometry},
        )
        sit = self.model.config
        with torch.device("meta"):
            hidden = torch.zeros(1, sit.num_tokens, sit.hidden_size)  # the tokens at the tap
            projectors = [
                build_projector(sit.hidden_size, sit.projector_dim, d) for d in sit.projector_out_dims
            ]
        projector_macs = sum(count_flops(projector, hidden) for projector in projectors)
        step = 2 * 3 * cost.flops * config.batch_size
        return {
            "forward_macs_per_image": float(cost.flops),
            "projector_macs_per_image": float(projector_macs),
            "parameters": float(cost.parameters),
            "step_flops": float(step),
        }


def make_batch(config: TrainBenchConfig, with_features: bool, feature_dim: int, generator: torch.Generator):
    """A batch as the data stream yields it: uint8 images (channels-last), labels, cached SD-VAE
    moments (mean, std) and, when cached, float16 target tokens."""
    from repa.data.stream import Batch

    b, side, latent = config.batch_size, config.resolution, config.latent_size
    images = torch.randint(0, 256, (b, 3, side, side), dtype=torch.uint8, generator=generator)
    mean = torch.randn(b, 4, latent, latent, generator=generator)
    std = 0.05 + 0.1 * torch.rand(b, 4, latent, latent, generator=generator)
    tokens = (side // 16) ** 2  # DINOv2/14 at 224 for 256px: 16 x 16
    features = torch.randn(b, tokens, feature_dim, generator=generator).half() if with_features else None
    return Batch(
        images=images.contiguous(memory_format=torch.channels_last),
        labels=torch.randint(0, 1000, (b,), generator=generator),
        moments=torch.cat([mean, std], dim=1),
        features=features,
        keys=[f"{i:08d}" for i in range(b)],
        flipped=torch.zeros(b, dtype=torch.bool),
    )


def variant_name(model: str, precision: str, targets: str) -> str:
    return f"{model} {precision} {targets}"


@dataclass(frozen=True)
class Variant:
    model: str
    precision: str
    targets: str  # "cached" | "on-the-fly"
    compiled: bool = False
    attention: str = "matmul"  # CPU bf16 attention kernel: "matmul" (library default) | "sdpa"


def variant_specs(config: TrainBenchConfig) -> dict[str, Variant]:
    """Every variant to time, by name: model x precision on cached targets, plus the on-the-fly,
    compiled and fused-attention variants the config asks for."""
    specs: dict[str, Variant] = {}
    for model in config.models:
        for precision in config.precisions:
            specs[variant_name(model, precision, "cached")] = Variant(model, precision, "cached")
        extra = [
            (config.on_the_fly, "", dict(targets="on-the-fly")),
            (config.compiled, " compiled", dict(targets="cached", compiled=True)),
            (config.sdpa_attention, " sdpa-attention", dict(targets="cached", attention="sdpa")),
        ]
        for pairs, suffix, options in extra:
            for pair_model, precision in pairs:
                if pair_model == model:
                    name = variant_name(model, precision, options["targets"]) + suffix
                    specs[name] = Variant(model, precision, **options)
    return specs


def run_train_benchmark(
    config: TrainBenchConfig, log: Callable[[str], None] = print
) -> tuple[dict, str | None]:
    """Time every variant interleaved; return (the JSON-ready report, the profile table or None)."""
    from repa.encoders import create_encoder

    load_start = os.getloadavg()
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    encoder = create_encoder(
        config.encoder,
        resolution=config.resolution,
        pretrained=False,
        arch_overrides=config.encoder_overrides or None,
    ).eval()
    generator = torch.Generator().manual_seed(config.seed)
    cached_batch = make_batch(config, True, encoder.dim, generator)
    raw_batch = make_batch(config, False, encoder.dim, generator)
    models = {name: BenchModel(name, config, encoder) for name in config.models}
    for model in models.values():
        # One untimed step per model first, so that AdamW's moments exist before any measured
        # step: the memory figures are then the step's own, not the optimiser's first allocation.
        model.step(cached_batch, config.precisions[0])

    specs = variant_specs(config)
    skipped: dict[str, int] = {name: 0 for name in specs}

    def timed_step(name: str) -> None:
        spec = specs[name]
        batch = cached_batch if spec.targets == "cached" else raw_batch
        outcome = models[spec.model].step(batch, spec.precision, spec.compiled, spec.attention)
        skipped[name] += outcome.skipped  # a skipped step updates nothing: say so, do not hide it

    variants: dict[str, Callable[[], None]] = {name: (lambda name=name: timed_step(name)) for name in specs}

    peaks: dict[str, list[float]] = {p: [] for p in config.precisions}
    # the peak probed right before each timed step (3 products): what the load left at that moment
    probes: dict[str, list[float]] = {name: [] for name in specs}

    def probe_peak(name: str) -> None:
        precision = specs[name].precision
        probes[name].append(measure_matmul_peak(COMPUTE_DTYPE[precision], config.peak_size, 3))
        peaks[precision].append(probes[name][-1])

    def measure_peaks(round_index: int) -> None:
        for precision in config.precisions:
            peaks[precision].append(
                measure_matmul_peak(COMPUTE_DTYPE[precision], config.peak_size, config.peak_repeats)
            )
        measured = ", ".join(f"{p} {values[-1] / 1e9:.0f}" for p, values in peaks.items())
        log(f"round {round_index}: matmul peak {measured} GFLOP/s, load {os.getloadavg()[0]:.2f}")

    timing = interleaved_timings(
        variants, config.warmup, config.repeats, before_round=measure_peaks, before_each=probe_peak
    )
    times, memory = timing.times, timing.memory
    best_peak = {p: max(values) for p, values in peaks.items()}

    # encoder forward cost, for the on-the-fly variants
    with torch.no_grad():
        encoder_macs = count_flops(encoder, raw_batch.images[:1])
    flops = {name: model.flops(config) for name, model in models.items()}

    results = {}
    for name, spec in specs.items():
        model, precision, targets = spec.model, spec.precision, spec.targets
        seconds = median(times[name])
        step_flops = flops[model]["step_flops"]
        achieved = step_flops / seconds
        matched = [step_flops / t / peak for t, peak in zip(times[name], probes[name])]
        shares = [cpu_share(t, c) for t, c in zip(times[name], timing.cpu_times[name])]
        entry = {
            "model": model,
            "precision": precision,
            "targets": targets,
            "compiled": spec.compiled,
            "cpu_bf16_attention": spec.attention,
            "seconds_per_step": times[name],
            "median_s": seconds,
            "warmup_s": timing.warmup_times[name],
            "samples_per_s": config.batch_size / seconds,
            "step_gflop": step_flops / 1e9,
            "achieved_gflops": achieved / 1e9,
            "utilisation_of_measured_peak": achieved / best_peak[precision],
            # each step's FLOP/s over the peak probed just before it, median over rounds
            "utilisation_load_matched": median(matched),
            "peak_probed_before_each_step_gflops": [p / 1e9 for p in probes[name]],
            # how much of the cores the step got (process CPU time / (wall x threads)), and the
            # utilisation per CPU second: what the step would reach with the cores to itself
            "cpu_share": median(shares),
            "utilisation_per_cpu_second": median(
                [step_flops / t / share / best_peak[precision] for t, share in zip(times[name], shares)]
            ),
            "training_state_mb": models[model].state_bytes() / 2**20,
            "skipped_steps": skipped[name],  # non-finite, no update (the loop's rule); normally 0
            **memory.get(name, {}),
        }
        if targets == "on-the-fly":
            with_encoder = step_flops + 2 * encoder_macs * config.batch_size
            entry["utilisation_including_encoder_forward"] = with_encoder / seconds / best_peak[precision]
        results[name] = entry
        log(
            f"{name}: {seconds:.2f} s/step, {entry['samples_per_s']:.2f} samples/s, "
            f"{entry['achieved_gflops']:.0f} GFLOP/s = {entry['utilisation_of_measured_peak']:.1%} of peak"
        )

    profile_table, top_ops = None, []
    if config.profile is not None and config.profile in specs:
        profile_table, top_ops = profile_ops(variants[config.profile])

    report = {
        "benchmark": "training step throughput (SiT + REPA, the training loop's step)",
        # what each timed call is: the loop's own step function, on the method the loop builds
        "step_function": "repa.train.step.StepRunner.run",
        "method": {
            name: f"{type(model.method).__module__}.{type(model.method).__qualname__}"
            for name, model in models.items()
        },
        "conventions": {
            "step_flops": "2 x 3 x forward multiply-adds (velocity path, projectors excluded) x batch",
            "why": "x3: forward + backward; x2: a multiply-add is two FLOPs, as the matmul peak counts "
            "them (2 n^3 per product); see repa/analysis/train_throughput.py",
            "matmul_peak": f"{config.peak_size}^2 products (2 n^3 FLOPs each): best of {config.peak_repeats} "
            "per round and of 3 right before each timed step; utilisation_of_measured_peak uses the best "
            "over the whole run, utilisation_load_matched each step's own probe (median over rounds)",
            "figures": f"median of {config.repeats} timed rounds after {config.warmup} warm-up round(s); "
            "variants interleaved round-robin, order rotated each round",
            "memory": memory_method() + "; measured on the first warm-up step of each variant, "
            "in a process that holds every variant's model (peak_rss_mb is process-wide)",
        },
        "settings": {k: v for k, v in asdict(config).items()},
        # the loop's configuration each model was trained with (defaults + the settings above)
        "experiment_config": {name: model.experiment.to_dict() for name, model in models.items()},
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "loadavg_start": list(load_start),
            "loadavg_end": list(os.getloadavg()),
        },
        "matmul_peak_gflops": {
            p: {"best": best_peak[p] / 1e9, "per_round": [v / 1e9 for v in peaks[p]]}
            for p in config.precisions
        },
        "flops": {
            **{name: values for name, values in flops.items()},
            "encoder_forward_macs_per_image": float(encoder_macs),
        },
        "variants": results,
        "comparisons": compare(results, config),
        "profile": {"variant": config.profile if profile_table else None, "top_ops_by_self_cpu": top_ops},
        "wall_s": time.perf_counter() - started,
    }
    return report, profile_table


def compare(results: dict, config: TrainBenchConfig) -> dict:
    """Ratios between variants measured side by side in this run (> 1: the first is faster)."""
    out: dict = {}
    for model in config.models:
        fp32, bf16 = (results.get(variant_name(model, p, "cached")) for p in PRECISIONS)
        if fp32 and bf16:
            out[f"{model} bf16 speed-up over fp32"] = fp32["median_s"] / bf16["median_s"]
        for otf_model, precision in config.on_the_fly:
            cached = results.get(variant_name(model, precision, "cached"))
            otf = results.get(variant_name(model, precision, "on-the-fly"))
            if otf_model == model and cached and otf:
                out[f"{model} {precision} cached speed-up over on-the-fly"] = (
                    otf["median_s"] / cached["median_s"]
                )
        for compiled_model, precision in config.compiled:
            cached = results.get(variant_name(model, precision, "cached"))
            compiled = results.get(variant_name(model, precision, "cached") + " compiled")
            if compiled_model == model and cached and compiled:
                out[f"{model} {precision} compiled speed-up over eager"] = (
                    cached["median_s"] / compiled["median_s"]
                )
        for sdpa_model, precision in config.sdpa_attention:
            cached = results.get(variant_name(model, precision, "cached"))
            sdpa = results.get(variant_name(model, precision, "cached") + " sdpa-attention")
            if sdpa_model == model and cached and sdpa:
                out[f"{model} {precision} matmul-attention speed-up over fused sdpa"] = (
                    sdpa["median_s"] / cached["median_s"]
                )
    return out
