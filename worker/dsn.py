"""Delivery status notifications (RFC 3464 in an RFC 6522 ``multipart/report``): pure, bytes out.

One report per message and per kind, from the null sender, to the original MAIL FROM, with three
parts: a human explanation, the ``message/delivery-status`` fields (one block per recipient) and
the original message, its headers only (``text/rfc822-headers``, RET=HDRS or no RET) or all of it
(``message/rfc822``, RET=FULL, RFC 3461 §4.3).

The report is written by hand rather than through ``email.message`` so that every byte is known:
lines end in CRLF, no line exceeds 998 octets, field values cannot carry CR or LF (a remote reply
cannot inject a header), and the result is 7-bit whenever the sender's address is ASCII:

- a human part with non-ASCII text (an SMTPUTF8 address, say) is UTF-8 in quoted-printable;
- original headers with 8-bit bytes or over-long lines go as ``text/rfc822-headers`` in
  quoted-printable (any transfer encoding is allowed on a ``text/*`` part);
- ``message/rfc822`` allows only 7bit, 8bit or binary (RFC 2046 §5.2.1), so an 8-bit original asked
  for with RET=FULL is returned as headers only, unless the caller says the report may be 8-bit
  (``eight_bit_ok``, when it will go out with 8BITMIME): then it is ``message/rfc822`` with
  ``Content-Transfer-Encoding: 8bit``. RFC 3461 §4.3 allows headers only when the whole cannot be
  returned; the same fallback applies to an original larger than ``return_limit``;
- non-ASCII recipient addresses in the report fields use RFC 6533's ``utf-8`` address type with
  ``\\x{HEX}`` escapes, which keeps ``message/delivery-status`` 7-bit.
"""

from __future__ import annotations

import quopri
import re
import secrets
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

from common.dates import format_date

__all__ = ["ACTIONS", "DsnRecipient", "build_dsn", "format_date", "subject_for"]

ACTIONS = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})
"""RFC 3464 §2.3.3 action values."""

MAX_LINE = 998
"""RFC 5322 §2.1.1: at most 998 characters on a line, CRLF excluded."""

_FOLD_AT = 78
"""RFC 5322 §2.1.1: lines SHOULD be no longer than 78 characters."""

_MAX_DIAGNOSTIC = 1000
"""A remote reply longer than this is cut: it is a diagnostic, not a transcript."""

_STATUS_RE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_SAID_RE = re.compile(r"^host \S+ said: ")  # a diagnostic already in Postfix's "host X said: reply" form
_BCHARS_RE = re.compile(r"[^A-Za-z0-9'()+_,\-./:=?]")

SUBJECT_FAILED = "Undelivered Mail Returned to Sender"
SUBJECT_DELAYED = "Delayed Mail (still being retried)"
SUBJECT_SUCCESS = "Successful Mail Delivery Report"


@dataclass(frozen=True)
class DsnRecipient:
    address: str
    orcpt: str | None  # RFC 3461 ORCPT as given ("rfc822;user@example.com" or a bare address)
    action: str  # "failed" | "delayed" | "delivered" | "relayed"
    status: str  # RFC 3463 enhanced status, "5.1.1"
    remote_mta: str  # host name that gave the reply, "" if none answered
    diagnostic: str  # the remote reply, "550 5.1.1 no such user"; "" if none
    last_attempt: float | None


def subject_for(actions: Sequence[str]) -> str:
    """Any failure makes a bounce; else any delay a delay warning; else a success report."""
    if "failed" in actions:
        return SUBJECT_FAILED
    if "delayed" in actions:
        return SUBJECT_DELAYED
    return SUBJECT_SUCCESS


