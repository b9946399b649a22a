"""How long the stream ``mtaq:events`` may grow, in entries (issue 15).

An entry holds the events of one write (common/events.py ENTRY_FIELD: a group commit's receptions,
an outcome writer's call), from one to a few hundred, while ``events_max`` counts events: the
memory an operator sized for. XADD trims by entries (``MAXLEN ~``), so each writing process bounds
the stream at ``events_max`` over the events an entry holds on average, which it reads off the
stream itself (its oldest and newest entries' counts, ENTRY_COUNT_FIELD) at most every
``SAMPLE_EVERY`` seconds: two reads, no write. Entries of an older mtaq count one event each.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import redis

from common.events import entry_count

__all__ = ["SAMPLED", "SAMPLE_EVERY", "StreamBound"]

SAMPLE_EVERY = 30.0  # seconds between looks at the stream's entries
SAMPLED = 100  # entries looked at from each end


class StreamBound:
    def __init__(
        self, r: redis.Redis, stream: str, events_max: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.redis = r
        self.stream = stream
        self.events_max = events_max
        self.clock = clock
        self.per_entry = 1.0  # events an entry holds, on average (1 until the stream is looked at)
        self._next = float("-inf")

    def entries(self) -> int:
        """The MAXLEN for this process's next XADD: about ``events_max`` events."""
        now = self.clock()
        if now >= self._next:
            self._next = now + SAMPLE_EVERY
            with contextlib.suppress(redis.RedisError):  # the last figure stands; the write says what is wrong
                self.per_entry = self.sample()
        return max(1, math.ceil(self.events_max / self.per_entry))

    def sample(self) -> float:
        """Events an entry holds on average, at the stream's two ends (1.0 when it is empty)."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.xrange(self.stream, "-", "+", count=SAMPLED)
            pipe.xrevrange(self.stream, "+", "-", count=SAMPLED)
            oldest, newest = pipe.execute()
        seen: dict[Any, int] = {sid: entry_count(fields) for sid, fields in [*(oldest or []), *(newest or [])]}
        return sum(seen.values()) / len(seen) if seen else 1.0
