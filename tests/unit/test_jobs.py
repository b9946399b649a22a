from __future__ import annotations

import email
import email.policy

from common.envelope import Envelope, RcptState, Recipient, RecipientStatus
from common.store import Message
from worker.jobs import make_dsn

BODY = b"From: a@x.test\r\nSubject: hello\r\n\r\nthe body\r\n"


def msg(*rcpts: Recipient, sender: str = "a@x.test", ret: str | None = None) -> Message:
    env = Envelope(id="Q1", sender=sender, recipients=list(rcpts), received_at=1000.0, ret=ret, trusted=True)
    return Message(env, BODY)


BOUNCED = RecipientStatus(RcptState.BOUNCED, 1, "5.1.1", "550 5.1.1 no such user", "mx[127.0.0.2]:25", "mx", 1001.0)
SENT = RecipientStatus(RcptState.DELIVERED, 1, "2.0.0", "250 ok", "mx[127.0.0.2]:25", "mx", 1001.0)


def actions(m: Message | None) -> list[str]:
    assert m is not None
    report = email.message_from_bytes(m.body, policy=email.policy.default)
    return [line.split(":", 1)[1].strip() for line in report.as_string().splitlines() if line.startswith("Action:")]


def test_failure_gets_a_dsn_to_the_sender_from_null() -> None:
    dsn = make_dsn(msg(Recipient("b@y.test"), Recipient("c@y.test")), {0: BOUNCED, 1: SENT}, "mtaq.test", 2000.0)
    assert dsn is not None
    assert dsn.envelope.sender == "" and [r.address for r in dsn.envelope.recipients] == ["a@x.test"]
    assert actions(dsn) == ["failed"]
    assert b"Subject: hello" in dsn.body and b"the body" not in dsn.body  # headers only by default


def test_ret_full_returns_the_whole_message() -> None:
    dsn = make_dsn(msg(Recipient("b@y.test"), ret="FULL"), {0: BOUNCED}, "mtaq.test", 2000.0)
    assert dsn is not None and b"the body" in dsn.body


def test_notify_never_means_no_report() -> None:
    assert make_dsn(msg(Recipient("b@y.test", notify=("NEVER",))), {0: BOUNCED}, "h", 2000.0) is None


def test_notify_success_gets_a_relayed_report() -> None:
    dsn = make_dsn(msg(Recipient("b@y.test", notify=("SUCCESS",))), {0: SENT}, "h", 2000.0)
    assert actions(dsn) == ["relayed"]


def test_success_is_silent_by_default_and_delay_only_notify_silences_failure() -> None:
    assert make_dsn(msg(Recipient("b@y.test")), {0: SENT}, "h", 2000.0) is None
    assert make_dsn(msg(Recipient("b@y.test", notify=("DELAY",))), {0: BOUNCED}, "h", 2000.0) is None


def test_never_a_bounce_for_a_bounce() -> None:
    assert make_dsn(msg(Recipient("b@y.test"), sender=""), {0: BOUNCED}, "h", 2000.0) is None


def test_a_success_report_does_not_call_the_returned_headers_undelivered() -> None:
    dsn = make_dsn(msg(Recipient("b@y.test", notify=("SUCCESS",))), {0: SENT}, "h", 2000.0)
    assert dsn is not None
    assert b"Undelivered" not in dsn.body and b"Content-Description: Message Headers" in dsn.body
    bounce = make_dsn(msg(Recipient("b@y.test")), {0: BOUNCED}, "h", 2000.0)
    assert bounce is not None and b"Content-Description: Undelivered Message Headers" in bounce.body
