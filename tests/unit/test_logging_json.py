"""log_format=json: one JSON object per line carrying the text line's fields."""

from __future__ import annotations

import io
import json
import logging
import time

import pytest

from common.logging import JsonFormatter, TextFormatter, parse_fields, setup_logging


def test_delivery_line_fields() -> None:
    line = (
        "66171B859DFDABADC6D: to=<bob@example.net>, relay=mx1.example.net[192.0.2.1]:25, delay=0.31, "
        "dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as 4F2A)"
    )
    assert parse_fields(line) == {
        "queue_id": "66171B859DFDABADC6D",
        "to": "bob@example.net",
        "relay": "mx1.example.net[192.0.2.1]:25",
        "delay": 0.31,
        "dsn": "2.0.0",
        "status": "sent",
        "reply": "250 2.0.0 Ok: queued as 4F2A",
    }


def test_reply_with_parentheses_and_commas_stays_whole() -> None:
    f = parse_fields(
        "66171B859DFDABADC6D: to=<a,b@x.test>, relay=none, delay=0.02, dsn=5.1.2, status=bounced (no (x, y) here)"
    )
    assert f["to"] == "a,b@x.test" and f["status"] == "bounced" and f["reply"] == "no (x, y) here"


def test_ingress_line_and_other_lines() -> None:
    f = parse_fields("661BAA94B7FB7409605: client=unknown[127.0.0.1], from=<me@example.com>, nrcpt=1, size=256")
    assert f == {
        "queue_id": "661BAA94B7FB7409605",
        "client": "unknown[127.0.0.1]",
        "from": "me@example.com",
        "nrcpt": 1,
        "size": 256,
    }
    assert parse_fields("661BAA94B7FB7409605: removed") == {"queue_id": "661BAA94B7FB7409605", "text": "removed"}
    assert parse_fields("ingress listening on 127.0.0.1:25") == {}


def test_formatter_writes_one_object_per_line_even_for_tracebacks() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("worker"))
    log = logging.getLogger("mtaq.test.json")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning(
            "%s: to=<%s>, relay=none, delay=1.50, dsn=4.4.1, status=deferred (%s)",
            "ABCDEF0123456",
            "x@y.test",
            "refused\nsecond line",
        )
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(x) for x in lines)
    assert first["program"] == "mtaq/worker" and first["level"] == "WARNING" and first["queue_id"] == "ABCDEF0123456"
    assert first["delay"] == 1.5 and first["reply"] == "refused\nsecond line"
    assert "ValueError: boom" in second["exception"]


def test_setup_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="log_format"):
        setup_logging("x", "INFO", "xml")


def test_text_line_carries_each_records_own_second() -> None:
    """TextFormatter formats a second once and reuses it: a record of the next second (or of an
    earlier one, logged late by another thread) still shows its own time, as logging's would."""
    fmt = TextFormatter("worker")
    plain = logging.Formatter("%(asctime)s mtaq/worker[%(process)d]: %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S")
    base = 1_796_000_000.0
    for created in (base + 0.2, base + 0.9, base + 1.0, base + 0.5, base + 3600.7, base + 1.3):
        record = logging.LogRecord("mtaq.worker", logging.INFO, __file__, 1, "%s: removed", ("ABCDEF0123",), None)
        record.created, record.msecs = created, (created % 1) * 1000
        assert fmt.format(record) == plain.format(record)
        assert fmt.format(record).endswith(" INFO ABCDEF0123: removed")


def test_json_time_carries_each_records_own_second_and_offset() -> None:
    """JsonFormatter shares the once-a-second formatting: each record still shows its own time, to
    the millisecond, with the local UTC offset."""
    fmt = JsonFormatter("worker")
    base = 1_796_000_000.0
    for created in (base + 0.2, base + 0.9, base + 1.0, base + 0.5, base + 3600.7, base + 1.3):
        record = logging.LogRecord("mtaq.worker", logging.INFO, __file__, 1, "%s: removed", ("ABCDEF0123",), None)
        record.created, record.msecs = created, (created % 1) * 1000
        local = time.localtime(created)
        expected = time.strftime("%Y-%m-%dT%H:%M:%S", local) + f".{int(record.msecs):03d}" + time.strftime("%z", local)
        assert json.loads(fmt.format(record))["time"] == expected
