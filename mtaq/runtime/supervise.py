"""A small process supervisor: start children, restart one that dies, stop all on SIGTERM/SIGINT/SIGHUP.

Used by `mtaq run` (ingress + workers) and `mtaq ingress --processes N`. A child that exits with
EXIT_FATAL (it cannot work as configured: its port is in use) is not restarted: the supervisor
stops the others and exits with that code. Children die with the supervisor (mtaq/runtime/lifeline.py)."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any

from mtaq.runtime.lifeline import SUPERVISOR_ENV, die_with_parent, preexec_die_with

__all__ = ["EXIT_FATAL", "Child", "Process", "Supervisor", "restart_delay", "stop_processes"]

log = logging.getLogger("mtaq.supervisor")

# A child that dies this soon after its start is failing, not crashing: back off before restarting.
FAST_FAIL = 2.0
# sysexits.h EX_CONFIG: a child that cannot work as configured (its listening address is taken);
# restarting it would fail the same way for ever, so the supervisor gives up at once.
EXIT_FATAL = 78
# SIGHUP too: the children are in their own sessions (below), so when the terminal goes away only the
# supervisor hears it, and it must not die leaving them running
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def restart_delay(lived: float, restarts: int) -> float:
    """Seconds to wait before restarting a process that lived ``lived`` seconds: none after a crash,
    1, 2, 4 ... 30 s while it keeps dying at once."""
    return min(30.0, 2.0 ** min(restarts, 5)) if lived < FAST_FAIL else 0.0


Process = subprocess.Popen[bytes] | BaseProcess


def _running(p: Process) -> bool:
    return (p.poll() if isinstance(p, subprocess.Popen) else p.exitcode) is None


def stop_processes(procs: Sequence[Process], timeout: float, sig: int = signal.SIGTERM) -> list[Process]:
    """The one way to stop processes: ``sig`` to each, up to ``timeout`` seconds for all of them
    together, SIGKILL for those still running, then reap every one. Returns those killed."""
    for p in procs:
        if _running(p) and p.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_running(p) for p in procs):
        time.sleep(0.02)
    killed = [p for p in procs if _running(p)]
    for p in killed:
        if p.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        if isinstance(p, subprocess.Popen):
            p.wait()
        else:
            p.join()
    return killed


def _own_session(parent: int, target: Callable[..., Any], *args: Any) -> Any:
    # A forked child inherits the supervisor's stop handlers, which only set a flag in the parent's
    # Supervisor: a SIGTERM arriving before the child installs its own would be lost and the child
    # would run on until SIGKILL. Until then, the default action (exit) is right.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.setsid()
    die_with_parent(parent)
    return target(*args)


@dataclass
class Child:
    name: str
    argv: list[str] | None = None  # a subprocess
    target: Callable[..., Any] | None = None  # or a forked function (inherits listening sockets)
    args: tuple[Any, ...] = ()
    env: dict[str, str] | None = None
    proc: Any = None
    started: float = 0.0
    restarts: int = 0
    next_start: float = field(default=0.0)

    def start(self) -> None:
        # Each child in its own session: a terminal's Ctrl-C (SIGINT to the foreground process group)
        # reaches the supervisor only, which then stops the children with SIGTERM, once and in order.
        me = os.getpid()
        if self.argv is not None:
            self.proc = subprocess.Popen(
                self.argv,
                env={**(os.environ if self.env is None else self.env), SUPERVISOR_ENV: str(me)},
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=preexec_die_with(me),
            )
        else:
            assert self.target is not None
            ctx = multiprocessing.get_context("fork")
            self.proc = ctx.Process(
                target=_own_session, args=(me, self.target, *self.args), name=self.name, daemon=False
            )
            self.proc.start()
        self.started = time.monotonic()

    def exitcode(self) -> int | None:
        if self.proc is None:
            return None
        if isinstance(self.proc, subprocess.Popen):
            return self.proc.poll()
        code = self.proc.exitcode
        return None if code is None else int(code)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def signal(self, sig: int) -> None:
        pid = self.pid
        if pid is not None and self.exitcode() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


class Supervisor:
    def __init__(
        self, children: list[Child], *, stop_timeout: float = 40.0, watch: Callable[[], None] | None = None
    ) -> None:
        self.children = children
        self.stop_timeout = stop_timeout
        self.watch = watch  # called on every turn of the loop until the stop request (mtaq run: Redis)
        self._stop = False

    def request_stop(self, signum: int = signal.SIGTERM, frame: Any = None) -> None:
        self._stop = True

    def run(self) -> int:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.request_stop)
        for c in self.children:
            c.start()
            log.info("started %s (pid %s)", c.name, c.pid)
        fatal = False
        while not self._stop:
            if self.watch is not None:
                self.watch()
            now = time.monotonic()
            for c in self.children:
                code = c.exitcode()
                if code is None or self._stop:
                    continue
                if code == EXIT_FATAL:
                    log.error("%s (pid %s) cannot start (exit %d): not restarting; stopping", c.name, c.pid, code)
                    fatal = self._stop = True
                    break
                if c.next_start == 0.0:
                    delay = restart_delay(now - c.started, c.restarts)
                    log.error("%s (pid %s) exited with %s; restarting in %.0fs", c.name, c.pid, code, delay)
                    c.next_start = now + delay
                if now >= c.next_start:
                    c.restarts += 1
                    c.next_start = 0.0
                    c.start()
                    log.info("restarted %s (pid %s)", c.name, c.pid)
            time.sleep(0.2)
        self.stop()
        return EXIT_FATAL if fatal else 0

    def stop(self) -> None:
        log.info("stopping %d process(es)", len(self.children))
        started = [c for c in self.children if c.proc is not None]
        killed = stop_processes([c.proc for c in started], self.stop_timeout)
        for c in started:
            if c.proc in killed:
                log.warning("%s (pid %s) did not stop in %.0fs: killed it", c.name, c.pid, self.stop_timeout)
