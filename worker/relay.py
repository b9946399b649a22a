"""Conversations with one destination: MX targets in turn, a connection reused across messages up
to destination_messages_per_connection, at most 50 recipients per transaction. The conversations
of a process with one destination take their parcels from its lane (worker/lane.py); each runs in
its own thread (worker/crew.py starts them).

Outcomes are per recipient (worker/parcel.py). Nothing here touches Redis: the job records
outcomes.

A function here that cannot do its job for some recipients refuses by raising: ``Undeliverable``
carries the outcome they get, the edges' exceptions (``DnsError``, ``ConnectFailed``) carry what
it is made from. The one caller that records outcomes turns them into ``Outcome``.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from common.classify import classify
from common.envelope import LOG_STATUS, Envelope, RcptState
from common.mime7bit import to_7bit
from common.mx import DnsError, MXResolver, Target
from common.smtp.reply import Reply
from worker.lane import Lane
from worker.parcel import Outcome, Parcel, Undeliverable
from worker.smarthost import AuthLog, Smarthost
from worker.smtpclient import Checker, ConnectFailed, SMTPConnection, TLSPolicyFailed
from worker.tlspolicy import OPPORTUNISTIC, Requirement, requiretls_refusal

__all__ = ["Dialer", "Opened", "converse", "log_attempt", "resolve"]

log = logging.getLogger("mtaq.delivery")

# RFC 5321 §4.5.3.1.8 obliges servers to take 100 recipients; Postfix sends 50 per transaction
# (smtp_destination_recipient_limit), which keeps a single 452 from deferring too many.
RCPTS_PER_TRANSACTION = 50


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
    8-bit text without MIME) goes unchanged, as Postfix sends it: see common/mime7bit.py."""
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
    if env.requiretls:
        relay = conn.client.relay if conn.client is not None else "the host"
        refusal = requiretls_refusal(conn.tls_used, conn.supports("requiretls"), relay)
        if refusal is not None:
            # RFC 8689 §5: never sent without verified TLS; the DSN (ordinary mail) says why
            raise Undeliverable(Outcome(RcptState.BOUNCED, "5.7.30", refusal, ""))
        opts.append("REQUIRETLS")
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


@dataclass(slots=True)
class Dialer:
    """How a conversation opens connections: our name, the port, the timeouts."""

    helo_name: str
    port: int
    connect_timeout: float
    timeout: float
    messages_per_connection: int = 100
    smarthost: Smarthost | None = None  # the relayhost's login (worker/smarthost.py)
    auth_log: AuthLog = field(default_factory=AuthLog)

    def login(self, target: Target) -> tuple[tuple[str, str] | None, ssl.SSLContext | None]:
        """The credentials and verifying TLS context for this target, (None, None) if it needs none."""
        if self.smarthost is None or not self.smarthost.applies(target.hostname, target.port):
            return None, None
        return self.smarthost.credentials, self.smarthost.tls

    def dial(
        self, target: Target, require: Requirement = OPPORTUNISTIC, check: Checker | None = None
    ) -> SMTPConnection:
        """A connection to ``target``, greeted, EHLOed, with TLS as ``require`` says (``check``: the
        destination's certificate check), logged in when it is the relayhost with a login
        (``login``: STARTTLS verified for its name first, whatever ``require`` says). Raises
        ConnectFailed (TLSPolicyFailed when the policy refuses the host; ``auth`` set when the
        login failed or could not be sent safely, logged here once per relayhost). (Unit tests put
        an in-memory peer here.)"""
        auth, verify = self.login(target)
        conn = SMTPConnection(helo_name=self.helo_name, connect_timeout=self.connect_timeout, timeout=self.timeout)
        try:
            conn.open(
                target.ip, target.port, name=target.hostname, require=require, check=check, auth=auth, verify=verify
            )
        except ConnectFailed as e:
            if e.auth:
                self.auth_log.failed(str(target), e.text)  # once per relayhost, not per message
            raise
        if auth is not None:
            self.auth_log.succeeded(str(target))
        return conn


@dataclass(slots=True)
class Opened:
    """A live connection: the target (index) it goes to and how many messages it carried."""

    conn: SMTPConnection
    target: int
    sent: int = 0
    to: Target | None = None
    relaxed: bool = False  # opened without the destination's TLS policy, for TLS-Required: No mail


