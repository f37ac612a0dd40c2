"""Process lifetime on Linux: a child that must not outlive its parent."""

from __future__ import annotations

import os
import signal
import sys


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent exits (PR_SET_PDEATHSIG).

    Returns False where that is not available (not Linux). If the parent is already gone (this
    process was re-parented before the call), `sig` is sent at once, so no window is left open.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    parent = os.getppid()
    pr_set_pdeathsig = 1
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(sig)) != 0:
        return False
    if parent == 1 or os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return True
