"""The one Reply type (common/smtp/reply.py): the wire form the ingress writes, and a server's
reply as the client reads it, both with their RFC 3463 enhanced codes."""

from __future__ import annotations

import pytest

from common.envelope import RcptState
from common.smtp.reply import Reply


def test_single_line() -> None:
    assert Reply(250, "2.1.0", "Ok").to_bytes() == b"250 2.1.0 Ok\r\n"


def test_multi_line_every_line_carries_the_enhanced_code() -> None:
    reply = Reply(550, "5.7.1", "first\nsecond\nthird")
    assert reply.to_bytes() == b"550-5.7.1 first\r\n550-5.7.1 second\r\n550 5.7.1 third\r\n"


def test_cr_in_text_cannot_inject_a_line() -> None:
    assert Reply(250, "2.0.0", "a\r\nb").to_bytes() == b"250-2.0.0 a\r\n250 2.0.0 b\r\n"


def test_mismatched_class_is_refused() -> None:
    with pytest.raises(ValueError):
        Reply(250, "5.0.0", "nonsense")
    with pytest.raises(ValueError):
        Reply(600, "", "nonsense")


@pytest.mark.parametrize(
    ("code", "raw", "enhanced", "text", "shown"),
    [
        (550, b"5.1.1 <a@x.test>: no user", "5.1.1", "<a@x.test>: no user", "550 5.1.1 <a@x.test>: no user"),
        (250, b"2.0.0   Ok:\tqueued  as X", "2.0.0", "Ok: queued as X", "250 2.0.0 Ok: queued as X"),
        (451, "4.7.1 greylisted", "4.7.1", "greylisted", "451 4.7.1 greylisted"),
        (550, b"no enhanced code", "", "no enhanced code", "550 no enhanced code"),
        # an enhanced code of another class is not the server's status: it stays in the text
        (550, b"4.1.1 mixed up", "", "4.1.1 mixed up", "550 4.1.1 mixed up"),
        (550, b"5.1.1", "5.1.1", "", "550 5.1.1"),
        (220, b"mx.x.test ESMTP", "", "mx.x.test ESMTP", "220 mx.x.test ESMTP"),
        (554, b"\xff bad utf-8", "", "\ufffd bad utf-8", "554 \ufffd bad utf-8"),
        (550, b"5.1.10 null MX", "5.1.10", "null MX", "550 5.1.10 null MX"),
    ],
)
def test_parse_a_server_reply(code: int, raw: bytes | str, enhanced: str, text: str, shown: str) -> None:
    reply = Reply.parse(code, raw)
    assert (reply.code, reply.enhanced, reply.text) == (code, enhanced, text)
    assert str(reply) == shown


@pytest.mark.parametrize(
    ("reply", "dsn", "outcome"),
    [
        (Reply(250, "", "ok"), "2.0.0", RcptState.DELIVERED),
        (Reply(451, "", "later"), "4.0.0", RcptState.DEFERRED),
        (Reply(550, "", "no"), "5.0.0", RcptState.BOUNCED),
        (Reply(550, "5.7.1", "denied"), "5.7.1", RcptState.BOUNCED),
        (Reply(354, "", "go on"), "4.0.0", RcptState.DEFERRED),
    ],
)
def test_dsn_falls_back_to_the_basic_code(reply: Reply, dsn: str, outcome: RcptState) -> None:
    assert reply.dsn == dsn
    assert reply.outcome is outcome
    assert reply.positive is (reply.code < 300)


def test_parsed_reply_goes_back_on_the_wire_as_it_came() -> None:
    assert Reply.parse(550, b"5.1.1 no such user").to_bytes() == b"550 5.1.1 no such user\r\n"
