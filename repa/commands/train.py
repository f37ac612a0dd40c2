"""`repa train`: flags -> ExperimentConfig -> repa.train.loop.train.

Launch on many processes with `accelerate launch -m repa train ...` or `torchrun -m repa train`
(the same flags); plainly on one CPU or GPU otherwise.
"""

from __future__ import annotations

import argparse
import signal


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from repa.config import add_config_arguments

    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from repa.config import config_from_args
    from repa.train.loop import train

    config = config_from_args(args)
    result = train(config)
    status = "pre-empted; rerun the same command to resume" if result.preempted else "done"
    print(f"{result.run_dir}: step {result.step} ({status})")
    # 128 + signal (143 for SIGTERM, 130 for Ctrl-C), as if killed by it: job schedulers see the
    # run as unfinished and can requeue it.
    if not result.preempted:
        return 0
    return 128 + (result.stop_signal or signal.SIGTERM)
