"""The destinations some process claims a connection slot of (worker/limits.py ``WANTS_KEY``),
kept current in this process over pub/sub instead of read again and again.

Every conversation of a worker asks, between transactions, whether another process waits for one
of its destination's slots. The listing is a sorted set (destination -> the claim's expiry in ms);
it was read at most every 0.2 s a process, nearly always to find nothing: 0.37 of the 17 Redis
commands a delivered message cost on issue 15's ceiling load, and as many round trips. Now the
acquire script publishes each listing ("<destination> TAB <listed until, ms>") and unlisting
("<destination> TAB 0") on a channel of the same name, and a process
reads the set once when it subscribes, then only what was published: reading a subscription's
socket without blocking is no Redis command at all.

The subscription is opened at the first question, and opened again every RESUBSCRIBE seconds (a
connection that died without a word, as after a failover, would otherwise go quiet); the set is
read again each time. Until the subscription is confirmed, or when Redis fails, the watch cannot
say (None) and the caller reads the set itself."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

__all__ = ["RESUBSCRIBE", "SUBSCRIBE_WAIT", "ClaimWatch"]

RESUBSCRIBE = 30.0  # seconds a subscription serves before it is opened again
SUBSCRIBE_WAIT = 1.0  # seconds to wait for Redis to confirm a subscription


def _text(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


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
        self._scores: dict[str, int] = {}  # destination -> listed until (ms, the claimer's clock)

    def listed(self, now: float) -> frozenset[str] | None:
        """The destinations listed at ``now`` (epoch seconds), or None when the watch cannot say."""
        with self._lock:
            try:
                if self._sub is None or self.monotonic() - self._opened >= self.resubscribe:
                    self._open()
                self._drain()
            except redis.RedisError:
                self._close()
                return None
            now_ms = int(now * 1000)
            if len(self._scores) > 1000:  # lapsed listings nobody unlisted: forget them
                self._scores = {d: s for d, s in self._scores.items() if s >= now_ms}
            return frozenset(d for d, s in self._scores.items() if s >= now_ms)

    def close(self) -> None:
        with self._lock:
            self._close()

    def _open(self) -> None:
        self._close()
        sub = self.redis.pubsub(ignore_subscribe_messages=False)
        self._sub = sub
        sub.subscribe(self.channel)
        deadline = self.monotonic() + SUBSCRIBE_WAIT
        while True:  # confirmed before the set is read: nothing published after the read is missed
            m = sub.get_message(timeout=max(0.0, deadline - self.monotonic()))
            if m is not None and m.get("type") == "subscribe":
                break
            if self.monotonic() >= deadline:
                raise redis.TimeoutError(f"no confirmation of SUBSCRIBE {self.channel}")
        got: list[tuple[bytes | str, float]] = self.redis.zrangebyscore(self.channel, "-inf", "+inf", withscores=True)  # type: ignore[assignment]
        self._scores = {_text(d): int(s) for d, s in got}
        self._opened = self.monotonic()

    def _drain(self) -> None:
        """Apply what was published since the last look; reads the socket, asks Redis nothing."""
        while (m := self._sub.get_message(timeout=0.0)) is not None:
            if m.get("type") != "message":
                continue
            destination, _, score = _text(m["data"]).rpartition("\t")
            if score == "0":
                self._scores.pop(destination, None)
            elif score.isdigit():
                self._scores[destination] = int(score)

    def _close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(redis.RedisError):
                sub.close()
