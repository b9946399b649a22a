"""Delivery status notifications (RFC 3464 in an RFC 6522 ``multipart/report``): pure, bytes out.

``make_dsn`` decides what a finished message reports and to whom, ``make_delay_dsn`` the delay
warning; ``render_dsn`` writes the report. One report per message and per kind, from the null
sender, to the original MAIL FROM, with three parts: a human explanation, the delivery status
fields (one block per recipient) and the original message or its headers.

The report is written by hand rather than through ``email.message`` so that every byte is known:
lines end in CRLF, no line exceeds 998 octets, field values cannot carry CR or LF (a remote reply
cannot inject a header).

Two forms, chosen per report:

- **classic**, 7-bit fields: ``report-type=delivery-status`` with ``message/delivery-status``. A
  non-ASCII address (there should be none: such mail comes with SMTPUTF8) takes RFC 6533's
  ``utf-8`` address type in its 7-bit ``utf-8-addr-xtext`` form (``utf-8; j\\x{F6}rg@...``), and
  any other non-ASCII text in a field (a diagnostic quoting that address) uses the same
  ``\\x{HEX}`` notation, so one report has one escaping;
- **internationalized** (RFC 6533 §4, when the original came with SMTPUTF8 and the report has
  non-ASCII in it): ``report-type=global-delivery-status`` with ``message/global-delivery-status``,
  8-bit UTF-8 fields: non-ASCII addresses as ``utf-8;`` in the ``utf-8-addr-unitext`` form
  (``utf-8; jörg@...``), diagnostics as the server sent them; the original as ``message/global``
  (RFC 6532 §3.7) or its headers as ``message/global-headers`` (RFC 6533 §6.4).

What comes back of the original (RFC 3461 §4.3): the headers unless the sender asked for the
whole message with RET=FULL, and even then only the headers when

- the report is not a failure (a delay warning, a success report: RFC 3461 §4.3 returns the whole
  message only with a failure);
- the message came from outside (``trusted`` false: neither authenticated nor from
  ``mynetworks``): a DSN must not mail third-party content to a forged sender (backscatter);
- it is larger than ``return_limit``, or cannot be a message part at all (a NUL, a line over 998);
- it has 8-bit octets and arrived with neither BODY=8BITMIME nor SMTPUTF8, so nothing says the
  path back carries 8-bit mail (``message/rfc822`` allows only 7bit, 8bit or binary, RFC 2046
  §5.2.1). With 8BITMIME it goes as 8-bit ``message/rfc822``, with SMTPUTF8 as ``message/global``.

Each time, the human part says that only the headers are attached and why.
"""

from __future__ import annotations

import re
import secrets
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common.dates import format_date
from common.envelope import Envelope, RcptState, Recipient, RecipientStatus, new_queue_id
from common.store import Message
from worker.dsnfields import (
    address_field,
    crlf,
    cte,
    escape,
    field,
    field_text,
    header_section,
    lines_ok,
    one_line,
    orcpt_field,
    quoted_printable,
    seven_bit_clean,
    strip_final_crlf,
)

__all__ = [
    "ACTIONS",
    "DsnRecipient",
    "delay_warning_recipients",
    "format_date",
    "make_delay_dsn",
    "make_dsn",
    "render_dsn",
    "subject_for",
]

ACTIONS = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})
"""RFC 3464 §2.3.3 action values."""

_SUCCESS = frozenset({"delivered", "relayed", "expanded"})

_MAX_DIAGNOSTIC = 1000
"""A remote reply longer than this is cut: it is a diagnostic, not a transcript."""

_STATUS_RE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_SAID_RE = re.compile(r"^host \S+ said: ")  # a diagnostic already in Postfix's "host X said: reply" form
_BCHARS_RE = re.compile(r"[^A-Za-z0-9'()+_,\-./:=?]")

SUBJECT_FAILED = "Undelivered Mail Returned to Sender"
SUBJECT_MIXED = "Mail Delivery Status Report (some recipients failed)"
SUBJECT_DELAYED = "Delayed Mail (still being retried)"
SUBJECT_SUCCESS = "Successful Mail Delivery Report"


@dataclass(frozen=True)
class DsnRecipient:
    address: str
    orcpt: str | None  # RFC 3461 ORCPT as given ("rfc822;user@example.com" or a bare address)
    action: str  # "failed" | "delayed" | "delivered" | "relayed" | "expanded"
    status: str  # RFC 3463 enhanced status, "5.1.1"
    remote_mta: str  # host name that gave the reply, "" if none answered
    diagnostic: str  # the remote reply, "550 5.1.1 no such user"; "" if none
    last_attempt: float | None


