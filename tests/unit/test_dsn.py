"""RFC 3464 reports: built as bytes, checked by parsing them back with the stdlib email package."""

from __future__ import annotations

import email
import email.parser
import email.policy
import email.utils
from email.message import EmailMessage, Message

import pytest

from tests.mailparse import dsn_blocks, parse
from worker.dsn import DsnRecipient, render_dsn

NOW = 1_700_000_100.0
ARRIVAL = 1_700_000_000.0
ORIGINAL = (
    b"From: Sender <s@x.test>\r\n"
    b"To: bad@b.test\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Message-ID: <orig.1@x.test>\r\n"
    b"\r\n"
    b"The body line.\r\n"
    b"SECRET-BODY-MARKER\r\n"
)


def failed(address: str = "bad@b.test", **kw: object) -> DsnRecipient:
    fields: dict[str, object] = {
        "address": address,
        "orcpt": None,
        "action": "failed",
        "status": "5.1.1",
        "remote_mta": "mx.b.test",
        "diagnostic": "550 5.1.1 No such user",
        "last_attempt": NOW - 10,
    }
    fields.update(kw)
    return DsnRecipient(**fields)  # type: ignore[arg-type]


def build(recipients: list[DsnRecipient], **kw: object) -> bytes:
    args: dict[str, object] = {
        "reporting_mta": "mta.example",
        "queue_id": "ABC123",
        "envid": None,
        "arrival": ARRIVAL,
        "original_sender": "s@x.test",
        "recipients": recipients,
        "original": ORIGINAL,
        "ret": None,
        "now": NOW,
        "trusted": True,
    }
    args.update(kw)
    return render_dsn(**args).data  # type: ignore[arg-type]


def parts(msg: EmailMessage) -> list[EmailMessage]:
    return list(msg.iter_parts())  # type: ignore[arg-type]


def assert_well_formed(raw: bytes) -> None:
    assert b"\n" not in raw.replace(b"\r\n", b""), "bare LF"
    assert b"\r" not in raw.replace(b"\r\n", b""), "bare CR"
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert raw.endswith(b"\r\n")
    assert not parse(raw).defects


def test_bounce_headers() -> None:
    raw = build([failed()])
    assert_well_formed(raw)
    assert raw.isascii()
    msg = parse(raw)
    assert b"\r\nFrom: MAILER-DAEMON@mta.example (Mail Delivery System)\r\n" in b"\r\n" + raw
    assert msg["From"] == "MAILER-DAEMON@mta.example"
    assert b"\r\nTo: <s@x.test>\r\n" in raw
    assert msg["To"] == "s@x.test"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Message-ID"].startswith("<") and msg["Message-ID"].endswith("@mta.example>")
    date = email.utils.parsedate_to_datetime(msg["Date"])
    assert date.timestamp() == NOW
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"


def test_three_parts_and_report_fields() -> None:
    msg = parse(build([failed(orcpt="rfc822;Bad@B.test")], envid="ENV-42"))
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    per_message, rcpt = dsn_blocks(msg)
    assert per_message["Reporting-MTA"] == "dns; mta.example"
    assert per_message["X-Mtaq-Queue-ID"] == "ABC123"
    assert per_message["Original-Envelope-Id"] == "ENV-42"
    arrival = per_message["Arrival-Date"]
    assert arrival is not None and email.utils.parsedate_to_datetime(arrival).timestamp() == ARRIVAL
    assert rcpt["Original-Recipient"] == "rfc822; Bad@B.test"
    assert rcpt["Final-Recipient"] == "rfc822; bad@b.test"
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "5.1.1"
    assert rcpt["Remote-MTA"] == "dns; mx.b.test"
    assert rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"
    last = rcpt["Last-Attempt-Date"]
    assert last is not None and email.utils.parsedate_to_datetime(last).timestamp() == NOW - 10


def test_human_part_lists_each_recipient_and_its_reason() -> None:
    msg = parse(build([failed(), failed("gone@c.test", remote_mta="mx.c.test", diagnostic="550 5.1.1 Gone")]))
    text = parts(msg)[0].get_content()
    assert "mta.example" in text
    assert "<bad@b.test>: host mx.b.test said: 550 5.1.1 No such user" in text
    assert "<gone@c.test>: host mx.c.test said: 550 5.1.1 Gone" in text
    assert "postmaster" in text


