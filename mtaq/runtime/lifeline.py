"""Children that do not outlive their supervisor.

A ``kill -9`` of ``mtaq run`` (the OOM killer, a service manager's last resort) must not leave an
ingress taking mail, workers and a redis-server running with no parent. Postfix's daemons watch the
master and exit when it is gone; here:

- on Linux the kernel sends a child SIGTERM the moment its parent dies (``prctl(PR_SET_PDEATHSIG)``,
  set between fork and exec, so it covers redis-server too);
- everywhere, a child of ours also watches its parent's pid once a second and stops itself
  (SIGTERM: the same graceful stop as from the supervisor) when it has changed.

The supervisor's pid reaches a child in ``MTAQ_SUPERVISOR_PID`` (subprocesses) or as an argument
(forked children), so that a parent that died before the child looked is noticed too.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping

from common.pdeathsig import set_parent_death_signal

__all__ = [
    "SUPERVISOR_ENV",
    "die_with_parent",
    "die_with_supervisor",
    "preexec_die_with",
    "set_parent_death_signal",
    "watch_parent",
]

log = logging.getLogger("mtaq.supervisor")

SUPERVISOR_ENV = "MTAQ_SUPERVISOR_PID"
# How often the fallback looks at the parent, and how long a child stopping for lack of one may
# take before it exits anyway (its graceful stop is bounded by shutdown_grace; this bounds a hang).
WATCH_INTERVAL = 1.0
ORPHAN_GRACE = 60.0


def preexec_die_with(parent_pid: int, sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` for subprocess.Popen: the child gets ``sig`` when ``parent_pid`` dies, and
    exits at once if it already has (between fork and prctl)."""
    set_parent_death_signal(0)  # load libc in the parent: nothing to look up in the child (0: none)

    def preexec() -> None:
        set_parent_death_signal(sig)
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def watch_parent(parent_pid: int, *, interval: float = WATCH_INTERVAL, grace: float = ORPHAN_GRACE) -> threading.Thread:
    """The portable fallback: a daemon thread that stops this process (SIGTERM to itself) when its
    parent is no longer ``parent_pid``, and exits it hard ``grace`` seconds later."""

    def loop() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval)
        log.warning("supervisor (pid %d) is gone: stopping", parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        os._exit(1)

    t = threading.Thread(target=loop, name="mtaq-parent-watch", daemon=True)
    t.start()
    return t


def die_with_parent(parent_pid: int) -> None:
    """In a child, first thing: stop when ``parent_pid`` dies, including if it already has."""
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)
    watch_parent(parent_pid)


def die_with_supervisor(env: Mapping[str, str] = os.environ) -> None:
    """die_with_parent for a subprocess started by mtaq/runtime/supervise.py (which sets the variable)."""
    raw = env.get(SUPERVISOR_ENV, "")
    if raw.isdigit():
        die_with_parent(int(raw))
