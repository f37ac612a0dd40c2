"""`repa bench [--output FILE.json] [--quick]`: training, sampling and data throughput in one JSON.

See benchmarks/README.md for what each figure means and repa/analysis/bench_suite.py for how
the benchmarks are run.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="bench.json", help="JSON file to write (default bench.json)")
    parser.add_argument(
        "--quick", action="store_true", help="toy sizes, about a minute: checks the benchmarks run"
    )


def run(args: argparse.Namespace) -> int:
    from repa.analysis.bench_suite import run_benchmarks

    report = run_benchmarks(args.output, quick=args.quick)
    failed = [name for name in ("train", "sampling", "data") if report[name]["status"] == "failed"]
    return 1 if failed else 0
