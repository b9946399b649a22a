"""Running the ingress: one asyncio process, or N of them sharing one pre-bound listening socket."""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from common.logging import setup_logging
from common.redisconn import connect
from common.settings import Settings
from common.store import Store
from common.supervise import Child, Supervisor
from ingress.auth import Credentials
from ingress.server import Ingress, install_signal_handlers, make_ssl_context
from ingress.session import SessionConfig

__all__ = ["bind", "build_ingress", "main", "serve"]

log = logging.getLogger("mtaq.ingress")


def bind(listen: tuple[str, int]) -> socket.socket:
    host, port = listen
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def build_ingress(settings: Settings) -> Ingress:
    store = Store(connect(settings, timeout=5.0), settings.queue_name, relayhost=settings.relayhost,
                  job_max_messages=settings.job_max_messages, job_timeout=settings.job_timeout)
    ssl_ctx = make_ssl_context(settings.tls_cert, settings.tls_key) if settings.tls_cert else None
    creds = Credentials(settings.auth_file) if settings.auth_file else None
    return Ingress(store, SessionConfig.from_settings(settings), idle_timeout=settings.idle_timeout,
                   max_connections=settings.max_connections, max_per_client=settings.max_connections_per_client,
                   commit_max_messages=settings.commit_max_messages, max_queue=settings.max_queue,
                   ssl_context=ssl_ctx, credentials=creds, shutdown_grace=settings.shutdown_grace)


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
    setup_logging("ingress", settings.log_level)
    asyncio.run(_serve(settings, sock))


def main(settings: Settings) -> int:
    setup_logging("ingress", settings.log_level)
    sock = bind(settings.listen_addr)
    n = settings.processes or os.cpu_count() or 1
    if n == 1:
        serve(settings, sock)
        return 0
    # the socket is bound once, before the fork: every child accepts on it, and a child that dies
    # loses no queued connection
    children = [Child(f"ingress-{i + 1}", target=serve, args=(settings, sock)) for i in range(n)]
    log.info("ingress on %s:%s with %d processes", *sock.getsockname()[:2], n)
    return Supervisor(children).run()
