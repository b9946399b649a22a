"""Which report a message gets (worker/dsn.py make_dsn, make_delay_dsn): recipients, NOTIFY, trust,
the 8-bit forms, and the envelope the report is queued with."""

from __future__ import annotations

import email
import email.message
import email.parser
import email.policy
import re
from email.message import EmailMessage

import pytest

from common.envelope import Envelope, RcptState, Recipient, RecipientStatus
from common.store import Message
from tests.mailparse import dsn_blocks, parse
from worker.dsn import delay_warning_recipients, make_delay_dsn, make_dsn

BODY = b"From: a@x.test\r\nSubject: hello\r\n\r\nBODY-MARKER\r\n"
BOUNCED = RecipientStatus(RcptState.BOUNCED, 1, "5.1.1", "550 5.1.1 no such user", "mx[127.0.0.2]:25", "mx", 1001.0)
SENT = RecipientStatus(RcptState.DELIVERED, 1, "2.0.0", "250 ok", "mx[127.0.0.2]:25", "mx", 1001.0)
DEFERRED = RecipientStatus(RcptState.DEFERRED, 2, "4.4.1", "451 4.4.1 later", "mx[127.0.0.2]:25", "mx", 1001.0)


def msg(*rcpts: Recipient, body: bytes = BODY, **kw: object) -> Message:
    fields: dict[str, object] = {"id": "Q1", "sender": "a@x.test", "recipients": list(rcpts), "received_at": 1000.0}
    fields.update(kw)
    return Message(Envelope(**fields), body)  # type: ignore[arg-type]


def report_of(m: Message | None) -> EmailMessage:
    assert m is not None
    report = parse(m.body)
    assert not report.defects
    return report


def returned(m: Message | None) -> str:
    return list(report_of(m).iter_parts())[2].get_content_type()


def test_full_content_only_for_trusted_mail_that_asked_for_it() -> None:
    for trusted, ret, kind in [
        (True, "FULL", "message/rfc822"),
        (False, "FULL", "text/rfc822-headers"),  # from outside: no backscatter of content
        (True, None, "text/rfc822-headers"),  # no RET: headers, our default
        (True, "HDRS", "text/rfc822-headers"),
    ]:
        dsn = make_dsn(msg(Recipient("b@y.test"), ret=ret, trusted=trusted), {0: BOUNCED}, "h", 2000.0)
        assert returned(dsn) == kind, (trusted, ret)
        assert dsn is not None and (b"BODY-MARKER" in dsn.body) is (kind == "message/rfc822")


def test_eight_bit_mail_comes_back_whole_when_it_came_with_8bitmime() -> None:
    body = b"From: a@x.test\r\nSubject: hello\r\n\r\ncaf\xc3\xa9\r\n"
    m = msg(Recipient("b@y.test"), body=body, ret="FULL", trusted=True, body_8bit=True)
    dsn = make_dsn(m, {0: BOUNCED}, "h", 2.0)
    assert returned(dsn) == "message/rfc822"
    assert dsn is not None and dsn.envelope.body_8bit and not dsn.envelope.smtputf8
    plain = make_dsn(msg(Recipient("b@y.test"), body=body, ret="FULL", trusted=True), {0: BOUNCED}, "h", 2.0)
    assert returned(plain) == "text/rfc822-headers"  # 8-bit without 8BITMIME: nothing says it gets back
    assert plain is not None and plain.body.isascii() and not plain.envelope.body_8bit


def test_smtputf8_mail_gets_a_global_report_queued_with_smtputf8() -> None:
    body = "From: jörg@x.test\r\nSubject: grüße\r\n\r\nbody\r\n".encode()
    m = msg(Recipient("jörg@y.test"), body=body, sender="jörg@x.test", ret="FULL", trusted=True, smtputf8=True)
    dsn = make_dsn(m, {0: BOUNCED}, "h", 2000.0)
    report = report_of(dsn)
    assert report.get_param("report-type") == "global-delivery-status"
    assert returned(dsn) == "message/global"
    assert dsn is not None and dsn.envelope.smtputf8 and dsn.envelope.body_8bit
    assert [r.address for r in dsn.envelope.recipients] == ["jörg@x.test"]


def test_mixed_outcomes_share_one_report_under_their_own_headings() -> None:
    m = msg(Recipient("bad@y.test"), Recipient("good@y.test", notify=("SUCCESS", "FAILURE")))
    report = report_of(make_dsn(m, {0: BOUNCED, 1: SENT}, "h", 2000.0))
    assert report["Subject"] == "Mail Delivery Status Report (some recipients failed)"
    text = next(iter(report.iter_parts())).get_content()
    assert text.index("<bad@y.test>") < text.index("Delivered (or relayed)") < text.index("<good@y.test>")


def test_the_report_itself_is_trusted_so_nothing_more_is_withheld() -> None:
    dsn = make_dsn(msg(Recipient("b@y.test")), {0: BOUNCED}, "h", 2000.0)
    assert dsn is not None and dsn.envelope.trusted and dsn.envelope.is_bounce


@pytest.mark.parametrize(
    ("notify", "warned"),
    [((), True), (("DELAY",), True), (("FAILURE", "DELAY"), True), (("FAILURE",), False), (("NEVER",), False)],
)
def test_delay_warnings_go_to_who_asked_or_said_nothing(notify: tuple[str, ...], warned: bool) -> None:
    m = msg(Recipient("slow@y.test", notify=notify))
    assert (make_delay_dsn(m, {0: DEFERRED}, "h", 20000.0) is not None) is warned


