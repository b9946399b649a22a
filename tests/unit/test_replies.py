"""The ingress's reply catalogue: its codes and RFC 3463 enhanced codes (RFC 2034) on the wire.
The Reply type itself: tests/unit/test_smtp_reply.py."""

from __future__ import annotations

import re

import pytest

from ingress import replies
from ingress.replies import Reply

ENHANCED_LINE = re.compile(rb"^([245])\d\d[ -]\1\.\d{1,3}\.\d{1,3} [^\r\n]*\r\n$")


def catalogue() -> list[tuple[str, Reply]]:
    return [(name, value) for name, value in vars(replies).items() if isinstance(value, Reply)]


def test_334_empty_challenge_keeps_its_space() -> None:
    # RFC 4954 §4: "334 " (with the space) asks for the initial response.
    assert replies.AUTH_CONTINUE.to_bytes() == b"334 \r\n"


@pytest.mark.parametrize(
    ("reply", "code", "enhanced"),
    [
        (replies.BAD_SEQUENCE, 503, "5.5.1"),
        (replies.RELAY_DENIED, 554, "5.7.1"),
        (replies.LINE_TOO_LONG, 500, "5.5.2"),
        (replies.MESSAGE_TOO_BIG, 552, "5.3.4"),
        (replies.TOO_MANY_RECIPIENTS, 452, "4.5.3"),
        (replies.BAD_ADDRESS, 501, "5.1.3"),
        (replies.TOO_MANY_ERRORS, 421, "4.7.0"),
        (replies.TIMEOUT, 421, "4.4.2"),
        (replies.TOO_MANY_CONNECTIONS, 421, "4.7.0"),
        (replies.STORAGE_FAILED, 451, "4.3.0"),
        (replies.INSUFFICIENT_STORAGE, 452, "4.3.1"),
        (replies.SHUTTING_DOWN, 421, "4.3.2"),
        (replies.ENCRYPTION_REQUIRED_FOR_AUTH, 538, "5.7.11"),
        (replies.AUTH_FAILED, 535, "5.7.8"),
        (replies.MUST_STARTTLS, 530, "5.7.0"),
        (replies.NON_ASCII_ADDRESS, 553, "5.6.7"),
        (replies.VRFY_CANNOT, 252, "2.5.0"),
        (replies.AUTH_OK, 235, "2.7.0"),
        (replies.STARTTLS_READY, 220, "2.0.0"),
        (replies.BYE, 221, "2.0.0"),
        (replies.HELP, 214, "2.0.0"),
        (replies.PARAM_NOT_RECOGNIZED, 555, "5.5.4"),
        (replies.AUTH_CANCELLED, 501, "5.0.0"),
    ],
)
def test_catalogue_codes(reply: Reply, code: int, enhanced: str) -> None:
    assert (reply.code, reply.enhanced) == (code, enhanced)


def test_relay_denied_text() -> None:
    assert replies.RELAY_DENIED.to_bytes() == b"554 5.7.1 Relay access denied\r\n"


@pytest.mark.parametrize(("name", "reply"), catalogue())
def test_every_2xx_4xx_5xx_constant_has_a_matching_enhanced_code(name: str, reply: Reply) -> None:
    if reply.code < 400 and str(reply.code).startswith("3"):
        assert reply.enhanced == "", name  # RFC 3463 has no class 3
    else:
        assert ENHANCED_LINE.match(reply.to_bytes()), name


def test_queued() -> None:
    assert replies.queued("18C0FFEE01").to_bytes() == b"250 2.0.0 Ok: queued as 18C0FFEE01\r\n"


def test_greeting_and_ehlo_have_no_enhanced_code() -> None:
    # RFC 2034 §3: not on the greeting nor on the replies to HELO/EHLO.
    assert replies.greeting("mx.example").to_bytes() == b"220 mx.example ESMTP mtaq\r\n"
    assert replies.helo_reply("mx.example").to_bytes() == b"250 mx.example\r\n"
    assert replies.ehlo_reply("mx.example", ["PIPELINING", "SIZE 10"]).to_bytes() == (
        b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 10\r\n"
    )
