"""`repa demo [--output DIR] [--quick] [--seed S] [--with-repa-e] [--encoder NAME]`.

The whole research loop at toy scale on a CPU, offline: synthetic data -> shards -> a small
teacher encoder -> plain SiT and REPA runs -> FD-vs-step curves -> report.md.
"""

from __future__ import annotations

import argparse

from repa.config import PRECISIONS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="demo_output", help="output directory (default demo_output)")
    parser.add_argument("--quick", action="store_true", help="a tiny version (about two minutes), for tests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--with-repa-e", action="store_true", help="also train a REPA-E run on a small VAE")
    parser.add_argument(
        "--encoder",
        default="",
        help="use a registered encoder (e.g. dinov2-s, needs its weights) as the teacher",
    )
    parser.add_argument(
        "--mixed-precision",
        default="auto",
        choices=[p for p in PRECISIONS if p != "fp16"],
        help="auto (default): bf16 only on a CPU that multiplies it natively (AMX, AVX512-BF16), else fp32",
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from repa.demo.pipeline import FULL, QUICK, DemoOptions, run_demo

    options = DemoOptions(
        output=Path(args.output),
        seed=args.seed,
        quick=args.quick,
        with_repa_e=args.with_repa_e,
        encoder=args.encoder,
        mixed_precision=args.mixed_precision,
        size=QUICK if args.quick else FULL,
    )
    run_demo(options)
    return 0
