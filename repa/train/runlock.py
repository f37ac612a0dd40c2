"""One writer per run directory.

Two trainings writing one run directory (a requeued job while the old one still runs, a second
terminal, ranks orphaned by a killed launcher) delete each other's staging folders and
interleave their logs. The main process therefore holds, for the whole run:

- an advisory POSIX record lock (lockf) on `RUN_DIR/.lock`: exclusive, released by the kernel
  when the process dies however it dies, and (unlike flock) not inherited by the data-loader
  workers it forks, which may outlive it by a moment;
- a lease, `RUN_DIR/lease.json` (host, pid, start time, heartbeat), rewritten every few seconds
  by a thread: on shared file systems, where locks may not reach other machines, a fresh
  heartbeat is what says "in use".

A second start refuses at once, naming the holder and its last heartbeat. A lease is taken over
(saying so) when its heartbeat is older than `stale_after` seconds, or when its holder ran on
this machine and its process is gone. A holder that finds its lease taken over exits without
writing anything more.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from repa.utils.files import write_bytes_atomic

LOCK_FILE = ".lock"
LEASE_FILE = "lease.json"
LOST_LEASE_EXIT = 75  # EX_TEMPFAIL: another process owns the run now


class RunLockedError(RuntimeError):
    """The run directory is in use by another live training."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunLock:
    def __init__(self, run_dir: Path, stale_after: float = 300.0, heartbeat_every: float | None = None):
        self.run_dir = Path(run_dir)
        self.stale_after = stale_after
        self.heartbeat_every = heartbeat_every or max(min(stale_after / 6, 30.0), 0.1)
        self.identity = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self._lock_handle = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def lease_path(self) -> Path:
        return self.run_dir / LEASE_FILE

    def read_lease(self) -> dict | None:
        try:
            return json.loads(self.lease_path.read_text())
        except (OSError, ValueError):
            return None

    def _ours(self, lease: dict | None) -> bool:
        return bool(lease) and (lease.get("host"), lease.get("pid"), lease.get("started")) == (
            self.identity["host"],
            self.identity["pid"],
            self.identity["started"],
        )

    def acquire(self) -> str | None:
        """Take the run directory, or raise RunLockedError. Returns a note to print when a stale
        lease was taken over."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.run_dir / LOCK_FILE, "a+")  # noqa: SIM115 (held for the whole run)
        try:
            fcntl.lockf(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except (BlockingIOError, PermissionError):  # held elsewhere (EAGAIN or EACCES)
            locked = False
        except OSError:  # a file system without locks: the lease alone decides
            locked = True
        lease = self.read_lease()
        note = None
        if lease and not self._ours(lease):
            age = time.time() - float(lease.get("heartbeat", 0))
            holder = f"{lease.get('host')} pid {lease.get('pid')}"
            gone = lease.get("host") == self.identity["host"] and not _process_alive(int(lease.get("pid", 0)))
            if not (gone or age > self.stale_after):
                handle.close()
                started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lease.get("started", 0))))
                raise RunLockedError(
                    f"{self.run_dir} is in use by {holder} (started {started}, last heartbeat {age:.0f} s "
                    f"ago): wait for it to finish or stop it, or choose another --exp-name; a lease "
                    f"without a heartbeat for --lease-stale-after ({self.stale_after:.0f} s) is taken over"
                )
            why = "its process is gone" if gone else f"no heartbeat for {age:.0f} s"
            note = f"taking over the run directory {self.run_dir} from {holder} ({why})"
        elif not locked:  # its holder has not written its lease yet
            handle.close()
            raise RunLockedError(f"{self.run_dir} is locked by another process on this machine ({LOCK_FILE})")
        self._lock_handle = handle
        self._beat()
        self._thread = threading.Thread(target=self._heartbeat, name="repa-run-lease", daemon=True)
        self._thread.start()
        return note

    def _beat(self) -> None:
        lease = {**self.identity, "heartbeat": time.time()}
        write_bytes_atomic(self.lease_path, json.dumps(lease).encode(), durable=False)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_every):
            lease = self.read_lease()
            if lease is not None and not self._ours(lease):
                # Another process took the run over (this one looked dead to it): writing on
                # would corrupt its checkpoints, so stop here, without saving.
                sys.stderr.write(
                    f"\nrepa: the run directory {self.run_dir} was taken over by {lease.get('host')} pid "
                    f"{lease.get('pid')}; exiting without writing\n"
                )
                sys.stderr.flush()
                os._exit(LOST_LEASE_EXIT)
            with contextlib.suppress(OSError):
                self._beat()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._ours(self.read_lease()):
            with contextlib.suppress(OSError):
                self.lease_path.unlink()
        if self._lock_handle is not None:
            with contextlib.suppress(OSError):
                fcntl.lockf(self._lock_handle.fileno(), fcntl.LOCK_UN)
            self._lock_handle.close()
            self._lock_handle = None