def subject_for(actions: Sequence[str]) -> str:
    """Failures alone make a bounce; failures beside successes a mixed report (so that nobody
    reads the delivered recipients as returned); else any delay a delay warning; else success."""
    if "failed" in actions:
        return SUBJECT_MIXED if any(a in _SUCCESS for a in actions) else SUBJECT_FAILED
    if "delayed" in actions:
        return SUBJECT_DELAYED
    return SUBJECT_SUCCESS


# -- which report a message gets (the delivery side calls these)


def make_dsn(
    msg: Message,
    statuses: Mapping[int, RecipientStatus],
    hostname: str,
    now: float,
    *,
    return_limit: int | None = None,
) -> Message | None:
    """The RFC 3464 report for a finished message, or None: never for mail from <> (no loops),
    failures unless NOTIFY said otherwise, successes only when NOTIFY=SUCCESS asked. Failed and
    relayed recipients of one message share one report, each under its own heading."""
    env = msg.envelope
    if env.is_bounce:
        return None
    report: list[DsnRecipient] = []
    for i, r in enumerate(env.recipients):
        st = statuses.get(i)
        if st is None:
            continue
        if st.state is RcptState.BOUNCED and r.wants("FAILURE"):
            action = "failed"
        elif st.state is RcptState.DELIVERED and r.wants("SUCCESS"):
            # we do not pass NOTIFY on to the next hop, so we report "relayed" (RFC 3461 §4.1)
            action = "relayed"
        else:
            continue
        report.append(_report_recipient(r, st, action))
    return _report_message(msg, report, hostname, now, return_limit=return_limit) if report else None


def delay_warning_recipients(env: Envelope, statuses: Mapping[int, RecipientStatus]) -> list[int]:
    """Positions a delay warning would name: deferred recipients that asked for NOTIFY=DELAY or
    gave no NOTIFY (RFC 3461 §4.1, as Postfix). None for mail from <>."""
    if env.is_bounce:
        return []
    return [
        i
        for i, r in enumerate(env.recipients)
        if (st := statuses.get(i)) is not None and st.state is RcptState.DEFERRED and r.wants("DELAY")
    ]


def make_delay_dsn(
    msg: Message,
    statuses: Mapping[int, RecipientStatus],
    hostname: str,
    now: float,
    *,
    retry_until: float | None = None,
) -> Message | None:
    """The ``Action: delayed`` warning for a message still queued, or None when no recipient wants
    one. Headers only, whatever RET said (RFC 3461 §4.3); ``retry_until`` is the end of the
    message's queue lifetime (``Will-Retry-Until``, RFC 3464 §2.3.9)."""
    positions = delay_warning_recipients(msg.envelope, statuses)
    report = [_report_recipient(msg.envelope.recipients[i], statuses[i], "delayed") for i in positions]
    return _report_message(msg, report, hostname, now, retry_until=retry_until) if report else None


def _report_recipient(r: Recipient, st: RecipientStatus, action: str) -> DsnRecipient:
    default = {"failed": "5.0.0", "delayed": "4.0.0"}.get(action, "2.0.0")
    return DsnRecipient(
        address=r.address,
        orcpt=r.orcpt,
        action=action,
        status=st.dsn or default,
        remote_mta=st.remote_mta,
        diagnostic=st.reply,
        last_attempt=st.updated or None,
    )


def _report_message(
    msg: Message,
    report: Sequence[DsnRecipient],
    hostname: str,
    now: float,
    *,
    return_limit: int | None = None,
    retry_until: float | None = None,
) -> Message:
    env = msg.envelope
    rendered = render_dsn(
        reporting_mta=hostname,
        queue_id=env.id,
        envid=env.envid,
        arrival=env.received_at,
        original_sender=env.sender,
        recipients=report,
        original=msg.body,
        ret=env.ret,
        now=now,
        eight_bit_ok=env.body_8bit,
        utf8_ok=env.smtputf8,
        trusted=env.trusted,
        return_limit=return_limit,
        retry_until=retry_until,
    )
    bounce = Envelope(
        id=new_queue_id(),
        sender="",
        recipients=[Recipient(env.sender)],
        received_at=now,
        helo=hostname,
        client_addr="127.0.0.1",
        client_name="localhost",
        protocol="local",
        body_8bit=rendered.eight_bit,
        smtputf8=rendered.international or not env.sender.isascii(),
        trusted=True,  # our own report: nothing of it is withheld further on
    )
    return Message(bounce, rendered.data)


