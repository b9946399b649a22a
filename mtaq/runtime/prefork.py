"""`mtaq ingress`: one ingress process, or N forked ones accepting on one listening socket bound
before the fork, under the supervisor. ingress/process.py serves one process on the socket it is
handed; the processes around it are the runtime's, as `mtaq run`'s are."""

from __future__ import annotations

import logging
import os
import signal
import socket
from typing import Any

from common.address import bind_listener
from common.logging import setup_logging
from common.settings import Settings
from ingress.process import serve
from mtaq.runtime.supervise import Child, Supervisor

__all__ = ["run_ingress"]

log = logging.getLogger("mtaq.ingress")


def run_ingress(settings: Settings) -> int:
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
    return _ListenerSupervisor(children, sock, stop_timeout=settings.stop_timeout).run()


class _ListenerSupervisor(Supervisor):
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