def test_postmaster_address_is_named() -> None:
    text = parts(parse(build([failed()], postmaster="help@mta.example")))[0].get_content()
    assert "help@mta.example" in text


def test_a_diagnostic_already_saying_host_is_not_doubled() -> None:
    r = failed(diagnostic="host mx.b.test[127.0.0.2] said: 550 5.1.1 No such user")
    msg = parse(build([r]))
    text = parts(msg)[0].get_content()
    assert text.count("said:") == 1
    assert dsn_blocks(msg)[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"


def test_optional_fields_are_left_out() -> None:
    r = failed(orcpt=None, remote_mta="", diagnostic="", last_attempt=None)
    per_message, rcpt = dsn_blocks(build([r]))
    assert "Original-Envelope-Id" not in per_message
    for name in ("Original-Recipient", "Remote-MTA", "Diagnostic-Code", "Last-Attempt-Date"):
        assert name not in rcpt


def test_our_own_diagnostic_is_not_labelled_smtp() -> None:
    r = failed(remote_mta="", status="5.1.2", diagnostic="Host or domain name not found. Name service error")
    rcpt = dsn_blocks(build([r]))[1]
    assert rcpt["Diagnostic-Code"] == "X-Mtaq; Host or domain name not found. Name service error"


def test_bare_orcpt_is_taken_as_rfc822() -> None:
    rcpt = dsn_blocks(build([failed(orcpt="Orig@B.test")]))[1]
    assert rcpt["Original-Recipient"] == "rfc822; Orig@B.test"


@pytest.mark.parametrize(
    ("actions", "subject"),
    [
        (["failed"], "Undelivered Mail Returned to Sender"),
        (["failed", "delivered"], "Mail Delivery Status Report (some recipients failed)"),
        (["relayed", "failed"], "Mail Delivery Status Report (some recipients failed)"),
        (["failed", "delayed"], "Undelivered Mail Returned to Sender"),
        (["delayed"], "Delayed Mail (still being retried)"),
        (["delayed", "relayed"], "Delayed Mail (still being retried)"),
        (["delivered"], "Successful Mail Delivery Report"),
        (["relayed", "delivered"], "Successful Mail Delivery Report"),
    ],
)
def test_subject_follows_the_actions(actions: list[str], subject: str) -> None:
    status = {"failed": "5.1.1", "delayed": "4.4.1", "delivered": "2.0.0", "relayed": "2.0.0"}
    recipients = [failed(f"r{i}@b.test", action=a, status=status[a]) for i, a in enumerate(actions)]
    msg = parse(build(recipients))
    assert msg["Subject"] == subject
    blocks = dsn_blocks(msg)[1:]
    assert [b["Action"] for b in blocks] == actions


def test_ret_hdrs_returns_headers_only() -> None:
    for ret in (None, "HDRS", "hdrs"):
        raw = build([failed()], ret=ret)
        assert b"SECRET-BODY-MARKER" not in raw
        original = parts(parse(raw))[2]
        assert original.get_content_type() == "text/rfc822-headers"
        content = original.get_payload(decode=True)
        assert isinstance(content, bytes)
        assert b"Subject: quarterly numbers\r\n" in content
        assert b"Message-ID: <orig.1@x.test>" in content


def test_ret_full_returns_the_whole_message() -> None:
    raw = build([failed()], ret="FULL")
    assert_well_formed(raw)
    original = parts(parse(raw))[2]
    assert original.get_content_type() == "message/rfc822"
    payload = original.get_payload()
    assert isinstance(payload, list) and len(payload) == 1
    inner = payload[0]
    assert isinstance(inner, Message)
    assert inner["Subject"] == "quarterly numbers"
    assert "SECRET-BODY-MARKER" in str(inner.get_payload())
    assert ORIGINAL.rstrip(b"\r\n") in raw


def test_ret_full_over_the_limit_returns_headers() -> None:
    raw = build([failed()], ret="FULL", return_limit=50)
    assert parts(parse(raw))[2].get_content_type() == "text/rfc822-headers"
    assert b"SECRET-BODY-MARKER" not in raw


def test_eight_bit_headers_stay_seven_bit_safe() -> None:
    original = b"From: s@x.test\r\nSubject: caf\xc3\xa9 \xff\r\n\r\nbody \xe9\r\n"
    raw = build([failed()], original=original, ret="HDRS")
    assert raw.isascii()
    assert_well_formed(raw)
    part = parts(parse(raw))[2]
    assert part.get_content_type() == "text/rfc822-headers"
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert part.get_payload(decode=True) == b"From: s@x.test\r\nSubject: caf\xc3\xa9 \xff\r\n"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78


def test_eight_bit_full_falls_back_to_headers_unless_allowed() -> None:
    original = b"From: s@x.test\r\nSubject: plain\r\n\r\nbody caf\xc3\xa9\r\n"
    raw = build([failed()], original=original, ret="FULL")
    assert raw.isascii()
    assert parts(parse(raw))[2].get_content_type() == "text/rfc822-headers"

    raw = build([failed()], original=original, ret="FULL", eight_bit_ok=True)
    msg = parse(raw)
    assert msg["Content-Transfer-Encoding"] == "8bit"
    part = parts(msg)[2]
    assert part.get_content_type() == "message/rfc822"
    assert part["Content-Transfer-Encoding"] == "8bit"
    assert b"body caf\xc3\xa9\r\n" in raw


def test_lf_only_original_is_normalised_to_crlf() -> None:
    raw = build([failed()], original=ORIGINAL.replace(b"\r\n", b"\n"), ret="FULL")
    assert_well_formed(raw)
    assert ORIGINAL.rstrip(b"\r\n") in raw


def returned_octets(raw: bytes) -> bytes:
    """The content of a report's third part (the returned message or its headers), as sent."""
    boundary = parse(raw).get_boundary()
    assert boundary is not None
    _, _, _, third, _ = raw.split(b"--" + boundary.encode())
    return third.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n")


def test_original_without_body_or_headers() -> None:
    for original in (b"Subject: only headers\r\n", b"", b"\r\nbody only\r\n"):
        headers = original.split(b"\r\n\r\n", 1)[0] if not original.startswith(b"\r\n") else b""
        for ret in ("FULL", "HDRS"):
            raw = build([failed()], original=original, ret=ret)
            assert_well_formed(raw)
            kind = parts(parse(raw))[2].get_content_type()
            got = returned_octets(raw)
            if ret == "FULL":  # the whole message back, exactly as it came
                assert (kind, got) == ("message/rfc822", original), (original, got)
            else:  # its headers only, and never a line of its body
                assert kind == "text/rfc822-headers" and b"body only" not in got, (original, got)
                assert got.strip(b"\r\n") == headers.strip(b"\r\n"), (original, got)


def test_a_reply_cannot_inject_fields() -> None:
    r = failed(diagnostic="550 5.1.1 No such user\r\nAction: delivered\r\n\r\nX-Evil: yes")
    raw = build([r])
    assert_well_formed(raw)
    blocks = dsn_blocks(raw)
    assert len(blocks) == 2
    assert blocks[1]["Action"] == "failed"
    assert blocks[1]["X-Evil"] is None
    assert "Action: delivered" in str(blocks[1]["Diagnostic-Code"])


def test_long_diagnostics_are_folded() -> None:
    long_reply = "550 5.7.1 " + " ".join(["blocked"] * 100)
    raw = build([failed(diagnostic=long_reply), failed("x@b.test", diagnostic="550 " + "y" * 3000)])
    assert_well_formed(raw)
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    rcpt = dsn_blocks(raw)[1]
    assert str(rcpt["Diagnostic-Code"]).split() == ["smtp;", *long_reply.split()]


def test_non_ascii_recipient_uses_rfc6533_utf8_type() -> None:
    raw = build([failed("jös@b.test", orcpt="rfc822;Jös@b.test")])
    assert raw.isascii()
    assert_well_formed(raw)
    msg = parse(raw)
    rcpt = dsn_blocks(msg)[1]
    assert rcpt["Final-Recipient"] == "utf-8; j\\x{F6}s@b.test"
    assert rcpt["Original-Recipient"] == "utf-8; J\\x{F6}s@b.test"
    assert "<jös@b.test>" in parts(msg)[0].get_content()


def test_invalid_status_is_replaced_by_a_class_default() -> None:
    rcpt = dsn_blocks(build([failed(status="bogus")]))[1]
    assert rcpt["Status"] == "5.0.0"


def test_boundary_never_occurs_in_the_parts() -> None:
    msg = parse(build([failed()], ret="FULL"))
    boundary = msg.get_boundary()
    assert boundary is not None and 0 < len(boundary) <= 70
    assert len(parts(msg)) == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"original_sender": ""}, "null sender"),
        ({"recipients": []}, "at least one recipient"),
    ],
)
def test_refuses_impossible_reports(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"recipients": [failed()]}
    args.update(kwargs)
    recipients = args.pop("recipients")
    assert isinstance(recipients, list)
    with pytest.raises(ValueError, match=message):
        build(recipients, **args)