def build_dsn(
    *,
    reporting_mta: str,
    queue_id: str,
    envid: str | None,
    arrival: float,
    original_sender: str,
    recipients: Sequence[DsnRecipient],
    original: bytes,
    ret: str | None,
    now: float,
    postmaster: str = "",
    eight_bit_ok: bool = False,
    return_limit: int | None = None,
) -> bytes:
    """The complete report message (RFC 5322, CRLF line endings), ready to be queued from ``<>``.

    ``ret`` is RFC 3461 RET (``FULL`` returns the whole original, anything else the headers);
    ``eight_bit_ok`` allows an 8-bit ``message/rfc822`` part (see the module docstring);
    ``return_limit`` caps the size of a returned full original (headers only beyond it).
    Raises ValueError for an empty sender (mail from ``<>`` is never bounced), no recipients, or
    an unknown action.
    """
    if not original_sender:
        raise ValueError("no report to the null sender <>: that is how bounce loops start")
    if not recipients:
        raise ValueError("a delivery status notification needs at least one recipient")
    for r in recipients:
        if r.action not in ACTIONS:
            raise ValueError(f"unknown DSN action {r.action!r}")
    mta = _clean(reporting_mta) or "localhost"
    # RFC 2046 §5.1.1: 1-70 characters from a small set, and never found in the content.
    boundary = _BCHARS_RE.sub("_", f"=_{secrets.token_hex(8)}.{int(now)}.{queue_id}/{mta}")[:70]

    parts = [
        _human_part(mta, recipients, postmaster),
        _status_part(mta, queue_id, envid, arrival, original_sender, recipients),
        _original_part(
            original, ret, eight_bit_ok, return_limit, undelivered=any(r.action == "failed" for r in recipients)
        ),
    ]
    eight_bit = any(p.eight_bit for p in parts)
    while any(boundary.encode() in p.body for p in parts):  # vanishingly unlikely, but cheap to rule out
        boundary = f"{boundary}.{secrets.token_hex(4)}"

    headers = [
        _field("From", f"MAILER-DAEMON@{mta} (Mail Delivery System)"),
        _field("To", f"<{_one_line(original_sender)}>"),
        _field("Subject", subject_for([r.action for r in recipients])),
        _field("Date", format_date(now)),
        _field("Message-ID", f"<{int(now)}.{secrets.token_hex(6)}.{_clean(queue_id)}@{mta}>"),
        _field("Auto-Submitted", "auto-replied"),  # RFC 3834 §5: no auto-reply to this
        _field("MIME-Version", "1.0"),
        _field("Content-Type", f'multipart/report; report-type=delivery-status; boundary="{boundary}"'),
        _field("Content-Transfer-Encoding", "8bit" if eight_bit else "7bit"),
    ]
    out = bytearray()
    out += b"".join(headers)
    out += b"\r\nThis is a MIME-encapsulated message.\r\n"
    for part in parts:
        out += b"\r\n--" + boundary.encode() + b"\r\n"
        out += part.render()
    out += b"\r\n--" + boundary.encode() + b"--\r\n"
    return bytes(out)


# -- the three parts


@dataclass(frozen=True)
class _Part:
    headers: list[bytes]
    body: bytes  # CRLF line endings; the CRLF before the next boundary belongs to the boundary
    eight_bit: bool = False

    def render(self) -> bytes:
        return b"".join(self.headers) + b"\r\n" + self.body


def _human_part(mta: str, recipients: Sequence[DsnRecipient], postmaster: str) -> _Part:
    kind = subject_for([r.action for r in recipients])
    if kind == SUBJECT_FAILED:
        intro = (
            "Your message could not be delivered to one or more of its recipients. The reasons "
            "are listed below, and the message (or its headers) is attached."
        )
    elif kind == SUBJECT_DELAYED:
        intro = (
            "Your message has not yet been delivered to one or more of its recipients. It stays "
            "in the queue and delivery will be tried again; there is no need to send it again. "
            "You will be told if it finally cannot be delivered."
        )
    else:
        intro = (
            "Your message was delivered to the recipients listed below, as you asked to be "
            "told. A message handed on to a system that does not report back may still be "
            "bounced from there."
        )
    contact = _one_line(postmaster) if postmaster else "postmaster"
    paragraphs = [
        f"This is the mail system at host {mta}.",
        intro,
        f"For help, please write to {contact} and include this report.",
    ]
    lines: list[str] = []
    for p in paragraphs:
        lines.extend(textwrap.wrap(p, 72) or [""])
        lines.append("")
    lines.append("                   The mail system")
    lines.append("")
    for r in recipients:
        lines.extend(textwrap.wrap(_recipient_line(r), 76, subsequent_indent="    ", break_on_hyphens=False))
        lines.append("")
    text = "\n".join(lines)
    if text.isascii():
        body = _crlf(text.encode("ascii"))
        return _Part(
            [
                _field("Content-Description", "Notification"),
                _field("Content-Type", "text/plain; charset=us-ascii"),
                _field("Content-Transfer-Encoding", "7bit"),
            ],
            body,
        )
    return _Part(
        [
            _field("Content-Description", "Notification"),
            _field("Content-Type", "text/plain; charset=utf-8"),
            _field("Content-Transfer-Encoding", "quoted-printable"),
        ],
        _quoted_printable(text.encode("utf-8")),
    )


