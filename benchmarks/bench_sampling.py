"""Sampling throughput with interval-aware CFG vs always-batched CFG, at REPA's published settings.

Published settings: Euler-Maruyama SDE, 250 steps, CFG scale 1.8 applied for t in [0, 0.7]
(t=1 noise). Our sampler runs the model on the doubled batch [x; x] with labels [y; null] only
at the steps inside the interval and on the conditional half alone elsewhere. The comparison
runs the same sampler with the interval [0, 1], i.e. CFG on every step (what a sampler that
always batches both halves costs; the guidance values differ, the work is what is measured).

Theoretical ratio. The SDE evaluates the model at t in linspace(1, 0.04, N); let f be the
fraction of those times with t <= 0.7. Cost in "rows through the model" per sample:
interval-aware = f * 2 + (1 - f) * 1 = 1 + f, always-batched = 2, so the ratio is 2 / (1 + f).
For N -> infinity, f -> (0.7 - 0.04) / 0.96 = 0.6875 and the ratio -> 1.185 (a uniform-in-t
estimate, 2 / (2 * 0.7 + 0.3) = 1.176, ignores that the grid stops at 0.04). The script computes
f exactly for the chosen N with the sampler's own grid. The measured ratio falls short of it when
per-call overhead (not proportional to rows) matters, i.e. for tiny models or batches.

    python benchmarks/bench_sampling.py                       # ~1 minute on a 2-core CPU
    python benchmarks/bench_sampling.py --full --output sampling.json   # 250 steps, batch 64
    python benchmarks/bench_sampling.py --full --device cuda --model SiT-XL/2 --hidden-size 1152 \\
        --depth 28 --num-heads 16 --input-size 32 --precision bf16     # the real model on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from repa.models import create_model
from repa.transport import Guidance, sample, time_grid

PUBLISHED = dict(mode="sde", num_steps=250, cfg_scale=1.8, guidance_low=0.0, guidance_high=0.7)


def guided_fraction(num_steps: int, low: float, high: float, mode: str = "sde") -> float:
    """Fraction of the sampler's model evaluations that fall inside the guidance interval."""
    times = time_grid(mode, num_steps)[:-1]  # the times at which the model is called
    guidance = Guidance(scale=2.0, low=low, high=high, null_label=0)
    return sum(guidance.active(t) for t in times) / len(times)


def time_sampling(model, args, guidance_high: float, runs: int) -> list[float]:
    """Seconds per run of `args.num_samples` samples, one entry per run."""
    device = next(model.parameters()).device
    labels = torch.arange(args.num_samples, device=device) % model.config.num_classes
    seeds = list(range(args.num_samples))
    shape = (model.config.in_channels, model.config.input_size, model.config.input_size)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad(), autocast:
            sample(
                model.velocity,
                shape,
                labels,
                seeds,
                mode="sde",
                num_steps=args.num_steps,
                cfg_scale=PUBLISHED["cfg_scale"],
                guidance_low=PUBLISHED["guidance_low"],
                guidance_high=guidance_high,
                null_label=model.null_label,
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SiT-S/2", help="registered model name (width overrides below)")
    parser.add_argument("--hidden-size", type=int, default=192)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=3)
    parser.add_argument("--input-size", type=int, default=16, help="latent side (4 channels)")
    parser.add_argument("--num-samples", type=int, default=16, help="batch of samples per run")
    parser.add_argument("--num-steps", type=int, default=25, help="SDE steps (published: 250)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per setting (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--full", action="store_true", help="published settings: 250 steps, 64 samples")
    parser.add_argument("--output", default=None, help="write the JSON here too")
    args = parser.parse_args()
    if args.full:
        args.num_steps, args.num_samples = PUBLISHED["num_steps"], 64
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = (
        create_model(
            args.model,
            input_size=args.input_size,
            in_channels=4,
            hidden_size=args.hidden_size,
            depth=args.depth,
            num_heads=args.num_heads,
            num_classes=1000,
        )
        .eval()
        .to(args.device)
    )

    for high in (PUBLISHED["guidance_high"], 1.0):  # warm-up (allocator, kernels, caches)
        time_sampling(model, args, high, runs=args.warmup)
    # Alternate the two settings so that load changes on a shared machine hit both alike.
    interval_times, always_times = [], []
    for _ in range(args.repeats):
        interval_times += time_sampling(model, args, PUBLISHED["guidance_high"], runs=1)
        always_times += time_sampling(model, args, 1.0, runs=1)
    interval_rate = args.num_samples / statistics.median(interval_times)
    always_rate = args.num_samples / statistics.median(always_times)
    fraction = guided_fraction(args.num_steps, PUBLISHED["guidance_low"], PUBLISHED["guidance_high"])
    result = {
        "settings": {**PUBLISHED, "num_steps": args.num_steps, "num_samples": args.num_samples},
        "model": {
            "name": args.model,
            "hidden_size": args.hidden_size,
            "depth": args.depth,
            "input_size": args.input_size,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "precision": args.precision,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "guided_fraction_of_steps": fraction,
        "images_per_s": {"interval_cfg": interval_rate, "always_batched_cfg": always_rate},
        "seconds_per_run": {"interval_cfg": interval_times, "always_batched_cfg": always_times},
        "speedup_measured": interval_rate / always_rate,
        "speedup_theoretical": 2.0 / (1.0 + fraction),
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
