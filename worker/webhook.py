"""The webhook sender (issue 19): the events of the stream ``mtaq:events`` POSTed as signed JSON
arrays to ``events_webhook``.

Durable and ordered through a consumer group (``webhook``) on the stream, read by one consumer
name (``sender``) whoever runs it: what was read and not acknowledged stays in the group's pending
list, and the next round, or the next holder, sends that first, so events go out in stream order
and nothing read is forgotten. Acknowledged (XACK) only after a 2xx; a receiver that is down or
answers otherwise gets the same batch again after a backoff (1 s doubling to a minute).
At least once: a sender that dies between the 2xx and the XACK sends that batch again, and the
events' ``id`` lets the receiver drop the repeat.

One sender per deployment at a time: every worker runs ``run`` in a thread, and only the holder of
the lease ``mtaq:events:sender`` (a Redis key with a TTL, pushed on every round) sends; when the
holder dies its lease lapses within ``LEASE_TTL`` and another worker takes over. ``mtaq events``
runs the same loop as its own process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis

from common.events import SIGNATURE_HEADER, Event, parse_entries, sign
from common.settings import Settings
from common.store import EVENTS, EVENTS_GROUP, EVENTS_SENDER_LOCK

__all__ = [
    "LEASE_TTL",
    "MAX_BACKOFF",
    "SecretError",
    "WebhookSender",
    "check_settings",
    "read_secret",
    "start_webhook_sender",
]

log = logging.getLogger("mtaq.webhook")

CONSUMER = "sender"  # one name for whoever holds the lease: the next holder inherits the pending list
# seconds a dead holder keeps the lease: more than a read and a POST (BLOCK + POST_TIMEOUT); pushed on
# before each further POST of a round (a round of entries of many events may take many POSTs)
LEASE_TTL = 15.0
POST_TIMEOUT = 10.0
BLOCK = 1.0  # seconds a read waits for new events: a waiting event goes out within about a second
MIN_BACKOFF = 1.0
MAX_BACKOFF = 60.0

# KEYS: lease; ARGV: token, ms. Take the lease when free, push it on when ours; 1 when held.
_HOLD = """
local cur = redis.call('GET', KEYS[1])
if not cur then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
if cur == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# (url, body, headers) -> HTTP status; raises OSError when no answer came
Poster = Callable[[str, bytes, dict[str, str]], int]


class SecretError(ValueError):
    """The secret file cannot be used (one line)."""