def _recipient_line(r: DsnRecipient) -> str:
    diagnostic = _one_line(r.diagnostic)[:_MAX_DIAGNOSTIC]
    if r.remote_mta and diagnostic and not _SAID_RE.match(diagnostic):
        diagnostic = f"host {_one_line(r.remote_mta)} said: {diagnostic}"
    if r.action == "failed":
        what = diagnostic or f"delivery failed (status {r.status})"
    elif r.action == "delayed":
        what = f"delivery temporarily suspended: {diagnostic}" if diagnostic else f"delayed ({r.status})"
    else:
        to = f" to {_one_line(r.remote_mta)}" if r.remote_mta else ""
        what = f"{r.action}{to}" + (f" ({diagnostic})" if diagnostic else "")
    return f"<{_one_line(r.address)}>: {what}"


def _status_part(
    mta: str,
    queue_id: str,
    envid: str | None,
    arrival: float,
    sender: str,
    recipients: Sequence[DsnRecipient],
) -> _Part:
    # RFC 3464 §2.2: per-message fields, in the order of its grammar; then one block per recipient.
    fields: list[bytes] = []
    if envid:
        fields.append(_field("Original-Envelope-Id", _clean(envid)))
    fields.append(_field("Reporting-MTA", f"dns; {mta}"))
    fields.append(_field("X-Mtaq-Queue-ID", _clean(queue_id)))
    fields.append(_field("X-Mtaq-Sender", _address_field(sender)))
    fields.append(_field("Arrival-Date", format_date(arrival)))
    blocks = [b"".join(fields)]
    for r in recipients:
        block: list[bytes] = []
        if r.orcpt:
            block.append(_field("Original-Recipient", _orcpt_field(r.orcpt)))
        block.append(_field("Final-Recipient", _address_field(r.address)))
        block.append(_field("Action", r.action))
        block.append(_field("Status", _status(r)))
        if r.remote_mta:
            block.append(_field("Remote-MTA", f"dns; {_clean(r.remote_mta)}"))
        if r.diagnostic:
            # "smtp" when a remote server said it; our own words (DNS, connect errors) are ours.
            kind = "smtp" if r.remote_mta else "X-Mtaq"
            reply = _SAID_RE.sub("", _clean(r.diagnostic)) if r.remote_mta else _clean(r.diagnostic)
            block.append(_field("Diagnostic-Code", f"{kind}; {reply[:_MAX_DIAGNOSTIC]}"))
        if r.last_attempt is not None:
            block.append(_field("Last-Attempt-Date", format_date(r.last_attempt)))
        blocks.append(b"".join(block))
    body = _strip_final_crlf(b"\r\n".join(blocks))
    return _Part(
        [
            _field("Content-Description", "Delivery report"),
            _field("Content-Type", "message/delivery-status"),
        ],
        body,
    )


def _original_part(
    original: bytes, ret: str | None, eight_bit_ok: bool, return_limit: int | None, *, undelivered: bool = True
) -> _Part:
    whole = _crlf(original)
    what = "Undelivered Message" if undelivered else "Message"  # a success report returns no failure
    full = (ret or "").upper() == "FULL" and (return_limit is None or len(whole) <= return_limit)
    if full:
        if _seven_bit_clean(whole):
            return _Part(
                [
                    _field("Content-Description", what),
                    _field("Content-Type", "message/rfc822"),
                    _field("Content-Transfer-Encoding", "7bit"),
                ],
                whole,
            )
        if eight_bit_ok and _eight_bit_clean(whole):
            return _Part(
                [
                    _field("Content-Description", what),
                    _field("Content-Type", "message/rfc822"),
                    _field("Content-Transfer-Encoding", "8bit"),
                ],
                whole,
                eight_bit=True,
            )
    headers = _header_section(whole)
    description = _field("Content-Description", f"{what} Headers")
    content_type = _field("Content-Type", "text/rfc822-headers")
    if _seven_bit_clean(headers):
        return _Part([description, content_type, _field("Content-Transfer-Encoding", "7bit")], headers)
    if eight_bit_ok and _eight_bit_clean(headers):
        return _Part([description, content_type, _field("Content-Transfer-Encoding", "8bit")], headers, eight_bit=True)
    return _Part(
        [description, content_type, _field("Content-Transfer-Encoding", "quoted-printable")],
        _quoted_printable(headers),
    )


