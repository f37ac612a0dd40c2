"""The run directory's checkpoint layout: names, the completeness marker, listing and resume.

Training writes this layout (repa.train.checkpoint, the save protocol) and evaluation reads it
(repa.eval.checkpoints, repa.eval.curves); it lives here so that neither imports the other.
No torch: listing checkpoints costs a directory read.

Layout of a run directory's `checkpoints/`:

    step-00010000/          a committed checkpoint
        COMPLETE.json       written last, by the main process: step, world size, time, files
        model.pt            online model, EMA, optimisers, scaler, schedule, step, config (main)
        rng-rank{R}.pt      each process's RNG states and data-stream position
        ema.safetensors     the EMA weights in the published key layout (for REPA tools)
    latest                  text file naming the newest committed checkpoint (write-then-rename)
    .tmp-step-00020000/     a save in progress; never read, removed on the next start

A checkpoint exists only once COMPLETE.json is in it: everything here skips folders without it,
so a kill at any moment of a save leaves the previous checkpoint the newest one.
"""

from __future__ import annotations

import re
from pathlib import Path

COMPLETE = "COMPLETE.json"
LATEST = "latest"
STAGING_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def parse_checkpoint_name(name: str) -> int | None:
    """The step of a checkpoint folder's name, or None for any other name."""
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def staging_dir(checkpoints_dir: Path, step: int) -> Path:
    return checkpoints_dir / f"{STAGING_PREFIX}{checkpoint_name(step)}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def list_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """Committed checkpoints as (step, path), oldest first. Incomplete folders are ignored."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        step = parse_checkpoint_name(path.name)
        if step is not None and path.is_dir() and is_complete(path):
            found.append((step, path))
    return sorted(found)


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete checkpoint (the `latest` pointer is a hint; completeness decides)."""
    found = list_checkpoints(checkpoints_dir)
    return found[-1][1] if found else None


def resolve_resume(resume: str, checkpoints_dir: Path) -> Path | None:
    """`auto` -> newest complete checkpoint or None; `none` -> None; `step:N` or a path -> that one."""
    if resume in ("", "none"):
        return None
    if resume == "auto":
        return latest_checkpoint(checkpoints_dir)
    if resume.startswith("step:"):
        path = checkpoints_dir / checkpoint_name(int(resume[len("step:") :]))
    else:
        path = Path(resume)
    if not is_complete(path):
        available = ", ".join(p.name for _, p in list_checkpoints(checkpoints_dir)) or "none"
        raise FileNotFoundError(
            f"cannot resume from {path}: not a complete checkpoint (no {COMPLETE}); "
            f"complete ones: {available}"
        )
    return path