def converse(
    lane: Lane,
    dialer: Dialer,
    *,
    opened: Opened | None = None,
    stopping: Callable[[], bool] = lambda: False,
    pace: Callable[[], None] = lambda: None,
    feedback: Callable[[bool, str], None] = lambda ok, why: None,
) -> tuple[Opened | None, bool]:
    """One conversation: take parcels from ``lane`` and send them, target after target, until
    none is left for it. Returns the connection still open and reusable (for the cache), else None,
    and whether it reached any server. ``feedback(ok, why)`` hears of each failed connection, each
    connection the server greeted and each delivered message (slow start, dead destinations)."""
    targets = lane.targets
    reached = opened is not None
    tried = reached  # whether it tried any server: one that found nothing to send failed nowhere
    record = lane.record
    first = opened.target if opened is not None else 0
    for t in range(first, len(targets)):
        target = targets[t]
        relay = str(target)
        relaxed = False  # a connection without the policy, for TLS-Required: No mail only
        while lane.has(t, relaxed) and not stopping():
            if opened is not None and opened.target != t:
                opened.conn.quit()
                opened = None
            if opened is None:
                tried = True
                policy = None if relaxed else lane.tls
                require = policy.require(target) if policy is not None else OPPORTUNISTIC
                try:
                    if require.refuse is not None:
                        raise TLSPolicyFailed(require.refuse)  # this MX may not be used: not even a connect
                    # the relayhost's login (Dialer.login) is not the policy: TLS-Required: No
                    # (relaxed) never relaxes it, the password is ours to protect
                    conn = dialer.dial(target, require, policy.check if policy is not None else None)
                    if conn.tls_failure is not None:
                        log.info("%s: %s", relay, conn.tls_failure.text)  # testing mode: delivered, noted
                    if policy is not None:
                        policy.report(require, target.hostname, conn.tls_failure)
                except TLSPolicyFailed as e:
                    # the host answers, it just may not have this mail: no word to the throttle
                    log.info("%s: %s", relay, e.text)
                    lane.failed(_connect_outcome(e, relay, target))
                    if policy is not None:
                        policy.report(require, target.hostname, e.failure)
                    if not relaxed and lane.has(t, True):
                        relaxed = True  # again without the policy, for the mail that asked for that
                        continue
                    break  # the next address
                except ConnectFailed as e:
                    if not e.auth:  # a login's failure: Dialer.dial logged it, once per relayhost
                        log.info("%s", e.text)
                    lane.failed(_connect_outcome(e, relay, target))
                    feedback(False, e.text)
                    break  # the next address
                opened = Opened(conn, t, to=target, relaxed=relaxed)
                reached = True
                # slow start: a server that limits connections says so when it greets (421, or no
                # answer at all), so a greeted connection grows the window at once: a server slow
                # to accept mail (1 s at DATA) held the window at 5 for a second, then 10 for
                # another (bench.slowdest)
                feedback(True, "")
            parcel = lane.take(t, relaxed)
            if parcel is None:
                break
            try:
                pace()
            except BaseException:
                lane.back(parcel, t)  # not sent: it waits for its turn again, here
                raise
            if stopping():
                # asked to stop while paced or held (worker/outcomes.py: a stalled outcome write,
                # Redis down): not sent, it goes back with the rest, and nothing is delivered that
                # might not be recorded
                lane.back(parcel, t)
                break
            try:
                alive = _send_parcel(
                    opened.conn, parcel, parcel.pending(), relay, target, record, last=t + 1 >= len(targets)
                )
            except BaseException:
                opened.conn.close()  # its state is unknown: never reused
                lane.back(parcel, t + 1)
                raise
            opened.sent += 1
            delivered = any(o.state is RcptState.DELIVERED for o in parcel.outcomes.values())
            if parcel.pending() and t + 1 < len(targets):
                lane.back(parcel, t + 1)  # deferred here: the next MX may take it
            else:
                lane.finished(parcel)
            if delivered:
                feedback(True, "")  # slow start: the window grows while deliveries succeed
            if not alive or not opened.conn.alive:
                opened.conn.close()
                opened = None
                break  # the server broke off: the rest go to the next address
            if opened.sent >= dialer.messages_per_connection:
                opened.conn.quit()  # destination_messages_per_connection: a fresh connection
                opened = None
    # A conversation that found no parcel for it (another took them) reports "reached": its
    # caller fails what waits with the last failure when none was reached, and parcels a new job
    # added meanwhile must not get "No reachable host" from a conversation that never tried.
    reached = reached or not tried
    if opened is not None and opened.relaxed:
        opened.conn.quit()  # opened without the policy (TLS-Required: No): never cached for other mail
        return None, reached
    if opened is not None and (not opened.conn.alive or opened.sent >= dialer.messages_per_connection):
        opened.conn.quit()
        return None, reached
    return opened, reached


