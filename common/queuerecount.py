"""The queue's counters and indexes (common/queuestats.py) recounted from the queue: the sweep's
correction of whatever drifted (something that bypassed the scripts), and the streamed walk it
and `mtaq queue list` share."""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from common.envelope import Envelope
from common.queuestats import COUNTER_FIELDS, DROP_EMPTY
from common.store import INDEX, QCOUNTS, QDEFERRED, QDEST_PREFIX, QDESTS, QDESTS_GEN, Message, Store, msg_key, qdest_key
from common.storeio import reply_text

__all__ = ["Recount", "RecountReport", "recount", "stream_ids"]

log = logging.getLogger("mtaq.queuerecount")


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
        fresh = [(reply_text(q), float(s)) for q, s in got if reply_text(q) not in seen]
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
        self._before = {reply_text(k): int(v) for k, v in store.redis.hgetall(QCOUNTS).items()}

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
            now = {reply_text(k): int(v) for k, v in self._watch.hgetall(QCOUNTS).items()}
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
    keys = [QDEFERRED] + [qdest_key(reply_text(d)) for d in r.smembers(QDESTS)]
    for key in keys:
        start = 0
        while True:
            ids = [reply_text(x) for x in r.zrange(key, start, start + chunk - 1)]
            if not ids:
                break
            gone = [q for q, s in zip(ids, r.zmscore(INDEX, ids), strict=True) if s is None]
            if gone:
                removed += int(r.zrem(key, *gone))
            start += len(ids) - len(gone)
    r.eval(DROP_EMPTY, 2, QDESTS, QDESTS_GEN, QDEST_PREFIX, uuid.uuid4().hex)
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
