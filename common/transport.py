"""``transport_table``: a next hop per recipient domain, as Postfix's transport_maps (smtp: only).

One entry a line, ``DOMAIN NEXTHOP``, ``#`` comments. DOMAIN is ``example.com`` (that domain only)
or ``.example.com`` (its subdomains); the exact domain wins, then the nearest ``.parent``. NEXTHOP
is ``[host]`` or ``[host]:port`` for that host itself (no MX lookup), or ``host`` for the MX hosts
of ``host`` (on smtp_port). Consulted before relayhost and MX (common/routing.py), by the ingress
(grouping mail into jobs) and the workers alike, so give both the same file.

``TransportTable`` re-reads the file when it changes (common/watched.py: one stat() a second at
most; a file that breaks on a re-read is logged once and the old entries kept). At start-up a
bad file is ``TransportTableError``: one line, exit 78 (mtaq/cli.py).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from common.watched import Watched

__all__ = ["TransportTable", "TransportTableError", "lookup", "parse_transport"]

log = logging.getLogger("mtaq.routing")

_LABELS = re.compile(r"(?=.{1,253}$)[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*")
_LITERAL = re.compile(r"\[([^\[\]\s]+)\](?::(\d{1,5}))?")


class TransportTableError(Exception):
    """A transport table that cannot be used; the message is one line for the operator."""


def _nexthop(value: str) -> str | None:
    """The next hop as routing writes it (``[host]``, ``[host]:port``, ``host``), None if malformed."""
    literal = _LITERAL.fullmatch(value)
    if literal:
        port = literal.group(2)
        if port is not None and not 0 < int(port) < 65536:
            return None
        return f"[{literal.group(1).lower()}]" + (f":{port}" if port else "")
    host = value.lower().rstrip(".")
    return host if _LABELS.fullmatch(host) else None


def parse_transport(text: str, where: str) -> dict[str, str]:
    """{domain or .domain: next hop}; TransportTableError naming the line of the first bad entry."""
    out: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TransportTableError(f"transport_table {where} line {number}: expected DOMAIN NEXTHOP")
        domain, value = parts[0].lower().rstrip("."), parts[1]
        if not _LABELS.fullmatch(domain.removeprefix(".")):
            raise TransportTableError(f"transport_table {where} line {number}: {domain!r} is not a domain")
        hop = _nexthop(value)
        if hop is None:
            raise TransportTableError(
                f"transport_table {where} line {number}: next hop {value!r}: write [host], [host]:port or host"
            )
        out[domain] = hop
    return out


def lookup(entries: Mapping[str, str], domain: str) -> str | None:
    """The next hop for ``domain``: its own entry, else that of ``.parent`` nearest to it."""
    domain = domain.lower().rstrip(".")
    if domain in entries:
        return entries[domain]
    labels = domain.split(".")
    for i in range(1, len(labels)):
        hop = entries.get("." + ".".join(labels[i:]))
        if hop is not None:
            return hop
    return None


def _load(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise TransportTableError(f"transport_table {path}: {reason}") from None
    return parse_transport(text, str(path))


class TransportTable:
    def __init__(self, path: str, *, clock: Callable[[], float] = time.monotonic, check_every: float = 1.0) -> None:
        self.path = Path(path)
        self._entries = Watched(  # TransportTableError at start-up
            lambda: _load(self.path),
            lambda entries: [self.path],
            errors=(TransportTableError,),
            describe=lambda entries: f"transport_table: {len(entries)} entries from {self.path}",
            log=log,
            clock=clock,
            check_every=check_every,
        )

    def nexthop(self, domain: str) -> str | None:
        return lookup(self._entries.get(), domain)
