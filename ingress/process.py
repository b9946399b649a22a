"""Running one ingress process on a listening socket it is given. How many processes share that
socket, and who restarts them, is the command line's business (mtaq/runtime/prefork.py): the
ingress knows nothing of supervisors."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from common.heap import settle
from common.logging import setup_logging
from common.redisconn import connect
from common.settings import Settings
from common.spool import Spool
from ingress.config import IngressConfig
from ingress.server import Ingress, install_signal_handlers

__all__ = ["build_ingress", "loop_factory", "serve"]

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
    settle()  # start-up's objects out of the collector's way (common/heap.py)
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
    its transports and loop run in C, which measured (docs/performance.md) as less CPU per
    connection and per reply for the same sessions."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
