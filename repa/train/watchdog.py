"""`--step-timeout`: a rank that stops making progress says where it is and exits.

A frozen rank (a stuck file system, a wedged driver, a stopped process) leaves the others
waiting in a collective, silently, for the process group's timeout. Each rank therefore runs a
watchdog: the loop re-arms it whenever it makes progress, with the allowance of what comes next
(a training step, or a long phase: start-up and the first step with its compilation, a
checkpoint save, a preview, an evaluation). When an allowance runs out, the rank writes the
Python stacks of all its threads to `RUN_DIR/hang-rank{R}.txt`, says so on stderr and exits with
status 124, so the scheduler can requeue the job and the last complete checkpoint carries on.
(Under torchrun the launcher then stops the remaining ranks.)

The watchdog is a Python thread, which needs the interpreter lock; collectives and most
kernels release it while they wait. As a backstop for a thread that never does, faulthandler's
C watchdog dumps the stacks and exits a minute later.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time
from pathlib import Path

HANG_EXIT = 124  # as timeout(1)
BACKSTOP_S = 60.0


class StepWatchdog:
    def __init__(
        self,
        run_dir: Path,
        rank: int,
        describe_checkpoint=lambda: "none",
        step_timeout: float = 0.0,
        long_phase_timeout: float = 0.0,
    ):
        """`step_timeout` 0 disables the watchdog; `step` and `long_phase` then do nothing."""
        self.step_timeout, self.long_phase_timeout = step_timeout, long_phase_timeout
        self.path = Path(run_dir) / f"hang-rank{rank}.txt"
        self.rank = rank
        self.describe_checkpoint = describe_checkpoint  # names the last complete checkpoint
        self._deadline = float("inf")
        self._allowance = 0.0
        self._what = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._file = None

    def step(self, what: str) -> None:
        """A training step comes next: --step-timeout."""
        if self.step_timeout:
            self.expect(self.step_timeout, what)

    def long_phase(self, what: str) -> None:
        """Start-up, a save, a preview or an evaluation comes next: --long-phase-timeout."""
        if self.step_timeout:
            self.expect(self.long_phase_timeout, what)

    def expect(self, seconds: float, what: str) -> None:
        """The next progress report must come within `seconds` (0: no limit), while `what`."""
        with self._lock:
            self._allowance, self._what = seconds, what
            self._deadline = time.monotonic() + seconds if seconds > 0 else float("inf")
        if self._file is not None:
            faulthandler.cancel_dump_traceback_later()
            if seconds > 0:
                faulthandler.dump_traceback_later(seconds + BACKSTOP_S, exit=True, file=self._file)
        if seconds > 0 and self._thread is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a")  # noqa: SIM115 (open while the watchdog runs)
            faulthandler.dump_traceback_later(seconds + BACKSTOP_S, exit=True, file=self._file)
            self._thread = threading.Thread(target=self._watch, name="repa-step-watchdog", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                overdue = time.monotonic() > self._deadline
                allowance, what = self._allowance, self._what
            if overdue:
                self._fire(allowance, what)

    def _fire(self, allowance: float, what: str) -> None:
        self._file.write(f"rank {self.rank}: no progress for {allowance:.0f} s while {what}\n")
        faulthandler.dump_traceback(file=self._file, all_threads=True)
        self._file.flush()
        last = "unknown"
        with contextlib.suppress(Exception):
            last = self.describe_checkpoint()
        sys.stderr.write(
            f"\nrepa train: rank {self.rank} made no progress for {allowance:.0f} s while {what} "
            f"(--step-timeout); Python stacks of every thread are in {self.path}. Exiting so that the job "
            f"can be requeued; the rerun resumes from the last complete checkpoint ({last}).\n"
        )
        sys.stderr.flush()
        os._exit(HANG_EXIT)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._file is not None:
            faulthandler.cancel_dump_traceback_later()
            self._file.close()
            self._file = None
            with contextlib.suppress(OSError):
                if self.path.stat().st_size == 0:  # nothing happened: leave no empty report
                    self.path.unlink()