# -- the report itself


@dataclass(frozen=True)
class Report:
    data: bytes  # the whole message, CRLF line endings
    eight_bit: bool  # some part is 8bit: queue it with BODY=8BITMIME
    international: bool  # report-type=global-delivery-status (RFC 6533): queue it with SMTPUTF8


def render_dsn(
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
    utf8_ok: bool = False,
    trusted: bool = False,
    return_limit: int | None = None,
    retry_until: float | None = None,
) -> Report:
    """The complete report message (RFC 5322, CRLF line endings), ready to be queued from ``<>``.

    ``ret`` is RFC 3461 RET; ``eight_bit_ok`` (the original came with BODY=8BITMIME) and
    ``utf8_ok`` (with SMTPUTF8) say which 8-bit forms the way back may carry; ``trusted`` (from
    mynetworks or authenticated) allows the whole original at all; ``return_limit`` caps its size.
    See the module docstring. Raises ValueError for an empty sender (mail from ``<>`` is never
    bounced), no recipients, or an unknown action.
    """
    if not original_sender:
        raise ValueError("no report to the null sender <>: that is how bounce loops start")
    if not recipients:
        raise ValueError("a delivery status notification needs at least one recipient")
    for r in recipients:
        if r.action not in ACTIONS:
            raise ValueError(f"unknown DSN action {r.action!r}")
    whole = crlf(original)
    international = utf8_ok and not _all_ascii(original_sender, recipients, header_section(whole))
    mta = escape(reporting_mta) or "localhost"  # a host name: ASCII in the top-level fields too
    # RFC 2046 §5.1.1: 1-70 characters from a small set, and never found in the content.
    boundary = _BCHARS_RE.sub("_", f"=_{secrets.token_hex(8)}.{int(now)}.{queue_id}/{mta}")[:70]

    failure = any(r.action == "failed" for r in recipients)
    full, withheld = _return_whole(whole, ret, failure, trusted, eight_bit_ok or utf8_ok, return_limit)
    parts = [
        _human_part(mta, recipients, postmaster, withheld, arrival, now, retry_until, international),
        _status_part(mta, queue_id, envid, arrival, original_sender, recipients, retry_until, international),
        _original_part(whole, full, international, undelivered=failure),
    ]
    eight_bit = any(p.eight_bit for p in parts)
    while any(boundary.encode() in p.body for p in parts):  # vanishingly unlikely, but cheap to rule out
        boundary = f"{boundary}.{secrets.token_hex(4)}"

    report_type = "global-delivery-status" if international else "delivery-status"
    headers = [
        field("From", f"MAILER-DAEMON@{mta} (Mail Delivery System)"),
        field("To", f"<{one_line(original_sender)}>"),
        field("Subject", subject_for([r.action for r in recipients])),
        field("Date", format_date(now)),
        field("Message-ID", f"<{int(now)}.{secrets.token_hex(6)}.{escape(queue_id)}@{mta}>"),
        field("Auto-Submitted", "auto-replied"),  # RFC 3834 §5: no auto-reply to this
        field("MIME-Version", "1.0"),
        field("Content-Type", f'multipart/report; report-type={report_type}; boundary="{boundary}"'),
        field("Content-Transfer-Encoding", "8bit" if eight_bit else "7bit"),
    ]
    out = bytearray()
    out += b"".join(headers)
    out += b"\r\nThis is a MIME-encapsulated message.\r\n"
    for part in parts:
        out += b"\r\n--" + boundary.encode() + b"\r\n"
        out += part.render()
    out += b"\r\n--" + boundary.encode() + b"--\r\n"
    return Report(bytes(out), eight_bit, international)


def _all_ascii(sender: str, recipients: Sequence[DsnRecipient], headers: bytes) -> bool:
    texts = [sender] + [t for r in recipients for t in (r.address, r.orcpt or "", r.diagnostic, r.remote_mta)]
    return headers.isascii() and all(t.isascii() for t in texts)


