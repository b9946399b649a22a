"""Deliver a batch of messages to one destination: MX targets in turn, one connection per target
reused across messages (RSET between), at most 50 recipients per transaction.

Outcomes are per recipient and of three kinds, as in python-slimta: delivered, permanent failure
(bounce) and transient failure (retry later). Nothing here touches Redis: the job records outcomes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from common.envelope import Envelope
from worker.mime7bit import to_7bit
from worker.mx import DnsPermanent, DnsTransient, MXResolver, Target
from worker.smtpclient import ConnectFailed, ConnectionCache, RemoteReply, SMTPConnection

__all__ = ["Kind", "Outcome", "Parcel", "deliver"]

log = logging.getLogger("mtaq.delivery")

# RFC 5321 §4.5.3.1.8 obliges servers to take 100 recipients; Postfix sends 50 per transaction
# (smtp_destination_recipient_limit), which keeps a single 452 from deferring too many.
RCPTS_PER_TRANSACTION = 50


class Kind(str, Enum):
    SENT = "sent"
    BOUNCED = "bounced"
    DEFERRED = "deferred"


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: Kind
    dsn: str
    reply: str  # what to show: the remote reply, or our own diagnostic
    relay: str  # host[ip]:port, or "none"
    remote_mta: str = ""


@dataclass(slots=True)
class Parcel:
    """One message and the recipients (positions in its envelope) to deliver to this destination."""

    envelope: Envelope
    body: bytes
    rcpt_idx: list[int]
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    # what goes to a server without 8BITMIME: worked out (and logged) once per parcel
    body_7bit: bytes | None = field(default=None, repr=False)

    def pending(self) -> list[int]:
        return [i for i in self.rcpt_idx if i not in self.outcomes or self.outcomes[i].kind is Kind.DEFERRED]


def _fail_all(parcels: Sequence[Parcel], outcome: Outcome) -> None:
    for p in parcels:
        for i in p.pending():
            p.outcomes[i] = outcome


def utf8_addresses(env: Envelope) -> bool:
    return not (env.sender.isascii() and all(r.address.isascii() for r in env.recipients))


def needs_smtputf8(env: Envelope, body: bytes) -> bool:
    """Whether an SMTPUTF8 message really needs it: a non-ASCII address or header. A client may ask
    for SMTPUTF8 on all-ASCII mail; like Postfix, such mail goes to a server without it unchanged."""
    if utf8_addresses(env):
        return True
    head, _, _ = body.partition(b"\r\n\r\n")
    return not head.isascii()


def body_to_send(parcel: Parcel, conn: SMTPConnection) -> bytes:
    """The message as this server may take it. 8-bit mail (BODY=8BITMIME, or octets above 127 in
    it) to a server without 8BITMIME is converted to 7-bit MIME (RFC 6152 §3), as Postfix does
    (disable_mime_output_conversion = no). A message that cannot be converted (8-bit header fields,
    8-bit text without MIME) goes unchanged, as Postfix sends it: see worker/mime7bit.py."""
    body = parcel.body
    if conn.supports("8bitmime") or (not parcel.envelope.body_8bit and body.isascii()):
        return body
    if parcel.body_7bit is None:
        converted = to_7bit(body)
        if converted is None:
            log.info("%s: cannot convert 8BITMIME to 7BIT MIME: sending 8-bit content unchanged", parcel.envelope.id)
            parcel.body_7bit = body
        else:
            if converted is not body:
                log.info("%s: 8BITMIME to 7BIT MIME conversion", parcel.envelope.id)
            parcel.body_7bit = converted
    return parcel.body_7bit


def mail_options(env: Envelope, body: bytes, conn: SMTPConnection) -> list[str] | Outcome:
    """MAIL FROM parameters for ``body``, the message as it will be sent (``body_to_send``)."""
    opts: list[str] = []
    if conn.supports("size"):
        opts.append(f"SIZE={len(body)}")  # RFC 1870: lets the server refuse before the data is sent
    if env.body_8bit and conn.supports("8bitmime"):
        opts.append("BODY=8BITMIME")
    if env.smtputf8 or utf8_addresses(env):
        if conn.supports("smtputf8"):
            opts.append("SMTPUTF8")
        elif needs_smtputf8(env, body):
            # RFC 6531 §3.4: no downgrade; a permanent failure as Postfix reports it
            return Outcome(Kind.BOUNCED, "5.6.7", "SMTPUTF8 is required, but was not offered by host", "")
    return opts


Recorder = Callable[[Parcel, list[int]], None]


def deliver(
    destination: str,
    parcels: Sequence[Parcel],
    *,
    resolver: MXResolver,
    port: int,
    helo_name: str,
    connect_timeout: float,
    timeout: float,
    record: Recorder | None = None,
    cache: ConnectionCache | None = None,
) -> None:
    """Fill in ``parcel.outcomes`` for every recipient of every parcel.

    ``record(parcel, positions)`` is called right after a transaction with the recipients whose
    outcome became final there (sent or bounced), so that they are marked before anything else is
    tried: a job re-run after a crash does not send them again."""
    try:
        targets = resolver.targets(destination, port)
    except DnsPermanent as e:
        _fail_all(parcels, Outcome(Kind.BOUNCED, e.dsn, e.text, "none"))
        return
    except DnsTransient as e:
        _fail_all(parcels, Outcome(Kind.DEFERRED, e.dsn, e.text, "none"))
        return
    if not targets:
        _fail_all(parcels, Outcome(Kind.DEFERRED, "4.4.4", f"No route to {destination}", "none"))
        return
    last: Outcome = Outcome(Kind.DEFERRED, "4.4.1", f"No reachable host for {destination}", "none")
    for target in targets:
        if not any(p.pending() for p in parcels):
            return
        relay = f"{target.hostname}[{target.ip}]:{target.port}"
        conn = cache.take(target.ip, target.port) if cache is not None else None
        try:
            if conn is None:
                conn = SMTPConnection(helo_name=helo_name, connect_timeout=connect_timeout, timeout=timeout)
                conn.open(target.ip, target.port, name=target.hostname)
        except ConnectFailed as e:
            log.info("%s", e.text)
            reply = e.reply
            if reply is not None and reply.permanent:
                # a 5xx greeting: Postfix skips to the next MX (smtp_skip_5xx_greeting)
                last = Outcome(Kind.DEFERRED, "4" + reply.dsn[1:], e.text, relay, target.hostname)
            elif reply is not None:
                last = Outcome(Kind.DEFERRED, reply.dsn, e.text, relay, target.hostname)
            else:
                last = Outcome(Kind.DEFERRED, "4.4.1", e.text, "none", target.hostname)
            _defer_pending(parcels, last)
            continue
        try:
            _send_parcels(conn, parcels, relay, target, record)
        except BaseException:
            conn.close()  # its state is unknown: never cached
            raise
        if cache is not None:
            cache.give(target.ip, target.port, conn)
        else:
            conn.quit()
    # whatever is still pending keeps the last transient outcome it got (or the last connect failure)
    _defer_pending(parcels, last, only_unset=True)


def _defer_pending(parcels: Sequence[Parcel], outcome: Outcome, *, only_unset: bool = False) -> None:
    for p in parcels:
        for i in p.pending():
            if not (only_unset and i in p.outcomes):
                p.outcomes[i] = outcome


def _send_parcels(
    conn: SMTPConnection, parcels: Sequence[Parcel], relay: str, target: Target, record: Recorder | None
) -> None:
    for parcel in parcels:
        pending = parcel.pending()
        if not pending:
            continue
        if not conn.alive:
            return
        if not _send_parcel(conn, parcel, pending, relay, target, record):
            return


def _send_parcel(
    conn: SMTPConnection, parcel: Parcel, pending: list[int], relay: str, target: Target, record: Recorder | None
) -> bool:
    """One message's transactions on this connection; False when the connection is gone."""
    env = parcel.envelope
    body = body_to_send(parcel, conn)
    opts = mail_options(env, body, conn)
    if isinstance(opts, Outcome):
        for i in pending:
            parcel.outcomes[i] = Outcome(opts.kind, opts.dsn, opts.reply, relay, target.hostname)
        if record is not None:
            record(parcel, pending)
        return True
    for start in range(0, len(pending), RCPTS_PER_TRANSACTION):
        chunk = pending[start : start + RCPTS_PER_TRANSACTION]
        try:
            result = conn.send(env.sender, [env.recipients[i].address for i in chunk], body, mail_options=opts)
        except Exception:
            # a surprise in the client (a bug, an address it cannot encode) must not stop the
            # other messages of the job, nor leave the connection mid-transaction for the next
            log.exception("%s: unexpected error while sending to %s", env.id, relay)
            conn.close()
            oops = Outcome(
                Kind.DEFERRED, "4.3.0", "internal error while sending (see the worker log)", relay, target.hostname
            )
            for i in parcel.pending():
                parcel.outcomes[i] = oops
            return False
        for pos, reply in result.replies.items():
            parcel.outcomes[chunk[pos]] = _outcome(reply, relay, target.hostname)
        final = [i for i in chunk if i in parcel.outcomes and parcel.outcomes[i].kind is not Kind.DEFERRED]
        if final and record is not None:
            record(parcel, final)
        if result.broken:
            what = f"conversation with {relay} timed out" if result.timed_out else f"lost connection with {relay}"
            lost = Outcome(Kind.DEFERRED, "4.4.2", f"{what} while sending message", relay, target.hostname)
            for i in chunk:
                if i not in result.replies:
                    parcel.outcomes[i] = lost
            return False
        # after a transaction the server is reset by itself (RFC 5321 §4.1.1.4); send() sent
        # RSET after one that failed part-way
        if not conn.alive:
            return False
    return True


def _outcome(reply: RemoteReply, relay: str, host: str) -> Outcome:
    if 200 <= reply.code < 300:
        return Outcome(Kind.SENT, reply.dsn, str(reply), relay, host)
    if reply.permanent:
        return Outcome(Kind.BOUNCED, reply.dsn, f"host {relay} said: {reply}", relay, host)
    return Outcome(Kind.DEFERRED, reply.dsn, f"host {relay} said: {reply}", relay, host)


def log_attempt(qid: str, rcpt: str, outcome: Outcome, received_at: float, status: str | None = None) -> None:
    """Postfix's one line per delivery attempt: queue id, recipient, relay, delay, dsn, status, reply."""
    delay = time.time() - received_at
    log.info(
        "%s: to=<%s>, relay=%s, delay=%.2f, dsn=%s, status=%s (%s)",
        qid,
        rcpt,
        outcome.relay or "none",
        delay,
        outcome.dsn,
        status or outcome.kind.value,
        outcome.reply,
    )
