"""Remote MX stand-ins for integration tests: aiosmtpd servers on loopback addresses.

The worker has one ``smtp_port`` for every MX, so tests put several sinks on one port across
127.0.0.x addresses (Linux routes all of 127.0.0.0/8 to loopback)::

    port = free_port()  # tests/ports.py
    with SinkServer("127.0.0.2", port) as mx1, SinkServer("127.0.0.3", port) as mx2:
        mx1.rcpt_replies["bad@b.test"] = "550 5.1.1 No such user"
        mx2.data_reply = "451 4.3.0 try later"
        ...
        assert wait_for(lambda: len(mx1.messages) == 1, 10)

Replies are scripted per recipient (``rcpt_replies``), for every recipient (``rcpt_default``), for
MAIL (``mail_reply``) and for DATA (``data_reply``); ``hangup_on`` drops the connection at a
command; ``eightbitmime = False`` stops advertising 8BITMIME; ``data_delay`` makes a slow remote.
``connections``, ``open_connections`` and ``max_open`` count connections (all, open now, most
open at once). ``tls=True`` offers STARTTLS with a trustme certificate (``.ca`` trusts it);
``tls_broken=True`` offers STARTTLS and then fails the handshake; ``ca=`` issues the
certificate from a given trustme CA (a test's "public" CA) for ``hostname``.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult

from tests.ports import free_port

__all__ = [
    "Delivery",
    "SinkServer",
    "tagged",
    "taken_on_dropped",
    "wait_for",
]

HANGUP_POINTS = frozenset({"MAIL", "RCPT", "DATA"})


def taken_on_dropped(boxes: Iterable[SinkServer], tag: re.Pattern[bytes]) -> Counter[str]:
    """How many copies of each tagged message were the last transaction of a connection that then
    ended without another command (no QUIT, no MAIL, no RSET), and were followed by a later copy:
    the sender died or hung up after its dot, maybe before it read the 250, and sent it again
    (RFC 1047)."""
    copies: dict[str, list[tuple[float, bool]]] = {}
    for box in boxes:
        with box.lock:
            for d in box.deliveries:
                m = tag.search(d.data)
                if m:
                    cut = d.session in box.dropped_sessions and box.last_taken.get(d.session) is d
                    copies.setdefault(m.group(1).decode(), []).append((d.at, cut))
    counts: Counter[str] = Counter()
    for key, found in copies.items():
        latest = max(at for at, _ in found)
        counts[key] = sum(1 for at, cut in found if cut and at < latest)
    return counts


def tagged(boxes: Iterable[SinkServer], tag: re.Pattern[bytes]) -> Counter[str]:
    """How many times each message arrived at these sinks, by the tag its data carries (the
    pattern's first group): what at-least-once tests count lost and duplicated mail by."""
    seen: Counter[str] = Counter()
    for box in boxes:
        with box.lock:
            for _, _, data in box.messages:
                m = tag.search(data)
                if m:
                    seen[m.group(1).decode()] += 1
    return seen


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true (-> True) or ``timeout`` seconds pass (-> False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


@dataclass(frozen=True)
class Delivery:
    """One accepted transaction, with what the session looked like."""

    mail_from: str  # "" for the null sender <>
    rcpt_tos: list[str]
    data: bytes
    helo: str
    tls: bool
    mail_options: list[str]
    peer: str
    peer_port: int = 0  # the client's source port: tells the connections apart
    session: int = 0  # the connection's number at this sink (1, 2, ...): dropped_sessions says how it ended
    at: float = field(default_factory=time.monotonic)  # when the sink took it (before its 250)


class SinkServer:
    """An SMTP server on ``host:port`` that records what it accepts and answers as scripted."""

    def __init__(
        self,
        host: str = "127.0.0.2",
        port: int | None = None,
        *,
        tls: bool = False,
        tls_broken: bool = False,
        hostname: str | None = None,
        smtputf8: bool = False,
        ca: trustme.CA | None = None,
    ) -> None:
        self.host = host
        self.smtputf8 = smtputf8
        self.port = port if port is not None else free_port([host])
        self.hostname = hostname or f"sink-{host}"
        # Scripted replies; tests may change them while the server runs.
        self.rcpt_replies: dict[str, str] = {}
        self.rcpt_default: str | None = None
        self.mail_reply: str | None = None
        self.data_reply: str | None = None
        self.hangup_on: str | None = None  # "MAIL", "RCPT" or "DATA": drop the connection there
        self.data_delay = 0.0  # seconds to wait before answering the end of DATA (a slow remote)
        # advertise PIPELINING (RFC 2920) as nearly every real MX does; aiosmtpd reads commands one
        # line at a time, so it serves a pipelining client correctly
        self.pipelining = True
        # aiosmtpd advertises 8BITMIME (RFC 6152); False drops it from the EHLO reply, as an old MX
        self.eightbitmime = True
        # RFC 8689: advertise REQUIRETLS and take the MAIL parameter (counted in requiretls_mails)
        self.requiretls = False
        self.requiretls_mails = 0
        # What happened.
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.deliveries: list[Delivery] = []
        self.mail_times: list[float] = []  # time.monotonic() of each MAIL FROM (pacing tests)
        self.rejected: list[tuple[str, str]] = []  # (recipient, reply) for scripted RCPT refusals
        self.hangups = 0
        self.attempts = 0  # transactions begun: MAIL commands received, whatever the outcome
        self.connections = 0  # connections accepted in all
        self.open_connections = 0  # connections open now
        self.max_open = 0  # the most connections ever open at once
        # session number -> when (time.monotonic()) a connection ended without QUIT: the client died or
        # hung up (or the sink did: hangup_on); the session's last_taken, if it has one, may never
        # have had its 250 read (RFC 1047)
        self.dropped_sessions: dict[int, float] = {}
        # session number -> the delivery taken on it with no command since (a MAIL, RSET, NOOP or
        # QUIT after it says the client read its 250)
        self.last_taken: dict[int, Delivery] = {}
        self.session_numbers = itertools.count(1)  # never reset: a number names one connection for good
        self.lock = threading.Lock()
        # AUTH (RFC 4954) after STARTTLS only, when set: user -> password; logins: (user, accepted)
        self.auth: dict[str, str] | None = None
        self.logins: list[tuple[str, bool]] = []
        self.ca: trustme.CA | None = None
        self.leaf: trustme.LeafCert | None = None  # the certificate it presents (tls=True)
        self._tls_context: ssl.SSLContext | None = None
        if tls or tls_broken:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            if not tls_broken:  # without a certificate every handshake fails: "no shared cipher"
                self.ca = ca or trustme.CA()
                self.leaf = self.ca.issue_cert(self.hostname, host)
                self.leaf.configure_cert(context)
            self._tls_context = context
        self._controller: Controller | None = None

    # -- lifecycle

    def start(self) -> SinkServer:
        if self._controller is not None:
            return self
        kwargs: dict[str, Any] = {}
        if self._tls_context is not None:
            kwargs["tls_context"] = self._tls_context
        if self.auth is not None:
            kwargs.update(authenticator=self._authenticate, auth_require_tls=True)
        controller = _CountingController(
            self,
            _Handler(self),
            hostname=self.host,
            port=self.port,
            server_hostname=self.hostname,
            ready_timeout=60.0,  # GENEROUS (tests.integration.eventually): a start is an event, not a guess
            enable_SMTPUTF8=self.smtputf8,
            **kwargs,
        )
        controller.start()
        self._controller = controller
        return self

    def stop(self) -> None:
        if self._controller is not None:
            controller, self._controller = self._controller, None
            controller.stop()

    def __enter__(self) -> SinkServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- views

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def recipients(self) -> list[str]:
        """Every recipient of every accepted message, in order."""
        with self.lock:
            return [r for _, rcpts, _ in self.messages for r in rcpts]

    def clear(self) -> None:
        with self.lock:
            self.messages.clear()
            self.deliveries.clear()
            self.mail_times.clear()
            self.rejected.clear()
            self.hangups = 0
            self.attempts = 0
            self.connections = 0
            self.dropped_sessions.clear()
            self.last_taken.clear()
            self.max_open = self.open_connections

    def trust(self, context: ssl.SSLContext) -> None:
        """Make a client context trust this sink's certificate (``tls=True`` only)."""
        if self.ca is None:
            raise ValueError("this sink has no certificate")
        self.ca.configure_trust(context)

    # -- called from the server thread

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        user = data.login.decode("utf-8", "replace")
        ok = self.auth is not None and self.auth.get(user) == data.password.decode("utf-8", "replace")
        with self.lock:
            self.logins.append((user, ok))
        return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 535 itself

    def _hangup(self, server: Any, command: str) -> bool:
        if self.hangup_on != command:
            return False
        with self.lock:
            self.hangups += 1
        transport = getattr(server, "transport", None)
        if transport is not None:
            transport.abort()
        return True

    def _record(self, delivery: Delivery) -> None:
        with self.lock:
            self.deliveries.append(delivery)
            self.last_taken[delivery.session] = delivery
            self.messages.append((delivery.mail_from, list(delivery.rcpt_tos), delivery.data))


class _CountingSMTP(SMTP):
    """aiosmtpd's server, counting the connections open at once for the sink."""

    def __init__(self, sink: SinkServer, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sink = sink
        self.session_number = 0
        self.quit_sent = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        with self._sink.lock:
            self._sink.connections += 1
            self.session_number = next(self._sink.session_numbers)
            self._sink.open_connections += 1
            self._sink.max_open = max(self._sink.max_open, self._sink.open_connections)
        super().connection_made(transport)

    async def smtp_MAIL(self, arg: str) -> None:
        self._answered()
        # aiosmtpd refuses parameters it does not know (555): take REQUIRETLS off first, counted
        if self._sink.requiretls and arg and " REQUIRETLS" in arg.upper():
            words = [w for w in arg.split(" ") if w.upper() != "REQUIRETLS"]
            with self._sink.lock:
                self._sink.requiretls_mails += 1
            arg = " ".join(words)
        await super().smtp_MAIL(arg)

    async def smtp_QUIT(self, arg: str) -> None:
        self.quit_sent = True
        self._answered()
        await super().smtp_QUIT(arg)

    async def smtp_RSET(self, arg: str) -> None:
        self._answered()
        await super().smtp_RSET(arg)

    async def smtp_NOOP(self, arg: str) -> None:
        self._answered()
        await super().smtp_NOOP(arg)

    def _answered(self) -> None:
        """A command after a delivery: the client had read that delivery's 250."""
        with self._sink.lock:
            self._sink.last_taken.pop(self.session_number, None)

    def connection_lost(self, error: Exception | None) -> None:
        with self._sink.lock:
            self._sink.open_connections -= 1
            if not self.quit_sent:
                self._sink.dropped_sessions[self.session_number] = time.monotonic()
        super().connection_lost(error)


class _CountingController(Controller):
    def __init__(self, sink: SinkServer, *args: Any, **kwargs: Any) -> None:
        self._sink = sink
        super().__init__(*args, **kwargs)

    def factory(self) -> SMTP:
        return _CountingSMTP(self._sink, self.handler, **self.SMTP_kwargs)


class _Handler:
    """aiosmtpd handler hooks; the state lives in the SinkServer."""

    def __init__(self, sink: SinkServer) -> None:
        self.sink = sink

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.sink.pipelining:
            responses.insert(1, "250-PIPELINING")
        if not self.sink.eightbitmime:
            responses = [r for r in responses if r != "250-8BITMIME"]
        if self.sink.requiretls:
            responses.insert(1, "250-REQUIRETLS")
        return responses

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: Sequence[str]
    ) -> str:
        with self.sink.lock:
            self.sink.attempts += 1
            self.sink.mail_times.append(time.monotonic())
        if self.sink._hangup(server, "MAIL"):
            return "421 4.4.2 closing"
        if self.sink.mail_reply is not None and not self.sink.mail_reply.startswith("2"):
            return self.sink.mail_reply
        # aiosmtpd takes an empty mail_from for "no MAIL yet": keep "<>" and translate when recording
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return self.sink.mail_reply or "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Sequence[str]
    ) -> str:
        if self.sink._hangup(server, "RCPT"):
            return "421 4.4.2 closing"
        scripted = _lookup(self.sink.rcpt_replies, address)
        if scripted is None:
            scripted = self.sink.rcpt_default
        if scripted is not None and not scripted.startswith("2"):
            with self.sink.lock:
                self.sink.rejected.append((address, scripted))
            return scripted
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return scripted or "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.sink.data_delay:
            await asyncio.sleep(self.sink.data_delay)
        if self.sink._hangup(server, "DATA"):
            return "421 4.4.2 closing"
        if self.sink.data_reply is not None and not self.sink.data_reply.startswith("2"):
            return self.sink.data_reply
        content = envelope.original_content if envelope.original_content is not None else envelope.content
        data = content if isinstance(content, bytes) else str(content).encode("utf-8")
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        self.sink._record(
            Delivery(
                mail_from="" if envelope.mail_from == "<>" else envelope.mail_from,  # "" is <>, as in Envelope
                rcpt_tos=list(envelope.rcpt_tos),
                data=data,
                helo=session.host_name or "",
                tls=session.ssl is not None,
                mail_options=list(envelope.mail_options),
                peer=peer,
                peer_port=int(session.peer[1]) if isinstance(session.peer, tuple) else 0,
                session=getattr(server, "session_number", 0),
            )
        )
        return self.sink.data_reply or "250 2.0.0 Ok: queued"


def _lookup(replies: dict[str, str], address: str) -> str | None:
    if address in replies:
        return replies[address]
    low = address.lower()
    for key, reply in list(replies.items()):
        if key.lower() == low:
            return reply
    return None
