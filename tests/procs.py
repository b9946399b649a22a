"""Processes as the tests see them, from /proc: alive or not, a process's children and all its
descendants, and whether a port refuses connections (nothing listens, nobody holds it)."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

__all__ = ["alive", "children", "descendants", "listeners", "refused"]


def alive(pid: int) -> bool:
    """Whether any thread of a process still runs (not a zombie, not gone).

    The process's own stat is not enough: when another thread ends the process (``os._exit`` from
    the lifeline's watch thread), the main thread can already show ``Z`` while the exiting thread
    has not yet dropped the shared file table, so a listening socket is still open. The sockets are
    closed once every thread is a zombie or gone."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for tid in tasks:
        try:
            state = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if state not in ("Z", "X"):
            return True
    return False


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (zombies excluded), sorted."""
    out: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except FileNotFoundError:
            continue
    return sorted(c for c in out if alive(c))


def descendants(pid: int) -> set[int]:
    """Every living process below ``pid`` (children, grandchildren: RQ's scheduler)."""
    parent_of: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent_of[int(stat.parent.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parent_of.items() if parent in frontier} - found
        found |= frontier
    return {p for p in found if alive(p)}


def refused(port: int, host: str = "127.0.0.1", timeout: float = 60.0) -> bool:
    """Whether a connection to host:port is refused. Only a refusal counts: a slow connect on a
    loaded machine is not one (``timeout`` bounds it)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return False
    except ConnectionRefusedError:
        return True


def listeners(port: int) -> list[str]:
    """The processes holding a listening TCP socket on ``port`` ("pid cmdline"), from /proc: what a
    failed ``refused`` check prints, so that a failure says who still holds the port."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            f = row.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                inodes.add(f[9])
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        links = set()
        try:
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):  # closed since the listing (the listing's own)
                    links.add(os.readlink(fd))
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if any(f"socket:[{i}]" in links for i in inodes):
            found.append(f"{proc.name} {cmd[:200]}")
    return found