def _return_whole(
    whole: bytes, ret: str | None, failure: bool, trusted: bool, eight_bit_ok: bool, return_limit: int | None
) -> tuple[bool, str]:
    """Whether the whole original goes back, and if RET=FULL asked for it but only the headers
    do, why (a sentence for the human part)."""
    if (ret or "").upper() != "FULL":
        return False, ""
    if not failure:
        return False, "only a report of failed delivery returns the whole message (RFC 3461)"
    if not trusted:
        return False, (
            "the message came from a client that neither authenticated nor was in this "
            "system's networks, and its content is not sent on to an address that may be forged"
        )
    if return_limit is not None and len(whole) > return_limit:
        return False, f"the message is larger than the {return_limit} octets a report returns"
    if not lines_ok(whole):
        return False, "the message has NUL octets or lines over 998 octets, which no message part may carry"
    if not whole.isascii() and not eight_bit_ok:
        return False, (
            "the message has 8-bit content but arrived without BODY=8BITMIME or SMTPUTF8, so "
            "this report could not carry it"
        )
    return True, ""


@dataclass(frozen=True)
class _Part:
    headers: list[bytes]
    body: bytes  # CRLF line endings; the CRLF before the next boundary belongs to the boundary
    eight_bit: bool = False

    def render(self) -> bytes:
        return b"".join(self.headers) + b"\r\n" + self.body


_SECTIONS = (
    ("failed", "Delivery to these recipients failed:"),
    ("delayed", "Delivery to these recipients is delayed; it will be tried again:"),
    ("success", "Delivered (or relayed) to these recipients:"),
)


def _human_part(
    mta: str,
    recipients: Sequence[DsnRecipient],
    postmaster: str,
    withheld: str,
    arrival: float,
    now: float,
    retry_until: float | None,
    international: bool,
) -> _Part:
    kind = subject_for([r.action for r in recipients])
    if kind == SUBJECT_FAILED:
        intro = (
            "Your message could not be delivered to one or more of its recipients. The reasons "
            "are listed below, and the message (or its headers) is attached."
        )
    elif kind == SUBJECT_MIXED:
        intro = (
            "Your message was delivered to some of its recipients but could not be delivered to "
            "others. Each recipient is listed below under what happened to it; there is no need "
            "to send the message again to those it reached."
        )
    elif kind == SUBJECT_DELAYED:
        until = f" until {format_date(retry_until)}" if retry_until is not None else ""
        intro = (
            f"Your message has not yet been delivered to one or more of its recipients after "
            f"{_duration(now - arrival)} in the queue. It stays in the queue and delivery will be "
            f"tried again{until}. This is a warning only: there is no need to send it again. "
            "You will be told if it finally cannot be delivered."
        )
    else:
        intro = (
            "Your message was delivered to the recipients listed below, as you asked to be "
            "told. A message handed on to a system that does not report back may still be "
            "bounced from there."
        )
    contact = one_line(postmaster) if postmaster else "postmaster"
    paragraphs = [f"This is the mail system at host {mta}.", intro]
    if withheld:
        paragraphs.append(
            f"You asked for the whole message to be returned (RET=FULL), but only its headers are attached: {withheld}."
        )
    paragraphs.append(f"For help, please write to {contact} and include this report.")
    lines: list[str] = []
    for p in paragraphs:
        lines.extend(textwrap.wrap(p, 72) or [""])
        lines.append("")
    lines.append("                   The mail system")
    lines.append("")
    for key, heading in _SECTIONS:
        members = [r for r in recipients if (r.action if r.action in ("failed", "delayed") else "success") == key]
        if not members:
            continue
        lines.append(heading)
        lines.append("")
        for r in members:
            lines.extend(textwrap.wrap(_recipient_line(r), 76, subsequent_indent="    ", break_on_hyphens=False))
            lines.append("")
    text = "\n".join(lines)
    described = field("Content-Description", "Notification")
    if text.isascii():
        return _Part(
            [described, field("Content-Type", "text/plain; charset=us-ascii"), cte("7bit")],
            crlf(text.encode("ascii")),
        )
    if international:  # the report is 8-bit anyway: the text as it reads
        return _Part(
            [described, field("Content-Type", "text/plain; charset=utf-8"), cte("8bit")],
            crlf(text.encode("utf-8")),
            eight_bit=True,
        )
    return _Part(
        [described, field("Content-Type", "text/plain; charset=utf-8"), cte("quoted-printable")],
        quoted_printable(text.encode("utf-8")),
    )


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 2 * 86400:
        return f"{seconds // 86400} days"
    if seconds >= 2 * 3600:
        return f"{seconds // 3600} hours"
    if seconds >= 120:
        return f"{seconds // 60} minutes"
    return f"{seconds} seconds"


