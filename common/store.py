"""Message storage: every Redis key mtaq writes, and the operations on them.

No other module builds a ``mtaq:`` key string. Keys (RQ keeps its own ``rq:`` keys, common/jobqueue.py):

``mtaq:msg:<id>``   hash: ``env`` (envelope JSON) and ``body`` (the message bytes, stored once);
                    ``q``, its summary (common/queuestats.py); ``r<n>``, recipient n's
                    RecipientStatus JSON once it has been tried (absent: pending); ``v`` = 2, the
                    layout (common/statusscript.py LAYOUT); ``warned`` (time) once its delay
                    warning was queued
``mtaq:rcpt:<id>``, ``mtaq:left:<id>``  a message in the older layout (no ``v``: an older mtaq's,
                    or written while the layout gate was closed): its
                    recipients' states (hash: index -> JSON) and how many are not yet final
``mtaq:layout``     string: "2" once every worker reads one key a message (LAYOUT_KEY, the gate)
``mtaq:index``      sorted set: queue id -> arrival time (mailq listing, queue size for backpressure)
``mtaq:stats``      hash of counters: received, delivered, bounced, deferred, and the metrics' own
                    (common/metrics.py: accepted, connections, rejected:<code>, latency buckets ...)
``mtaq:leases:<destination>`` hash: queue id -> the token of the job working on that message for
                    that destination (common/leasebook.py); a lease counts while its holder key lives
``mtaq:holder:<token>`` string with a TTL: a job's leases are alive (pushed on by its worker's heartbeat)
``mtaq:lease:<id>:finish`` string with a TTL: a finisher's claim on building that message's report
``mtaq:sweep-lock`` string with a TTL: the worker sweeping the queue now
``mtaq:hold``       set: queue ids an operator put on hold (`mtaq queue hold`); never delivered until released
``mtaq:samples``    sorted set: time -> JSON sample of queue depth and counters (the status page's chart)
``mtaq:samples-lock`` string with a TTL: the exporter that wrote the last sample
``mtaq:events``     stream of delivery events (common/events.py), an entry a write (its events as a
                    JSON array), capped at about ``events_max`` events (common/eventstream.py); the
                    consumer group ``webhook`` is the webhook sender's (worker/webhook.py)
``mtaq:events:sender`` string with a TTL: the process sending the webhook now (one per deployment)
``mtaq:suppressed`` sorted set: suppressed address -> until (epoch seconds) (common/suppression.py)
``mtaq:suppressed:since`` hash: suppressed address -> when it was suppressed
``mtaq:suppressed:changes`` stream of changes to the list (address, op), capped: what an ingress
                    cache reads to stay current without a round trip per RCPT
``mtaq:committed:<id>`` string with a TTL: a group commit (named by its first message) was stored
                    (with redis_min_replicas: settling a commit the loss of the primary cut off)
``mtaq:redis:primary``, ``mtaq:redis:failovers``, ``mtaq:redis:last-failover``  strings: the Redis
                    primary last seen through the Sentinels, failovers counted, the last one's time
``mtaq:queue:*``    the queue's counters and indexes (issue 16, common/queuestats.py): see below

Writes that must fail cleanly (commit, the queue size behind backpressure) raise StoreUnavailable or
StoreFull, never a redis-py exception: callers decide what to answer without knowing redis-py.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from common import queuestats
from common.envelope import Envelope, RcptState, RecipientStatus, domain_of
from common.events import Event, entry_fields, event_json
from common.eventstream import StreamBound
from common.msglayout import field, hold_flag, is_inline, state_field, states_listed, states_of, states_of_older
from common.statusscript import LAYOUT_FIELD, LAYOUT_INLINE, SET_STATUSES, STATUSES_PER_CALL
from common.statusscript import REMOVED as REMOVED
from common.storeio import (
    Replicated,
    Ride,
    StoreError,
    StoreFull,
    StoreNotReplicated,
    StoreUnavailable,
    reply_text,
    translated,
)

__all__ = [
    "SWEEP_LOCK",
    "Message",
    "Store",
    "StoreError",
    "StoreFull",
    "StoreNotReplicated",
    "StoreUnavailable",
]

log = logging.getLogger("mtaq.store")

PREFIX = "mtaq:"
INDEX = PREFIX + "index"
STATS = PREFIX + "stats"
SWEEP_LOCK = PREFIX + "sweep-lock"
HOLD = PREFIX + "hold"
RECOVERY_LOCK = PREFIX + "recovery-lock"  # the worker running RQ's registry clean-up now (short TTL)
SAMPLES = PREFIX + "samples"
SAMPLE_LOCK = PREFIX + "samples-lock"
# high availability (common/replication.py): the primary last seen, failovers counted, the last one's time
PRIMARY_SEEN = PREFIX + "redis:primary"
FAILOVERS = PREFIX + "redis:failovers"
FAILOVER_TIME = PREFIX + "redis:last-failover"
# One key a message (common/statusscript.py LAYOUT) is written only once every worker reads it: a
# worker says so in its RQ worker hash (WORKER_LAYOUT_FIELD), and a worker that finds every
# registered worker saying so sets LAYOUT_KEY, for good (Store.open_layout). Until then new mail
# is written as an older mtaq wrote it, which every version reads: a rolling upgrade.
LAYOUT_KEY = PREFIX + "layout"
WORKER_LAYOUT_FIELD = "mtaq_layout"
COMMIT_MARK_TTL = 3600  # seconds a commit's mark lasts: far longer than an interrupted commit is settled in

# Queue monitoring (issue 16): counters and indexes kept in the round trips that change the queue
# (common/queuestats.py keeps them, mtaq/ops/queueindex.py reads them); the field "q" of a message
# hash is its summary.
QCOUNTS = PREFIX + "queue:counts"  # hash: bytes, m:deferred, m:held, r:active, r:deferred, r:held
QDEFERRED = PREFIX + "queue:deferred"  # zset: queue id -> arrival, messages with a deferred recipient
QDESTS = PREFIX + "queue:dests"  # set: destinations that have an index
QDESTS_GEN = PREFIX + "queue:dests-gen"  # string: changes whenever a destination leaves QDESTS
DESTS_KNOWN_FOR = 60.0  # seconds a process trusts what it knows of QDESTS (Store.commit)
QDEST_PREFIX = PREFIX + "queue:dest:"  # + destination: zset, queue id -> arrival, open recipients there


def qdest_key(destination: str) -> str:
    return QDEST_PREFIX + destination


# Delivery events and suppression (issue 19)
EVENTS = PREFIX + "events"
EVENTS_GROUP = "webhook"  # the webhook sender's consumer group on EVENTS
EVENTS_SENDER_LOCK = PREFIX + "events:sender"
SUPPRESSED = PREFIX + "suppressed"
SUPPRESSED_SINCE = PREFIX + "suppressed:since"
SUPPRESSED_CHANGES = PREFIX + "suppressed:changes"


def msg_key(qid: str) -> str:
    return f"{PREFIX}msg:{qid}"


def rcpt_key(qid: str) -> str:
    return f"{PREFIX}rcpt:{qid}"


def left_key(qid: str) -> str:
    return f"{PREFIX}left:{qid}"


def commit_mark_key(mark: str) -> str:
    return f"{PREFIX}committed:{mark}"


def claim_key(qid: str, what: str) -> str:
    return f"{PREFIX}lease:{qid}:{what}"


def leases_key(destination: str) -> str:
    return f"{PREFIX}leases:{destination}"


HOLDER_PREFIX = PREFIX + "holder:"


def holder_key(token: str) -> str:
    return HOLDER_PREFIX + token


# Per-destination pending lists drained by one job at a time (issue 15, common/jobqueue.py):
# ``mtaq:pend:<d>``   list: queue ids committed for d that no job has taken yet;
# ``mtaq:armed``      hash: d -> the id of the queued RQ job that will take d's pending list;
# ``mtaq:pend-count`` int: messages in every pending list (the ingress's flow control reads it);
# ``mtaq:drawn:<job>`` list, TTL: the ids that job took (a re-run after a crash takes the same);
# ``mtaq:drawn-avg``  float: messages a drain job took, moving average (flow control's job size).
ARMED = PREFIX + "armed"
PEND_COUNT = PREFIX + "pend-count"
DRAWN_AVG = PREFIX + "drawn-avg"


def pend_key(destination: str) -> str:
    return f"{PREFIX}pend:{destination}"


def drawn_key(job_id: str) -> str:
    return f"{PREFIX}drawn:{job_id}"


# Per-destination delivery limits shared by every worker (worker/limits.py):
# ``mtaq:dest:<d>:slots`` sorted set, connection token -> lease expiry (a dead holder's slot lapses);
# ``mtaq:dest:<d>:down``  string with a TTL, why the destination is throttled;
# ``mtaq:dest:<d>:rate``  the earliest time the next message may go (destination_rate);
# ``mtaq:dest:<d>:want``  string with a TTL: the worker process refused a slot, which the next one
#                         freed goes to (fairness between processes);
# ``mtaq:dest:wants``     sorted set, destination -> its want's expiry (ms): which destinations have
#                         one, read every WANTS_LOOK (0.2 s) by each process (worker/limits.py).
# `mtaq queue stats` and the metrics read them where they exist ("*" as d gives a SCAN pattern).
def dest_key(destination: str, what: str) -> str:
    return f"{PREFIX}dest:{destination}:{what}"


# Outbound TLS (issue 21), shared by every worker on every host:
# ``mtaq:mta-sts:<domain>``  string with a TTL (the policy's max_age): the MTA-STS policy in force, JSON
#                            (worker/mtasts.py); a failed refresh leaves it alone
# ``mtaq:tlsrpt:<day>:<domain>``  hash: TLS-RPT session counts of that UTC day (worker/tlsrpt.py)
# ``mtaq:tlsrpt:<day>``           set: the policy domains counted that day
# ``mtaq:tlsrpt-sent:<day>``      string: the worker that sends that day's reports (once, cluster-wide)
def mta_sts_key(domain: str) -> str:
    return f"{PREFIX}mta-sts:{domain}"


def tlsrpt_key(day: str, domain: str) -> str:
    return f"{PREFIX}tlsrpt:{day}:{domain}"


def tlsrpt_domains_key(day: str) -> str:
    return f"{PREFIX}tlsrpt:{day}"


def tlsrpt_sent_key(day: str) -> str:
    return f"{PREFIX}tlsrpt-sent:{day}"


def open_layout_gate(url: str) -> None:
    """Open the layout gate (LAYOUT_KEY) on a Redis only processes of this version use: `mtaq run`'s
    embedded one."""
    with redis.Redis.from_url(url) as r:
        r.set(LAYOUT_KEY, LAYOUT_INLINE)


# The delay warning of a message is claimed in its own hash (HSETNX), so it goes away with the
# message; KEYS: msg hash; ARGV: field, time. 1 when this caller claimed it, 0 when claimed before or gone.
WARNED_FIELD = "warned"
_CLAIM_WARNING = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
"""


