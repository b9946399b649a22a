"""The destinations some process claims a connection slot of (worker/limits.py ``WANTS_KEY``),
kept current in this process over pub/sub instead of read again and again.

Every conversation of a worker asks, between transactions, whether another process waits for one
of its destination's slots. The listing is a sorted set (destination -> the claim's expiry in ms);
it was read at most every 0.2 s a process, nearly always to find nothing: 0.37 of the 17 Redis
commands a delivered message cost on issue 15's ceiling load, and as many round trips. Now the
acquire script publishes each listing ("<destination> TAB <listed until, ms>") and unlisting
("<destination> TAB 0") on a channel of the same name, and a process
reads the set once when it subscribes, then only what was published: reading a subscription's
socket without blocking is no Redis command at all (opening one again every RESUBSCRIBE seconds
is a reconnection: a handful of commands a process every 30 s).

The subscription is opened at the first question, and opened again every RESUBSCRIBE seconds (a
connection that died without a word, as after a failover, would otherwise go quiet); the set is
read again each time. The worker's heartbeat reads what was published meanwhile (``tick``: Redis
keeps what a subscriber has not read in its output buffer), and lets a subscription go that nobody
asked for that long. Until the subscription is confirmed, or for RETRY_AFTER seconds after Redis
failed, the watch cannot say (None) and the caller reads the set itself."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from common.storeio import reply_text

__all__ = ["RESUBSCRIBE", "RETRY_AFTER", "SUBSCRIBE_WAIT", "ClaimWatch"]

RESUBSCRIBE = 30.0  # seconds a subscription serves before it is opened again
SUBSCRIBE_WAIT = 1.0  # seconds to wait for Redis to confirm a subscription
RETRY_AFTER = 5.0  # seconds without a new subscription after one failed (the set is read meanwhile)


class ClaimWatch:
    def __init__(
        self,
        r: redis.Redis,
        channel: str,
        *,
        resubscribe: float = RESUBSCRIBE,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = r
        self.channel = channel  # the sorted set's name, and the channel's
        self.resubscribe = resubscribe
        self.monotonic = monotonic
        self._lock = threading.Lock()
        self._sub: Any = None  # redis.client.PubSub
        self._opened = 0.0
        self._opening = False  # a caller is opening a subscription (outside the lock)
        self._asked = 0.0  # when listed() was last called
        self._retry_at = 0.0  # no new subscription before this, after a failure
        self._scores: dict[str, int] = {}  # destination -> listed until (ms, the claimer's clock)

    def listed(self, now: float) -> frozenset[str] | None:
        """The destinations listed at ``now`` (epoch seconds), or None when the watch cannot say.
        The lock is held for reads of the subscription's socket only: one caller at a time opens a
        subscription, outside it (the others go on with the old one, or are told None), and after
        a failure nobody tries again for RETRY_AFTER seconds (Redis gone must not cost every
        conversation a connection attempt)."""
        opening = False
        with self._lock:
            self._asked = self.monotonic()
            due = self._sub is None or self._asked - self._opened >= self.resubscribe
            if due and not self._opening and self._asked >= self._retry_at:
                self._opening = opening = True
        if opening:
            self._replace()
        with self._lock:
            if self._sub is None:
                return None
            try:
                self._drain()
            except redis.RedisError:
                self._failed()
                return None
            now_ms = int(now * 1000)
            if len(self._scores) > 1000:  # lapsed listings nobody unlisted: forget them
                self._scores = {d: s for d, s in self._scores.items() if s >= now_ms}
            return frozenset(d for d, s in self._scores.items() if s >= now_ms)

    def tick(self) -> None:
        """The heartbeat's: read what was published (Redis keeps what a subscriber has not read in
        its output buffer), and let a subscription nobody asked for RESUBSCRIBE seconds go."""
        with self._lock:
            if self._sub is None:
                return
            if self.monotonic() - self._asked >= self.resubscribe:
                self._close()
                return
            try:
                self._drain()
            except redis.RedisError:
                self._failed()

    def close(self) -> None:
        with self._lock:
            self._close()

    def _replace(self) -> None:
        """Open a subscription and read the set, outside the lock; then it replaces the old one."""
        sub: Any = None
        try:
            sub = self.redis.pubsub(ignore_subscribe_messages=False)
            sub.subscribe(self.channel)
            deadline = self.monotonic() + SUBSCRIBE_WAIT
            while True:  # confirmed before the set is read: nothing published after the read is missed
                m = sub.get_message(timeout=max(0.0, deadline - self.monotonic()))
                if m is not None and m.get("type") == "subscribe":
                    break
                if self.monotonic() >= deadline:
                    raise redis.TimeoutError(f"no confirmation of SUBSCRIBE {self.channel}")
            got: list[tuple[bytes | str, float]] = self.redis.zrangebyscore(
                self.channel, "-inf", "+inf", withscores=True
            )  # type: ignore[assignment]
            scores = {reply_text(d): int(s) for d, s in got}
        except redis.RedisError:
            if sub is not None:
                with contextlib.suppress(redis.RedisError):
                    sub.close()
            with self._lock:
                self._opening = False
                self._failed()
            return
        with self._lock:
            self._close()
            self._sub, self._scores, self._opened, self._opening = sub, scores, self.monotonic(), False

    def _failed(self) -> None:
        self._close()
        self._retry_at = self.monotonic() + RETRY_AFTER

    def _drain(self) -> None:
        """Apply what was published since the last look; reads the socket, asks Redis nothing."""
        while (m := self._sub.get_message(timeout=0.0)) is not None:
            if m.get("type") != "message":
                continue
            destination, _, score = reply_text(m["data"], "replace").rpartition("\t")
            if score == "0":
                self._scores.pop(destination, None)
            elif score.isascii() and score.isdigit():
                self._scores[destination] = int(score)

    def _close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(redis.RedisError):
                sub.close()