def test_unknown_action_is_refused() -> None:
    with pytest.raises(ValueError, match="action"):
        build([failed(action="bounced")])


# -- what comes back of the original, and the human part saying so


def test_untrusted_mail_gets_headers_only_and_the_report_says_why() -> None:
    raw = build([failed()], ret="FULL", trusted=False)
    assert b"SECRET-BODY-MARKER" not in raw
    msg = parse(raw)
    assert parts(msg)[2].get_content_type() == "text/rfc822-headers"
    text = " ".join(parts(msg)[0].get_content().split())
    assert "only its headers are attached" in text and "neither authenticated nor was in this system's networks" in text


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"recipients": [failed(action="delayed", status="4.4.1")]}, "only a report of failed delivery"),
        ({"return_limit": 50}, "larger than the 50 octets"),
        ({"original": b"Subject: x\r\n\r\nbody \xe9\r\n"}, "without BODY=8BITMIME or SMTPUTF8"),
        ({"original": b"Subject: x\r\n\r\n" + b"y" * 1200 + b"\r\n"}, "lines over 998 octets"),
    ],
)
def test_ret_full_downgraded_to_headers_says_why(kwargs: dict[str, object], reason: str) -> None:
    args: dict[str, object] = {"recipients": [failed()], "ret": "FULL"}
    args.update(kwargs)
    recipients = args.pop("recipients")
    assert isinstance(recipients, list)
    msg = parse(build(recipients, **args))
    assert parts(msg)[2].get_content_type() == "text/rfc822-headers"
    text = " ".join(parts(msg)[0].get_content().split())
    assert "(RET=FULL), but only its headers are attached" in text and reason in text


