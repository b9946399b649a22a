"""The kernel's signal to a child when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``): the
roles `mtaq run` starts (mtaq/runtime/lifeline.py) and the scheduler a worker forks
(worker/pool.py) use it so that none of them outlives the process that started it."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["set_parent_death_signal"]

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_libc: ctypes.CDLL | None = None


def set_parent_death_signal(sig: int) -> bool:
    """Ask the kernel for ``sig`` when the parent dies (Linux); False where there is no such thing.

    Async-signal-safe enough for a preexec_fn once the library is loaded (call it with 0 in the
    parent first): then it is one prctl(2)."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return int(_libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
