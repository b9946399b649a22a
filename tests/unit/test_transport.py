"""transport_table (common/transport.py) and the Router consulting it before relayhost and MX."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from common.routing import Router
from common.transport import TransportTable, TransportTableError, lookup, parse_transport
from tests.unit.fakeclock import FakeClock

TABLE = """
# DOMAIN NEXTHOP
example.com      [smtp.example.net]:587
.example.com     relay.example.net     # subdomains: relay.example.net's MX
Special.ORG.     [192.0.2.7]
"""


def test_parse_and_lookup() -> None:
    entries = parse_transport(TABLE, "t")
    assert entries == {
        "example.com": "[smtp.example.net]:587",
        ".example.com": "relay.example.net",
        "special.org": "[192.0.2.7]",
    }
    assert lookup(entries, "EXAMPLE.com") == "[smtp.example.net]:587"
    assert lookup(entries, "a.b.example.com") == "relay.example.net"
    assert lookup(entries, "special.org.") == "[192.0.2.7]"
    assert lookup(entries, "sub.special.org") is None  # no .special.org entry
    assert lookup(entries, "notexample.com") is None


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("example.com", "expected DOMAIN NEXTHOP"),
        ("example.com a b", "expected DOMAIN NEXTHOP"),
        ("ex!ample.com [h]", "is not a domain"),
        ("example.com [h]:99999", "write [host], [host]:port or host"),
        ("example.com smtp:relay", "write [host], [host]:port or host"),
    ],
)
def test_bad_lines_are_one_line_naming_the_line(line: str, error: str) -> None:
    with pytest.raises(TransportTableError) as e:
        parse_transport(f"# c\n{line}\n", "/etc/t")
    assert str(e.value).startswith("transport_table /etc/t line 2: ") and error in str(e.value)


def test_router_table_before_relayhost_and_mx(tmp_path: Path) -> None:
    path = tmp_path / "transport"
    path.write_text(TABLE)
    router = Router("smart.example.net:25", TransportTable(str(path)))
    assert router.hop("a@example.com") == "[smtp.example.net]:587"
    assert router.hop("a@x.example.com") == "relay.example.net"
    assert router.hop("a@elsewhere.test") == "[smart.example.net]:25"
    assert Router("", TransportTable(str(path))).hop("a@elsewhere.test") == "elsewhere.test"


def test_reread_on_change_old_entries_kept_on_a_broken_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "transport"
    path.write_text("example.com [a.example.net]\n")
    clock = FakeClock()
    table = TransportTable(str(path), clock=clock)
    path.write_text("example.com [b.example.net]:2525\n")
    assert table.nexthop("example.com") == "[a.example.net]"  # within a second: not looked at
    clock.now += 1.5
    assert table.nexthop("example.com") == "[b.example.net]:2525"
    path.write_text("example.com\n")
    with caplog.at_level(logging.INFO, logger="mtaq.routing"):
        for _ in range(3):
            clock.now += 1.5
            assert table.nexthop("example.com") == "[b.example.net]:2525"
    assert [r.levelno for r in caplog.records].count(logging.ERROR) == 1


def test_missing_file_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(TransportTableError, match="No such file"):
        TransportTable(str(tmp_path / "nope"))
