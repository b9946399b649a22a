"""Reading what mtaq sends, with the standard library's email parser (software we did not write):
one ``parse`` for a message, one ``dsn_blocks`` for an RFC 3464 / RFC 6533 delivery report."""

from __future__ import annotations

import email
import email.parser
import email.policy
from email.message import EmailMessage, Message

__all__ = ["dsn_blocks", "parse", "recipient_blocks"]

STATUS_TYPES = ("message/delivery-status", "message/global-delivery-status")


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def dsn_blocks(raw: bytes | EmailMessage) -> list[Message]:
    """The field blocks of a delivery report's status part: the per-message block first, then one
    per recipient. Each is a ``Message``, so field names are case-insensitive (``b["action"]``).

    A message/global-delivery-status part (RFC 6533) is UTF-8 in 8bit, which the email package does
    not split into blocks: those are read from the raw octets between the part's boundaries."""
    report = parse(raw) if isinstance(raw, bytes) else raw
    assert report.get_content_type() == "multipart/report", report.get_content_type()
    assert report.get_param("report-type") in ("delivery-status", "global-delivery-status")
    [status] = [p for p in report.iter_parts() if p.get_content_type() in STATUS_TYPES]
    if status.get_content_type() == "message/delivery-status":  # the parser split it into blocks
        payload = status.get_payload()
        assert isinstance(payload, list)
        return [b for b in payload if isinstance(b, Message)]
    assert isinstance(raw, bytes), "a global report is read from its octets"
    assert status["Content-Transfer-Encoding"] == "8bit"
    boundary = report.get_boundary()
    assert boundary is not None
    section = next(s for s in raw.split(b"--" + boundary.encode()) if b"message/global-delivery-status" in s)
    body = section.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n").decode("utf-8")
    parser = email.parser.HeaderParser(policy=email.policy.default)
    return [parser.parsestr(block + "\r\n") for block in body.split("\r\n\r\n")]


def recipient_blocks(raw: bytes) -> list[Message]:
    """The per-recipient blocks of a delivery report."""
    return dsn_blocks(raw)[1:]
