"""Reading the queue's counters and indexes (common/queuestats.py keeps them): counts by state, the
qshape table and the oldest message in a few round trips whatever the queue's length; the queue ids
a filtered listing asks for, from the smallest index that answers it; the whole queue streamed a
chunk at a time; and the sweep's recount, which corrects whatever drifted.

``exact_counts`` computes the same numbers from a walk (`mtaq queue stats --exact`, and the tests
that prove the counters equal it)."""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from common.envelope import Envelope, RcptState
from common.queuestats import COUNTER_FIELDS
from common.queueview import AGE_BUCKETS, QUEUE_STATES, MessageView, QueueShape, age_bucket, load_views, reason_of
from common.store import HOLD, INDEX, QCOUNTS, QDEFERRED, QDESTS, Message, Store, msg_key, qdest_key

__all__ = [
    "QueueCounts",
    "RecountReport",
    "exact_counts",
    "read_counts",
    "recount",
    "selected_ids",
    "stream_ids",
]

log = logging.getLogger("mtaq.queueindex")

REASONS_SAMPLE = 200  # deferred messages whose replies give `stats` its top deferral reasons


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


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
        """As common/queueview.QueueShape (what the formatters and the status page take); reasons
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
                    out.deferred_destinations.add(rc.destination)
                    out.reasons[reason_of(rc.status.reply)] += 1
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
    c = {_text(k): int(v) for k, v in raw.items()}
    out = QueueCounts(now, messages=int(messages), size=max(0, c.get("bytes", 0)))
    held, deferred = max(0, c.get("m:held", 0)), max(0, c.get("m:deferred", 0))
    out.by_state = {"active": max(0, out.messages - held - deferred), "deferred": deferred, "held": held}
    out.recipients = {s: max(0, c.get(f"r:{s}", 0)) for s in QUEUE_STATES}
    out.oldest = float(first[0][1]) if first else None
    names = sorted(_text(d) for d in dests)
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
    ids = [_text(x) for x in r.zrange(QDEFERRED, -n, -1)]
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
        ids = [_text(x) for x in r.smembers(HOLD)]
        scores = r.zmscore(INDEX, ids) if ids else []
        ranked = sorted((s, q) for q, s in zip(ids, scores, strict=True) if s is not None)
        return [q for s, q in ranked if older_than is None or s < now - older_than]
    if domain is not None:
        return [_text(x) for x in r.zrangebyscore(qdest_key(domain.lower().rstrip(".")), "-inf", cutoff)]
    if deferred:
        return [_text(x) for x in r.zrangebyscore(QDEFERRED, "-inf", cutoff)]
    if older_than is not None:
        return [_text(x) for x in r.zrangebyscore(INDEX, "-inf", cutoff)]
    return None


def stream_ids(r: redis.Redis, chunk: int = 500, first: int = 50) -> Iterator[list[str]]:
    """The whole queue in arrival order, a chunk (one round trip) at a time, from a cursor on the
    arrival score: memory stays one chunk whatever the queue's length, and messages that finish
    meanwhile do not shift what comes next. The first chunk is ``first`` long: a listing's first
    lines come out before the rest is read."""
    after: float | None = None
    size = min(first, chunk)
    seen: set[str] = set()  # ids at the cursor's score already given (arrivals in the same microsecond)
    while True:
        low = "-inf" if after is None else repr(after)
        got: Any = r.zrangebyscore(INDEX, low, "+inf", start=0, num=size + len(seen), withscores=True)
        fresh = [(_text(q), float(s)) for q, s in got if _text(q) not in seen]
        if not fresh:
            return
        fresh = fresh[:size]
        size = chunk
        yield [q for q, _ in fresh]
        last = fresh[-1][1]
        seen = {q for q, s in fresh if s == last} | (seen if last == after else set())
        after = last


# -- the recount -----------------------------------------------------------------------------------
@dataclass
class RecountReport:
    messages: int = 0
    repaired: int = 0  # messages whose summary or index entries were wrong
    removed: int = 0  # index entries of messages no longer queued
    applied: bool = False  # the totals were written (nothing changed the counters during the walk)
    drift: dict[str, int] = field(default_factory=dict)  # counter -> what it was off by


class Recount:
    """One walk's recount: ``add`` each chunk of messages the walk loads, then ``finish``.

    Each message is recounted atomically (queuestats.REPAIR), so its own contribution is right
    whatever runs meanwhile. The totals are written only if nothing changed the counters during the
    walk (WATCH from the start): otherwise the next sweep tries again; a drift in the totals needs
    something that bypassed the scripts (an older mtaq, a hand-made change), so waiting is safe."""

    def __init__(self, store: Store, hop: Callable[[str], str]) -> None:
        self.store = store
        self.hop = hop
        self.report = RecountReport()
        self.totals: Counter[str] = Counter()
        self._watch = store.redis.pipeline(transaction=True)
        self._watch.watch(QCOUNTS)  # type: ignore[no-untyped-call]
        self._before = {_text(k): int(v) for k, v in store.redis.hgetall(QCOUNTS).items()}

    def add(self, messages: Sequence[Message]) -> None:
        pipe = self.store.redis.pipeline(transaction=False)
        for m in messages:
            self.store.repair(m.envelope, self.hop, client=pipe)
        for got in pipe.execute():
            if not got:
                continue
            changed, size, held, pending, deferred = (int(x) for x in got)
            self.report.messages += 1
            self.report.repaired += changed
            t = self.totals
            t["bytes"] += size
            if held:
                t["m:held"] += 1
                t["r:held"] += pending + deferred
            else:
                t["m:deferred"] += 1 if deferred else 0
                t["r:active"] += pending
                t["r:deferred"] += deferred

    def finish(self) -> RecountReport:
        r = self.store.redis
        self.report.removed = _drop_strays(r)
        want: dict[Any, int] = {f: self.totals.get(f, 0) for f in COUNTER_FIELDS}
        try:
            now = {_text(k): int(v) for k, v in self._watch.hgetall(QCOUNTS).items()}
            self.report.drift = {f: now.get(f, 0) - v for f, v in want.items() if now.get(f, 0) != v}
            self._watch.multi()
            self._watch.delete(QCOUNTS)
            self._watch.hset(QCOUNTS, mapping=want)
            self._watch.execute()
            self.report.applied = True
        except redis.WatchError:
            self.report.applied = False
        finally:
            self._watch.reset()
        if self.report.applied and self.report.drift:
            log.warning(
                "queue counters corrected: %s", ", ".join(f"{k} off by {v}" for k, v in self.report.drift.items())
            )
        return self.report

    def close(self) -> None:
        self._watch.reset()


def _drop_strays(r: redis.Redis, chunk: int = 1000) -> int:
    """Index entries of messages no longer queued (left by something that bypassed the scripts):
    removed, and destinations whose index is empty taken out of the set. Returns how many."""
    removed = 0
    keys = [QDEFERRED] + [qdest_key(_text(d)) for d in r.smembers(QDESTS)]
    for key in keys:
        start = 0
        while True:
            ids = [_text(x) for x in r.zrange(key, start, start + chunk - 1)]
            if not ids:
                break
            gone = [q for q, s in zip(ids, r.zmscore(INDEX, ids), strict=True) if s is None]
            if gone:
                removed += int(r.zrem(key, *gone))
            start += len(ids) - len(gone)
    for d in r.smembers(QDESTS):
        if not r.exists(qdest_key(_text(d))):
            r.srem(QDESTS, d)
    return removed


def recount(store: Store, hop: Callable[[str], str], chunk: int = 500) -> RecountReport:
    """Walk the queue (envelopes only) and recount: `mtaq queue sweep` and the tests; the worker's
    periodic sweep recounts in the walk it already makes (worker/sweep.py)."""
    rc = Recount(store, hop)
    try:
        for ids in stream_ids(store.redis, chunk):
            rc.add(_envelopes(store.redis, ids))
        return rc.finish()
    finally:
        rc.close()


def _envelopes(r: redis.Redis, ids: Sequence[str]) -> list[Message]:
    pipe = r.pipeline(transaction=False)
    for qid in ids:
        pipe.hget(msg_key(qid), "env")
    return [Message(Envelope.from_json(env), b"") for env in pipe.execute() if env is not None]