def test_delay_warning_names_only_the_deferred_recipients() -> None:
    m = msg(Recipient("slow@y.test"), Recipient("done@y.test"), Recipient("gone@y.test"), Recipient("new@y.test"))
    states = {0: DEFERRED, 1: SENT, 2: BOUNCED, 3: RecipientStatus()}
    assert delay_warning_recipients(m.envelope, states) == [0]
    report = report_of(make_delay_dsn(m, states, "h", 20000.0, retry_until=1000.0 + 86400))
    assert report["Subject"] == "Delayed Mail (still being retried)"
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    payload = status.get_payload()
    assert isinstance(payload, list)
    blocks = [b for b in payload if isinstance(b, email.message.Message)]
    assert [(b["Final-Recipient"], b["Action"], b["Status"]) for b in blocks[1:]] == [
        ("rfc822; slow@y.test", "delayed", "4.4.1")
    ]


def test_delay_warning_returns_headers_even_for_ret_full() -> None:
    dsn = make_delay_dsn(msg(Recipient("slow@y.test"), ret="FULL", trusted=True), {0: DEFERRED}, "h", 20000.0)
    assert returned(dsn) == "text/rfc822-headers"
    assert dsn is not None and b"BODY-MARKER" not in dsn.body


def test_never_a_delay_warning_for_mail_from_null() -> None:
    m = msg(Recipient("slow@y.test"), sender="")
    assert delay_warning_recipients(m.envelope, {0: DEFERRED}) == []
    assert make_delay_dsn(m, {0: DEFERRED}, "h", 20000.0) is None


def test_trusted_is_kept_in_the_envelope_json_and_absent_means_false() -> None:
    env = Envelope(id="Q1", sender="a@x.test", recipients=[Recipient("b@y.test")], trusted=True)
    assert '"trusted":true' in env.to_json() and Envelope.from_json(env.to_json()).trusted
    env.trusted = False
    assert "trusted" not in env.to_json() and not Envelope.from_json(env.to_json()).trusted


# -- every kind of report, checked against the structure RFC 3464 / RFC 6522 / RFC 6533 give it

UTF8_BODY = "From: jörg@x.test\r\nSubject: grüße\r\n\r\nbody\r\n".encode()
EIGHT_BIT_BODY = b"From: a@x.test\r\nSubject: hello\r\n\r\ncaf\xc3\xa9\r\n"


def kinds() -> dict[str, Message | None]:
    success = Recipient("good@y.test", notify=("SUCCESS", "FAILURE"))
    utf8 = msg(Recipient("jörg@y.test"), body=UTF8_BODY, sender="jörg@x.test", smtputf8=True, ret="FULL", trusted=True)
    return {
        "failed": make_dsn(msg(Recipient("bad@y.test"), ret="FULL", trusted=True), {0: BOUNCED}, "h.test", 2e3),
        "mixed": make_dsn(msg(Recipient("bad@y.test"), success), {0: BOUNCED, 1: SENT}, "h.test", 2e3),
        "success": make_dsn(msg(success), {0: SENT}, "h.test", 2e3),
        "delayed": make_delay_dsn(msg(Recipient("slow@y.test")), {0: DEFERRED}, "h.test", 2e4, retry_until=9e4),
        "8bit-headers": make_dsn(msg(Recipient("b@y.test"), body=EIGHT_BIT_BODY, ret="FULL"), {0: BOUNCED}, "h", 2e3),
        "global": make_dsn(utf8, {0: BOUNCED}, "h.test", 2e3),
    }


@pytest.mark.parametrize("kind", ["failed", "mixed", "success", "delayed", "8bit-headers", "global"])
def test_every_report_has_the_rfc3464_structure(kind: str) -> None:
    dsn = kinds()[kind]
    assert dsn is not None
    raw = dsn.body
    report = report_of(dsn)
    assert dsn.envelope.sender == "" and report["Auto-Submitted"] == "auto-replied"
    international = report.get_param("report-type") == "global-delivery-status"
    assert international is (kind == "global")
    assert raw.isascii() is (kind != "global")  # 8-bit only where the path back was said to carry it
    human, status, original = report.iter_parts()  # RFC 6522: exactly three parts here
    assert human.get_content_type() == "text/plain"
    expected = "message/global-delivery-status" if international else "message/delivery-status"
    assert status.get_content_type() == expected
    assert original.get_content_type() in (
        "message/rfc822",
        "text/rfc822-headers",
        "message/global",
        "message/global-headers",
    )
    per_message, *per_recipient = dsn_blocks(raw)
    assert per_message["reporting-mta"] in ("dns; h.test", "dns; h")
    assert per_recipient
    for block in per_recipient:
        assert block["action"] in {"failed", "delayed", "delivered", "relayed", "expanded"}
        assert re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", block["status"])
        assert block["status"][0] == {"failed": "5", "delayed": "4"}.get(block["action"], "2")
        address_type, _, address = block["final-recipient"].partition("; ")
        assert address_type in ("rfc822", "utf-8") and address
        assert (address_type == "utf-8") is (not address.isascii() or "\\x{" in address)
        diagnostic = block["diagnostic-code"]
        if block["action"] in ("failed", "delayed"):  # the remote's reply is why: never left out
            assert diagnostic is not None, block
            assert diagnostic in ("smtp; 550 5.1.1 no such user", "smtp; 451 4.4.1 later"), diagnostic
        if diagnostic is not None:
            assert re.match(r"(smtp|X-Mtaq); \S", diagnostic)
    if kind == "delayed":
        assert all("will-retry-until" in b for b in per_recipient)
