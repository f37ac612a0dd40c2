"""Atomic checkpoints: the save protocol. The layout it writes is repa.runs's (read there).

Protocol (docs/reliability.md, "Atomic checkpoints"): every process writes into the temporary folder, all
meet at a barrier, the main process writes COMPLETE.json, fsyncs, renames the folder into place
and moves the `latest` pointer; old checkpoints are deleted only after that, and at least two
are kept. Loading skips anything without COMPLETE.json, so a kill at any moment leaves the
previous checkpoint intact. Files hold tensors and plain Python values only (no pickled
objects), so they load with torch.load(weights_only=True).

Checksums: COMPLETE.json records a BLAKE2b-256 digest of every file (repa.runs verifies them
on resume and evaluation). The large files the main process writes are hashed as they are
written (`save_file`, `save_safetensors` return the digest, which the loop hands to
`commit_save`), so a save reads nothing back; the rest (other ranks' rng files, a method's
export) is hashed at commit by reading it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

# The layout names are re-exported: the loop and tests reach them as `ckpt.X`.
from repa.runs import (  # noqa: F401
    COMPLETE,
    LATEST,
    STAGING_PREFIX,
    DamagedCheckpointError,
    checkpoint_damage,
    checkpoint_name,
    is_complete,
    latest_checkpoint,
    list_checkpoints,
    parse_checkpoint_name,
    resolve_resume,
    staging_dir,
    verify_checkpoint_file,
)
from repa.utils.files import (
    CHECKSUM,
    HashingWriter,
    bytes_checksum,
    file_checksum,
    fsync_dir,
    write_bytes_atomic,
)


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
    checksums: dict[str, str | None] | None = None,
) -> Path:
    """After every process wrote into the staging folder: mark complete, rename, prune.

    checksums: file name -> digest of the files this (main) process hashed while writing them.
    Every other file in the folder (other ranks' rng-rank{R}.pt, a method's export) is hashed
    here by reading it; those are written by code that gets only a path or by another process."""
    barrier()  # all files of all ranks are written
    final = checkpoints_dir / checkpoint_name(step)
    if is_main:
        staging = staging_dir(checkpoints_dir, step)
        known = {name: digest for name, digest in (checksums or {}).items() if digest}
        digests = {}
        for file in sorted(staging.iterdir()):  # make the data durable before declaring it complete
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
            digests[file.name] = known.get(file.name) or file_checksum(file)
        record = {
            "step": step,
            "world_size": world_size,
            "time": time.time(),
            "files": sorted(digests),
            "checksum": CHECKSUM,
            "checksums": digests,
        }
        write_bytes_atomic(staging / COMPLETE, json.dumps(record, indent=1).encode())
        if final.exists():  # a committed checkpoint of the same step (e.g. re-saved after resume)
            shutil.rmtree(final)
        os.replace(staging, final)
        fsync_dir(checkpoints_dir)
        write_bytes_atomic(checkpoints_dir / LATEST, final.name.encode())
        prune_checkpoints(checkpoints_dir, keep_last=keep_last, keep_every=keep_every)
    barrier()
    return final


def prune_checkpoints(checkpoints_dir: Path, keep_last: int, keep_every: int = 0) -> None:
    """Delete old complete checkpoints beyond the newest `keep_last` (never fewer than 2); keep
    multiples of `keep_every` (for FID curves)."""
    keep_last = max(keep_last, 2)
    found = list_checkpoints(checkpoints_dir)
    for step, path in found[:-keep_last]:
        if keep_every and step % keep_every == 0:
            continue
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_staging(checkpoints_dir: Path) -> None:
    """Staging folders left by a killed save are garbage: remove them at start-up (main only)."""
    if checkpoints_dir.is_dir():
        for path in checkpoints_dir.glob(f"{STAGING_PREFIX}step-*"):
            shutil.rmtree(path, ignore_errors=True)


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


def save_file(obj: dict, path: Path) -> str:
    """torch.save `obj` to `path`; returns the file's checksum, hashed as torch writes it."""
    with HashingWriter(path) as out:
        torch.save(obj, out)
    return out.hexdigest()


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> str:
    """Write a .safetensors file; returns its checksum. The file is serialised in memory (as
    safetensors' own save_file does with each tensor), hashed, then written: no read back."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    digest = bytes_checksum(data)
    with open(path, "wb") as handle:
        handle.write(data)
    return digest


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
