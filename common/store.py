"""Every Redis key mtaq writes, and the operations on them.

No other module builds a key string. Keys (all prefixed ``mtaq:``; RQ keeps its own ``rq:`` keys):

``mtaq:msg:<id>``   hash: ``env`` (envelope JSON) and ``body`` (the message bytes, stored once);
                    ``warned`` (time) once its delay warning was queued
``mtaq:rcpt:<id>``  hash: recipient index -> RecipientStatus JSON
``mtaq:left:<id>``  integer: recipients not yet final; the message is removed when it reaches 0
``mtaq:index``      sorted set: queue id -> arrival time (mailq listing, queue size for backpressure)
``mtaq:stats``      hash of counters: received, delivered, bounced, deferred, attempts, dsn
"""

from __future__ import annotations

import datetime
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from rq import Queue, Retry
from rq.serializers import JSONSerializer

from common.envelope import Envelope, RcptState, RecipientStatus, domain_of
from common.settings import Settings

__all__ = [
    "DELIVER_FUNC",
    "Message",
    "Store",
    "next_hop",
]

PREFIX = "mtaq:"
INDEX = PREFIX + "index"
STATS = PREFIX + "stats"
# The job function, by import path: common/ must not import worker/.
DELIVER_FUNC = "worker.jobs.deliver"
# Crash safety net only: a job whose worker died (SIGKILL, OOM) is found abandoned by RQ's registry
# cleanup and run again; recipients already delivered are skipped by their state. Delivery backoff
# is ours (worker/retry.py), never RQ's.
CRASH_RETRY = Retry(max=10, interval=[5, 60, 300])
# Every delivery job: no result kept (there is none), a failed one kept 30 days for `rq` inspection.
_JOB_KEEP: dict[str, Any] = {"result_ttl": 0, "failure_ttl": 30 * 86400, "retry": CRASH_RETRY}


def msg_key(qid: str) -> str:
    return f"{PREFIX}msg:{qid}"


def rcpt_key(qid: str) -> str:
    return f"{PREFIX}rcpt:{qid}"


def left_key(qid: str) -> str:
    return f"{PREFIX}left:{qid}"


def lease_key(qid: str, destination: str) -> str:
    return f"{PREFIX}lease:{qid}:{destination}"


SWEEP_LOCK = PREFIX + "sweep-lock"

# KEYS: lease; ARGV: token. Release a lease only if it is still ours (a job that overran its lease
# must not free the next holder's).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def next_hop(address: str, relayhost: str) -> str:
    """The destination a recipient is delivered to and grouped by: its domain, or the relayhost.

    A relayhost is taken literally (no MX lookup), as Postfix does for ``[host]:port``."""
    if relayhost:
        if relayhost.startswith("["):
            return relayhost
        host, _, port = relayhost.partition(":")
        return f"[{host}]:{port}" if port else f"[{host}]"
    return domain_of(address)


