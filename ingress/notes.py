"""What the ingress logs about refusals, in Postfix's words, and a rate limit on it.

The sans-IO session writes ``Note``s (it does no IO); the server takes them after each call and
hands them to a ``NoteLog``, a token bucket with an injected clock: a flood of bad commands costs
a bounded number of log lines a second, and the next line that gets through says how many were
left out. Credentials never reach a note: a refused AUTH line is named by its verb alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from ingress.events import Peer
from ingress.replies import Reply

__all__ = ["Note", "NoteLog", "printable", "reject_line"]

# Longest client-supplied text (HELO name, address) put into one log line.
MAX_FIELD = 255


@dataclass(frozen=True, slots=True)
class Note:
    """One line for the log. ``level`` is a ``logging`` level."""

    level: int
    text: str


def printable(text: str, limit: int = MAX_FIELD) -> str:
    """Client text made safe for one log line: no controls (no terminal escapes, no line breaks),
    cut to ``limit`` characters."""
    out = "".join(ch if ch.isprintable() else "?" for ch in text)
    return out if len(out) <= limit else out[:limit] + "..."


def reject_line(
    command: str,
    peer: Peer,
    reply: Reply,
    *,
    sender: str | None,
    recipient: str | None,
    helo: str,
    protocol: str,
) -> str:
    """Postfix's ``NOQUEUE: reject: RCPT from name[ip]: 554 5.7.1 <addr>: Relay access denied;
    from=<s> to=<r> proto=ESMTP helo=<h>``; ``from``/``to`` only when the command had them."""
    text = " ".join(reply.lines())
    if command == "RCPT" and recipient is not None:
        text = f"<{printable(recipient)}>: {text}"
    status = f"{reply.code} {reply.enhanced} " if reply.enhanced else f"{reply.code} "
    fields = []
    if sender is not None:
        fields.append(f"from=<{printable(sender)}>")
    if recipient is not None:
        fields.append(f"to=<{printable(recipient)}>")
    fields.append(f"proto={protocol}")
    if helo:
        fields.append(f"helo=<{printable(helo)}>")
    client = f"{printable(peer.name)}[{peer.ip}]"
    return f"NOQUEUE: reject: {command} from {client}: {status}{text}; {' '.join(fields)}"


class NoteLog:
    """Log notes through ``logger``, at most ``rate`` a second on average with bursts of
    ``burst`` (per process); the rest are counted and the count is logged with the next one."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        rate: float = 20.0,
        burst: int = 200,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._tokens = float(burst)
        self._last = clock()
        self.suppressed = 0  # since the last line that got through
        self.suppressed_total = 0

    def emit(self, note: Note) -> None:
        now = self.clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens < 1.0:
            self.suppressed += 1
            self.suppressed_total += 1
            return
        self._tokens -= 1.0
        if self.suppressed:
            self.logger.warning("%d refusal log lines suppressed by the log rate limit", self.suppressed)
            self.suppressed = 0
        self.logger.log(note.level, "%s", note.text)