# -- helpers


def _field(name: str, value: str) -> bytes:
    """``Name: value`` CRLF, folded at spaces to 78 columns where it can be (RFC 5322 §2.2.3)."""
    line = f"{name}: {value}"
    out: list[str] = []
    while len(line) > _FOLD_AT:
        cut = line.rfind(" ", len(name) + 2, _FOLD_AT)
        if cut <= 0:
            cut = line.find(" ", _FOLD_AT)
        if 0 < cut <= MAX_LINE:
            out.append(line[:cut])
            line = line[cut:]  # the continuation line starts with the space (folding white space)
        elif len(line) > MAX_LINE:
            # One word longer than a line may be: split it (a space in the value beats a broken line).
            out.append(line[:_FOLD_AT])
            line = " " + line[_FOLD_AT:]
        else:
            break
        if not line.strip():
            break
    out.append(line)
    result = "\r\n".join(out) + "\r\n"
    return result.encode("utf-8")


def _one_line(value: str) -> str:
    """No CR, LF or other controls: a multi-line SMTP reply becomes one line."""
    return " ".join("".join(c if c.isprintable() else " " for c in value).split())


def _clean(value: str) -> str:
    """One line of printable ASCII: non-ASCII as backslash escapes."""
    return _one_line(value).encode("ascii", "backslashreplace").decode("ascii")


def _address_field(address: str) -> str:
    """``rfc822; addr``, or RFC 6533 ``utf-8; addr`` with ``\\x{HEX}`` escapes when not ASCII."""
    address = _one_line(address)
    if address.isascii():
        return f"rfc822; {address}"
    escaped = "".join(c if c.isascii() and c != "\\" else f"\\x{{{ord(c):X}}}" for c in address)
    return f"utf-8; {escaped}"


def _orcpt_field(orcpt: str) -> str:
    """ORCPT arrives as ``addr-type;address`` (RFC 3461 §4.2); a bare address is taken as rfc822."""
    kind, sep, address = _one_line(orcpt).partition(";")
    if sep and kind.strip() and re.fullmatch(r"[A-Za-z0-9-]+", kind.strip()):
        if kind.strip().lower() == "rfc822":
            return _address_field(address.strip())
        return f"{kind.strip()}; {_clean(address.strip())}"
    return _address_field(orcpt)


def _status(r: DsnRecipient) -> str:
    status = r.status.strip()
    if _STATUS_RE.match(status):
        return status
    return {"failed": "5.0.0", "delayed": "4.0.0"}.get(r.action, "2.0.0")


def _crlf(data: bytes) -> bytes:
    """Every line ending as CRLF (bare LF and bare CR too)."""
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def _strip_final_crlf(data: bytes) -> bytes:
    return data[:-2] if data.endswith(b"\r\n") else data


def _header_section(message: bytes) -> bytes:
    """The header lines of a CRLF message, each ending in CRLF (no blank separator line)."""
    if message.startswith(b"\r\n"):
        return b""
    head, sep, _ = message.partition(b"\r\n\r\n")
    return head + b"\r\n" if sep else (message if message.endswith(b"\r\n") else message + b"\r\n")


def _lines_ok(data: bytes) -> bool:
    return b"\x00" not in data and all(len(line) <= MAX_LINE for line in data.split(b"\r\n"))


def _seven_bit_clean(data: bytes) -> bool:
    return data.isascii() and _lines_ok(data)


def _eight_bit_clean(data: bytes) -> bool:
    return _lines_ok(data)


def _quoted_printable(data: bytes) -> bytes:
    """Quoted-printable of CRLF text (RFC 2045 §6.7), lines kept as lines, CRLF endings."""
    text = data.replace(b"\r\n", b"\n")
    return _crlf(quopri.encodestring(text, quotetabs=False))
