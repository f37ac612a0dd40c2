"""`repa bench [--output FILE.json] [--quick] [--probe]`: training, sampling and data throughput in one
JSON; `--probe` prints only what the CPU offers (its capability, bf16 flags, fp32 and bf16 matmul
rates) and the precision `auto` picks, in a few seconds.

`repa bench --device cuda [--dry-run]`: the GPU suite instead (repa/analysis/gpu_bench.py):
SiT-XL/2 + REPA's training step in bf16 at batch 32/64/128, eager and compiled, the sampler and
the loader, in one JSON; without CUDA it says so in one line. `benchmarks/gpu_check.sh` runs it.

See benchmarks/README.md for what each figure means and repa/analysis/bench_suite.py for how
the benchmarks are run.
"""

from __future__ import annotations

import argparse

from repa.config import PRECISIONS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="bench.json", help="JSON file to write (default bench.json)")
    parser.add_argument(
        "--quick", action="store_true", help="toy sizes, about a minute: checks the benchmarks run"
    )
    parser.add_argument(
        "--probe",
        action="store_true",
        help="only print the CPU's capability, bf16 flags and fp32/bf16 matmul rates, and what "
        "--mixed-precision auto picks",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cpu: the CPU suite; cuda: SiT-XL/2 + REPA's step, sampler and loader on one GPU",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="with --device cuda: the same code at toy sizes, on the CPU when there is no GPU",
    )
    parser.add_argument(
        "--mixed-precision",
        default="auto",
        choices=[p for p in PRECISIONS if p != "fp16"],
        help="fp32 is always timed; bf16 too when asked for or when auto picks it (default auto)",
    )


def run(args: argparse.Namespace) -> int:
    from repa.analysis.bench_suite import run_benchmarks

    if args.device == "cuda":
        from repa.analysis.gpu_bench import run_gpu_benchmark

        output = args.output if args.output != "bench.json" else "bench_gpu.json"
        run_gpu_benchmark(output, dry_run=args.dry_run)
        return 0
    if args.dry_run:
        raise SystemExit("repa bench: --dry-run goes with --device cuda (the CPU suite has --quick)")
    if args.probe:
        from repa.precision import machine_report

        print(machine_report())
        return 0
    report = run_benchmarks(args.output, quick=args.quick, precision=args.mixed_precision)
    failed = [name for name in ("train", "sampling", "data") if report[name]["status"] == "failed"]
    return 1 if failed else 0