def _connect_outcome(e: ConnectFailed, relay: str, target: Target) -> Outcome:
    if isinstance(e, TLSPolicyFailed):
        # the diagnostic names the policy and what failed; never 5xx: the next attempt may succeed
        return Outcome(RcptState.DEFERRED, e.failure.dsn, e.text, relay, target.hostname, "none")
    reply = e.reply
    if reply is not None and reply.outcome is RcptState.BOUNCED:
        # a 5xx greeting: Postfix skips to the next MX (smtp_skip_5xx_greeting) and defers
        return Outcome(RcptState.DEFERRED, "4" + reply.dsn[1:], e.text, relay, target.hostname)
    if reply is not None:
        return Outcome(RcptState.DEFERRED, reply.dsn, e.text, relay, target.hostname)
    return Outcome(RcptState.DEFERRED, e.dsn or "4.4.1", e.text, "none", target.hostname)


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


def _send_parcel(
    conn: SMTPConnection,
    parcel: Parcel,
    pending: list[int],
    relay: str,
    target: Target,
    record: Recorder | None,
    *,
    last: bool = True,
) -> bool:
    """One message's transactions on this connection; False when the connection is gone. ``last``:
    no MX address comes after this one."""
    env = parcel.envelope
    body = body_to_send(parcel, conn)
    try:
        opts = mail_options(env, body, conn)
    except Undeliverable as e:
        state, dsn = e.outcome.state, e.outcome.dsn
        if dsn == "5.7.30" and not last:
            state, dsn = RcptState.DEFERRED, "4.7.30"  # RFC 8689 §5.2: the next MX may satisfy REQUIRETLS
        refused = Outcome(state, dsn, e.outcome.reply, relay, target.hostname, str(conn.tls_used))
        for i in pending:
            parcel.outcomes[i] = refused
        if record is not None and state is not RcptState.DEFERRED:
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
        tls = str(conn.tls_used)
        for pos, reply in result.replies.items():
            parcel.outcomes[chunk[pos]] = _outcome(reply, relay, target.hostname, tls)
        final = [i for i in chunk if i in parcel.outcomes and parcel.outcomes[i].state is not RcptState.DEFERRED]
        if final and record is not None:
            record(parcel, final)
        if result.broken:
            what = f"conversation with {relay} timed out" if result.timed_out else f"lost connection with {relay}"
            lost = Outcome(RcptState.DEFERRED, "4.4.2", f"{what} while sending message", relay, target.hostname, tls)
            for i in chunk:
                if i not in result.replies:
                    parcel.outcomes[i] = lost
            return False
        # after a transaction the server is reset by itself (RFC 5321 §4.1.1.4); send() sent
        # RSET after one that failed part-way
        if not conn.alive:
            return False
    return True


def _outcome(reply: Reply, relay: str, host: str, tls: str = "") -> Outcome:
    state = reply.outcome
    if state is RcptState.DELIVERED:
        return Outcome(state, reply.dsn, str(reply), relay, host, tls)
    return Outcome(state, reply.dsn, f"host {relay} said: {reply}", relay, host, tls)


def log_attempt(qid: str, rcpt: str, outcome: Outcome, received_at: float) -> None:
    """Postfix's one line per delivery attempt: queue id, recipient, relay, delay, tls (what the
    session had, issue 21), dsn, the bounce class of a failure (common/classify.py), status
    (Postfix's word for the outcome, ``LOG_STATUS``), reply."""
    delay = time.time() - received_at
    failed = "" if outcome.state is RcptState.DELIVERED else f"class={classify(outcome.dsn, outcome.reply).value}, "
    log.info(
        "%s: to=<%s>, relay=%s, delay=%.2f, tls=%s, dsn=%s, %sstatus=%s (%s)",
        qid,
        rcpt,
        outcome.relay or "none",
        delay,
        outcome.tls or "none",
        outcome.dsn,
        failed,
        LOG_STATUS[outcome.state],
        outcome.reply,
    )
