"""Refusals logged once each, Postfix style, rate-limited; never a credential (issue 11.4)."""

from __future__ import annotations

import base64
import ipaddress
import logging

import pytest

from ingress.config import SessionConfig
from ingress.events import Peer
from ingress.notes import Note, NoteLog, printable
from ingress.session import Session
from tests.unit.fakeclock import FakeClock

CLIENT = Peer("203.0.113.9", 40001, "client.example")
SECRET = "s3cret-Passw0rd"
PLAIN = base64.b64encode(b"\0alice\0" + SECRET.encode()).decode()


def session(**kw: object) -> Session:
    cfg = SessionConfig(
        hostname="mx.test",
        max_message_size=2000,
        max_recipients=3,
        max_errors=100,
        networks=(ipaddress.ip_network("192.0.2.0/24"),),
        relay_domains=frozenset({"ours.test"}),
        auth_available=True,
        **kw,  # type: ignore[arg-type]
    )
    s = Session(cfg, CLIENT, tls=True)
    s.start()
    s.receive_data(b"EHLO client.test\r\n")
    assert s.take_notes() == []
    return s


def lines(s: Session, data: bytes) -> list[str]:
    s.receive_data(data)
    return [n.text for n in s.take_notes()]


def test_relay_denial_in_postfix_words() -> None:
    s = session()
    assert lines(s, b"MAIL FROM:<a@client.test>\r\nRCPT TO:<user@elsewhere.test>\r\n") == [
        "NOQUEUE: reject: RCPT from client.example[203.0.113.9]: 554 5.7.1 <user@elsewhere.test>: "
        "Relay access denied; from=<a@client.test> to=<user@elsewhere.test> proto=ESMTP helo=<client.test>"
    ]
    assert lines(s, b"RCPT TO:<bob@ours.test>\r\n") == []  # accepted: nothing to log


def test_each_kind_of_refusal_is_logged_once() -> None:
    s = session()
    assert lines(s, b"NO\x00OP\r\n") == [
        "NOQUEUE: reject: UNKNOWN from client.example[203.0.113.9]: 500 5.5.2 Error: invalid character "
        "in command; proto=ESMTP helo=<client.test>"
    ]
    assert lines(s, b"MAIL FROM:<no-domain>\r\n") == [
        "NOQUEUE: reject: MAIL from client.example[203.0.113.9]: 501 5.1.3 Bad address syntax; "
        "proto=ESMTP helo=<client.test>"
    ]
    # a smuggling attempt: one line for the whole message, none for the commands hidden in it
    smuggled = b"hi\n.\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<v@ours.test>\r\nDATA\r\n\r\n.\r\n"
    out = lines(s, b"MAIL FROM:<a@client.test>\r\nRCPT TO:<bob@ours.test>\r\nDATA\r\n" + smuggled)
    assert out == [
        "NOQUEUE: reject: END-OF-MESSAGE from client.example[203.0.113.9]: 550 5.6.0 Error: message "
        "contains bare CR or LF; from=<a@client.test> proto=ESMTP helo=<client.test>"
    ]


def test_client_text_cannot_forge_log_lines() -> None:
    s = session()
    # a HELO with a line separator is refused (non-ASCII), one with a terminal escape is not
    out = lines(s, b"HELO evil\xe2\x80\xa8fake\r\nHELO evil\x1b[2Jfake\r\n")
    assert len(out) == 1 and "\u2028" not in out[0] and "fake" not in out[0]
    out = lines(s, b"MAIL FROM:<a@client.test>\r\nRCPT TO:<x@else.test>\r\n")
    assert len(out) == 1 and "\x1b" not in out[0]
    assert out[0].endswith("proto=SMTP helo=<evil?[2Jfake>")
    assert printable("a" * 300).endswith("...") and len(printable("a" * 300)) == 258


@pytest.mark.parametrize(
    "exchange",
    [
        [f"AUTH PLAIN {PLAIN}x"],  # bad base64
        ["AUTH PLAIN", PLAIN + "!"],
        ["AUTH LOGIN", base64.b64encode(b"alice").decode(), SECRET],  # the password sent in clear
        ["AUTH LOGIN", "*"],
        ["AUTH CRAM-MD5 " + SECRET],
    ],
)
def test_auth_payloads_are_never_logged(exchange: list[str]) -> None:
    s = session()
    notes: list[str] = []
    for line in exchange:
        notes += lines(s, line.encode() + b"\r\n")
    assert notes, "the refusal is logged"
    for text in notes:
        assert text.startswith("NOQUEUE: reject: AUTH from client.example[203.0.113.9]: ")
        assert SECRET not in text and "alice" not in text and base64.b64encode(SECRET.encode()).decode() not in text
        assert "YWxpY2U" not in text  # base64 of the user name either


def test_a_flood_is_rate_limited_and_the_gap_counted(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    logger = logging.getLogger("mtaq.test.notes")
    notes = NoteLog(logger, rate=2.0, burst=3, clock=clock)
    with caplog.at_level(logging.INFO, logger="mtaq.test.notes"):
        for i in range(10):
            notes.emit(Note(logging.INFO, f"reject {i}"))
        assert [r.getMessage() for r in caplog.records] == ["reject 0", "reject 1", "reject 2"]
        assert notes.suppressed == 7
        clock.now += 0.5  # one token back at 2 a second
        notes.emit(Note(logging.INFO, "reject 10"))
        notes.emit(Note(logging.INFO, "reject 11"))
        assert [r.getMessage() for r in caplog.records][3:] == [
            "7 refusal log lines suppressed by the log rate limit",
            "reject 10",
        ]
        clock.now += 3600  # refills to the burst, never beyond
        for i in range(5):
            notes.emit(Note(logging.INFO, f"later {i}"))
    assert [r.getMessage() for r in caplog.records][5:] == [
        "1 refusal log lines suppressed by the log rate limit",
        "later 0",
        "later 1",
        "later 2",
    ]
    assert notes.suppressed_total == 10