def _recipient_line(r: DsnRecipient) -> str:
    diagnostic = one_line(r.diagnostic)[:_MAX_DIAGNOSTIC]
    if r.remote_mta and diagnostic and not _SAID_RE.match(diagnostic):
        diagnostic = f"host {one_line(r.remote_mta)} said: {diagnostic}"
    if r.action == "failed":
        what = diagnostic or f"delivery failed (status {r.status})"
    elif r.action == "delayed":
        what = f"delivery temporarily suspended: {diagnostic}" if diagnostic else f"delayed ({r.status})"
    else:
        to = f" to {one_line(r.remote_mta)}" if r.remote_mta else ""
        what = f"{r.action}{to}" + (f" ({diagnostic})" if diagnostic else "")
    return f"<{one_line(r.address)}>: {what}"


def _status_part(
    mta: str,
    queue_id: str,
    envid: str | None,
    arrival: float,
    sender: str,
    recipients: Sequence[DsnRecipient],
    retry_until: float | None,
    international: bool,
) -> _Part:
    # RFC 3464 §2.2: per-message fields, in the order of its grammar; then one block per recipient.
    fields: list[bytes] = []
    if envid:
        fields.append(field("Original-Envelope-Id", field_text(envid, international)))
    fields.append(field("Reporting-MTA", f"dns; {mta}"))
    fields.append(field("X-Mtaq-Queue-ID", escape(queue_id)))
    fields.append(field("X-Mtaq-Sender", address_field(sender, international)))
    fields.append(field("Arrival-Date", format_date(arrival)))
    blocks = [b"".join(fields)]
    for r in recipients:
        block: list[bytes] = []
        if r.orcpt:
            block.append(field("Original-Recipient", orcpt_field(r.orcpt, international)))
        block.append(field("Final-Recipient", address_field(r.address, international)))
        block.append(field("Action", r.action))
        block.append(field("Status", _status(r)))
        if r.remote_mta:
            block.append(field("Remote-MTA", f"dns; {field_text(r.remote_mta, international)}"))
        if r.diagnostic:
            # "smtp" when a remote server said it; our own words (DNS, connect errors) are ours.
            kind = "smtp" if r.remote_mta else "X-Mtaq"
            reply = field_text(r.diagnostic, international)
            reply = _SAID_RE.sub("", reply) if r.remote_mta else reply
            block.append(field("Diagnostic-Code", f"{kind}; {reply[:_MAX_DIAGNOSTIC]}"))
        if r.last_attempt is not None:
            block.append(field("Last-Attempt-Date", format_date(r.last_attempt)))
        if r.action == "delayed" and retry_until is not None:
            block.append(field("Will-Retry-Until", format_date(retry_until)))
        blocks.append(b"".join(block))
    body = strip_final_crlf(b"\r\n".join(blocks))
    content_type = "message/global-delivery-status" if international else "message/delivery-status"
    headers = [field("Content-Description", "Delivery report"), field("Content-Type", content_type)]
    if international:  # RFC 6533 §6.3: 8bit, unless the transport is 7-bit
        headers.append(cte("8bit"))
    return _Part(headers, body, eight_bit=not body.isascii())


def _original_part(whole: bytes, full: bool, international: bool, *, undelivered: bool) -> _Part:
    what = "Undelivered Message" if undelivered else "Message"  # a success report returns no failure
    if full:
        content_type = "message/global" if international else "message/rfc822"
        seven = whole.isascii()
        return _Part(
            [
                field("Content-Description", what),
                field("Content-Type", content_type),
                cte("7bit" if seven else "8bit"),
            ],
            whole,
            eight_bit=not seven,
        )
    headers = header_section(whole)
    description = field("Content-Description", f"{what} Headers")
    if international and lines_ok(headers):  # RFC 6533 §6.4: the UTF-8 headers of an internationalized message
        seven = headers.isascii()
        return _Part(
            [description, field("Content-Type", "message/global-headers"), cte("7bit" if seven else "8bit")],
            headers,
            eight_bit=not seven,
        )
    rfc822_headers = field("Content-Type", "text/rfc822-headers")
    if seven_bit_clean(headers):
        return _Part([description, rfc822_headers, cte("7bit")], headers)
    # any transfer encoding is allowed on a text/* part: 8-bit or over-long header lines stay 7-bit safe
    return _Part([description, rfc822_headers, cte("quoted-printable")], quoted_printable(headers))


def _status(r: DsnRecipient) -> str:
    status = r.status.strip()
    if _STATUS_RE.match(status):
        return status
    return {"failed": "5.0.0", "delayed": "4.0.0"}.get(r.action, "2.0.0")
