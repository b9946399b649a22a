"""8BITMIME to 7BIT MIME conversion (common/mime7bit.py)."""

from __future__ import annotations

import base64
import quopri
import re
from email.message import EmailMessage

import pytest

from common.mime7bit import to_7bit
from tests.mailparse import parse
from worker.dsn import DsnRecipient, render_dsn

HEAD = (
    b"Received: from client.test (client.test [127.0.0.1])\r\n"
    b"\tby mtaq.test with ESMTP id 1; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"From: alice@client.test\r\nTo: bob@a.test\r\nSubject:  two  spaces kept\r\n"
    b"X-Tab:\tkept\r\nMIME-Version: 1.0\r\n"
)


def seven_bit(data: bytes) -> None:
    assert data.isascii()
    assert b"\r" not in data.replace(b"\r\n", b"") and b"\n" not in data.replace(b"\r\n", b"")  # CRLF only
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))


def leaves(msg: EmailMessage) -> list[EmailMessage]:
    return [p for p in msg.walk() if not p.is_multipart()]


@pytest.mark.parametrize(
    "message",
    [
        HEAD + b"Content-Type: text/plain\r\n\r\nplain ascii\r\n",
        b"Subject: not MIME at all\r\n\r\nhello\r\n",
        HEAD + b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n",
        b"Subject: headers only\r\n",
    ],
)
def test_seven_bit_mail_comes_back_as_it_is(message: bytes) -> None:
    assert to_7bit(message) is message


@pytest.mark.parametrize("field", [b"CONTENT-TRANSFER-ENCODING: 8BIT", b"content-transfer-encoding:\r\n binary"])
def test_ascii_mail_declared_8bit_is_relabelled(field: bytes) -> None:
    """All ASCII but declared 8bit or binary (in any case, folded): not sent as it is to a server
    without 8BITMIME, however the quick look for a Content-Transfer-Encoding field is spelt."""
    msg = HEAD + b"Content-Type: text/plain\r\n" + field + b"\r\n\r\nplain ascii\r\n"
    out = to_7bit(msg)
    assert out is not None and out is not msg and b"Content-Transfer-Encoding: quoted-printable\r\n" in out


@pytest.mark.parametrize(
    ("text", "charset"),
    [
        ("Grüße aus Köln, ça va? Ünïcödé\r\nsecond line \r\n.dot line\r\n", "utf-8"),
        ("Grüße aus Köln, ça va?\r\n" + "é" * 120 + "\r\n", "iso-8859-1"),
    ],
)
def test_text_plain_8bit_becomes_quoted_printable(text: str, charset: str) -> None:
    raw = text.encode(charset)
    message = (
        HEAD
        + f"Content-Type: text/plain; charset={charset}\r\n".encode()
        + b"Content-Transfer-Encoding: 8bit\r\nX-After: kept\r\n\r\n"
        + raw
    )
    out = to_7bit(message)
    assert out is not None
    seven_bit(out)
    head, _, body = out.partition(b"\r\n\r\n")
    # every other field byte for byte, in its place; only the CTE value changed
    assert head == (
        HEAD
        + f"Content-Type: text/plain; charset={charset}\r\n".encode()
        + b"Content-Transfer-Encoding: quoted-printable\r\nX-After: kept"
    )
    got = parse(out)
    assert got.get_payload(decode=True) == raw
    assert got.get_content() == parse(message).get_content() == text
    assert b"\r\n.dot line" in body or charset != "utf-8"


def test_undeclared_8bit_octets_are_converted_and_the_field_added() -> None:
    message = HEAD + b"Content-Type: text/plain; charset=utf-8\r\n\r\ncaf\xc3\xa9\r\n"
    out = to_7bit(message)
    assert out == HEAD + (
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9\r\n"
    )


def test_multipart_alternative_only_the_8bit_part_changes() -> None:
    html = b"<p>caf\xc3\xa9</p>\r\n"
    plain_part = (
        b"--=_b1\r\nContent-Type: text/plain; charset=us-ascii\r\n"
        b"Content-Transfer-Encoding: 7bit\r\n\r\nplain = ascii  \r\n"
    )
    message = (
        HEAD + b'Content-Type: multipart/alternative;\r\n boundary="=_b1"\r\n'
        b"Content-Transfer-Encoding: 8bit\r\n\r\n"
        b"This is a preamble.\r\n"
        + plain_part
        + b"--=_b1 \r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + html
        + b"--=_b1--\r\nepilogue\r\n"
    )
    out = to_7bit(message)
    assert out is not None
    seven_bit(out)
    expected = (
        HEAD + b'Content-Type: multipart/alternative;\r\n boundary="=_b1"\r\n'
        b"Content-Transfer-Encoding: 7bit\r\n\r\n"
        b"This is a preamble.\r\n" + plain_part + b"--=_b1 \r\nContent-Type: text/html; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        b"<p>caf=C3=A9</p>\r\n"
        b"--=_b1--\r\nepilogue\r\n"
    )
    assert out == expected
    before, after = leaves(parse(message)), leaves(parse(out))
    assert [p.get_content_type() for p in after] == ["text/plain", "text/html"]
    assert [p.get_payload(decode=True) for p in after] == [p.get_payload(decode=True) for p in before]
    assert parse(out).get_boundary() == "=_b1"


