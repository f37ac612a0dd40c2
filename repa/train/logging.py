"""Metrics sinks: always a local metrics.jsonl; TensorBoard and wandb when asked.

Only the main process logs. wandb is initialised with a timeout: a stuck `wandb.init` on rank 0
would otherwise time out the other ranks' collectives (docs/reliability.md); on failure the run goes
on with the local file and says so.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


class MetricsLogger:
    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        report_to: str = "",
        config: dict | None = None,
        wandb_project: str = "repa",
        wandb_mode: str = "online",
        run_name: str = "",
    ):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tensorboard = None
        self._wandb = None
        if not enabled:
            return
        loggers = {name.strip() for name in report_to.split(",") if name.strip()}
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if "wandb" in loggers:
            self._wandb = _init_wandb(run_dir, config or {}, wandb_project, wandb_mode, run_name)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        # "time" (wall clock) lets curves put hours on the x-axis.
        record = {
            "step": step,
            "time": time.time(),
            **{k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()},
        }
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for key, value in metrics.items():
                self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def log_image(self, step: int, key: str, path: Path) -> None:
        if self.enabled and self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def _init_wandb(run_dir: Path, config: dict, project: str, mode: str, run_name: str):
    try:
        import wandb

        # A stable id derived from the run directory: a resumed online run continues the same
        # wandb run. (Offline runs cannot be resumed by wandb; sync them later with this id.)
        run_id = "".join(ch if ch.isalnum() else "-" for ch in run_dir.name)[-64:]
        return wandb.init(
            project=project,
            name=run_name or run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
            mode=mode,
            settings=wandb.Settings(init_timeout=90),
        )
    except Exception as error:  # noqa: BLE001 - any wandb failure must not stop training
        print(
            f"wandb could not start ({error}); logging to {run_dir / 'metrics.jsonl'} only", file=sys.stderr
        )
        return None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of a run's metrics.jsonl (for curves and tests)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
