"""What the processes of a multi-node job agree on before training starts.

- How long a collective waits for the other ranks (`--dist-timeout`): by default longer than any
  allowance of the watchdog (repa/train/watchdog.py), so that a frozen rank is reported by the
  watchdog, with stacks, rather than by a timeout deep in the backend, and so that rank 0's
  longest phase (start-up, which builds the `--eval-every` reference statistics, a save, an
  evaluation's scoring) fits. NCCL's own default is 10 minutes.
- That every rank sees the run directory: rank 0 stages and commits checkpoints there that
  every rank writes its RNG file into, and a resume reads them on every rank. On nodes without
  a shared file system each node would write its own half of every checkpoint; the job stops at
  start-up instead, naming the requirement.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import time
from datetime import timedelta
from pathlib import Path

from repa.utils.files import write_bytes_atomic

# The collective timeout's floor: the watchdog's default long-phase allowance plus a margin.
MIN_AUTO_TIMEOUT_S = 3600.0
TIMEOUT_MARGIN_S = 120.0
# A marker file is new to every other node; a network file system's lookup of a name it has never
# seen goes to the server, so it shows up at once. A few seconds of retries cover the rest.
MARKER_WAIT_S = 5.0
MARKER_PREFIX = ".shared-fs-check-"


class SharedDirectoryError(RuntimeError):
    """A rank does not see the run directory rank 0 writes."""


def process_group_timeout(run) -> timedelta:
    """The process group's timeout for the run options `run` (--dist-timeout; 0: derived)."""
    if run.dist_timeout:
        return timedelta(seconds=run.dist_timeout)
    longest = max(run.step_timeout, run.long_phase_timeout, MIN_AUTO_TIMEOUT_S)
    return timedelta(seconds=longest + TIMEOUT_MARGIN_S)


def _sees(marker: Path, token: str, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        with contextlib.suppress(OSError):
            if marker.read_text() == token:
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def check_shared_run_dir(run_dir: Path, rank: int, world_size: int, wait_s: float = MARKER_WAIT_S) -> None:
    """Every rank of torch.distributed's default group calls this with the run directory as it
    sees it. Rank 0 writes a marker file with a random token there and broadcasts the token; every
    rank reads the file; all learn every rank's verdict, and all raise SharedDirectoryError when
    any rank did not see it."""
    if world_size <= 1:
        return
    import torch.distributed as dist

    run_dir = Path(run_dir)
    message: list[str | None] = [None, None]  # token, or rank 0's error
    if rank == 0:
        token = secrets.token_hex(16)
        try:
            write_bytes_atomic(run_dir / f"{MARKER_PREFIX}{token}", token.encode())
            message[0] = token
        except OSError as error:
            message[1] = f"rank 0 cannot write the run directory {run_dir}: {error}"
    dist.broadcast_object_list(message, src=0)
    token, failure = message
    if failure is not None:
        raise SharedDirectoryError(failure)
    marker = run_dir / f"{MARKER_PREFIX}{token}"
    seen = rank == 0 or _sees(marker, token, wait_s)
    verdicts: list = [None] * world_size
    dist.all_gather_object(verdicts, (rank, socket.gethostname(), str(run_dir.absolute()), seen))
    if rank == 0:
        with contextlib.suppress(OSError):
            marker.unlink()
    blind = [verdict for verdict in verdicts if not verdict[3]]
    if blind:
        _, host0, dir0, _ = verdicts[0]
        where = "; ".join(f"rank {r} on {host} looked in {seen_dir}" for r, host, seen_dir, _ in blind)
        raise SharedDirectoryError(
            f"{len(blind)} of {world_size} ranks do not see the run directory that rank 0 on {host0} "
            f"writes ({dir0}, marker file {marker.name}): {where}. Every rank must see the run "
            "directory on one file system shared by all nodes (NFS, Lustre, GPFS, ...): checkpoints are "
            "staged and committed there by rank 0 with a file from every rank, and read back by every "
            "rank on resume. Put --output-dir on shared storage, the same path on every node."
        )