def test_application_octet_stream_becomes_base64() -> None:
    blob = bytes(range(256)) * 3
    blob = blob.replace(b"\r", b"").replace(b"\n", b"")  # a DATA stream holds no bare CR or LF
    message = (
        HEAD + b"Content-Type: multipart/mixed; boundary=XYZ\r\n\r\n"
        b"--XYZ\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n"
        b"--XYZ\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Disposition: attachment; filename=blob.bin\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n" + blob + b"\r\n--XYZ--\r\n"
    )
    out = to_7bit(message)
    assert out is not None
    seven_bit(out)
    assert b"--XYZ\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n--XYZ\r\n" in out
    parts = leaves(parse(out))
    assert parts[1]["Content-Transfer-Encoding"] == "base64"
    assert parts[1].get_payload(decode=True) == blob
    assert parts[1].get_filename() == "blob.bin"
    assert all(len(line) <= 76 for line in out.split(b"\r\n"))


def test_nested_message_rfc822_is_converted_inside() -> None:
    inner = (
        b"From: carol@c.test\r\nSubject: inner\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        b"na\xc3\xafve\r\n"
    )
    message = (
        HEAD + b"Content-Type: multipart/mixed; boundary=outer\r\n\r\n"
        b"--outer\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + inner + b"--outer--\r\n"
    )
    out = to_7bit(message)
    assert out is not None
    seven_bit(out)
    got = parse(out)
    wrapper = next(p for p in got.walk() if p.get_content_type() == "message/rfc822")
    assert wrapper["Content-Transfer-Encoding"] == "7bit"
    text = next(p for p in got.walk() if p.get_content_type() == "text/plain")
    assert text.get_content() == "naïve"  # the last CRLF belongs to the delimiter


def test_long_lines_are_soft_broken_with_crlf() -> None:
    message = HEAD + b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + "ä".encode() * 200
    out = to_7bit(message)
    assert out is not None
    seven_bit(out)
    assert b"=\r\n" in out and all(len(line) <= 76 for line in out.split(b"\r\n\r\n", 1)[1].split(b"\r\n"))
    assert parse(out).get_payload(decode=True) == "ä".encode() * 200


@pytest.mark.parametrize(
    "message",
    [
        HEAD + b"Subject: caf\xc3\xa9\r\nContent-Type: text/plain\r\n\r\ncaf\xc3\xa9\r\n",  # 8-bit header
        b"Subject: old style\r\n\r\njust send 8: caf\xe9\r\n",  # not MIME
        HEAD + b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nX-Name: \xc3\xa9\r\n\r\nx\r\n--b--\r\n",
        HEAD + b"Content-Type: multipart/mixed; boundary=b\r\n\r\npr\xc3\xa9amble\r\n--b\r\n\r\nx\r\n--b--\r\n",
        HEAD + b"Content-Type: message/rfc822\r\n\r\nSubject: inner, not MIME\r\n\r\ncaf\xc3\xa9\r\n",
        HEAD + b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\n\xff\xfe\r\n",
    ],
)
def test_no_conversion_gives_none(message: bytes) -> None:
    assert to_7bit(message) is None


def test_crlf_everywhere_and_idempotent() -> None:
    message = (
        HEAD + b"Content-Type: multipart/mixed; boundary=q\r\n\r\n"
        b"--q\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nline \xc3\xa9\r\n\tindent\r\n\r\n"
        b"--q\r\nContent-Type: application/pdf\r\n\r\n%PDF\xe2\xe3\xcf\xd3\r\n--q--\r\n"
    )
    out = to_7bit(message)
    assert out is not None
    seven_bit(out)
    assert re.search(rb"(?<!\r)\n", out) is None
    assert to_7bit(out) is out  # a converted message is 7-bit mail


def test_an_internationalized_dsn_converts_for_a_server_without_8bitmime() -> None:
    # RFC 6533 §6.3-6.4 and RFC 6532 §3.7 allow any transfer encoding on these parts (unlike
    # message/rfc822), so our own SMTPUTF8 reports have a 7-bit form
    rcpt = DsnRecipient("jörg@b.test", None, "failed", "5.1.1", "mx.b.test", "550 5.1.1 <jörg@b.test>", None)
    original = "From: jörg@x.test\r\nSubject: grüße\r\n\r\nbody grüße\r\n".encode()
    for ret in ("FULL", "HDRS"):
        report = render_dsn(
            reporting_mta="mtaq.test",
            queue_id="Q1",
            envid=None,
            arrival=0.0,
            original_sender="a@x.test",
            recipients=[rcpt],
            original=original,
            ret=ret,
            now=1.0,
            utf8_ok=True,
            trusted=True,
        )
        assert report.international and not report.data.isascii()
        out = to_7bit(report.data)
        assert out is not None
        seven_bit(out)
        boundary = parse(out).get_boundary()
        assert boundary is not None
        # the stdlib parses message/* as an embedded message: decode the sections by hand
        sections = [s.split(b"\r\n\r\n", 1) for s in out.split(b"--" + boundary.encode())[2:4]]
        (status_head, status_body), (original_head, original_body) = sections
        assert b"Content-Transfer-Encoding: quoted-printable" in status_head
        assert "Final-Recipient: utf-8; jörg@b.test".encode() in quopri.decodestring(status_body)
        if ret == "FULL":
            assert b"Content-Transfer-Encoding: base64" in original_head
            assert "Subject: grüße".encode() in base64.b64decode(original_body)
        else:
            assert b"Content-Transfer-Encoding: quoted-printable" in original_head
            assert "Subject: grüße".encode() in quopri.decodestring(original_body)
