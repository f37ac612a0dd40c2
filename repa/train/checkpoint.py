"""Atomic checkpoints: a checkpoint exists only once it is complete.

Layout of a run directory's `checkpoints/`:

    step-00010000/          a committed checkpoint
        COMPLETE.json       written last, by the main process: step, world size, time, files
        model.pt            online model, EMA, optimisers, scaler, schedule, step, config (main)
        rng-rank{R}.pt      each process's RNG states and data-stream position
        ema.safetensors     the EMA weights in the published key layout (for REPA tools)
    latest                  text file naming the newest committed checkpoint (write-then-rename)
    .tmp-step-00020000/     a save in progress; never read, removed on the next start

Protocol (docs/reliability.md, "Atomic checkpoints"): every process writes into the temporary folder, all
meet at a barrier, the main process writes COMPLETE.json, fsyncs, renames the folder into place
and moves the `latest` pointer; old checkpoints are deleted only after that, and at least two
are kept. Loading skips anything without COMPLETE.json, so a kill at any moment leaves the
previous checkpoint intact. Files hold tensors and plain Python values only (no pickled
objects), so they load with torch.load(weights_only=True).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

COMPLETE = "COMPLETE.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write to a sibling temporary file, fsync, rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def staging_dir(checkpoints_dir: Path, step: int) -> Path:
    return checkpoints_dir / f".tmp-{checkpoint_name(step)}"


def begin_save(checkpoints_dir: Path, step: int, is_main: bool, barrier: Callable[[], None]) -> Path:
    """Create a clean staging folder for `step` (main process) and return it after a barrier."""
    staging = staging_dir(checkpoints_dir, step)
    if is_main:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
    barrier()
    return staging


def commit_save(
    checkpoints_dir: Path,
    step: int,
    world_size: int,
    is_main: bool,
    barrier: Callable[[], None],
    keep_last: int = 2,
    keep_every: int = 0,
) -> Path:
    """After every process wrote into the staging folder: mark complete, rename, prune."""
    barrier()  # all files of all ranks are written
    final = checkpoints_dir / checkpoint_name(step)
    if is_main:
        staging = staging_dir(checkpoints_dir, step)
        for file in staging.iterdir():  # make the data durable before declaring it complete
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        record = {
            "step": step,
            "world_size": world_size,
            "time": time.time(),
            "files": sorted(os.listdir(staging)),
        }
        write_file_atomic(staging / COMPLETE, json.dumps(record, indent=1).encode())
        if final.exists():  # a committed checkpoint of the same step (e.g. re-saved after resume)
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(checkpoints_dir)
        write_file_atomic(checkpoints_dir / LATEST, final.name.encode())
        prune_checkpoints(checkpoints_dir, keep_last=keep_last, keep_every=keep_every)
    barrier()
    return final


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def list_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """Committed checkpoints as (step, path), oldest first. Incomplete folders are ignored."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete checkpoint (the `latest` pointer is a hint; completeness decides)."""
    found = list_checkpoints(checkpoints_dir)
    return found[-1][1] if found else None


def prune_checkpoints(checkpoints_dir: Path, keep_last: int, keep_every: int = 0) -> None:
    """Delete old complete checkpoints beyond the newest `keep_last` (never fewer than 2) and
    stale staging folders; keep multiples of `keep_every` (for FID curves)."""
    keep_last = max(keep_last, 2)
    found = list_checkpoints(checkpoints_dir)
    for step, path in found[:-keep_last]:
        if keep_every and step % keep_every == 0:
            continue
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_staging(checkpoints_dir: Path) -> None:
    """Staging folders left by a killed save are garbage: remove them at start-up (main only)."""
    if checkpoints_dir.is_dir():
        for path in checkpoints_dir.glob(".tmp-step-*"):
            shutil.rmtree(path, ignore_errors=True)


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


class DiskFullError(RuntimeError):
    """A checkpoint did not fit on its disk; the message says what is safe and what to do."""


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC from any writer: torch raises OSError, safetensors its own error with the text."""
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error)


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def disk_full_message(checkpoints_dir: Path, step: int, staging: Path) -> str:
    """One paragraph for a save that ran out of space: where, how much, what is intact, what next."""
    last = latest_checkpoint(checkpoints_dir)
    needed = directory_bytes(last) if last is not None else directory_bytes(staging)
    free = shutil.disk_usage(checkpoints_dir).free
    intact = f"the last complete checkpoint, {last}, is intact" if last else "no earlier checkpoint exists"
    return (
        f"no space left on the device of {checkpoints_dir} while saving step {step}: a checkpoint takes "
        f"about {needed / 2**20:.0f} MiB and {free / 2**20:.0f} MiB are free; {intact}. Free some space "
        f"(or lower --keep-checkpoints) and rerun the same command to resume from it"
    )


def load_file(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def save_file(obj: dict, path: Path) -> None:
    torch.save(obj, path)


def capture_rng_state() -> dict:
    """Every RNG a training step may draw from, for exact resumption."""
    import random

    import numpy as np

    state = {
        "torch": torch.get_rng_state(),
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps(np.random.get_state()[1].tolist()),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(
        ("MT19937", np.array(json.loads(state["numpy"]), dtype=np.uint32), state["numpy_pos"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
