"""Log set-up shared by every role: one line per event, Postfix-like, to stderr.

``log_format=text`` (the default) writes Postfix's line; ``log_format=json`` writes the same event as
one JSON object per line for log shippers. The JSON carries the same fields as the text line: the
text's ``QID: key=value, ... status=X (reply)`` shape is parsed back into ``queue_id``, one member
per ``key=value`` and ``reply``, so that every role's existing log calls need no second spelling.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import sys
import time
from typing import Any

__all__ = ["LOG_FORMATS", "TIME_FORMAT", "JsonFormatter", "TextFormatter", "parse_fields", "setup_logging"]

LOG_FORMATS = ("text", "json")

# "66171B859DFDABADC6D: to=<bob@example.net>, relay=mx[192.0.2.1]:25, delay=0.31, dsn=2.0.0, status=sent (250 Ok)"
_QID = re.compile(r"(?P<qid>[0-9A-F]{10,}): (?P<rest>.*)\Z", re.S)
# a value is <...> (an address, may hold commas), or runs to the next ", " or " (" at the end
_PAIR = re.compile(r"(?P<key>[a-z_]+)=(?P<value><[^>]*>|[^,\s(]*(?:\([^)]*\))?[^,\s]*)(?:, |\s*(?=\()|\s*\Z)")
_NUMERIC = {"delay": float, "size": int, "nrcpt": int}


def parse_fields(message: str) -> dict[str, Any]:
    """The structured fields of a Postfix-style line; {} for a line of another shape."""
    m = _QID.match(message)
    if m is None:
        return {}
    out: dict[str, Any] = {"queue_id": m["qid"]}
    rest = m["rest"]
    pos = 0
    while pos < len(rest):
        pair = _PAIR.match(rest, pos)
        if pair is None or pair.end() == pos:
            break
        key, value = pair["key"], pair["value"]
        if value.startswith("<") and value.endswith(">"):
            value = value[1:-1]
        conv = _NUMERIC.get(key)
        try:
            out[key] = conv(value) if conv else value
        except ValueError:
            out[key] = value
        pos = pair.end()
    tail = rest[pos:].strip()
    if tail.startswith("(") and tail.endswith(")"):
        out["reply"] = tail[1:-1]
    elif tail:
        out["text"] = tail  # e.g. "removed", "sender delivery status notification: ID"
    return out


TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"  # a line's time, to the second, local (both formats)


class _Seconds:
    """A record's second as both formats write it (TIME_FORMAT, and the UTC offset), formatted once
    a second, not once a line: time.localtime and strftime were a sixth of a line's cost."""

    def __init__(self) -> None:
        self._last = (-1, "", "")  # (second, its text, its offset): one attribute, replaced whole by any thread

    def __call__(self, created: float) -> tuple[str, str]:
        second = int(created)
        last = self._last
        if last[0] != second:
            local = time.localtime(second)
            last = (second, time.strftime(TIME_FORMAT, local), time.strftime("%z", local))
            self._last = last
        return last[1], last[2]


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (json.dumps escapes any newline in the message)."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role
        self.host = socket.gethostname()
        self._seconds = _Seconds()

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        stamp, offset = self._seconds(record.created)
        obj: dict[str, Any] = {
            "time": f"{stamp}.{int(record.msecs):03d}{offset}",
            "host": self.host,
            "program": f"mtaq/{self.role}",
            "pid": record.process,
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        obj.update(parse_fields(message))
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """Postfix's line: ``2026-12-07T12:00:00 mtaq/worker[123]: INFO message``, its time formatted
    once a second (``_Seconds``)."""

    def __init__(self, role: str) -> None:
        super().__init__(f"%(asctime)s mtaq/{role}[%(process)d]: %(levelname)s %(message)s", TIME_FORMAT)
        self._seconds = _Seconds()

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self._seconds(record.created)[0]


def setup_logging(role: str, level: str = "INFO", fmt: str = "text") -> None:
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    # No line shows where it was logged from or by which thread: the logging HOWTO's "Optimization"
    # switches spare each record a walk up the stack (sys._getframe) and the thread lookups. Every
    # delivery logs two lines and every message received one: 10 -> 6 us a line.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(role) if fmt == "json" else TextFormatter(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # RQ logs every job start and end at INFO: our own delivery line says more, once.
    logging.getLogger("rq").setLevel(max(logging.WARNING, root.level))
