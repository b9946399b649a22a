"""Binding a listening socket so that a failure is one line an operator can act on
(``127.0.0.1:2525 is in use``), never a traceback. The ``[host]:port`` parser is
common/smtp/hostport.py."""

from __future__ import annotations

import errno
import socket

from common.smtp.hostport import format_hostport

__all__ = ["CannotBind", "bind_listener"]


class CannotBind(Exception):
    """A listening address that cannot be had; str() is the one line to show."""

    @classmethod
    def because(cls, where: str, e: OSError) -> CannotBind:
        return cls(_reason(where, e))


def bind_listener(host: str, port: int, *, backlog: int = 1024) -> socket.socket:
    """A non-blocking listening TCP socket; raises CannotBind with the reason in one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    where = format_hostport(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no obstacle, a listener is
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise CannotBind.because(where, e) from None
    sock.setblocking(False)
    return sock


def _reason(where: str, e: OSError) -> str:
    if e.errno == errno.EADDRINUSE:
        return f"{where} is in use: stop what listens there, or give another --listen"
    if e.errno == errno.EACCES:
        return f"{where}: permission denied (a port below 1024 needs root or CAP_NET_BIND_SERVICE)"
    if e.errno == errno.EADDRNOTAVAIL:
        return f"{where} is not an address of this host: check --listen"
    if isinstance(e, socket.gaierror):
        return f"{where}: no such host ({e.strerror}): check --listen"
    return f"{where}: cannot listen: {e.strerror or e}"
