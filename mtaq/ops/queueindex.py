"""Reading the queue's counters and indexes (common/queuestats.py keeps them): counts by state, the
qshape table and the oldest message in a few round trips whatever the queue's length, and the
queue ids a filtered listing asks for, from the smallest index that answers it.

``exact_counts`` computes the same numbers from a walk (`mtaq queue stats --exact`, and the tests
that prove the counters equal it)."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import redis

from common.envelope import RcptState
from common.store import HOLD, INDEX, QCOUNTS, QDEFERRED, QDESTS, qdest_key
from common.storeio import reply_text
from mtaq.ops.queueview import AGE_BUCKETS, QUEUE_STATES, MessageView, QueueShape, age_bucket, load_views

__all__ = [
    "QueueCounts",
    "counted_shape",
    "deferred_sample",
    "exact_counts",
    "read_counts",
    "selected_ids",
]

REASONS_SAMPLE = 200  # deferred messages whose replies give `stats` its top deferral reasons


@dataclass
class QueueCounts:
    """The queue in numbers: messages and open recipients by state (active, deferred, held), octets,
    the oldest arrival, and per destination the messages in each qshape age bucket and the oldest
    arrival. A message counts once per destination it has an open recipient at."""

    now: float
    messages: int = 0
    size: int = 0
    by_state: dict[str, int] = field(default_factory=lambda: dict.fromkeys(QUEUE_STATES, 0))
    recipients: dict[str, int] = field(default_factory=lambda: dict.fromkeys(QUEUE_STATES, 0))
    oldest: float | None = None
    destinations: dict[str, list[int]] = field(default_factory=dict)
    destination_oldest: dict[str, float] = field(default_factory=dict)

    def top(self, n: int) -> list[tuple[str, list[int]]]:
        return sorted(self.destinations.items(), key=lambda kv: (-sum(kv[1]), kv[0]))[:n]

    def shape(self, deferred: Iterable[MessageView] = ()) -> QueueShape:
        """As mtaq/ops/queueview.QueueShape (what the formatters and the status page take); reasons
        and deferred destinations from ``deferred``, a sample of deferred messages."""
        out = QueueShape(self.now, self.messages, self.size, dict(self.by_state))
        out.recipients_by_state = Counter(
            {"pending": self.recipients["active"], "deferred": self.recipients["deferred"]}
        )
        out.recipients_by_state["held"] = self.recipients["held"]
        out.destinations = {d: list(row) for d, row in self.destinations.items()}
        out.oldest = self.oldest
        for m in deferred:
            for rc in m.open:
                if rc.state is RcptState.DEFERRED:
                    out.note_deferred(rc)
        return out


def exact_counts(views: Iterable[MessageView], now: float) -> QueueCounts:
    """The counts from a walk of the queue (pure)."""
    out = QueueCounts(now)
    for m in views:
        out.messages += 1
        out.size += m.size
        state = m.state
        out.by_state[state] += 1
        arrival = m.envelope.received_at
        out.oldest = arrival if out.oldest is None else min(out.oldest, arrival)
        for rc in m.open:
            out.recipients["held" if m.held else "deferred" if rc.state is RcptState.DEFERRED else "active"] += 1
        col = age_bucket(m.age(now))
        for dest in m.destinations():
            out.destinations.setdefault(dest, [0] * len(AGE_BUCKETS))[col] += 1
            known = out.destination_oldest.get(dest)
            out.destination_oldest[dest] = arrival if known is None else min(known, arrival)
    return out


def read_counts(r: redis.Redis, now: float, *, top: int | None = None) -> QueueCounts:
    """The counts from the counters and indexes: two round trips, the second one of 8 commands per
    destination; no message is read. With ``top``, the destinations are the ``top`` largest (one
    more round trip of a ZCARD each to find them): a scrape stays small with many destinations."""
    pipe = r.pipeline(transaction=False)
    pipe.hgetall(QCOUNTS)
    pipe.zcard(INDEX)
    pipe.zrange(INDEX, 0, 0, withscores=True)
    pipe.smembers(QDESTS)
    raw, messages, first, dests = pipe.execute()
    c = {reply_text(k): int(v) for k, v in raw.items()}
    out = QueueCounts(now, messages=int(messages), size=max(0, c.get("bytes", 0)))
    held, deferred = max(0, c.get("m:held", 0)), max(0, c.get("m:deferred", 0))
    out.by_state = {"active": max(0, out.messages - held - deferred), "deferred": deferred, "held": held}
    out.recipients = {s: max(0, c.get(f"r:{s}", 0)) for s in QUEUE_STATES}
    out.oldest = float(first[0][1]) if first else None
    names = sorted(reply_text(d) for d in dests)
    if top is not None and len(names) > top:
        pipe = r.pipeline(transaction=False)
        for d in names:
            pipe.zcard(qdest_key(d))
        sizes = pipe.execute()
        names = sorted(d for _, d in sorted(zip((-int(n) for n in sizes), names, strict=True))[:top])
    if not names:
        return out
    limits = [limit for _, limit in AGE_BUCKETS[:-1]]
    pipe = r.pipeline(transaction=False)
    for d in names:
        key = qdest_key(d)
        pipe.zcard(key)
        pipe.zrange(key, 0, 0, withscores=True)
        for limit in limits:  # arrived after now - limit: younger than limit
            pipe.zcount(key, f"({now - limit!r}", "+inf")
    got = pipe.execute()
    step = 2 + len(limits)
    for n, d in enumerate(names):
        total, head, *younger = got[n * step : (n + 1) * step]
        if not total:
            continue
        cumulative = [int(x) for x in younger] + [int(total)]
        out.destinations[d] = [cumulative[0]] + [b - a for a, b in itertools.pairwise(cumulative)]
        if head:
            out.destination_oldest[d] = float(head[0][1])
    return out


def deferred_sample(r: redis.Redis, relayhost: str, n: int = REASONS_SAMPLE) -> list[MessageView]:
    """The ``n`` most recently arrived messages with a deferred recipient."""
    ids = [reply_text(x) for x in r.zrange(QDEFERRED, -n, -1)]
    return list(load_views(r, relayhost, ids=ids))


def counted_shape(r: redis.Redis, relayhost: str, now: float) -> QueueShape:
    return read_counts(r, now).shape(deferred_sample(r, relayhost))


# -- listing ---------------------------------------------------------------------------------------
def selected_ids(
    r: redis.Redis,
    now: float,
    *,
    domain: str | None = None,
    deferred: bool = False,
    hold: bool = False,
    older_than: float | None = None,
) -> list[str] | None:
    """The queue ids a filtered listing may show, in arrival order, from the indexes (a superset:
    the caller still checks each view); None when no filter names an index."""
    cutoff = "+inf" if older_than is None else f"({now - older_than!r}"
    if hold:
        ids = [reply_text(x) for x in r.smembers(HOLD)]
        scores = r.zmscore(INDEX, ids) if ids else []
        ranked = sorted((s, q) for q, s in zip(ids, scores, strict=True) if s is not None)
        return [q for s, q in ranked if older_than is None or s < now - older_than]
    if domain is not None:
        return [reply_text(x) for x in r.zrangebyscore(qdest_key(domain.lower().rstrip(".")), "-inf", cutoff)]
    if deferred:
        return [reply_text(x) for x in r.zrangebyscore(QDEFERRED, "-inf", cutoff)]
    if older_than is not None:
        return [reply_text(x) for x in r.zrangebyscore(INDEX, "-inf", cutoff)]
    return None
