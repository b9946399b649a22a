"""Running the ingress: one asyncio process, or N of them sharing one pre-bound listening socket."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

from common.address import bind_listener
from common.logging import setup_logging
from common.redisconn import connect
from common.settings import Settings
from common.spool import Spool
from common.supervise import Child, Supervisor
from ingress.config import IngressConfig
from ingress.server import Ingress, install_signal_handlers

__all__ = ["build_ingress", "main", "serve"]

log = logging.getLogger("mtaq.ingress")


def build_ingress(settings: Settings) -> Ingress:
    # WAIT blocks up to redis_replica_timeout: the socket must outlast it, or a slow replica would
    # look like a dead primary
    spool = Spool.from_settings(settings, connect(settings, timeout=max(5.0, settings.redis_replica_timeout + 5)))
    return Ingress(spool, IngressConfig.from_settings(settings))


async def _serve(settings: Settings, sock: socket.socket) -> None:
    ingress = build_ingress(settings)
    await ingress.start(sock=sock)
    done = asyncio.Event()
    install_signal_handlers(ingress, done)
    log.info("ingress listening on %s:%s", *sock.getsockname()[:2])
    await done.wait()
    log.info("ingress stopped")


def serve(settings: Settings, sock: socket.socket) -> None:
    """One ingress process (also the target of each forked child)."""
    setup_logging("ingress", settings.log_level, settings.log_format)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(_serve(settings, sock))


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (a dependency on CPython/Linux), else asyncio's:
    its transports and loop run in C, which measured (README, Performance) as less CPU per
    connection and per reply for the same sessions."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(settings: Settings) -> int:
    setup_logging("ingress", settings.log_level, settings.log_format)
    sock = bind_listener(*settings.listen_addr)  # CannotBind: one line and EXIT_FATAL (mtaq/cli.py)
    n = settings.processes or os.cpu_count() or 1
    if n == 1:
        serve(settings, sock)
        return 0
    # the socket is bound once, before the fork: every child accepts on it, and a child that dies
    # loses no queued connection
    children = [Child(f"ingress-{i + 1}", target=serve, args=(settings, sock)) for i in range(n)]
    log.info("ingress on %s:%s with %d processes", *sock.getsockname()[:2], n)
    return _IngressSupervisor(children, sock, stop_timeout=settings.stop_timeout).run()


class _IngressSupervisor(Supervisor):
    """Closes the parent's copy of the listening socket when told to stop. Each child closes its
    own copy at SIGTERM; were the parent to keep one, the kernel would go on completing handshakes
    into the backlog that nobody accepts, and those clients would wait, then get a reset, instead of
    a prompt refusal that sends them to the next MX. (No child is forked after the stop request.)"""

    def __init__(self, children: list[Child], sock: socket.socket, *, stop_timeout: float) -> None:
        super().__init__(children, stop_timeout=stop_timeout)
        self._sock = sock

    def request_stop(self, signum: int = signal.SIGTERM, frame: Any = None) -> None:
        super().request_stop(signum, frame)
        self._sock.close()