def test_headers_asked_for_are_not_explained() -> None:
    text = parts(parse(build([failed()], ret="HDRS", trusted=False)))[0].get_content()
    assert "RET=FULL" not in text


# -- RFC 6533: one escaping per report, internationalized reports for SMTPUTF8 mail

UTF8_ORIGINAL = "From: Jörg <jörg@x.test>\r\nSubject: grüße\r\n\r\nbody grüße\r\nSECRET-BODY-MARKER\r\n".encode()


def jorg(**kw: object) -> DsnRecipient:
    fields: dict[str, object] = {
        "orcpt": "utf-8;rejectj\\x{F6}rg@b.test",
        "diagnostic": "host mx.b.test[127.0.0.2]:25 said: 550 5.1.1 <rejectjörg@b.test>: unknown",
    }
    fields.update(kw)
    return failed("rejectjörg@b.test", **fields)


def test_smtputf8_mail_gets_a_global_report_with_unitext_addresses() -> None:
    raw = build([jorg()], original=UTF8_ORIGINAL, original_sender="jörg@x.test", ret="FULL", utf8_ok=True)
    assert_well_formed(raw)
    msg = parse(raw)
    assert msg.get_param("report-type") == "global-delivery-status"
    assert msg["Content-Transfer-Encoding"] == "8bit"
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain",
        "message/global-delivery-status",
        "message/global",
    ]
    per_message, rcpt = dsn_blocks(raw)
    assert per_message["X-Mtaq-Sender"] == "utf-8; jörg@x.test"
    assert rcpt["Original-Recipient"] == "utf-8; rejectjörg@b.test"  # the \x{F6} of the ORCPT decoded
    assert rcpt["Final-Recipient"] == "utf-8; rejectjörg@b.test"
    assert rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 <rejectjörg@b.test>: unknown"
    assert b"\\x" not in raw  # one form: UTF-8 throughout
    inner = parts(msg)[2].get_payload()
    assert isinstance(inner, list) and isinstance(inner[0], Message) and inner[0]["Subject"] == "grüße"
    assert "SECRET-BODY-MARKER" in raw.decode("utf-8")
    assert "<rejectjörg@b.test>" in parts(msg)[0].get_content()