# KEYS: rcpt hash, left counter, stats hash, index; ARGV: field, new status JSON, final (1/0), stat name,
# queue id. Returns the recipients left when the status became final, -1 when it already was final (a
# re-run job: nothing changes), -2 when the message is gone, -3 after a non-final update.
_SET_STATUS = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return -2 end
if string.find(old, '"s":"delivered"', 1, true) or string.find(old, '"s":"bounced"', 1, true) then
  return -1
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
if ARGV[3] == '1' then return redis.call('DECR', KEYS[2]) end
return -3
"""


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
    """Queue storage on one Redis connection (sync redis-py; the ingress calls it from a thread)."""

    def __init__(
        self,
        r: redis.Redis,
        queue_name: str = "mtaq",
        *,
        relayhost: str = "",
        job_max_messages: int = 100,
        job_max_bytes: int = 20_000_000,
        job_timeout: int = 1800,
    ) -> None:
        self.redis = r
        self.queue = Queue(queue_name, connection=r, serializer=JSONSerializer)
        self.relayhost = relayhost
        self.job_max_messages = max(1, job_max_messages)
        self.job_max_bytes = job_max_bytes
        self.job_timeout = job_timeout
        self._set_status = r.register_script(_SET_STATUS)
        self._release = r.register_script(_RELEASE)
        self._claim_warning = r.register_script(_CLAIM_WARNING)

    @classmethod
    def from_settings(cls, settings: Settings, r: redis.Redis) -> Store:
        return cls(
            r,
            settings.queue_name,
            relayhost=settings.relayhost,
            job_max_messages=settings.job_max_messages,
            job_max_bytes=settings.job_max_bytes,
            job_timeout=settings.job_timeout,
        )

    def batches(self, sized: Sequence[tuple[str, int]]) -> list[list[str]]:
        """Split (queue id, size) pairs into job batches within job_max_messages and job_max_bytes."""
        out: list[list[str]] = []
        current: list[str] = []
        total = 0
        for qid, size in sized:
            if current and (len(current) >= self.job_max_messages or total + size > self.job_max_bytes):
                out.append(current)
                current, total = [], 0
            current.append(qid)
            total += size
        if current:
            out.append(current)
        return out

    # -- writing new mail -------------------------------------------------------------------------
    def commit(self, messages: Sequence[Message], *, delete: Iterable[str] = ()) -> None:
        """Store messages and their delivery jobs in one MULTI/EXEC: all of it or nothing.

        ``delete`` removes finished messages in the same transaction (a DSN replaces its original).
        Raises redis.ConnectionError / redis.ResponseError (OOM) and stores nothing then."""
        pipe = self.redis.pipeline(transaction=True)
        by_dest: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for m in messages:
            env = m.envelope
            pipe.hset(msg_key(env.id), mapping={"env": env.to_json(), "body": m.body})
            fresh = RecipientStatus().to_json()
            pipe.hset(rcpt_key(env.id), mapping={str(i): fresh for i in range(len(env.recipients))})
            pipe.set(left_key(env.id), len(env.recipients))
            pipe.zadd(INDEX, {env.id: env.received_at})
            for dest in dict.fromkeys(next_hop(r.address, self.relayhost) for r in env.recipients):
                by_dest[dest].append((env.id, len(m.body)))
        if messages:
            pipe.hincrby(STATS, "received", len(messages))
        for qid in delete:
            self._delete(pipe, qid)
        jobs = [
            Queue.prepare_data(DELIVER_FUNC, args=(dest, ids), timeout=self.job_timeout, **_JOB_KEEP)
            for dest, sized in by_dest.items()
            for ids in self.batches(sized)
        ]
        if jobs:
            self.queue.enqueue_many(jobs, pipeline=pipe)
        pipe.execute()

    def schedule(self, destination: str, ids: Sequence[str], delay: float) -> None:
        """A later delivery attempt of these messages to one destination (RQ's scheduler runs it)."""
        self.queue.enqueue_in(
            datetime.timedelta(seconds=max(0.0, delay)),
            DELIVER_FUNC,
            destination,
            list(ids),
            job_timeout=self.job_timeout,
            **_JOB_KEEP,
        )

    def enqueue_now(self, destination: str, ids: Sequence[str], *, force: bool = False) -> None:
        """A delivery attempt now. ``force`` (`mtaq queue flush`) also tries deferred recipients
        whose next attempt is not due yet; otherwise a job leaves those to their retry job."""
        self.queue.enqueue(DELIVER_FUNC, destination, list(ids), force, job_timeout=self.job_timeout, **_JOB_KEEP)

    def enqueue_sized(self, by_hop: Mapping[str, Sequence[tuple[str, int]]], *, force: bool = False) -> int:
        """Jobs now for (queue id, size) pairs per next hop, within the job limits; returns how many
        messages were queued (a message counts once per hop)."""
        queued = 0
        for hop, sized in by_hop.items():
            for ids in self.batches(sized):
                self.enqueue_now(hop, ids, force=force)
                queued += len(ids)
        return queued

    # -- reading ----------------------------------------------------------------------------------
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
        """Messages with their recipient states, in one round trip; None for one that is gone."""
        pipe = self.redis.pipeline(transaction=False)
        for qid in ids:
            pipe.hmget(msg_key(qid), ["env", "body"])
            pipe.hgetall(rcpt_key(qid))
        raw = pipe.execute()
        out: list[tuple[Message, dict[int, RecipientStatus]] | None] = []
        for (env, body), states in zip(raw[0::2], raw[1::2], strict=True):
            if env is None or body is None:
                out.append(None)
                continue
            message = Message(Envelope.from_json(env), body if isinstance(body, bytes) else body.encode())
            out.append((message, {int(k): RecipientStatus.from_json(v) for k, v in states.items()}))
        return out

    def statuses(self, qid: str) -> dict[int, RecipientStatus]:
        raw = self.redis.hgetall(rcpt_key(qid))
        return {int(k): RecipientStatus.from_json(v) for k, v in raw.items()}

    def queue_size(self) -> int:
        return int(self.redis.zcard(INDEX))

    def queue_ids(self, start: int = 0, end: int = -1) -> list[str]:
        return [x.decode() if isinstance(x, bytes) else str(x) for x in self.redis.zrange(INDEX, start, end)]

    def stats(self) -> dict[str, int]:
        return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in self.redis.hgetall(STATS).items()}

    # -- recipient state --------------------------------------------------------------------------
    def set_statuses(self, updates: Mapping[str, Mapping[int, RecipientStatus]]) -> dict[str, list[int]]:
        """Record outcomes of any number of messages in one round trip; returns, per queue id, what
        _SET_STATUS returned for each update (0: that message is finished)."""
        for attempt in range(2):
            pipe = self.redis.pipeline(transaction=False)
            order: list[str] = []
            for qid, ups in updates.items():
                for idx, st in ups.items():
                    stat = _STAT_OF.get(st.state, "deferred")
                    # EVALSHA directly: a registered Script in a pipeline asks SCRIPT EXISTS first,
                    # one more round trip each time
                    pipe.evalsha(
                        self._set_status.sha,
                        4,
                        rcpt_key(qid),
                        left_key(qid),
                        STATS,
                        INDEX,
                        str(idx),
                        st.to_json(),
                        "1" if st.final else "0",
                        stat,
                        qid,
                    )
                    order.append(qid)
            try:
                results = pipe.execute()
                break
            except redis.exceptions.NoScriptError:
                if attempt:
                    raise
                self.redis.script_load(_SET_STATUS)  # a restarted Redis forgot it; nothing ran
        out: dict[str, list[int]] = {qid: [] for qid in updates}
        for qid, r in zip(order, results, strict=True):
            out[qid].append(int(r))
        return out

    # -- leases: one job at a time works on a (message, destination) ---------------------------------
    def lease(self, qids: Sequence[str], destination: str, token: str, seconds: float) -> list[str]:
        """Take the lease of each message for this destination; returns those taken. A lease held
        by another job (a duplicate chain, a flush, a sweep) means that job is on it now."""
        pipe = self.redis.pipeline(transaction=False)
        for qid in qids:
            pipe.set(lease_key(qid, destination), token, nx=True, px=max(1000, int(seconds * 1000)))
        return [qid for qid, ok in zip(qids, pipe.execute(), strict=True) if ok]

    def release(self, qids: Sequence[str], destination: str, token: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for qid in qids:
            self._release(keys=[lease_key(qid, destination)], args=[token], client=pipe)
        pipe.execute()

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
        self._delete(pipe, qid)
        pipe.execute()

    @staticmethod
    def _delete(pipe: Any, qid: str) -> None:
        pipe.delete(msg_key(qid), rcpt_key(qid), left_key(qid))
        pipe.zrem(INDEX, qid)