_STAT_OF = {RcptState.DELIVERED: "delivered", RcptState.BOUNCED: "bounced"}


@dataclass(slots=True)
class Message:
    envelope: Envelope
    body: bytes


class Store:
    """Message storage on one Redis connection (sync redis-py; the ingress calls it from a thread)."""

    def __init__(
        self,
        r: redis.Redis,
        *,
        replicas: int = 0,
        replica_timeout: float = 1.0,
        strict_replicas: bool = True,
        events_max: int = 0,
        inline: bool = True,
    ) -> None:
        self.redis = r
        # new messages in one key (LAYOUT); else as an older mtaq wrote them (processes start with
        # False and ask Redis: refresh_layout)
        self.inline = inline
        # redis_min_replicas: commits and recipient outcomes wait for this many replicas (WAIT).
        # strict (the ingress): too few is StoreNotReplicated, a 451; else (a worker, whose writes
        # record what already happened) WAIT again for a while, then StoreNotReplicated: the job is
        # run again (common/storeio.py Replicated.patience).
        self.replicas = replicas
        self.replica_timeout = replica_timeout
        self.strict_replicas = strict_replicas
        self.events_max = events_max  # the stream mtaq:events holds about this many; 0: no events
        self.events_bound = StreamBound(r, EVENTS, events_max)  # ... in entries of several
        self._set_statuses = r.register_script(SET_STATUSES)
        self._claim_warning = r.register_script(_CLAIM_WARNING)
        self._hold = r.register_script(queuestats.HOLD)
        self._repair = r.register_script(queuestats.REPAIR)
        # destinations this process's commits found in QDESTS, and under which generation
        # (queuestats.COMMIT: their SADD is left out while the generation holds)
        self._lock = threading.Lock()
        self._dests_generation = ""
        self._dests_known: set[str] = set()
        self._dests_until = 0.0  # monotonic: forget what is known from then (DESTS_KNOWN_FOR)

    # -- writing new mail -------------------------------------------------------------------------
    def commit(
        self,
        messages: Sequence[Message],
        *,
        delete: Iterable[str] = (),
        unlease: Iterable[tuple[str, str]] = (),
        also: Callable[[Any], None] | None = None,
        hop: Callable[[str], str] = domain_of,
        mark: str = "",
        events: Sequence[Event] = (),
    ) -> None:
        """Store messages in one MULTI/EXEC: all of it or nothing; raises StoreUnavailable or
        StoreFull and stores nothing then. ``events`` go to the stream in the same transaction.

        ``delete`` removes finished messages in the same transaction (a DSN replaces its original);
        ``unlease`` (queue id, destination) drops those leases with them: a deleted message's lease
        guards nothing, whoever holds it. ``also`` adds commands to it (their delivery jobs:
        common/spool.py). ``mark`` leaves a short-lived key saying this commit was stored, for a
        writer that lost its connection before the answer (``has_commit_mark``): its messages may be
        finished and gone already, but the mark outlives them. ``hop`` names a recipient's
        destination for the queue's indexes."""
        inline = self.inline
        plan = queuestats.commit_plan([(m.envelope, len(m.body)) for m in messages], hop, keeps_hold=inline)
        with translated():
            pipe = self._pipeline(transaction=True)
            for m in messages:
                env = m.envelope
                summary = plan.summaries[env.id]
                # a memoryview: redis-py writes it as it is (one sendall), where hiredis's packer
                # copied a 1 MiB body into the command, growing it as it went (1.1 ms a MiB)
                body = memoryview(m.body)
                if inline:
                    # one key: no state is written for a recipient not yet tried (LAYOUT), and the
                    # summary counts the open ones (issue 15: two commands a message fewer)
                    pipe.hset(
                        msg_key(env.id),
                        mapping={"env": env.to_json(), "body": body, "q": summary, LAYOUT_FIELD: LAYOUT_INLINE},
                    )
                    continue
                pipe.hset(msg_key(env.id), mapping={"env": env.to_json(), "body": body, "q": summary})
                fresh = RecipientStatus().to_json()
                pipe.hset(rcpt_key(env.id), mapping={str(i): fresh for i in range(len(env.recipients))})
                pipe.set(left_key(env.id), len(env.recipients))
            if messages:
                # one ZADD for the whole batch: a command a message fewer (issue 15)
                pipe.zadd(INDEX, {m.envelope.id: m.envelope.received_at for m in messages})
                pipe.hincrby(STATS, "received", len(messages))
                # EVAL: see _delete
                now = time.monotonic()
                with self._lock:
                    if now >= self._dests_until:
                        # forgotten once a minute: what only the generation cannot tell (a failover
                        # that lost the SADD and kept the generation, an older sweep's removal)
                        # costs at most a minute of a destination missing from the set
                        self._dests_generation, self._dests_until = "", now + DESTS_KNOWN_FOR
                        self._dests_known.clear()
                    generation = self._dests_generation
                    known = {d for d in plan.by_destination if d in self._dests_known}
                args = plan.args(QDEST_PREFIX, generation, uuid.uuid4().hex, known)
                at = len(pipe.command_stack)
                pipe.eval(queuestats.COMMIT, 3, QCOUNTS, QDESTS, QDESTS_GEN, *args)
            self._delete(pipe, list(delete))
            by_dest: dict[str, list[str]] = {}
            for qid, dest in unlease:
                by_dest.setdefault(dest, []).append(qid)
            for dest, qids in by_dest.items():
                pipe.hdel(leases_key(dest), *qids)  # the messages go: whoever held them
            if also is not None:
                also(pipe)
            self.stage_events(pipe, events)
            if mark:
                pipe.set(commit_mark_key(mark), 1, ex=COMMIT_MARK_TTL)
            try:
                done = pipe.execute()
            except redis.RedisError:
                with self._lock:  # a lost connection may be a failover: ask the set again
                    self._dests_generation = ""
                raise
        if messages:
            answer = done[at]
            self._listed(reply_text(answer), plan.by_destination)

    def _listed(self, generation: str, dests: Iterable[str]) -> None:
        """These destinations are in QDESTS under ``generation`` (the commit's answer)."""
        with self._lock:
            if generation != self._dests_generation:
                self._dests_generation = generation
                self._dests_known.clear()
            self._dests_known.update(dests)

    def stage_events(self, pipe: Any, events: Sequence[Event]) -> None:
        """Add events to the stream in ``pipe`` (nothing when events are off)."""
        if self.events_max > 0 and events:
            # one entry for the write's events (common/events.py ENTRY_FIELD): one XADD a commit
            pipe.xadd(EVENTS, entry_fields(events), maxlen=self.events_bound.entries(), approximate=True)

    def _pipeline(self, *, transaction: bool) -> redis.client.Pipeline:
        """A pipeline of writes that must reach ``replicas`` replicas before they count (plain
        when none are asked for)."""
        if not self.replicas:
            return self.redis.pipeline(transaction=transaction)
        pipe = Replicated(self.redis.connection_pool, self.redis.response_callbacks, transaction, None)
        pipe.replicas = self.replicas
        pipe.timeout_ms = max(1, int(self.replica_timeout * 1000))
        pipe.strict = self.strict_replicas
        return pipe

    # -- the layout gate (LAYOUT_KEY) ------------------------------------------------------------------
    def refresh_layout(self) -> bool:
        """Whether new messages are written in one key: asked of Redis until it says yes, then
        never again (the gate does not close)."""
        if not self.inline:
            with translated():
                self.inline = is_inline(self.redis.get(LAYOUT_KEY))
        return self.inline

    def open_layout(self, worker_keys: Sequence[str]) -> bool:
        """Open the gate if every worker registered (RQ's worker hashes ``worker_keys``) reads one
        key a message; True when it is open."""
        if self.refresh_layout():
            return True
        if not worker_keys:
            return False
        pipe = self.redis.pipeline(transaction=False)
        for key in worker_keys:
            pipe.hget(key, WORKER_LAYOUT_FIELD)
        if all(is_inline(mark) for mark in pipe.execute()):
            self.redis.set(LAYOUT_KEY, LAYOUT_INLINE)
            self.inline = True
            log.info("every worker reads one key a message: new mail is written so from now on")
        return self.inline

    # -- reading ----------------------------------------------------------------------------------
    def has_commit_mark(self, mark: str) -> bool:
        """Whether the commit that carried ``mark`` (commit's ``mark``) was stored."""
        with translated():
            return bool(self.redis.exists(commit_mark_key(mark)))

    def has_any(self, qids: Sequence[str]) -> bool:
        """Whether any of these messages is stored (one EXISTS): a commit is all or nothing."""
        with translated():
            return bool(qids) and bool(self.redis.exists(*[msg_key(q) for q in qids]))

    def load(self, qid: str) -> Message | None:
        found = self.load_many([qid])[0]
        return None if found is None else found[0]

    def walk(self, chunk: int = 500) -> Iterator[list[tuple[Message, dict[int, RecipientStatus]]]]:
        """The whole queue in arrival order, loaded a chunk (one round trip) at a time; messages
        finished meanwhile are left out."""
        ids = self.queue_ids()
        for start in range(0, len(ids), chunk):
            yield [found for found in self.load_many(ids[start : start + chunk]) if found is not None]

    def load_many(self, ids: Sequence[str]) -> list[tuple[Message, dict[int, RecipientStatus]] | None]:
        """Messages with their recipient states (those tried; the others are pending), in one round
        trip (a second for messages an older mtaq queued); None for one that is gone."""
        return self._load(ids, with_hold=False)[0]

    def load_with_hold(
        self, ids: Sequence[str], ride: Ride | None = None
    ) -> tuple[list[tuple[Message, dict[int, RecipientStatus]] | None], set[str]]:
        """``load_many``, and those of ``ids`` on hold, in the same round trip: a summary that keeps
        the hold flag (``k``, common/queuestats.py qs_is_held) says it, read with the message; the
        hold set is asked only for the others (an older mtaq's summaries), in the second round trip
        that older messages take anyway. Issue 15: an SMISMEMBER and a round trip a job fewer.
        ``ride`` queues reads of another owner's in the same round trip, after the load's, and
        returns the function their answers go to (worker/limits.py ``DownLook``: whether the
        destination is down, a round trip a job fewer)."""
        return self._load(ids, with_hold=True, ride=ride)

    def _load(
        self,
        ids: Sequence[str],
        *,
        with_hold: bool,
        ride: Ride | None = None,
    ) -> tuple[list[tuple[Message, dict[int, RecipientStatus]] | None], set[str]]:
        pipe = self.redis.pipeline(transaction=False)
        for qid in ids:
            pipe.hgetall(msg_key(qid))
        taken = ride(pipe) if ride is not None else None
        answers = pipe.execute()
        found: list[dict[Any, Any]] = answers[: len(ids)]
        if taken is not None:
            taken(answers[len(ids) :])
        older = [n for n, h in enumerate(found) if h and not is_inline(field(h, LAYOUT_FIELD))]
        held: set[str] = set()
        ask: list[str] = []  # messages whose summary does not keep the hold flag
        if with_hold:
            for qid, h in zip(ids, found, strict=True):
                flag = hold_flag(field(h, "q")) if h else False
                if flag is None:
                    ask.append(qid)
                elif flag:
                    held.add(qid)
        kept: dict[int, dict[Any, Any]] = {}
        if older or ask:
            pipe = self.redis.pipeline(transaction=False)
            for n in older:
                pipe.hgetall(rcpt_key(ids[n]))
            if ask:
                pipe.smismember(HOLD, ask)
            answers = pipe.execute()
            kept = dict(zip(older, answers[: len(older)], strict=True))
            if ask:
                held |= {qid for qid, on in zip(ask, answers[-1], strict=True) if on}
        out: list[tuple[Message, dict[int, RecipientStatus]] | None] = []
        for n, h in enumerate(found):
            env, body = field(h, "env"), field(h, "body")
            if env is None or body is None:
                out.append(None)
                continue
            message = Message(Envelope.from_json(env), body if isinstance(body, bytes) else body.encode())
            out.append((message, states_of_older(kept[n]) if n in kept else states_of(h)))
        return out, held

    def hold(self, ids: Sequence[str]) -> list[str]:
        """Put messages on hold (`mtaq queue hold`): no delivery, no expiry, no bounce until
        released. Returns those newly held; an id not in the queue is not held."""
        return self._held(list(dict.fromkeys(ids)), True)

    def _held(self, ids: list[str], on: bool) -> list[str]:
        """Hold or release ``ids`` with the queue counters moved in the same script; those changed."""
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for qid in ids:
            keys = [HOLD, msg_key(qid), QCOUNTS, QDEFERRED, QDESTS, INDEX]
            self._hold(keys=keys, args=[qid, QDEST_PREFIX, "1" if on else "0"], client=pipe)
        return [qid for qid, changed in zip(ids, pipe.execute(), strict=True) if changed]

    def held_ids(self) -> list[str]:
        return sorted(reply_text(x) for x in self.redis.smembers(HOLD))

    def statuses(self, qid: str) -> dict[int, RecipientStatus]:
        """The state of each of a message's recipients, those not yet tried pending ({} when the
        message is gone)."""
        layout, env = self.redis.hmget(msg_key(qid), [LAYOUT_FIELD, "env"])
        if env is None:
            return {}
        if not is_inline(layout):
            return states_of_older(self.redis.hgetall(rcpt_key(qid)))
        n = len(Envelope.from_json(env).recipients)
        tried = states_listed(self.redis.hmget(msg_key(qid), [state_field(i) for i in range(n)]) if n else [])
        return {i: tried.get(i, RecipientStatus()) for i in range(n)}

    def queue_size(self) -> int:
        with translated():
            return int(self.redis.zcard(INDEX))

    def queue_ids(self, start: int = 0, end: int = -1) -> list[str]:
        return [reply_text(x) for x in self.redis.zrange(INDEX, start, end)]

    def stats(self) -> dict[str, int]:
        return {reply_text(k): int(v) for k, v in self.redis.hgetall(STATS).items()}

    # -- recipient state --------------------------------------------------------------------------
    def set_statuses(self, updates: Mapping[str, Mapping[int, RecipientStatus]]) -> dict[str, list[int]]:
        """Record outcomes of any number of messages in one round trip; returns, per queue id, what
        the recipient-state script (common/statusscript.py) returned for each update (0: that message is finished)."""
        entries = [(qid, idx, st) for qid, ups in updates.items() for idx, st in ups.items()]
        out: dict[str, list[int]] = {qid: [] for qid in updates}
        for (qid, _, _), r in zip(entries, self.set_status_list(entries), strict=True):
            out[qid].append(r)
        return out

    def set_status_list(
        self,
        entries: Sequence[tuple[str, int, RecipientStatus]],
        *,
        events: Sequence[Event | None] = (),
        also: Callable[[Any], None] | None = None,
        last: Mapping[str, str] | None = None,
        ride: Ride | None = None,
    ) -> list[int]:
        """``set_statuses`` for (queue id, recipient index, status) entries, in one round trip; the
        same id may come more than once (the worker's outcome writer merges several jobs' turns).
        ``events[n]`` (when given) is written with entry n, by the script, only if its state is;
        ``also`` adds commands to the same round trip (the suppression of a hard bounce);
        ``ride`` too, after it, and returns the function that takes their answers once the write
        has succeeded (worker/limits.py ``ride``: slow start's news, by EVAL, which cannot miss a
        script: an error of theirs would fail the write, whose outcomes Redis then has).
        ``last``: queue id -> destination of messages whose final outcome here finishes them with
        no report due (the caller asks the report maker): when it is their last open recipient,
        the message and its index entries go in the same script
        (returns -4); else it is an outcome like any other."""
        if not entries:
            return []
        with_events = self.events_max > 0 and bool(events)
        calls: list[tuple[list[str], list[str]]] = []
        for start in range(0, len(entries), STATUSES_PER_CALL):
            keys = [STATS, QCOUNTS, HOLD, QDEFERRED, QDESTS, EVENTS, INDEX]
            count = min(STATUSES_PER_CALL, len(entries) - start)
            args = [str(count), QDEST_PREFIX, str(self.events_bound.entries() if with_events else 0)]
            for n in range(start, start + count):
                qid, idx, st = entries[n]
                ev = events[n] if with_events else None
                dest = (last or {}).get(qid) if st.final else None
                keys += [rcpt_key(qid), left_key(qid), msg_key(qid), INDEX]
                one = [
                    str(idx),
                    st.to_json(),
                    "2" if dest is not None else "1" if st.final else "0",
                    _STAT_OF.get(st.state, "deferred"),
                    st.state.value,
                    qid,
                ]
                if ev is not None:
                    one.append(event_json(ev))
                args += [str(len(one)), *one]
            calls.append((keys, args))
        for attempt in range(2):
            pipe = self._pipeline(transaction=False)
            for keys, args in calls:
                # EVALSHA directly: a registered Script in a pipeline asks SCRIPT EXISTS first,
                # one more round trip each time
                pipe.evalsha(self._set_statuses.sha, len(keys), *keys, *args)
            if also is not None:
                also(pipe)
            start = len(pipe)
            taken = ride(pipe) if ride is not None and not attempt else None  # ran once: not again
            try:
                answers = pipe.execute()
            except redis.exceptions.NoScriptError:
                if attempt:
                    raise
                self.redis.script_load(SET_STATUSES)  # a restarted Redis forgot it; nothing ran
                continue
            if taken is not None:
                taken(answers[start:])
            return [int(x) for answer in answers[: len(calls)] for x in answer]
        raise AssertionError("unreachable")

    def unhold(self, ids: Sequence[str]) -> list[str]:
        """Take messages off hold (`mtaq queue release`); returns those that were held."""
        return self._held(list(ids), False)

    def claim_delay_warnings(self, qids: Sequence[str], now: float) -> list[str]:
        """Mark the delay warning of each message as sent; returns those this caller marked (a
        message warned before, or gone, is left out): one warning per message, whoever asks."""
        pipe = self.redis.pipeline(transaction=False)
        for qid in qids:
            self._claim_warning(keys=[msg_key(qid)], args=[WARNED_FIELD, repr(now)], client=pipe)
        return [qid for qid, ok in zip(qids, pipe.execute(), strict=True) if ok]

    def try_lock(self, key: str, seconds: int) -> bool:
        return bool(self.redis.set(key, "1", nx=True, ex=max(1, seconds)))

    def delete(self, qid: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        self._delete(pipe, [qid])
        pipe.execute()

    @staticmethod
    def _delete(pipe: Any, ids: Sequence[str]) -> None:
        # EVAL, not EVALSHA: inside MULTI a script Redis forgot (a restart) would fail alone while
        # the rest of the transaction ran. One for all the messages: the script's text once.
        if not ids:
            return
        keys = [INDEX, HOLD, QCOUNTS, QDEFERRED, QDESTS]
        for qid in ids:
            keys += [msg_key(qid), rcpt_key(qid), left_key(qid)]
        pipe.eval(queuestats.DELETE, len(keys), *keys, QDEST_PREFIX, *ids)

    def repair(self, envelope: Envelope, hop: Callable[[str], str], client: Any = None) -> Any:
        """The sweep's recount of one message's summary, counters and index entries from its
        recipient states (queuestats.REPAIR); with ``client`` a pipeline, queued on it."""
        qid = envelope.id
        keys = [msg_key(qid), rcpt_key(qid), HOLD, QCOUNTS, QDEFERRED, QDESTS, INDEX]
        args = [qid, QDEST_PREFIX, queuestats.static_summary(envelope, hop), LAYOUT_INLINE, "1" if self.inline else ""]
        return self._repair(keys=keys, args=args, client=client)