def read_secret(path: str) -> bytes:
    """The HMAC key: the file's content without surrounding whitespace."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as e:
        raise SecretError(f"events_webhook_secret_file {path}: {e.strerror or e}") from None
    if not key:
        raise SecretError(f"events_webhook_secret_file {path} is empty: put the shared secret in it")
    return key


def http_post(url: str, body: bytes, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=POST_TIMEOUT) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as e:  # an answer, not a 2xx
        return int(e.code)


class WebhookSender:
    def __init__(
        self,
        r: redis.Redis,
        url: str,
        secret: bytes,
        *,
        batch: int = 100,
        post: Poster = http_post,
        clock: Callable[[], float] = time.monotonic,
        token: str | None = None,
    ) -> None:
        self.redis = r
        self.url = url
        self.secret = secret
        self.batch = batch
        self.post = post
        self.clock = clock
        self.token = token or uuid.uuid4().hex
        self.backoff = 0.0
        self.next_try = 0.0
        self.sent = 0
        self._hold = r.register_script(_HOLD)
        self._release = r.register_script(_RELEASE)
        self._group_ready = False

    # -- the lease ----------------------------------------------------------------------------------
    def hold(self) -> bool:
        """Take or keep the lease; True while this sender is the one that sends."""
        return bool(self._hold(keys=[EVENTS_SENDER_LOCK], args=[self.token, int(LEASE_TTL * 1000)]))

    def release(self) -> None:
        self._release(keys=[EVENTS_SENDER_LOCK], args=[self.token])

    # -- one round ----------------------------------------------------------------------------------
    def ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            # from the start of the stream: events written before the first sender ran are sent too
            self.redis.xgroup_create(EVENTS, EVENTS_GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    def read(self, block: float | None) -> list[tuple[str, Event | None]]:
        """The pending events first (read before, not acknowledged), else new ones, waiting up to
        ``block`` seconds for them (None: not at all)."""
        return self._read("0", None) or self._read(">", block)

    def _read(self, start: str, block: float | None) -> list[tuple[str, Event | None]]:
        kw: dict[str, Any] = {"count": self.batch}
        if block is not None:
            kw["block"] = int(block * 1000)
        answer: Any = self.redis.xreadgroup(EVENTS_GROUP, CONSUMER, {EVENTS: start}, **kw)
        out: list[tuple[str, Event | None]] = []
        for _, entries in answer or []:
            for sid, fields in entries:
                # a pending entry trimmed from the stream (events_max) comes back without fields
                if fields:
                    out += parse_entries([(sid, fields)])
                else:
                    out.append((sid.decode() if isinstance(sid, bytes) else str(sid), None))
        return out

    def body(self, events: Sequence[Event]) -> bytes:
        return json.dumps([e.to_json_obj() for e in events], separators=(",", ":"), ensure_ascii=False).encode()

    def step(self, block: float | None = BLOCK) -> bool:
        """Send one batch if there is one and the backoff allows; True when a batch was acknowledged."""
        if self.clock() < self.next_try:
            return False
        self.ensure_group()
        got = self.read(block)
        if not got:
            return False
        ids = list(dict.fromkeys(sid for sid, _ in got))  # an entry holds one write's events
        events = [ev for _, ev in got if ev is not None]
        # at most ``batch`` events a POST; the entries acknowledged once all their events are sent
        # (a POST that fails sends the earlier ones again: at least once, the ids tell)
        for at in range(0, len(events), self.batch):
            if at and not self.hold():
                # a round of many POSTs (entries of many events) outlasting the lease: another
                # sender has it now and sends these from the group's pending list; stop here
                log.info(
                    "webhook sender: lease lost during a round; %d event(s) left to the new holder", len(events) - at
                )
                return False
            chunk = events[at : at + self.batch]
            body = self.body(chunk)
            headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(self.secret, body)}
            headers["User-Agent"] = "mtaq-webhook"
            try:
                status = self.post(self.url, body, headers)
                why = "" if 200 <= status < 300 else f"answered {status}"
            except OSError as e:
                why = f"unreachable ({getattr(e, 'reason', None) or e})"
            if why:
                self._failed(why, len(events) - at)
                return False
        self.redis.xack(EVENTS, EVENTS_GROUP, *ids)
        if self.backoff:
            log.info("webhook %s: back, sending again", self.url)
        self.backoff = 0.0
        self.sent += len(events)
        return True

    def _failed(self, why: str, n: int) -> None:
        self.backoff = min(MAX_BACKOFF, max(MIN_BACKOFF, self.backoff * 2))
        self.next_try = self.clock() + self.backoff
        log.warning("webhook %s %s: %d event(s) wait, next try in %.0fs", self.url, why, n, self.backoff)

    # -- the loop -----------------------------------------------------------------------------------
    def run(self, stopping: threading.Event) -> None:
        """Send while holding the lease, until ``stopping``; Redis trouble is waited out."""
        holding: bool | None = None  # unknown: the first round says which it is
        try:
            while not stopping.is_set():
                try:
                    now_holding = self.hold()
                    if now_holding != holding:
                        log.info("webhook sender %s", "taken over by this process" if now_holding else "held elsewhere")
                        holding = now_holding
                    if not holding:
                        stopping.wait(LEASE_TTL / 3)
                        continue
                    wait = self.next_try - self.clock()
                    if wait > 0:
                        stopping.wait(min(wait, LEASE_TTL / 3))
                        continue
                    self.step()
                except (redis.RedisError, OSError) as e:
                    log.warning("webhook sender: Redis unavailable (%s)", e)
                    stopping.wait(1.0)
                except Exception:  # an entry it cannot read (a newer mtaq's?): said, retried, never fatal
                    log.exception("webhook sender: round failed; next try in %.0fs", MAX_BACKOFF)
                    stopping.wait(MAX_BACKOFF)
        finally:
            if holding:
                with contextlib.suppress(redis.RedisError, OSError):  # else it lapses by itself
                    self.release()


def sender_from_settings(settings: Settings, r: redis.Redis) -> WebhookSender:
    """Raises SecretError (one line) when the secret cannot be read."""
    check_settings(settings)
    return WebhookSender(
        r, settings.events_webhook, read_secret(settings.events_webhook_secret_file), batch=settings.events_batch
    )


def check_settings(settings: Settings) -> None:
    """Raises SecretError when ``events_webhook`` is set and its secret cannot be read: said once,
    at start, rather than by every worker `mtaq run` starts."""
    if settings.events_webhook:
        if not settings.events_webhook_secret_file:
            raise SecretError("events_webhook needs events_webhook_secret_file: the key the POSTs are signed with")
        read_secret(settings.events_webhook_secret_file)


def start_webhook_sender(settings: Settings, r: redis.Redis, stopping: threading.Event) -> threading.Thread | None:
    """In a worker: the sender's loop in a daemon thread when ``events_webhook`` is set."""
    if not settings.events_webhook:
        return None
    sender = sender_from_settings(settings, r)
    t = threading.Thread(target=sender.run, args=(stopping,), name="mtaq-webhook", daemon=True)
    t.start()
    return t
