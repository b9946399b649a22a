"""Conversations with one destination: MX targets in turn, a connection reused across messages up
to destination_messages_per_connection, at most 50 recipients per transaction. Several
conversations of one job share its parcels (``Work``); each runs in its own thread.

Outcomes are per recipient, in mtaq's one vocabulary (``RcptState``): DELIVERED, BOUNCED (a
permanent failure) or DEFERRED (a transient failure: retry later), as in python-slimta. Nothing
here touches Redis: the job records outcomes.

A function here that cannot do its job for some recipients refuses by raising: ``Undeliverable``
carries the outcome they get, the edges' exceptions (``DnsError``, ``ConnectFailed``) carry what
it is made from. The one caller that records outcomes turns them into ``Outcome``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from common.classify import classify
from common.envelope import LOG_STATUS, Envelope, RcptState
from worker.mime7bit import to_7bit
from worker.mx import DnsError, MXResolver, Target
from worker.smtpclient import ConnectFailed, RemoteReply, SMTPConnection

__all__ = [
    "Dialer",
    "Opened",
    "Outcome",
    "Owner",
    "Parcel",
    "Undeliverable",
    "Work",
    "converse",
    "deliver",
    "resolve",
]

log = logging.getLogger("mtaq.delivery")

# RFC 5321 §4.5.3.1.8 obliges servers to take 100 recipients; Postfix sends 50 per transaction
# (smtp_destination_recipient_limit), which keeps a single 452 from deferring too many.
RCPTS_PER_TRANSACTION = 50


@dataclass(frozen=True, slots=True)
class Outcome:
    state: RcptState  # DELIVERED, BOUNCED or DEFERRED (never PENDING)
    dsn: str
    reply: str  # what to show: the remote reply, or our own diagnostic
    relay: str  # host[ip]:port, or "none"
    remote_mta: str = ""


class Undeliverable(Exception):
    """The recipients at hand cannot be delivered here: ``outcome`` says what they get."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(f"{outcome.dsn} {outcome.reply}")
        self.outcome = outcome


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
        return [i for i in self.rcpt_idx if i not in self.outcomes or self.outcomes[i].state is RcptState.DEFERRED]


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


def mail_options(env: Envelope, body: bytes, conn: SMTPConnection) -> list[str]:
    """MAIL FROM parameters for ``body``, the message as it will be sent (``body_to_send``).
    Raises Undeliverable when this server cannot take it as it is."""
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
            raise Undeliverable(
                Outcome(RcptState.BOUNCED, "5.6.7", "SMTPUTF8 is required, but was not offered by host", "")
            )
    return opts


Recorder = Callable[[Parcel, list[int]], None]


class Owner(Protocol):
    """The job a parcel belongs to: it records final outcomes and hears when a parcel is done."""

    def record(self, parcel: Parcel, positions: list[int]) -> None: ...

    def done(self, parcel: Parcel) -> None: ...


class _Solo:
    def __init__(self, record: Recorder | None) -> None:
        self._record = record

    def record(self, parcel: Parcel, positions: list[int]) -> None:
        if self._record is not None:
            self._record(parcel, positions)

    def done(self, parcel: Parcel) -> None:
        pass