def test_smtputf8_headers_only_are_message_global_headers() -> None:
    raw = build([jorg()], original=UTF8_ORIGINAL, ret="HDRS", utf8_ok=True)
    assert_well_formed(raw)
    part = parts(parse(raw))[2]
    assert part.get_content_type() == "message/global-headers"
    assert "Subject: grüße\r\n".encode() in raw and b"SECRET-BODY-MARKER" not in raw


def test_a_seven_bit_report_uses_one_escaping_for_addresses_and_text() -> None:
    raw = build([jorg()])  # no SMTPUTF8: the report stays 7-bit
    assert raw.isascii()
    assert_well_formed(raw)
    rcpt = dsn_blocks(raw)[1]
    assert rcpt["Original-Recipient"] == "utf-8; rejectj\\x{F6}rg@b.test"
    assert rcpt["Final-Recipient"] == "utf-8; rejectj\\x{F6}rg@b.test"
    assert rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 <rejectj\\x{F6}rg@b.test>: unknown"
    assert b"\\xf6" not in raw.lower().replace(b"\\x{f6}", b"")  # no Python-style escape anywhere


def test_utf8_addresses_escape_what_xtext_reserves() -> None:
    seven = dsn_blocks(build([failed("jö+a=b@b.test")]))[1]
    assert seven["Final-Recipient"] == "utf-8; j\\x{F6}\\x{2B}a\\x{3D}b@b.test"
    [_, rcpt] = dsn_blocks(build([failed("jö+a=b@b.test")], utf8_ok=True))
    assert rcpt["Final-Recipient"] == "utf-8; jö\\x{2B}a\\x{3D}b@b.test"
    ascii_plus = dsn_blocks(build([failed("a+b@b.test")]))[1]
    assert ascii_plus["Final-Recipient"] == "rfc822; a+b@b.test"  # rfc822 addresses are as they are


def test_smtputf8_mail_with_an_ascii_report_stays_classic() -> None:
    raw = build([failed()], utf8_ok=True, ret="FULL")
    assert raw.isascii()
    assert parse(raw).get_param("report-type") == "delivery-status"


def test_eight_bit_body_with_smtputf8_goes_back_whole() -> None:
    original = b"From: s@x.test\r\nSubject: plain\r\n\r\nbody caf\xc3\xa9\r\n"
    msg = parse(build([failed()], original=original, ret="FULL", utf8_ok=True))
    assert parts(msg)[2].get_content_type() == "message/rfc822"
    assert parts(msg)[2]["Content-Transfer-Encoding"] == "8bit"


# -- mixed and delayed reports


def test_a_mixed_report_says_who_got_it_and_who_did_not() -> None:
    ok = failed("good@c.test", action="relayed", status="2.0.0", remote_mta="mx.c.test", diagnostic="250 2.0.0 Ok")
    msg = parse(build([failed(), ok]))
    assert msg["Subject"] == "Mail Delivery Status Report (some recipients failed)"
    text = parts(msg)[0].get_content()
    failed_part, _, delivered_part = text.partition("Delivered (or relayed) to these recipients:")
    assert "Delivery to these recipients failed:" in failed_part and "<bad@b.test>" in failed_part
    assert "<good@c.test>" not in failed_part
    assert "<good@c.test>: relayed to mx.c.test" in delivered_part and "<bad@b.test>" not in delivered_part
    assert "Undelivered Mail Returned to Sender" not in text
    assert [b["Action"] for b in dsn_blocks(msg)[1:]] == ["failed", "relayed"]


def test_a_delay_warning_names_the_retry_deadline() -> None:
    r = failed(action="delayed", status="4.4.1", diagnostic="451 4.4.1 try later")
    msg = parse(build([r], retry_until=ARRIVAL + 86400, now=ARRIVAL + 14400))
    rcpt = dsn_blocks(msg)[1]
    assert rcpt["Action"] == "delayed" and rcpt["Status"] == "4.4.1"
    until = rcpt["Will-Retry-Until"]
    assert until is not None and email.utils.parsedate_to_datetime(until).timestamp() == ARRIVAL + 86400
    text = " ".join(parts(msg)[0].get_content().split())
    assert "after 4 hours in the queue" in text and "This is a warning only" in text
