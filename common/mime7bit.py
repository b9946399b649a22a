"""8BITMIME to 7BIT MIME conversion (RFC 6152 §3), for a server that does not offer 8BITMIME.

``to_7bit(message)`` gives a 7-bit-clean equivalent of a MIME message, or None when there is none.
It walks the MIME tree on the message's own bytes: every leaf part whose payload has octets above
127, or that is declared ``Content-Transfer-Encoding: 8bit`` or ``binary``, is re-encoded,
quoted-printable for ``text/*`` and base64 for everything else, and its Content-Transfer-Encoding
field replaced (or added after its last header field); a multipart or message/rfc822 declared
8bit or binary is relabelled 7bit; message/rfc822 parts are converted recursively. Everything
else is copied byte for byte: the other header fields (their order, folding and whitespace), the
boundaries and delimiter lines, preambles and epilogues, and the unchanged parts. Lines end in
CRLF, as ingress stores them. A message with nothing 8-bit in it is returned as it is (the same
object).

Why not parse and regenerate it with the ``email`` package (``policy=compat32``,
``BytesGenerator(mangle_from_=False)``)? Checked: even with ``linesep="\\r\\n"`` the generator
refolds long header fields, drops the whitespace after a field's colon (``X-Tab:\\tv`` becomes
``X-Tab: v``, ``Subject:  a`` becomes ``Subject: a``) and adds a space after an empty field. That
breaks DKIM signatures using "simple" header canonicalization and changes fields nobody asked us
to touch. So the ``email`` package is used only to read each entity's header block
(``BytesHeaderParser``: content type, boundary, transfer encoding), never to write.

No conversion exists (None) for:

- octets above 127 in a header field, of the message or of any part: headers cannot be
  transfer-encoded (RFC 2047 encoded-words would change what the fields say, and the addresses
  in them cannot be encoded at all);
- a non-MIME message (neither ``MIME-Version`` nor ``Content-Type``) whose body has 8-bit octets;
  a message/rfc822 part whose embedded message is such a message (RFC 2046 §5.2.1: message/rfc822
  may only be 7bit, 8bit or binary, so it cannot be base64-encoded instead);
- 8-bit octets in a multipart's preamble or epilogue, in a multipart without a boundary or without
  any delimiter, in a part already encoded as base64 or in an unknown encoding, and in message/*
  types other than rfc822, global, global-headers and global-delivery-status (partial and
  external-body must be 7bit).

What the relay does with None (worker/relay.py) -- the choice, with Postfix's behaviour in mind:
RFC 6152 says convert or return the message; Postfix (``disable_mime_output_conversion = no``)
converts what its MIME engine can and sends the rest unchanged: 8-bit header fields and a
non-MIME 8-bit body go out as they are (its downgrade only re-encodes parts labelled 8bit). mtaq
does the same: an unconvertible message is sent unchanged, and the log line says so. Such a
message was already outside the rules when it was accepted (8-bit headers without SMTPUTF8, 8-bit
text without MIME); a bounce would return mail that in practice every server without 8BITMIME
takes anyway (RFC 6152 §3's "just-send-8" reality), and the sender can do nothing about it.
"""

from __future__ import annotations

import base64
import binascii
import re
from email import policy
from email.message import Message
from email.parser import BytesHeaderParser

__all__ = ["has_8bit", "to_7bit"]

CRLF = b"\r\n"
_DECLARED_8BIT = re.compile(rb"(?im)^content-transfer-encoding:[ \t]*(?:\r\n[ \t]+)*\"?(?:8bit|binary)\b")
_EIGHT_BIT_CTE = frozenset({"8bit", "binary"})
_PASSTHROUGH_CTE = frozenset({"", "7bit", "8bit", "binary"})  # the payload is the data itself
# RFC 6532 §3.7 and RFC 6533 §6.3-6.4: unlike message/rfc822 these may take any transfer encoding
# (our own internationalized DSNs are made of them); the two that are lines of fields go as
# quoted-printable, readable like text/*, message/global as base64.
_TEXTUAL_MESSAGE = frozenset({"message/global-delivery-status", "message/global-headers"})
_ENCODABLE_MESSAGE = _TEXTUAL_MESSAGE | {"message/global"}


class _Unconvertible(Exception):
    """This message has no 7-bit equivalent (see the module docstring)."""


def has_8bit(data: bytes) -> bool:
    return not data.isascii()


def to_7bit(message: bytes) -> bytes | None:
    """A 7-bit-clean equivalent of ``message`` (the same object when nothing in it is 8-bit), or
    None when it has none."""
    # the regular expression steps through every line (~13 us for 4 KiB): most ASCII mail has no
    # Content-Transfer-Encoding field at all, which a search of its lower-case copy tells at once
    if message.isascii() and (
        b"content-transfer-encoding" not in message.lower() or not _DECLARED_8BIT.search(message)
    ):
        return message
    try:
        out = _entity(message, top=True, default_type="text/plain")
    except _Unconvertible:
        return None
    return message if out == message else out


def _split(entity: bytes) -> tuple[bytes, bytes | None]:
    """Header block (each field with its CRLF) and body; body None when there is no blank line."""
    if entity.startswith(CRLF):
        return b"", entity[2:]
    end = entity.find(b"\r\n\r\n")
    if end < 0:
        return entity, None
    return entity[: end + 2], entity[end + 4 :]