class Work:
    """Parcels waiting for a conversation with one destination, shared by the conversations of a
    process (threads) and fed by its jobs (each parcel keeps its ``Owner``). A parcel carries a
    floor: the first target (MX address, in order) it may still be tried at; a conversation on
    target ``t`` takes parcels whose floor is at most ``t``. A parcel deferred at ``t`` comes back
    with floor ``t + 1``: the next MX gets its turn, as in Postfix."""

    def __init__(self, targets: Sequence[Target], parcels: Sequence[Parcel] = (), owner: Owner | None = None) -> None:
        self.targets = list(targets)
        self._queue: list[tuple[Parcel, int]] = []
        self._owners: dict[int, Owner] = {}
        self._lock = threading.Lock()
        self.conversations = 0  # running now (the service counts them)
        self.staff_after = 0.0  # monotonic time before which no new conversation is asked for
        self.last = Outcome(RcptState.DEFERRED, "4.4.1", "No reachable host", "none")
        if parcels:
            self.add(parcels, owner or _Solo(None))

    def add(self, parcels: Sequence[Parcel], owner: Owner) -> None:
        with self._lock:
            for p in parcels:
                if p.pending():
                    self._queue.append((p, 0))
                    self._owners[id(p)] = owner

    def take(self, t: int) -> Parcel | None:
        with self._lock:
            for n, (parcel, floor) in enumerate(self._queue):
                if floor <= t:
                    del self._queue[n]
                    return parcel
        return None

    def back(self, parcel: Parcel, floor: int) -> None:
        with self._lock:
            self._queue.append((parcel, floor))

    def has(self, t: int) -> bool:
        with self._lock:
            return any(floor <= t for _, floor in self._queue)

    def __len__(self) -> int:
        with self._lock:
            return len(self._queue)

    def record(self, parcel: Parcel, positions: list[int]) -> None:
        owner = self._owners.get(id(parcel))
        if owner is not None:
            owner.record(parcel, positions)

    def finished(self, parcel: Parcel) -> None:
        """A conversation is done with this parcel (it is not coming back)."""
        with self._lock:
            owner = self._owners.pop(id(parcel), None)
        if owner is not None:
            owner.done(parcel)

    def withdraw(self, parcels: Sequence[Parcel]) -> list[Parcel]:
        """Take these parcels back out, those still waiting (their job hands them back)."""
        mine = {id(p) for p in parcels}
        with self._lock:
            out = [p for p, _ in self._queue if id(p) in mine]
            self._queue = [(p, f) for p, f in self._queue if id(p) not in mine]
            for p in out:
                self._owners.pop(id(p), None)
        return out

    def left(self) -> list[Parcel]:
        """Everything still waiting, taken out (no conversation will take it)."""
        with self._lock:
            out = [p for p, _ in self._queue]
            self._queue.clear()
            owners = [self._owners.pop(id(p), None) for p in out]
        for p, owner in zip(out, owners, strict=True):
            if owner is not None:
                owner.done(p)
        return out

    def failed(self, outcome: Outcome) -> None:
        with self._lock:
            self.last = outcome


@dataclass(slots=True)
class Dialer:
    """How a conversation opens connections: our name, the port, the timeouts."""

    helo_name: str
    port: int
    connect_timeout: float
    timeout: float
    messages_per_connection: int = 100


@dataclass(slots=True)
class Opened:
    """A live connection: the target (index) it goes to and how many messages it carried."""

    conn: SMTPConnection
    target: int
    sent: int = 0
    to: Target | None = None


def converse(
    work: Work,
    dialer: Dialer,
    *,
    opened: Opened | None = None,
    stopping: Callable[[], bool] = lambda: False,
    pace: Callable[[], None] = lambda: None,
    feedback: Callable[[bool, str], None] = lambda ok, why: None,
) -> tuple[Opened | None, bool]:
    """One conversation: take parcels from ``work`` and send them, target after target, until
    none is left for it. Returns the connection still open and reusable (for the cache), else None,
    and whether it reached any server. ``feedback(ok, why)`` hears of each failed connection and
    each delivered message (slow start, dead destinations)."""
    targets = work.targets
    reached = opened is not None
    record = work.record
    first = opened.target if opened is not None else 0
    for t in range(first, len(targets)):
        target = targets[t]
        relay = str(target)
        while work.has(t) and not stopping():
            if opened is not None and opened.target != t:
                opened.conn.quit()
                opened = None
            if opened is None:
                conn = SMTPConnection(
                    helo_name=dialer.helo_name, connect_timeout=dialer.connect_timeout, timeout=dialer.timeout
                )
                try:
                    conn.open(target.ip, target.port, name=target.hostname)
                except ConnectFailed as e:
                    log.info("%s", e.text)
                    work.failed(_connect_outcome(e, relay, target))
                    feedback(False, e.text)
                    break  # the next address
                opened = Opened(conn, t, to=target)
                reached = True
            parcel = work.take(t)
            if parcel is None:
                break
            pace()
            try:
                alive = _send_parcel(opened.conn, parcel, parcel.pending(), relay, target, record)
            except BaseException:
                opened.conn.close()  # its state is unknown: never reused
                work.back(parcel, t + 1)
                raise
            opened.sent += 1
            if any(o.state is RcptState.DELIVERED for o in parcel.outcomes.values()):
                feedback(True, "")  # slow start: the window grows while deliveries succeed
            if parcel.pending() and t + 1 < len(targets):
                work.back(parcel, t + 1)  # deferred here: the next MX may take it
            else:
                work.finished(parcel)
            if not alive or not opened.conn.alive:
                opened.conn.close()
                opened = None
                break  # the server broke off: the rest go to the next address
            if opened.sent >= dialer.messages_per_connection:
                opened.conn.quit()  # destination_messages_per_connection: a fresh connection
                opened = None
    if opened is not None and (not opened.conn.alive or opened.sent >= dialer.messages_per_connection):
        opened.conn.quit()
        return None, reached
    return opened, reached


