"""`repa curves RUN [RUN ...] --output DIR --ref REF`: metric-vs-step curves and the speed-up table."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from repa.commands.eval import add_evaluator_arguments
    from repa.commands.sample import add_sampler_arguments

    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories (training output)")
    parser.add_argument("--output", required=True, help="folder for curves.csv/json and the plots")
    parser.add_argument(
        "--num-samples", type=int, default=10_000, help="samples per checkpoint (default 10000)"
    )
    parser.add_argument(
        "--baseline", default=None, help="baseline run (default: the single run without encoder)"
    )
    parser.add_argument("--plot-metric", default=None, help="metric plotted and used for the speed-up")
    parser.add_argument(
        "--wandb-project", default=None, help="also log the table and plot to this wandb project"
    )
    add_evaluator_arguments(parser)
    add_sampler_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from repa.commands.eval import evaluator_from_args
    from repa.commands.sample import sampler_settings_from_args
    from repa.eval.curves import build_curves

    result = build_curves(
        args.runs,
        args.output,
        ref=args.ref,
        evaluator=evaluator_from_args(args),
        num_samples=args.num_samples,
        settings=sampler_settings_from_args(args),
        baseline=args.baseline,
        metric=args.plot_metric,
        seed=args.seed,
        labels=args.labels,
        batch_size=args.batch_size,
        device=args.device,
        wandb_project=args.wandb_project,
    )
    if result.speedup:
        print(f"speed-up over {result.baseline} (best {result.metric} of the baseline):")
        for run_name, entry in result.speedup.items():
            if entry["status"] == "reached" and entry["ratio_steps"]:
                print(f"  {run_name}: step {entry['step']} -> {entry['ratio_steps']:.2f}x fewer steps")
            else:
                print(f"  {run_name}: {entry['status']}")
    for kind, path in result.files.items():
        print(f"{kind}: {path}")
    return 0