def _headers(head: bytes, default_type: str) -> Message:
    msg = BytesHeaderParser(policy=policy.compat32).parsebytes(head + CRLF)
    if default_type != "text/plain":
        msg.set_default_type(default_type)
    return msg


def _entity(entity: bytes, *, top: bool, default_type: str) -> bytes:
    head, body = _split(entity)
    if has_8bit(head):
        raise _Unconvertible("8-bit header")
    if body is None:
        return entity
    msg = _headers(head, default_type)
    cte = (msg.get("content-transfer-encoding") or "").strip().strip('"').lower()
    if top and "mime-version" not in msg and "content-type" not in msg:
        if has_8bit(body):
            raise _Unconvertible("8-bit non-MIME message")
        return entity
    ctype = msg.get_content_type()
    maintype = msg.get_content_maintype()
    if maintype == "multipart":
        new_body = _multipart(
            body, msg.get_boundary(), "message/rfc822" if ctype == "multipart/digest" else "text/plain"
        )
        return _join(_relabel(head, cte), new_body)
    if ctype == "message/rfc822":
        new_body = _entity(body, top=True, default_type="text/plain") if body else body
        return _join(_relabel(head, cte), new_body)
    if not (has_8bit(body) or cte in _EIGHT_BIT_CTE):
        return entity
    if maintype == "message" and ctype not in _ENCODABLE_MESSAGE:
        raise _Unconvertible(f"8-bit {ctype}")
    if cte in _PASSTHROUGH_CTE:
        data = body
    elif cte == "quoted-printable":
        data = binascii.a2b_qp(body)  # raw 8-bit octets in QP are kept as they are
    else:
        raise _Unconvertible(f"8-bit octets in a {cte} part")
    if maintype == "text" or ctype in _TEXTUAL_MESSAGE:
        return _join(_set_cte(head, "quoted-printable"), _qp(data))
    return _join(_set_cte(head, "base64"), _b64(data))


def _join(head: bytes, body: bytes) -> bytes:
    return head + CRLF + body


def _multipart(body: bytes, boundary: str | None, default_type: str) -> bytes:
    """Convert each part between the delimiter lines; the lines themselves, the preamble and the
    epilogue are kept as they are."""
    if boundary is None:
        if has_8bit(body):
            raise _Unconvertible("8-bit multipart without a boundary")
        return body
    delimiter = re.compile(
        rb"(?m)^--" + re.escape(boundary.encode("ascii", "surrogateescape")) + rb"(--)?[ \t]*(?:\r\n|\Z)"
    )
    lines = list(delimiter.finditer(body))
    if not lines:
        if has_8bit(body):
            raise _Unconvertible("8-bit multipart without a delimiter")
        return body
    preamble = body[: lines[0].start()]
    if has_8bit(preamble):
        raise _Unconvertible("8-bit preamble")
    out = [preamble]
    for n, line in enumerate(lines):
        out.append(line.group(0))
        if line.group(1):  # the close delimiter: what follows is the epilogue
            epilogue = body[line.end() :]
            if has_8bit(epilogue):
                raise _Unconvertible("8-bit epilogue")
            out.append(epilogue)
            break
        end = lines[n + 1].start() if n + 1 < len(lines) else len(body)
        region = body[line.end() : end]
        if n + 1 < len(lines) and region.endswith(CRLF):
            # the CRLF before a delimiter belongs to the delimiter (RFC 2046 §5.1.1)
            out.append(_entity(region[:-2], top=False, default_type=default_type) + CRLF)
        else:
            out.append(_entity(region, top=False, default_type=default_type))
    return b"".join(out)


_CTE_FIELD = re.compile(rb"(?im)^content-transfer-encoding[ \t]*:.*\r\n(?:[ \t].*\r\n)*")


def _set_cte(head: bytes, value: str) -> bytes:
    """Replace the Content-Transfer-Encoding field where it stands (dropping any repeats), or add
    it after the last field."""
    field = f"Content-Transfer-Encoding: {value}\r\n".encode("ascii")
    found = list(_CTE_FIELD.finditer(head))
    if not found:
        return head + field
    out = head[: found[0].start()] + field
    for prev, nxt in zip(found, [*found[1:], None], strict=True):
        out += head[prev.end() : nxt.start() if nxt is not None else len(head)]
    return out


def _relabel(head: bytes, cte: str) -> bytes:
    """A composite entity declared 8bit or binary is 7bit once its parts are (RFC 2045 §6.4)."""
    return _set_cte(head, "7bit") if cte in _EIGHT_BIT_CTE else head


def _qp(data: bytes) -> bytes:
    """Quoted-printable (RFC 2045 §6.7) with CRLF line breaks kept as hard breaks: each line alone,
    so that a CR or LF not in a CRLF pair is encoded and soft breaks are CRLF too."""
    return CRLF.join(
        binascii.b2a_qp(line, quotetabs=False, istext=False, header=False).replace(b"=\n", b"=\r\n")
        for line in data.split(CRLF)
    )


def _b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", CRLF)
