"""asyncio glue around the sans-IO session: it owns the client connections (ingress/verify.py
opens only its own outbound probes to the next hop).

Feeds bytes into ``Session``, writes its replies, and carries out what it asks for: store a message
(group commit), upgrade to TLS, check a password. Also enforces what needs a clock or a view of every
connection: the idle deadline, connection limits, the AUTH failure limiter, graceful shutdown.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import socket
import ssl
import time
from collections import Counter
from collections.abc import Coroutine
from typing import Any, cast

from common import metrics
from common.dkimkeys import KeyTable
from common.envelope import DkimPending, Envelope, new_queue_id
from common.events import Event as DeliveryEvent
from common.events import receptions
from common.spool import Spool
from common.store import Message
from common.suppression import SuppressionCache
from ingress import replies
from ingress.auth import AuthLimiter, Credentials
from ingress.commit import Committer, StorageRefused
from ingress.config import IngressConfig
from ingress.events import AwaitFlow, VerifyRecipient
from ingress.flow import Backlog, FlowGate, read_backlog
from ingress.notes import Note, NoteLog, reject_line
from ingress.received import received_header
from ingress.recipients import RecipientTable
from ingress.session import (
    Authenticate,
    Close,
    Event,
    Peer,
    Send,
    Session,
    StartTLS,
    Transaction,
)
from ingress.signing import TrustedMail
from ingress.suppression import SuppressionGate, event_writer
from ingress.verify import make_verifier

__all__ = ["Ingress", "SMTPProtocol", "make_ssl_context"]

log = logging.getLogger("mtaq.ingress")

# A slow client must complete a command, or send this many octets of message data, within the idle
# timeout: one byte a second (slowloris) does not keep a connection alive.
PROGRESS_OCTETS = 512
# After we close a connection (221, 421, EOF), the close must complete within this many seconds or
# the connection is aborted: a client that reads nothing, or never answers a TLS close_notify,
# would otherwise hold its slot (and its share of max_connections_per_client) indefinitely.
CLOSE_GRACE = 2.0
# Input the TLS layer may hand us between the end of the handshake and our handshake task resuming:
# one round of pipelined commands at most (RFC 2920); more than this aborts the connection.
MAX_EARLY_TLS_DATA = 64 * 1024


def make_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


class Ingress:
    """What every connection of one ingress process shares."""

    def __init__(self, spool: Spool, config: IngressConfig) -> None:
        self.flow = _flow_gate(spool, config)
        self.committer = Committer(
            spool,
            max_batch=config.commit_max_messages,
            max_queue=config.max_queue,
            wait=config.commit_wait,
            open_transactions=self.open_transactions,
            on_commit=self.flow.wrote,
            events=_receptions if spool.store.events_max > 0 else None,
        )
        self.recipients = RecipientTable(config.relay_recipients) if config.relay_recipients else None
        self.verifier = make_verifier(config) if config.verify_relay_recipients else None
        # the session's view: tls_available and auth_available were derived from the same files
        # as the context and the credentials below, once, in IngressConfig.from_settings
        self.config = dataclasses.replace(config.session, mail_gate=self.committer.gate, mail_flow=self.flow.must_wait)
        if self.recipients is not None:
            self.config = dataclasses.replace(self.config, recipient_check=self.recipients.check)
        self.suppression = SuppressionGate(  # issue 19: refused at RCPT from a copy in memory
            SuppressionCache(spool.store.redis), event_writer(spool.store, lambda fn: self.spawn(asyncio.to_thread(fn)))
        )
        self.config = dataclasses.replace(self.config, suppressed=self.suppression.check)
        self.idle_timeout = config.idle_timeout
        self.max_connections = config.max_connections
        self.max_per_client = config.max_per_client
        self.ssl_context = make_ssl_context(config.tls_cert, config.tls_key) if config.tls_cert else None
        self.credentials = Credentials(config.auth_file) if config.auth_file else None
        self.auth_limiter = AuthLimiter()
        # KeyTableError from a bad key table: one line and exit 78 (mtaq/cli.py)
        self.trusted_mail = TrustedMail(
            config.session.hostname, KeyTable(config.dkim_keys) if config.dkim_keys else None
        )
        self.notes = NoteLog(log)
        self.shutdown_grace = config.shutdown_grace
        self.connections: set[SMTPProtocol] = set()
        self.per_client: Counter[str] = Counter()
        self.server: asyncio.Server | None = None
        self.stopping = False
        self._tasks: set[asyncio.Task[None]] = set()

    def open_transactions(self) -> int:
        """Sessions between MAIL and the answer after DATA: who may still join a group commit."""
        return sum(1 for c in self.connections if c.session is not None and c.session.in_transaction)

    def protocol(self) -> SMTPProtocol:
        return SMTPProtocol(self)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self, host: str = "", port: int = 0, *, sock: socket.socket | None = None) -> None:
        loop = asyncio.get_running_loop()
        await self.suppression.load()
        if sock is not None:
            self.server = await loop.create_server(self.protocol, sock=sock, backlog=1024)
        else:
            self.server = await loop.create_server(self.protocol, host, port, reuse_address=True, backlog=1024)
        self.spawn(self.committer.watch_queue())
        self.spawn(self.flow.watch())
        self.spawn(self.suppression.watch())

    async def shutdown(self) -> None:
        """Stop accepting; close idle sessions with 421; let transactions in flight finish (bounded);
        wait for the last group commit. Nothing the ingress answered 250 to is lost: 250 is only
        ever sent after the commit."""
        self.stopping = True
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.shutdown_if_idle()
        deadline = time.monotonic() + self.shutdown_grace
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            for conn in list(self.connections):
                conn.shutdown_if_idle()
        for conn in list(self.connections):
            conn.abort()
        await self.committer.flush()
        for t in list(self._tasks):
            t.cancel()


class SMTPProtocol(asyncio.Protocol):
    def __init__(self, ingress: Ingress) -> None:
        self.ingress = ingress
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.peer_ip = ""
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0  # of the idle timeout, in the loop's time (_arm_timer)
        self._abort_timer: asyncio.TimerHandle | None = None
        self._octets_since_progress = 0
        self._closing = False
        self._lost = False
        self._write_paused = False
        # Not None while a STARTTLS handshake runs: what the TLS layer decrypted before we resumed
        self._tls_early: bytearray | None = None

    # -- asyncio callbacks ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport; uvloop's implements asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        metrics.connection()
        peer = transport.get_extra_info("peername") or ("", 0)
        self.peer_ip = str(peer[0])
        ing = self.ingress
        if ing.stopping:
            self._refuse(replies.SHUTTING_DOWN)
            return
        if len(ing.connections) >= ing.max_connections or ing.per_client[self.peer_ip] >= ing.max_per_client:
            line = reject_line(
                "CONNECT",
                Peer(self.peer_ip, int(peer[1])),
                replies.TOO_MANY_CONNECTIONS,
                sender=None,
                recipient=None,
                helo="",
                protocol="SMTP",
            )
            ing.notes.emit(Note(logging.WARNING, line))  # rate-limited: a flood of connections too
            self._refuse(replies.TOO_MANY_CONNECTIONS)
            return
        ing.connections.add(self)
        ing.per_client[self.peer_ip] += 1
        self.session = Session(ing.config, Peer(self.peer_ip, int(peer[1])))
        log.debug("connect from [%s]", self.peer_ip)
        self._arm_timer()
        self._handle(self.session.start())

    def _refuse(self, reply: replies.Reply) -> None:
        assert self.transport is not None
        self.transport.write(reply.to_bytes())
        metrics.replies_sent(reply.to_bytes())
        self._close()

    def _close(self) -> None:
        """Close after the pending writes; abort if that takes longer than CLOSE_GRACE."""
        self._closing = True
        if self.transport is not None:
            self.transport.close()
        self.abort_later(CLOSE_GRACE)

    def data_received(self, data: bytes) -> None:
        if self.session is None or self._closing:
            return
        if self._tls_early is not None:
            # Clear-text reading stopped at STARTTLS, so this is the client's first input under TLS,
            # decrypted in the same read that finished the handshake, before _start_tls resumed.
            # The session (still WAIT_TLS) would drop it; keep it for when the session is told.
            self._tls_early += data
            if len(self._tls_early) > MAX_EARLY_TLS_DATA:
                self.abort()
            return
        events = self.session.receive_data(data)
        self._octets_since_progress += len(data)
        if any(isinstance(e, Send) for e in events) or self._octets_since_progress >= PROGRESS_OCTETS:
            self._arm_timer()
        self._handle(events)

    def eof_received(self) -> bool | None:
        if self.session is not None:
            self._handle(self.session.eof())
        return None

    def pause_writing(self) -> None:
        """The client does not read its replies and our write buffer passed its high-water mark:
        read no more commands until it drains. Without this, a client pipelining NOOPs and reading
        nothing grows the buffer without end; with it, such a client is cut at the idle timeout."""
        self._write_paused = True
        if self.transport is not None and not self._closing:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.transport is not None and not self._closing and self.session is not None and not self.session.waiting:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        """Also called by _start_tls when a handshake fails: asyncio's TLS layer does not report a
        connection lost during the handshake to us, and the slot must be given back all the same.
        Runs once."""
        if self._lost:
            return
        self._lost = True
        self._closing = True
        for timer in (self._timer, self._abort_timer):
            if timer is not None:
                timer.cancel()
        ing = self.ingress
        if self in ing.connections:
            ing.connections.discard(self)
            ing.per_client[self.peer_ip] -= 1
            if ing.per_client[self.peer_ip] <= 0:
                del ing.per_client[self.peer_ip]
        log.debug("disconnect from [%s]", self.peer_ip)

    # -- the session's requests -------------------------------------------------------------------
    def _handle(self, events: list[Event]) -> None:
        if self.session is not None:
            for note in self.session.take_notes():
                self.ingress.notes.emit(note)
        for ev in events:
            if self.transport is None or self._closing:
                return
            if isinstance(ev, Send):
                self.transport.write(ev.data)
                metrics.replies_sent(ev.data)
            elif isinstance(ev, Transaction):
                self.transport.pause_reading()
                self.ingress.spawn(self._store(ev))
            elif isinstance(ev, StartTLS):
                # Read nothing more in clear text: the client's ClientHello must stay in the socket
                # for the TLS layer, and from here on whatever reaches data_received has come
                # through TLS (see _tls_early) -- never clear text injected behind STARTTLS.
                self.transport.pause_reading()
                self._tls_early = bytearray()
                self.ingress.spawn(self._start_tls())
            elif isinstance(ev, Authenticate):
                self.transport.pause_reading()
                self.ingress.spawn(self._authenticate(ev))
            elif isinstance(ev, VerifyRecipient):
                self.transport.pause_reading()
                self.ingress.spawn(self._verify(ev))
            elif isinstance(ev, AwaitFlow):
                self.transport.pause_reading()
                self.ingress.spawn(self._await_flow())
            elif isinstance(ev, Close):
                self._close()

    def _resume(self, events: list[Event]) -> None:
        if self.transport is not None and not self._closing:
            self._arm_timer()
            self._handle(events)
            if self.session is not None and not self.session.waiting and not self._closing and not self._write_paused:
                self.transport.resume_reading()

    async def _store(self, tx: Transaction) -> None:
        assert self.session is not None
        try:
            qid = await self._commit(tx)
        except StorageRefused as e:
            self._resume(self.session.message_failed(e.reply))
            return
        except Exception:  # a bug, not the client's fault: it must still get an answer, and never 250
            log.exception("storing a message from [%s] failed", self.peer_ip)
            self._resume(self.session.message_failed(replies.STORAGE_FAILED))
            return
        log.info(
            "%s: client=%s[%s], from=<%s>, nrcpt=%d, size=%d%s",
            qid,
            self.session.peer.name,
            self.peer_ip,
            tx.sender,
            len(tx.recipients),
            len(tx.data),
            "" if tx.auth_user is None else f", sasl_username={tx.auth_user[:64]!r}",
        )
        metrics.accepted(len(tx.data))
        self._resume(self.session.message_stored(qid))

    async def _commit(self, tx: Transaction) -> str:
        """Store the message with its trace header; its queue id once it is in Redis."""
        assert self.session is not None
        qid = new_queue_id()
        now = time.time()
        # RFC 5321 §4.5.1: bare <postmaster> is accepted; with no local delivery it goes to our hostname's
        # postmaster, wherever that domain's MX points
        host = self.ingress.config.hostname
        rcpts = [
            r if "@" in r.address else dataclasses.replace(r, address=f"{r.address}@{host}") for r in tx.recipients
        ]
        data, body_8bit = tx.data, tx.body_8bit
        pending: tuple[DkimPending, ...] = ()
        if tx.trusted:  # Message-ID, Date and DKIM signatures: ingress/signing.py
            # The signatures are worked out here up to the private key's operation, which the
            # worker does (Envelope.dkim): that RSA-2048 signature was ~0.2 ms of this loop's CPU
            # a message (ingress 0.53-0.64 ms a signed message against 0.26-0.33 unsigned), on the
            # one loop every session waits on; the workers are as many as the load needs. A thread
            # here did not help: under load no core is idle, and the hop cost CPU and latency.
            prepared = self.ingress.trusted_mail.prepare(data, queue_id=qid, when=now, body_8bit=body_8bit)
            data, body_8bit, pending = prepared.data, prepared.body_8bit, prepared.pending
        env = Envelope(
            id=qid,
            sender=tx.sender,
            recipients=rcpts,
            received_at=now,
            helo=tx.helo,
            client_addr=self.peer_ip,
            client_name=self.session.peer.name,
            protocol=tx.protocol,
            body_8bit=body_8bit,
            smtputf8=tx.smtputf8,
            ret=tx.ret,
            envid=tx.envid,
            auth_user=tx.auth_user,
            trusted=tx.trusted,
            requiretls=tx.requiretls,
            dkim=pending,
        )
        trace = received_header(
            hostname=self.ingress.config.hostname,
            helo=tx.helo,
            client_ip=self.peer_ip,
            client_name=self.session.peer.name,
            protocol=tx.protocol,
            queue_id=qid,
            recipient=tx.recipients[0].address if len(tx.recipients) == 1 else None,
            when=now,
        )
        await self.ingress.committer.submit(Message(env, trace + data))
        return qid

    async def _start_tls(self) -> None:
        assert self.session is not None and self.transport is not None
        ctx = self.ingress.ssl_context
        if ctx is None:  # the session never offers STARTTLS without a context
            self.abort()
            return
        loop = asyncio.get_running_loop()
        try:
            new = await asyncio.wait_for(
                loop.start_tls(self.transport, self, ctx, server_side=True), timeout=self.ingress.idle_timeout
            )
        except (TimeoutError, ssl.SSLError, OSError, ConnectionError) as e:
            log.info("TLS handshake with [%s] failed: %s", self.peer_ip, e or type(e).__name__)
            self._handshake_failed()
            return
        except Exception:
            log.exception("TLS handshake with [%s] failed", self.peer_ip)
            self._handshake_failed()
            return
        if new is None:
            self._handshake_failed()
            return
        self.transport = new
        self._write_paused = False
        early, self._tls_early = bytes(self._tls_early or b""), None
        self._resume(self.session.tls_started())
        if early:
            self.data_received(early)  # before any later read: resume_reading only schedules one

    def _handshake_failed(self) -> None:
        # A timeout or a reset during the handshake never reaches our connection_lost (the TLS
        # layer swallows it while it is handshaking): abort and release the connection here.
        self.abort()
        self.connection_lost(None)

    async def _authenticate(self, ev: Authenticate) -> None:
        assert self.session is not None
        ing = self.ingress
        limiter = ing.auth_limiter
        ok, failure = False, None
        if ing.credentials is not None:
            async with limiter.checking(self.peer_ip) as allowed:
                if not allowed:
                    failure = replies.AUTH_RATE_LIMITED
                    log.warning("[%s]: %s authentication refused: too many failures", self.peer_ip, ev.mechanism)
                else:
                    try:
                        if ev.authzid and ev.authzid != ev.username:
                            ok = False  # no proxy authorization: a user may only act as itself
                        else:
                            ok = await asyncio.to_thread(ing.credentials.verify, ev.username, ev.password)
                    except Exception:  # the auth file unreadable, say: not the client's failure
                        log.exception("[%s]: checking credentials failed", self.peer_ip)
                        failure = replies.AUTH_TEMP_FAILURE
                    if not ok and failure is None:
                        limiter.failed(self.peer_ip)
                        # the user name is logged as sent (repr: no line breaks; cut short); the
                        # password never is
                        log.warning(
                            "[%s]: %s authentication failed for user %r", self.peer_ip, ev.mechanism, ev.username[:64]
                        )
        self._resume(self.session.auth_result(ok, failure))

    async def _verify(self, ev: VerifyRecipient) -> None:
        assert self.session is not None
        verifier = self.ingress.verifier
        if verifier is None:  # the session asks only when verification is configured
            refusal: replies.Reply | None = replies.UNVERIFIED_RECIPIENT
        else:
            try:
                refusal = await verifier.check(ev.address)
            except Exception:  # a bug: the client must still get an answer, and never a 250
                log.exception("verifying <%s> for [%s] failed", ev.address, self.peer_ip)
                refusal = replies.UNVERIFIED_RECIPIENT
        self._resume(self.session.recipient_verified(refusal))

    async def _await_flow(self) -> None:
        assert self.session is not None
        await self.ingress.flow.wait()
        self._resume(self.session.flow_granted())

    # -- deadlines and shutdown -------------------------------------------------------------------
    def _arm_timer(self) -> None:
        """Move the idle deadline ``idle_timeout`` from now. The timer is not cancelled and made again
        (each command did so, ~5% of the ingress's CPU): it fires at the deadline it was set for
        and, if the client made progress since, sleeps again until the new one."""
        self._octets_since_progress = 0
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self.ingress.idle_timeout
        if self._timer is None:
            self._timer = loop.call_at(self._deadline, self._on_timer)

    def _on_timer(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() < self._deadline:
            self._timer = loop.call_at(self._deadline, self._on_timer)
            return
        self._timer = None
        self._on_timeout()

    def _on_timeout(self) -> None:
        if self.session is None or self._closing:
            return
        if self.session.waiting:  # our own storage is slow, not the client
            self._arm_timer()
            return
        log.info("timeout after %s from [%s]", "DATA" if self.session.in_transaction else "command", self.peer_ip)
        self._handle(self.session.timeout())

    def shutdown_if_idle(self) -> None:
        if (
            self.session is not None
            and not self._closing
            and not self.session.in_transaction
            and not self.session.waiting
        ):
            self._handle(self.session.shutdown())

    def abort_later(self, delay: float = 1.0) -> None:
        if self._abort_timer is None:
            self._abort_timer = asyncio.get_running_loop().call_later(delay, self.abort)

    def abort(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.abort()


def _receptions(messages: list[Message]) -> list[DeliveryEvent]:
    """The reception events of a group commit (issue 19), written in its MULTI/EXEC."""
    return receptions(((m.envelope, m.body) for m in messages), time.time())


def _flow_gate(spool: Spool, config: IngressConfig) -> FlowGate:
    """Mail input flow control on the delivery queue's ready list (ingress/flow.py)."""
    r = spool.store.redis
    ready_key, taken_key, running_key = spool.queue.ready_key, spool.queue.taken_key, spool.queue.running_key
    pending_key, per_job_key = spool.queue.pending_key, spool.queue.drawn_avg_key

    def read(taken: float) -> Backlog:
        return read_backlog(r, ready_key, taken_key, running_key, taken, pending_key, per_job_key)

    return FlowGate(read, delay=config.in_flow_delay, limit=config.in_flow_backlog)


def install_signal_handlers(ingress: Ingress, done: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def stop() -> None:
        if not ingress.stopping:
            log.info("SIGTERM: no new connections; finishing transactions in flight")
            ingress.spawn(_stop(ingress, done))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)


async def _stop(ingress: Ingress, done: asyncio.Event) -> None:
    await ingress.shutdown()
    done.set()
