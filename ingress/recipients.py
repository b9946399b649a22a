"""``relay_recipients``: the valid recipients of the relay domains (Postfix relay_recipient_maps).

One address or ``@domain`` wildcard a line, ``#`` comments. Compared without case, as Postfix's
tables do. The file is re-read when it changes: at most once per ``check_every`` seconds of the
injected clock a stat() looks at its mtime, size and inode (no thread, no watcher).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from ingress import replies
from ingress.replies import Reply

__all__ = ["RecipientTable", "parse_table"]

log = logging.getLogger("mtaq.ingress")


def parse_table(text: str) -> frozenset[str]:
    """The entries of a table file, lower-cased; a trailing dot of a domain is dropped."""
    out = set()
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        entry = line.split()[0].lower()
        local, at, domain = entry.rpartition("@")
        if at:
            out.add(f"{local}@{domain.removesuffix('.')}")
    return frozenset(out)


class RecipientTable:
    def __init__(self, path: str, *, clock: Callable[[], float] = time.monotonic, check_every: float = 1.0) -> None:
        self.path = Path(path)
        self.clock = clock
        self.check_every = check_every
        self._entries: frozenset[str] | None = None  # None: never read successfully
        self._version: tuple[int, int, int] | None = None
        self._checked = float("-inf")
        self._failing = False

    def _refresh(self) -> None:
        now = self.clock()
        if now - self._checked < self.check_every and self._entries is not None:
            return
        self._checked = now
        try:
            st = self.path.stat()
            version = (st.st_mtime_ns, st.st_size, st.st_ino)
            if version != self._version:
                self._entries = parse_table(self.path.read_text(encoding="utf-8"))
                self._version = version
                log.info("relay_recipients: %d entries from %s", len(self._entries), self.path)
            self._failing = False
        except (OSError, UnicodeDecodeError) as e:
            if not self._failing:  # once per outage, not once per RCPT
                log.error("relay_recipients %s unreadable: %s (recipients of relay domains get 451)", self.path, e)
            self._failing = True
            if self._version is None:
                self._entries = None

    def check(self, address: str) -> Reply | None:
        """None when ``address`` is listed (itself or its ``@domain``), else the reply to send. A
        table never read answers 451 4.3.0: never accept, never refuse, on a broken table."""
        self._refresh()
        if self._entries is None:
            return replies.RECIPIENT_TABLE_UNAVAILABLE
        address = address.lower()
        _, at, domain = address.rpartition("@")
        if address in self._entries or (at and f"@{domain}" in self._entries):
            return None
        return replies.UNKNOWN_RELAY_RECIPIENT
