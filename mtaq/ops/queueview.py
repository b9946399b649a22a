"""The operator's view of the queue: each message's envelope, size and recipient states without its
body, and the summaries `mtaq queue stats`, the status page and the metrics share (counts by state,
a qshape-like age histogram per destination, the top deferral reasons).

Reading is pure once the data is loaded: ``load_views`` does the Redis round trips (one per chunk of
messages), everything else takes the views and a clock."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from common.classify import classify
from common.envelope import Envelope, RcptState, RecipientStatus
from common.msglayout import is_inline, state_field, states_listed, states_of_older
from common.routing import next_hop
from common.statusscript import LAYOUT_FIELD
from common.store import HOLD, INDEX, msg_key, rcpt_key
from common.storeio import reply_text

__all__ = [
    "AGE_BUCKETS",
    "MessageView",
    "QueueShape",
    "RcptView",
    "age_bucket",
    "load_views",
    "shape",
]

# qshape's columns, in minutes: 0-5, 5-10, 10-20, 20-40, 40-80, 80-160, older
AGE_BUCKETS: tuple[tuple[str, float], ...] = (
    ("0-5m", 300.0),
    ("5-10m", 600.0),
    ("10-20m", 1200.0),
    ("20-40m", 2400.0),
    ("40-80m", 4800.0),
    ("80-160m", 9600.0),
    ("older", float("inf")),
)


def age_bucket(age: float) -> int:
    for i, (_, limit) in enumerate(AGE_BUCKETS):
        if age < limit:
            return i
    return len(AGE_BUCKETS) - 1


@dataclass(frozen=True, slots=True)
class RcptView:
    address: str
    destination: str
    status: RecipientStatus

    @property
    def state(self) -> RcptState:
        return self.status.state


@dataclass(frozen=True, slots=True)
class MessageView:
    envelope: Envelope
    size: int
    recipients: tuple[RcptView, ...]
    held: bool

    @property
    def qid(self) -> str:
        return self.envelope.id

    @property
    def open(self) -> tuple[RcptView, ...]:
        """Recipients not final yet."""
        return tuple(r for r in self.recipients if not r.status.final)

    @property
    def state(self) -> str:
        """held (an operator's hold), deferred (a recipient waits for a retry), or active (new mail,
        or mail being delivered now)."""
        if self.held:
            return "held"
        if any(r.state is RcptState.DEFERRED for r in self.open):
            return "deferred"
        return "active"

    def age(self, now: float) -> float:
        return max(0.0, now - self.envelope.received_at)

    def destinations(self) -> list[str]:
        return list(dict.fromkeys(r.destination for r in self.open))


QUEUE_STATES = ("active", "deferred", "held")


def load_views(
    r: redis.Redis, relayhost: str = "", *, ids: Sequence[str] | None = None, chunk: int = 500
) -> Iterator[MessageView]:
    """Messages in arrival order (or ``ids`` in their order), one round trip per chunk; messages
    finished meanwhile, and unknown ids, are left out."""
    if ids is None:
        ids = [reply_text(x) for x in r.zrange(INDEX, 0, -1)]
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        pipe = r.pipeline(transaction=False)
        for qid in part:
            pipe.hmget(msg_key(qid), ["env", LAYOUT_FIELD])
            pipe.hstrlen(msg_key(qid), "body")
        if part:
            pipe.smismember(HOLD, list(part))
        raw = pipe.execute()
        held = raw[-1] if part else []
        envs = {n: (Envelope.from_json(got[0]), got[1]) for n, got in enumerate(raw[0:-1:2]) if got[0] is not None}
        # the states a second round trip: where they are, and which fields, the envelope says
        pipe = r.pipeline(transaction=False)
        for n, (env, layout) in envs.items():
            if is_inline(layout):
                pipe.hmget(msg_key(part[n]), [state_field(i) for i in range(len(env.recipients))] or ["r0"])
            else:
                pipe.hgetall(rcpt_key(part[n]))
        states = pipe.execute() if envs else []
        for (n, (env, layout)), got in zip(envs.items(), states, strict=True):
            parsed = states_listed(got) if is_inline(layout) else states_of_older(got)
            rcpts = tuple(
                RcptView(rc.address, next_hop(rc.address, relayhost), parsed.get(i, RecipientStatus()))
                for i, rc in enumerate(env.recipients)
            )
            yield MessageView(env, int(raw[2 * n + 1]), rcpts, bool(held[n]))


_VOLATILE = re.compile(r"\b[0-9A-F]{10,}\b|\b\d{6,}\b")  # queue ids, long numbers; not ports


def reason_of(reply: str, limit: int = 100) -> str:
    """A deferral reply as a reason to count: queue ids and long numbers masked, so that the same
    refusal from a remote counts as one reason."""
    text = _VOLATILE.sub("…", " ".join(reply.split()))
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class QueueShape:
    now: float
    messages: int = 0
    size: int = 0
    by_state: dict[str, int] = field(default_factory=lambda: dict.fromkeys(QUEUE_STATES, 0))
    recipients_by_state: Counter[str] = field(default_factory=Counter)
    # destination -> messages per age bucket (a message counts once per destination it still has)
    destinations: dict[str, list[int]] = field(default_factory=dict)
    deferred_destinations: set[str] = field(default_factory=set)
    reasons: Counter[str] = field(default_factory=Counter)
    reason_class: dict[str, str] = field(default_factory=dict)  # reason -> its bounce class (issue 19)
    oldest: float | None = None  # arrival time of the oldest message

    def note_deferred(self, rc: RcptView) -> None:
        """A deferred recipient: its destination, its reason and the reason's bounce class."""
        self.deferred_destinations.add(rc.destination)
        reason = reason_of(rc.status.reply)
        self.reasons[reason] += 1
        self.reason_class.setdefault(reason, classify(rc.status.dsn, rc.status.reply).value)

    def top_destinations(self, n: int = 20) -> list[tuple[str, list[int]]]:
        return sorted(self.destinations.items(), key=lambda kv: (-sum(kv[1]), kv[0]))[:n]

    def totals(self) -> list[int]:
        out = [0] * len(AGE_BUCKETS)
        for row in self.destinations.values():
            out = [a + b for a, b in zip(out, row, strict=True)]
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "bytes": self.size,
            "by_state": self.by_state,
            "recipients_by_state": dict(self.recipients_by_state),
            "age_buckets": [name for name, _ in AGE_BUCKETS],
            "destinations": {d: row for d, row in self.top_destinations(len(self.destinations))},
            "deferred_destinations": sorted(self.deferred_destinations),
            "top_deferral_reasons": [
                {"reason": r, "count": c, "classification": self.reason_class.get(r, "")}
                for r, c in self.reasons.most_common(10)
            ],
            "oldest_age_seconds": None if self.oldest is None else round(self.now - self.oldest, 3),
        }


def shape(views: Iterator[MessageView] | Sequence[MessageView], now: float) -> QueueShape:
    out = QueueShape(now)
    for m in views:
        out.messages += 1
        out.size += m.size
        out.by_state[m.state] += 1
        if out.oldest is None or m.envelope.received_at < out.oldest:
            out.oldest = m.envelope.received_at
        col = age_bucket(m.age(now))
        for dest in m.destinations():
            out.destinations.setdefault(dest, [0] * len(AGE_BUCKETS))[col] += 1
        for rc in m.recipients:
            out.recipients_by_state[rc.state.value] += 1
            if rc.state is RcptState.DEFERRED:
                out.note_deferred(rc)
    return out
