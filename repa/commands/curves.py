"""`repa curves RUN [RUN ...] --output DIR --ref REF`: metric-vs-step curves and the speed-up table.

Runs that differ only in the seed are one arm (`--arm NAME=RUN,RUN` names one and checks it):
each arm is drawn as its seeds' mean with a 95% band, and its speed-up over the baseline's arm
comes with a bootstrap interval over seeds (docs/comparisons.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from repa.commands.eval import add_evaluator_arguments
    from repa.commands.sample import add_sampler_arguments

    parser.add_argument(
        "runs", nargs="*", metavar="RUN", help="run directories (training output; --arm adds its runs)"
    )
    parser.add_argument(
        "--arm",
        action="append",
        default=[],
        metavar="NAME=RUN,RUN",
        help="an arm: runs differing only in the seed (refused otherwise); repeatable. Runs not in an "
        "--arm are grouped into arms by their configs",
    )
    parser.add_argument(
        "--sampling-seeds",
        type=int,
        default=0,
        metavar="K",
        help="re-score each run's last checkpoint with K sample sets and report the spread "
        "(evaluation noise, beside the spread over training seeds)",
    )
    parser.add_argument(
        "--classifier",
        default=None,
        metavar="PATH",
        help="TorchScript classifier (uint8 images -> logits): adds class_accuracy, the share of "
        "samples classified as the class they were sampled for",
    )
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
    from repa.eval.curves import Classifier, build_curves, parse_arm_option, read_run_config

    arms = parse_arm_option(args.arm)
    if not args.runs and not arms:
        raise SystemExit("repa curves: give run directories, or --arm NAME=RUN,RUN")
    # Sample as the runs' own previews do: with their --time-shift, unless a flag says otherwise.
    runs = [*args.runs, *(run for members in arms.values() for run in members)]
    shifts = {float(read_run_config(Path(run)).get("transport", {}).get("time_shift", 1.0)) for run in runs}
    if len(shifts) > 1 and args.time_shift is None and args.timestep_shift is None:
        raise SystemExit(
            f"repa curves: the runs were trained with different --time-shift values {sorted(shifts)}; "
            "give --time-shift to sample them all alike"
        )
    result = build_curves(
        args.runs,
        args.output,
        ref=args.ref,
        evaluator=evaluator_from_args(args),
        num_samples=args.num_samples,
        settings=sampler_settings_from_args(args, shifts.pop() if len(shifts) == 1 else 1.0),
        baseline=args.baseline,
        metric=args.plot_metric,
        seed=args.seed,
        labels=args.labels,
        batch_size=args.batch_size,
        device=args.device,
        wandb_project=args.wandb_project,
        arms=arms,
        classifier=Classifier.from_file(args.classifier, args.device or "cpu") if args.classifier else None,
        sampling_seeds=args.sampling_seeds,
    )
    if result.speedup:
        print(f"speed-up over {result.baseline} (best {result.metric} of the baseline):")
        for run_name, entry in result.speedup.items():
            if entry["status"] == "reached" and entry["ratio_steps"]:
                print(f"  {run_name}: step {entry['step']} -> {entry['ratio_steps']:.2f}x fewer steps")
            else:
                print(f"  {run_name}: {entry['status']}")
    for arm, entry in result.arm_speedup.items():
        if arm != result.baseline_arm:
            print(f"  arm {arm}: {describe_arm_speedup(entry)}")
    for run_name, entry in result.sampling_spread.items():
        print(
            f"  sampling noise, {run_name} step {entry['step']}: {entry['metric']} {entry['mean']:.4g} "
            f"+- {entry['std']:.3g} (std over {len(entry['values'])} sample sets)"
        )
    for kind, path in result.files.items():
        print(f"{kind}: {path}")
    return 0


def describe_arm_speedup(entry: dict) -> str:
    """One line for an arm's speed-up over the baseline arm, with its interval when there is one."""
    if entry.get("factor") is None:
        return entry.get("status", "not reached")
    seeds = entry["seeds"]
    text = f"{entry['factor']:.2f}x fewer steps"
    if entry.get("low") is None:
        return text + " (one seed per arm: no interval)"
    text += f", 95% interval [{entry['low']:.2f}, {entry['high']:.2f}] over seeds ({seeds[0]} vs {seeds[1]})"
    if entry.get("includes_one"):
        text += "; the interval includes 1: no speed-up is within the seed noise"
    if entry.get("factor_flops") is not None:
        text += f"; per training FLOP {entry['factor_flops']:.2f}x"
    return text
