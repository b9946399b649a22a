"""The Received: trace header (RFC 5321 §4.4)."""

from __future__ import annotations

import calendar

from hypothesis import given
from hypothesis import strategies as st

from ingress.received import MAX_HELO_IN_HEADER, _clean, received_header

WHEN = float(calendar.timegm((2026, 11, 29, 21, 41, 13)))


def header(**kw: object) -> bytes:
    args: dict[str, object] = dict(
        hostname="mx.example.net",
        helo="client.example",
        client_ip="192.0.2.7",
        client_name="mail.client.example",
        protocol="ESMTPS",
        queue_id="18C0FFEE01",
        recipient="user@example.org",
        when=WHEN,
    )
    args.update(kw)
    return received_header(**args)  # type: ignore[arg-type]


def test_exact_shape() -> None:
    assert header() == (
        b"Received: from client.example (mail.client.example [192.0.2.7])\r\n"
        b"\tby mx.example.net (mtaq) with ESMTPS id 18C0FFEE01\r\n"
        b"\tfor <user@example.org>; Sun, 29 Nov 2026 21:41:13 +0000\r\n"
    )


def test_without_recipient() -> None:
    assert header(recipient=None, client_name="unknown", protocol="ESMTP") == (
        b"Received: from client.example (unknown [192.0.2.7])\r\n"
        b"\tby mx.example.net (mtaq) with ESMTP id 18C0FFEE01;\r\n"
        b"\tSun, 29 Nov 2026 21:41:13 +0000\r\n"
    )


def test_ipv6_literal_form() -> None:
    # RFC 5321 §4.1.3: IPv6-address-literal = "IPv6:" IPv6-addr
    assert b"(unknown [IPv6:2001:db8::1])" in header(client_ip="2001:0db8::1", client_name="unknown")


def test_hostile_helo_cannot_break_the_header() -> None:
    out = header(helo="evil)\r\nBcc: x@y (z", recipient=None)
    lines = out.split(b"\r\n")
    assert lines[0] == b"Received: from evil???Bcc:?x@y??z (mail.client.example [192.0.2.7])"
    assert all(line.startswith(b"\t") for line in lines[1:-1])
    assert lines[-1] == b""


def test_empty_helo_and_long_helo() -> None:
    assert header(helo="").startswith(b"Received: from unknown (")
    first = header(helo="h" * 500).split(b"\r\n")[0]
    assert len(first) < 200


def test_every_line_ends_crlf_and_is_folded() -> None:
    out = header()
    assert out.endswith(b"\r\n")
    assert b"\n" not in out.replace(b"\r\n", b"")
    for line in out.split(b"\r\n")[1:-1]:
        assert line.startswith(b"\t")


@given(st.text(max_size=80))
def test_clean_is_the_character_by_character_rule(text: str) -> None:
    """The quick look for text that needs no cleaning agrees with the rule it short-cuts."""
    slow = "".join(ch if (ch.isprintable() and not ch.isspace() and ch not in "()\\") else "?" for ch in text)
    assert _clean(text) == (slow[:MAX_HELO_IN_HEADER] or "unknown")
