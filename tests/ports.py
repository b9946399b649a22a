"""TCP ports for test servers that cannot collide, even with tests running side by side.

pytest-xdist runs the suite in several worker processes at once, each starting its own MTAs, sinks
and redis-servers. A port found free by binding port 0 and closing again is an ephemeral port: the
kernel may hand the same one to another worker's socket (a client's source port, another ``bind(0)``)
before the test binds it. So ``free_port`` never takes an ephemeral port: each xdist worker has its
own block of ports below the kernel's ephemeral range (``ip_local_port_range``), derived from
``PYTEST_XDIST_WORKER`` (gw0, gw1, ...), and walks it in order, checking each port free on every host
it will be used on. Two workers' blocks are disjoint, and no ``bind(0)`` anywhere lands in one.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["LOOPBACK_HOSTS", "free_port", "ipv6_loopback", "port_block", "wait_port", "xdist_worker"]

LOOPBACK_HOSTS: tuple[str, ...] = tuple(f"127.0.0.{i}" for i in range(1, 10))
"""The addresses ``free_port`` checks by default: tests place sinks, ingress and DNS among these."""

BLOCK = 1000  # ports per xdist worker: a run uses a few hundred, and the walk wraps around
FIRST = 10000  # above the well-known and most registered service ports used on a developer's machine


def xdist_worker() -> int:
    """This process's xdist worker number (gw3 -> 3); 0 when the tests run in one process."""
    m = re.fullmatch(r"gw(\d+)", os.environ.get("PYTEST_XDIST_WORKER", ""))
    return int(m.group(1)) if m else 0


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def port_block(worker: int | None = None) -> range:
    """The ports ``free_port`` hands out in xdist worker ``worker`` (this one by default)."""
    n = xdist_worker() if worker is None else worker
    start = FIRST + n * BLOCK
    if start + BLOCK > _ephemeral_low():
        raise RuntimeError(f"xdist worker {n}: no port block below the ephemeral range; run fewer workers")
    return range(start, start + BLOCK)


_walk: Iterator[int] | None = None


def _next_candidate() -> int:
    global _walk
    if _walk is None:
        _walk = itertools.cycle(port_block())
    return next(_walk)


def free_port(hosts: Iterable[str] = LOOPBACK_HOSTS) -> int:
    """A TCP port of this worker's block that is free on every one of ``hosts`` now (tests bind it soon after)."""
    hosts = list(hosts)
    for _ in range(BLOCK):
        port = _next_candidate()
        with contextlib.ExitStack() as stack:
            try:
                for host in hosts:
                    s = stack.enter_context(socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET))
                    s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no TCP port of {port_block()} free on all of {hosts}")


def wait_port(host: str, port: int, timeout: float = 60.0) -> None:
    """Wait for a listener (a process starting on a loaded machine can take long; only failure waits it all)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port}")


def ipv6_loopback() -> bool:
    """Whether this host has ::1 (a container may have IPv6 off). Only "no such address or family"
    means no: any other error is a real failure and is raised."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError as e:
        if e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
            return False
        raise
    return True