def _connect_outcome(e: ConnectFailed, relay: str, target: Target) -> Outcome:
    reply = e.reply
    if reply is not None and reply.outcome is RcptState.BOUNCED:
        # a 5xx greeting: Postfix skips to the next MX (smtp_skip_5xx_greeting) and defers
        return Outcome(RcptState.DEFERRED, "4" + reply.dsn[1:], e.text, relay, target.hostname)
    if reply is not None:
        return Outcome(RcptState.DEFERRED, reply.dsn, e.text, relay, target.hostname)
    return Outcome(RcptState.DEFERRED, "4.4.1", e.text, "none", target.hostname)


def resolve(resolver: MXResolver, destination: str, port: int) -> list[Target]:
    """The addresses to try. Raises Undeliverable with the outcome for every recipient when there
    are none."""
    try:
        targets = resolver.targets(destination, port)
    except DnsError as e:
        raise Undeliverable(Outcome(e.state, e.dsn, e.text, "none")) from None
    if not targets:
        raise Undeliverable(Outcome(RcptState.DEFERRED, "4.4.4", f"No route to {destination}", "none"))
    return targets


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
) -> None:
    """Fill in ``parcel.outcomes`` for every recipient of every parcel, in one conversation
    (the delivery service runs several at once, see worker/service.py).

    ``record(parcel, positions)`` is called right after a transaction with the recipients whose
    outcome became final there (sent or bounced), so that they are marked before anything else is
    tried: a job re-run after a crash does not send them again."""
    try:
        found = resolve(resolver, destination, port)
    except Undeliverable as e:
        fail_all(parcels, e.outcome)
        return
    work = Work(found, parcels, _Solo(record))
    opened, _ = converse(work, Dialer(helo_name, port, connect_timeout, timeout))
    if opened is not None:
        opened.conn.quit()
    defer_left(parcels, work)


def fail_all(parcels: Sequence[Parcel], outcome: Outcome) -> None:
    for p in parcels:
        for i in p.pending():
            p.outcomes[i] = outcome


def defer_left(parcels: Sequence[Parcel], work: Work) -> None:
    """Whatever is still pending keeps the last transient outcome it got, or gets the last
    connection failure."""
    work.left()
    for p in parcels:
        for i in p.pending():
            if i not in p.outcomes:
                p.outcomes[i] = work.last


def _send_parcel(
    conn: SMTPConnection, parcel: Parcel, pending: list[int], relay: str, target: Target, record: Recorder | None
) -> bool:
    """One message's transactions on this connection; False when the connection is gone."""
    env = parcel.envelope
    body = body_to_send(parcel, conn)
    try:
        opts = mail_options(env, body, conn)
    except Undeliverable as e:
        refused = Outcome(e.outcome.state, e.outcome.dsn, e.outcome.reply, relay, target.hostname)
        for i in pending:
            parcel.outcomes[i] = refused
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
                RcptState.DEFERRED, "4.3.0", "internal error while sending (see the worker log)", relay, target.hostname
            )
            for i in parcel.pending():
                parcel.outcomes[i] = oops
            return False
        for pos, reply in result.replies.items():
            parcel.outcomes[chunk[pos]] = _outcome(reply, relay, target.hostname)
        final = [i for i in chunk if i in parcel.outcomes and parcel.outcomes[i].state is not RcptState.DEFERRED]
        if final and record is not None:
            record(parcel, final)
        if result.broken:
            what = f"conversation with {relay} timed out" if result.timed_out else f"lost connection with {relay}"
            lost = Outcome(RcptState.DEFERRED, "4.4.2", f"{what} while sending message", relay, target.hostname)
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
    state = reply.outcome
    if state is RcptState.DELIVERED:
        return Outcome(state, reply.dsn, str(reply), relay, host)
    return Outcome(state, reply.dsn, f"host {relay} said: {reply}", relay, host)


def log_attempt(qid: str, rcpt: str, outcome: Outcome, received_at: float) -> None:
    """Postfix's one line per delivery attempt: queue id, recipient, relay, delay, dsn, the bounce
    class of a failure (common/classify.py), status (Postfix's word for the outcome,
    ``LOG_STATUS``), reply."""
    delay = time.time() - received_at
    failed = "" if outcome.state is RcptState.DELIVERED else f"class={classify(outcome.dsn, outcome.reply).value}, "
    log.info(
        "%s: to=<%s>, relay=%s, delay=%.2f, dsn=%s, %sstatus=%s (%s)",
        qid,
        rcpt,
        outcome.relay or "none",
        delay,
        outcome.dsn,
        failed,
        LOG_STATUS[outcome.state],
        outcome.reply,
    )
