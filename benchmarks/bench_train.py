"""Training-step throughput: SiT-S/2 and SiT-B/2 with REPA, fp32 and bf16, cached vs on-the-fly targets.

Measures the training loop's own step (repa.analysis.train_throughput, whose docstring derives
the FLOP convention) on 256px-equivalent latents (32x32x4), one 768-d projector aligned at depth
4 to DINOv2-B-sized targets, batch 8. Variants run interleaved in one process; each figure is
the median of `--repeats` rounds after a warm-up round, with peak resident memory beside it, and
utilisation is against the matmul peak measured in the same run. The JSON's `comparisons` are
ratios between variants of this run (bf16 vs fp32, cached vs on-the-fly, ...), and a
torch.profiler table of one SiT-B/2 bf16 step is written next to it (`<output stem>.profile.txt`).

    python benchmarks/bench_train.py --output train.json          # ~5-8 minutes on 2 busy cores
    python benchmarks/bench_train.py --quick --output quick.json  # toy sizes, seconds
    python benchmarks/bench_train.py --models SiT-B/2 --precisions bf16 --on-the-fly "" --sdpa-attention "" \
        --compile SiT-B/2:bf16 --output compile.json                # eager vs torch.compile
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from repa.analysis.bench_suite import quick_train_config
from repa.analysis.train_throughput import TrainBenchConfig, run_train_benchmark


def parse_pairs(text: str) -> tuple[tuple[str, str], ...]:
    """'SiT-B/2:bf16,SiT-B/2:fp32' -> (('SiT-B/2', 'bf16'), ('SiT-B/2', 'fp32'))."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        model, _, precision = item.rpartition(":")
        if not model:
            raise SystemExit(
                f"--on-the-fly, --compile, --sdpa-attention take MODEL:PRECISION items, got {item!r}"
            )
        pairs.append((model, precision))
    return tuple(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="SiT-S/2,SiT-B/2", help="comma-separated model names")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument(
        "--on-the-fly", default="SiT-B/2:bf16", help="MODEL:PRECISION pairs also timed with the encoder run"
    )
    parser.add_argument(
        "--sdpa-attention",
        default="SiT-B/2:bf16",
        help="MODEL:PRECISION pairs also timed with torch's fused attention (the library's CPU bf16 "
        "default is two matmuls): the before/after of that change",
    )
    parser.add_argument(
        "--compile", default="", help="MODEL:PRECISION pairs also timed through torch.compile (minutes each)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-profile", action="store_true", help="skip the profile of the SiT-B/2 bf16 step")
    parser.add_argument("--quick", action="store_true", help="toy sizes (what `repa bench --quick` runs)")
    parser.add_argument("--output", default="bench_train.json")
    args = parser.parse_args()

    if args.quick:
        config = quick_train_config()
    else:
        config = TrainBenchConfig(
            models=tuple(args.models.split(",")),
            precisions=tuple(args.precisions.split(",")),
            on_the_fly=parse_pairs(args.on_the_fly),
            compiled=parse_pairs(args.compile),
            sdpa_attention=parse_pairs(args.sdpa_attention),
            batch_size=args.batch_size,
            repeats=args.repeats,
            warmup=args.warmup,
            profile=None if args.no_profile else TrainBenchConfig.profile,
        )
    report, table = run_train_benchmark(config)
    output = Path(args.output)
    if table:
        profile_path = output.with_name(output.stem + ".profile.txt")
        profile_path.write_text(
            f"torch.profiler, one step of {config.profile}, top ops by self CPU time\n{table}\n"
        )
        report["profile"]["table_file"] = profile_path.name
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["comparisons"], indent=1))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
