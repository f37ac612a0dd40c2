"""`repa demo [--output DIR] [--quick] [--seed S] [--seeds K] [--arms A,B,...] [--with-repa-e]
[--encoder NAME] [--text]`.

The whole research loop at toy scale on a CPU, offline: synthetic data -> shards -> a small
teacher encoder -> one run per arm and seed -> FD-vs-step curves with intervals, class accuracy,
the alignment probe -> report.md.
"""

from __future__ import annotations

import argparse

from repa.config import PRECISIONS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="demo_output", help="output directory (default demo_output)")
    parser.add_argument("--quick", action="store_true", help="a tiny version (about two minutes), for tests")
    parser.add_argument(
        "--seed", type=int, default=0, help="data, teacher and evaluator seed; the first training seed"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="K",
        help="training seeds per arm (default 1: no interval; 3 gives 95%% intervals and about 3x the time)",
    )
    parser.add_argument(
        "--arms",
        default="sit,repa",
        help="comma-separated arms, the first the baseline: sit, repa, repa-random-teacher (REPA with "
        "the teacher's architecture and random weights), repa-e, sra and dispersive (without the "
        "teacher), or any training method, with the teacher (e.g. reg) (default sit,repa)",
    )
    parser.add_argument("--with-repa-e", action="store_true", help="also train a REPA-E run on a small VAE")
    parser.add_argument(
        "--text",
        action="store_true",
        help="the text-to-image demo: captioned synthetic images, captions encoded by the packaged "
        "MiniLM, cross-attention SiT with and without REPA, FD and prompt accuracy per checkpoint "
        "(docs/text_to_image.md)",
    )
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

    if args.text:
        from repa.demo.text import TEXT_FULL, TEXT_QUICK, run_text_demo

        size = TEXT_QUICK if args.quick else TEXT_FULL
    else:
        size = QUICK if args.quick else FULL
    options = DemoOptions(
        output=Path(args.output),
        seed=args.seed,
        quick=args.quick,
        with_repa_e=args.with_repa_e,
        encoder=args.encoder,
        mixed_precision=args.mixed_precision,
        size=size,
        arms=tuple(arm.strip() for arm in args.arms.split(",") if arm.strip()),
        seeds=args.seeds,
    )
    options.arm_list()  # unknown arms and --seeds < 1 fail here, before any work
    (run_text_demo if args.text else run_demo)(options)
    return 0
