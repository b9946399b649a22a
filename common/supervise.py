"""A small process supervisor: start children, restart one that dies, stop all on SIGTERM/SIGINT/SIGHUP.

Used by `mtaq run` (ingress + workers) and `mtaq ingress --processes N`."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Child", "Supervisor", "restart_delay"]

log = logging.getLogger("mtaq.supervisor")

# A child that dies this soon after its start is failing, not crashing: back off before restarting.
FAST_FAIL = 2.0
# SIGHUP too: the children are in their own sessions (below), so when the terminal goes away only the
# supervisor hears it, and it must not die leaving them running
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def restart_delay(lived: float, restarts: int) -> float:
    """Seconds to wait before restarting a process that lived ``lived`` seconds: none after a crash,
    1, 2, 4 ... 30 s while it keeps dying at once."""
    return min(30.0, 2.0 ** min(restarts, 5)) if lived < FAST_FAIL else 0.0


def _own_session(target: Callable[..., Any], *args: Any) -> Any:
    os.setsid()
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
        if self.argv is not None:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL, start_new_session=True)
        else:
            assert self.target is not None
            ctx = multiprocessing.get_context("fork")
            self.proc = ctx.Process(target=_own_session, args=(self.target, *self.args), name=self.name, daemon=False)
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
        while not self._stop:
            if self.watch is not None:
                self.watch()
            now = time.monotonic()
            for c in self.children:
                code = c.exitcode()
                if code is None or self._stop:
                    continue
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
        return self.stop()

    def stop(self) -> int:
        log.info("stopping %d process(es)", len(self.children))
        for c in self.children:
            c.signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        while time.monotonic() < deadline and any(c.exitcode() is None for c in self.children):
            time.sleep(0.05)
        for c in self.children:
            if c.exitcode() is None:
                log.warning("%s (pid %s) did not stop in %.0fs: killing it", c.name, c.pid, self.stop_timeout)
                c.signal(signal.SIGKILL)
        for c in self.children:
            if isinstance(c.proc, subprocess.Popen):
                c.proc.wait()
            elif c.proc is not None:
                c.proc.join()
        return 0
