"""The backlog part of bench/scaling.py: does a queue of waiting mail slow down new mail?

Two destinations, resolved through a DNS server on loopback (tests/dnsserver.py): ``sink.test``,
whose MX is a smtp-sink on 127.0.0.2 (not .1, where mtaq listens:
its loop check would bounce the mail), and ``down.test``, whose MX is 127.0.0.3
where nothing listens (connection refused: a destination that is down). mtaq's workers resolve
MX through that server (MTAQ_DNS_SERVERS); Postfix, which cannot be pointed at a loopback resolver,
reaches the sink through a ``transport_maps`` entry (as bench/slowdest.py does).

The backlog is written straight through the product's own spool (common/spool.py: message,
envelope and delivery job in one MULTI/EXEC, as the ingress commits them), a thousand messages per
commit, into the Redis of a freshly started ``mtaq run``: 100,000 messages in seconds rather than
the minutes SMTP would take. Redis ``used_memory`` before and after the fill gives the memory per
queued message, and what it costs beyond the body. The workers make their first attempts at the
backlog (refused) while the new mail flows: the harder case for the new mail.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench.systems import Mtaq
from common.envelope import Envelope, Recipient, new_queue_id
from common.settings import Settings
from common.spool import Spool
from common.store import Message

__all__ = ["DOWN_IP", "Backlogged", "MemoryPerMessage", "backlog_body", "memory_per_message", "zone"]

DOWN_IP = "127.0.0.3"  # nothing listens here (nor on 0.0.0.0 at the sink's port)
BATCH = 1000  # messages per spool commit


def zone(sink_ip: str, down_ip: str = DOWN_IP) -> dict[str, list[tuple[str, str]]]:
    """sink.test -> mx.sink.test -> the sink; down.test -> mx.down.test -> nothing listening."""
    return {
        "sink.test.": [("MX", "10 mx.sink.test.")],
        "mx.sink.test.": [("A", sink_ip)],
        "down.test.": [("MX", "10 mx.down.test.")],
        "mx.down.test.": [("A", down_ip)],
    }


def backlog_body(size: int) -> bytes:
    """A message of exactly ``size`` octets (at least its header and one line)."""
    head = b"Subject: backlog\r\nFrom: b@backlog.test\r\n\r\n"
    fill = max(0, size - len(head) - 2)
    return head + b"x" * fill + b"\r\n"


@dataclass(frozen=True)
class MemoryPerMessage:
    messages: int
    body_octets: int
    used_before: int  # Redis used_memory, bytes
    used_after: int
    fill_s: float

    @property
    def per_message(self) -> float:
        return (self.used_after - self.used_before) / self.messages if self.messages else 0.0

    @property
    def beyond_body(self) -> float:
        """What a queued message costs on top of its body: envelope, status, job, indexes."""
        return self.per_message - self.body_octets

    def figures(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "body_octets": self.body_octets,
            "used_memory_before": self.used_before,
            "used_memory_after": self.used_after,
            "bytes_per_message": round(self.per_message),
            "bytes_beyond_body": round(self.beyond_body),
            "fill_s": round(self.fill_s, 1),
            "fill_msgs_s": round(self.messages / self.fill_s) if self.fill_s > 0 else None,
        }

    def line(self) -> str:
        return (
            f"backlog: {self.messages} messages of {self.body_octets} B to down.test in {self.fill_s:.1f}s; "
            f"Redis used_memory {self.used_before / 2**20:.1f} -> {self.used_after / 2**20:.1f} MiB: "
            f"{self.per_message:.0f} B per queued message, {self.beyond_body:.0f} B beyond the body"
        )


def memory_per_message(before: int, after: int, messages: int, body_octets: int, fill_s: float) -> MemoryPerMessage:
    return MemoryPerMessage(messages, body_octets, before, after, fill_s)


class Backlogged(Mtaq):
    """``mtaq run`` (defaults, MX through ``dns_servers``) that, once listening, has ``backlog``
    messages to down.test committed to its Redis through the spool."""

    def __init__(self, *args: Any, backlog: int = 0, backlog_size: int = 1024, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.backlog = backlog
        self.backlog_size = backlog_size
        self.memory: MemoryPerMessage | None = None

    def redis_socket(self) -> Path:
        return self.base / "var" / "redis.sock"

    def start(self) -> None:
        super().start()
        if self.backlog:
            self.memory = self.fill()
            print(f"  {self.memory.line()}", flush=True)

    def fill(self) -> MemoryPerMessage:
        sock = self.redis_socket()
        r = redis.Redis(unix_socket_path=str(sock))
        try:
            settings = Settings.from_env(self.env).replace(redis_url=f"unix://{sock}")
            spool = Spool.from_settings(settings, r)
            body = backlog_body(self.backlog_size)
            before = int(r.info("memory")["used_memory"])
            t0 = time.monotonic()
            for start in range(0, self.backlog, BATCH):
                n = min(BATCH, self.backlog - start)
                spool.commit([_message(body, start + i) for i in range(n)])
            fill_s = time.monotonic() - t0
            after = int(r.info("memory")["used_memory"])
        finally:
            r.close()
        return memory_per_message(before, after, self.backlog, len(body), fill_s)


def _message(body: bytes, n: int) -> Message:
    env = Envelope(id=new_queue_id(), sender="b@backlog.test", recipients=[Recipient(f"u{n}@down.test")])
    return Message(env, body)
