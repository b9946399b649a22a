"""An in-memory SMTP peer for the delivery core's unit tests: ``FakeDialer`` hands the
conversation ``FakeConnection``s to a ``FakePeer`` instead of sockets. The peer answers each
recipient from a table (default 250), refuses connections to the addresses it is told to, and
writes down every message it takes."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dns.resolver
import redis

from common.jobqueue import DeliveryQueue
from common.mx import MXResolver, Target
from common.routing import Router
from common.settings import Settings
from common.smtp.client import TransactionResult
from common.smtp.reply import Reply
from common.spool import Spool
from common.store import Store
from worker.dsn import make_dsn
from worker.limits import DestinationLimits
from worker.relay import Dialer
from worker.service import DeliveryService
from worker.smtpclient import Checker, ConnectFailed, SMTPConnection
from worker.tlspolicy import OPPORTUNISTIC, Requirement

__all__ = ["FakeConnection", "FakeDialer", "FakePeer", "FixedMX", "service_on", "target"]


def target(ip: str = "192.0.2.1", port: int = 25, hostname: str = "mx.test", preference: int = 10) -> Target:
    return Target(hostname, ip, port, preference)


@dataclass
class FakePeer:
    replies: dict[str, tuple[int, str]] = field(default_factory=dict)  # recipient -> (code, text)
    at: dict[str, tuple[int, str]] = field(default_factory=dict)  # ip -> what it answers every recipient
    refuse: set[str] = field(default_factory=set)  # ips whose connections fail
    extensions: set[str] = field(default_factory=lambda: {"8bitmime", "size", "smtputf8", "pipelining"})
    hang_up_after: int | None = None  # messages per connection before the peer drops it
    taken: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (ip, sender, recipients)
    bodies: list[bytes] = field(default_factory=list)  # the message of each entry of ``taken``
    opened: list[str] = field(default_factory=list)  # ips connected to, in order
    gate: threading.Event | None = None  # when set, send() waits for it (a slow peer)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reply(self, rcpt: str, ip: str) -> Reply:
        code, text = self.at.get(ip) or self.replies.get(rcpt, (250, "2.0.0 Ok"))
        return Reply.parse(code, text)


class FakeConnection(SMTPConnection):
    def __init__(self, peer: FakePeer, ip: str) -> None:
        super().__init__(helo_name="mtaq.test", connect_timeout=1.0, timeout=1.0)
        self.peer = peer
        self.ip = ip
        self.open_ = True
        self.sent = 0
        self.quits = 0

    def supports(self, extension: str) -> bool:
        return extension in self.peer.extensions

    def send(
        self, sender: str, recipients: Sequence[str], body: bytes, *, mail_options: Sequence[str] = ()
    ) -> TransactionResult:
        if self.peer.gate is not None:
            self.peer.gate.wait(5.0)
        replies = {n: self.peer.reply(r, self.ip) for n, r in enumerate(recipients)}
        ok = [r for n, r in enumerate(recipients) if replies[n].positive]
        with self.peer.lock:
            if ok:
                self.peer.taken.append((self.ip, sender, ok))
                self.peer.bodies.append(bytes(body))
        self.sent += 1
        if self.peer.hang_up_after is not None and self.sent >= self.peer.hang_up_after:
            self.open_ = False
        return TransactionResult(replies)

    def noop(self) -> bool:
        return self.open_

    @property
    def alive(self) -> bool:
        return self.open_

    def quit(self) -> None:
        self.quits += 1
        self.open_ = False

    def close(self) -> None:
        self.open_ = False


class FakeDialer(Dialer):
    def __init__(self, peer: FakePeer, messages_per_connection: int = 100) -> None:
        super().__init__("mtaq.test", 25, 1.0, 1.0, messages_per_connection)
        self.peer = peer

    def dial(
        self, target: Target, require: Requirement = OPPORTUNISTIC, check: Checker | None = None
    ) -> SMTPConnection:
        with self.peer.lock:
            self.peer.opened.append(target.ip)
        if target.ip in self.peer.refuse:
            raise ConnectFailed(f"connect to {target}: Connection refused")
        return FakeConnection(self.peer, target.ip)


class FixedMX(MXResolver):
    """Every destination's MX answer is ``targets``."""

    def __init__(self, targets: list[Target]) -> None:
        super().__init__(dns.resolver.Resolver(configure=False))
        self.answer = targets

    def targets(self, destination: str, port: int) -> list[Target]:
        return self.answer


def service_on(
    r: redis.Redis,
    peer: FakePeer,
    clock: Callable[[], float],
    *,
    destination_concurrency: int = 2,
    job_max_messages: int = 100,
    **settings: Any,
) -> DeliveryService:
    """A delivery service on ``r`` (fakeredis) whose conversations reach ``peer`` at one MX."""
    spool = Spool(Store(r), DeliveryQueue(r, "mtaq", job_max_messages=job_max_messages), Router())
    return DeliveryService(
        Settings(hostname="mtaq.test", **settings),
        spool,
        FixedMX([target()]),
        DestinationLimits(r, concurrency=destination_concurrency, clock=clock),
        dsn=make_dsn,
        clock=clock,
        dialer=FakeDialer(peer),
    )
