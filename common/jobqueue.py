"""The delivery queue: RQ jobs ``deliver(next hop, [queue ids], force)`` and ``drain(next hop, job
id)``, their options, batching within the job limits, and counts. The messages themselves are in
common/store.py.

New mail does not get a job per destination per group commit (two messages a job when a commit's
messages go to ten destinations, and RQ's bookkeeping, some 18 Redis commands a job, paid per
message: issue 15). A commit appends its ids to each destination's pending list and queues one
``drain`` job for that destination only if none is queued (``arm``: the hash ``mtaq:armed`` names it;
the pending list, the mark and RQ's own writes of the job go in one Lua script, inside the commit's
MULTI/EXEC). The job, when it starts (``draw``, one script), drops the mark, moves up to ``limit``
ids into a list of its own (``mtaq:drawn:<job id>``: RQ re-running it after its worker died finds
the same ids there) and, if ids are left, queues the next drain job for the destination, which
another worker process may take: a destination's backlog is spread over every worker process, a
job of ``limit`` messages at a time, and a commit racing with a draw either is drawn or arms a new
job. Retries, flushes, hand-backs and the sweep's requeues still name their messages
(``deliver``). A mark whose job is gone (an operator's ``rq empty``, a failed job) is found by the
workers' periodic clean-up (``rearm_lost``).

This module is the one owner of what RQ keeps for us, as common/store.py is of the ``mtaq:`` keys:
the layout of a job's arguments (written by ``stage``/``schedule``/``enqueue_now``, read back by
``QueuedJob.of``) and the keys of RQ's lists and registries (``ready_key``, ``running_key``). Every
other module asks here; tests/unit/test_rq_contract.py checks what we rely on in RQ itself."""

from __future__ import annotations

import datetime
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from rq import Queue, Retry
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from common.settings import Settings
from common.store import ARMED, DRAWN_AVG, PEND_COUNT, drawn_key, pend_key
from common.storeio import reply_text

__all__ = ["CRASH_RETRY", "DELIVER_FUNC", "DRAIN_FUNC", "DeliveryQueue", "QueueCounts", "QueuedJob"]

# The job function, by import path: RQ needs a string, and common/ must not import worker/.
# tests/unit/test_layout.py resolves it to the real function.
DELIVER_FUNC = "worker.jobs.deliver"
DRAIN_FUNC = "worker.jobs.drain"  # drain(next hop, its own job id): takes from the pending list
# Crash safety net only: a job whose worker died (SIGKILL, OOM) is found abandoned by RQ's registry
# cleanup and run again; recipients already delivered are skipped by their state. Delivery backoff
# is ours (worker/retry.py), never RQ's.
# The first re-run is immediate (the abandonment is only seen once the job's execution heartbeat
# lapsed, seconds after the death: worker/pool.py) and needs no scheduler; a worker killed over and
# over is retried for a while.
CRASH_RETRY = Retry(max=20, interval=[0, 5, 10, 30])
# Every delivery job: no result kept (there is none), a failed one kept 30 days for `rq` inspection.
_JOB_KEEP: dict[str, Any] = {"result_ttl": 0, "failure_ttl": 30 * 86400, "retry": CRASH_RETRY}


# A drawn list outlives its job's longest run by a day: RQ re-runs an abandoned job within
# seconds; a job that failed for good leaves it to expire (its messages go out again through the
# sweep, worker/sweep.py, once overdue).
DRAWN_TTL_EXTRA = 86400
# Jobs whose id the mark holds but that will not run: RQ has finished with them.
_NOT_COMING = {b"finished", b"failed", b"stopped", b"canceled"}

# Lua: arm(armed hash, dest, job id, at, stop): queue the drain job unless one is armed for dest.
# The job's writes are RQ's own (recorded from Queue._enqueue_job by _job_writes), in
# ARGV[at..stop], each as: number of words, words...
_ARM_LIB = """
local function arm(armed, dest, job, at, stop)
  if redis.call('HSETNX', armed, dest, job) == 0 then return 0 end
  while at <= stop do
    local n = tonumber(ARGV[at])
    redis.call(unpack(ARGV, at + 1, at + n))
    at = at + n + 1
  end
  return 1
end
"""
# KEYS: armed hash, pending count, then one pending list per destination; ARGV: replace (an armed
# job id to drop first: a lost job's; "" none), then per destination: its name, a new job id, n,
# n queue ids, m, the m words of the job's writes. Appends the ids; a list that was empty gets
# the job (a list that was not has one queued: whoever left ids in it armed one, or the
# clean-up's rearm_lost replaces a lost one). Returns how many jobs it queued.
_ARM = (
    _ARM_LIB
    + """
local at, total, armed = 2, 0, 0
for i = 3, #KEYS do
  local dest, job, n = ARGV[at], ARGV[at + 1], tonumber(ARGV[at + 2])
  at = at + 3
  local len
  if n > 0 then
    len = redis.call('RPUSH', KEYS[i], unpack(ARGV, at, at + n - 1))
    total = total + n
  else
    len = redis.call('LLEN', KEYS[i])
  end
  at = at + n
  local m = tonumber(ARGV[at])
  at = at + 1
  local stale = ARGV[1] ~= '' and redis.call('HGET', KEYS[1], dest) == ARGV[1]
  if stale then redis.call('HDEL', KEYS[1], dest) end
  if len > 0 and (len == n or stale) then armed = armed + arm(KEYS[1], dest, job, at, at + m - 1) end
  at = at + m
end
if total > 0 then redis.call('INCRBY', KEYS[2], total) end
return armed
"""
)
# KEYS: pending list, armed hash, pending count, this job's drawn list, the drawn moving average;
# ARGV: dest, this job's id, limit, drawn TTL, the next job's id, its writes. Returns the ids this
# job delivers.
_DRAW = (
    _ARM_LIB
    + """
if redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[2] then redis.call('HDEL', KEYS[2], ARGV[1]) end
local ids = redis.call('LRANGE', KEYS[4], 0, -1)
local more = 0
if #ids == 0 then
  local limit = tonumber(ARGV[3])
  ids = redis.call('LRANGE', KEYS[1], 0, limit)  -- one more than the limit: are ids left?
  if #ids > limit then
    more = 1
    table.remove(ids)
  end
  if #ids > 0 then
    redis.call('LTRIM', KEYS[1], #ids, -1)
    redis.call('RPUSH', KEYS[4], unpack(ids))
    redis.call('EXPIRE', KEYS[4], ARGV[4])
    redis.call('DECRBY', KEYS[3], #ids)
    local avg = tonumber(redis.call('GET', KEYS[5]) or #ids)
    redis.call('SET', KEYS[5], tostring(avg + 0.2 * (#ids - avg)))
  end
else
  more = redis.call('LLEN', KEYS[1])
end
if more > 0 then arm(KEYS[2], ARGV[1], ARGV[5], 6, #ARGV) end
return ids
"""
)


@dataclass(frozen=True, slots=True)
class QueueCounts:
    waiting: int
    running: int
    scheduled: int  # retries waiting for their time
    failed: int
    pending: int = 0  # messages in the pending lists, for the drain jobs to take (not jobs)


@dataclass(frozen=True, slots=True)
class QueuedJob:
    """A delivery job as RQ keeps it: ``deliver(destination, ids, force)``."""

    job_id: str
    destination: str
    ids: tuple[str, ...]  # a drain job names none: its messages are in the pending list

    @classmethod
    def of(cls, job: Job) -> QueuedJob:
        """Read the arguments ``DeliveryQueue`` wrote (positional: next hop, queue ids, [force];
        a drain job: next hop, its id); a job that is not ours (no arguments) has no destination
        and no messages."""
        args = list(job.args or ())
        destination = str(args[0]) if args else ""
        ids = tuple(str(q) for q in args[1]) if len(args) > 1 and isinstance(args[1], list | tuple) else ()
        return cls(job.id, destination, ids)


class DeliveryQueue:
    def __init__(
        self,
        r: redis.Redis,
        name: str = "mtaq",
        *,
        job_func: str = DELIVER_FUNC,
        job_max_messages: int = 100,
        job_max_bytes: int = 20_000_000,
        job_timeout: int = 1800,
        draw_size: int = 0,
    ) -> None:
        self.rq = Queue(name, connection=r, serializer=JSONSerializer)
        self._arm = r.register_script(_ARM)
        self._draw = r.register_script(_DRAW)
        self.job_func = job_func
        self.job_max_messages = max(1, job_max_messages)
        self.job_max_bytes = job_max_bytes
        self.job_timeout = job_timeout
        # messages a drain job takes at most (0: job_max_messages; see from_settings)
        self.draw_size = max(1, min(self.job_max_messages, draw_size or self.job_max_messages))

    @classmethod
    def from_settings(cls, settings: Settings, r: redis.Redis) -> DeliveryQueue:
        return cls(
            r,
            settings.queue_name,
            job_max_messages=settings.job_max_messages,
            job_max_bytes=settings.job_max_bytes,
            job_timeout=settings.job_timeout,
            # two rounds of what one worker process can have in conversation with one destination
            # at once (its conversations), within the destination's connection limit: RQ's
            # bookkeeping (some 36 Redis commands a drain job: its start, its draw, its heartbeats,
            # its end) is paid per job, and a process holds twice its conversations anyway
            # (worker/intake.py). Issue 15's ceiling load (4 processes of 10 conversations, ten
            # slow destinations): 8 -> 16 messages a job, 21.1 -> 19.0 commands a message at the
            # same rate. A process of 100 conversations (the default) is bound by the destination's
            # limit (20), as before.
            draw_size=min(2 * settings.worker_concurrency, settings.destination_concurrency),
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

    def stage(self, pipe: Any, by_hop: Mapping[str, Sequence[tuple[str, int]]]) -> int:
        """Add (queue id, size) pairs per next hop to the pending lists in the caller's MULTI/EXEC
        (common/spool.py: a message and its job are stored together or not at all), with a drain
        job for each hop that has none queued. Returns how many drain jobs of ``draw_size`` they
        make, at least one (the ingress's flow control counts messages per job with it)."""
        total = 0
        keys: list[str] = [ARMED, PEND_COUNT]
        args: list[Any] = [""]
        for hop, sized in by_hop.items():
            if not sized:
                continue
            ids = [qid for qid, _ in sized]
            total += len(ids)
            job_id, writes = self._job_writes(hop)
            keys.append(pend_key(hop))
            args += [hop, job_id, len(ids), *ids, len(writes), *writes]
        if total:
            # EVAL, not EVALSHA: a MULTI/EXEC cannot load a script it finds missing (see Store.commit)
            pipe.eval(_ARM, len(keys), *keys, *args)
        return -(-total // self.draw_size)

    def _job_writes(self, destination: str) -> tuple[str, list[bytes]]:
        """A new drain job for ``destination``: its id, and what RQ writes to queue it (recorded,
        not sent), flattened for _ARM_LIB's ``arm``."""
        job_id = uuid.uuid4().hex
        job = self.rq.create_job(
            DRAIN_FUNC, args=(destination, job_id), job_id=job_id, timeout=self.job_timeout, **_JOB_KEEP
        )
        rec = self.rq.connection.pipeline(transaction=False)
        rec.sadd(self.rq.redis_queues_keys, self.rq.key)
        self.rq._enqueue_job(job, pipeline=rec)
        commands = [tuple(c[0]) for c in rec.command_stack]
        rec.reset()
        enc = self.rq.connection.connection_pool.get_encoder()
        out: list[bytes] = []
        for i, cmd in enumerate(commands):
            if cmd[0] == "HSET" and _overwritten(cmd, commands[i + 1 :]):
                continue  # RQ sets the status, then writes the whole hash with it again
            out.append(str(len(cmd)).encode())
            out.extend(enc.encode(w) for w in cmd)  # type: ignore[no-untyped-call]
        return job_id, out

    def draw(self, destination: str, job_id: str, limit: int) -> list[str]:
        """Drain job ``job_id`` starting: up to ``limit`` queue ids off ``destination``'s pending
        list into the job's own list (or, run again after a crash, what that list holds), the
        job's mark dropped, and the next drain job queued if ids are left. One round trip."""
        keys, args = self._draw_call(destination, job_id, limit)
        return [reply_text(x) for x in self._draw(keys=keys, args=args)]

    def _draw_call(self, destination: str, job_id: str, limit: int) -> tuple[list[str], list[Any]]:
        """The draw script's keys and arguments (the next drain job's RQ writes among them)."""
        next_id, writes = self._job_writes(destination)
        ttl = self.job_timeout + DRAWN_TTL_EXTRA
        keys = [pend_key(destination), ARMED, PEND_COUNT, drawn_key(job_id), DRAWN_AVG]
        return keys, [destination, job_id, max(1, limit), ttl, next_id, *writes]

    def draw_in(
        self, pipe: Any, destination: str, job_id: str, limit: int
    ) -> Callable[[Sequence[Any]], list[str] | None]:
        """``draw`` queued in ``pipe``, a pipeline of another write (RQ's start of the job,
        worker/rqbook.py ``start``: a writing round trip a drain job fewer), by EVAL (a Redis that
        lost its scripts takes it in the same round trip). Returns the function that reads its
        answer: the ids, or None if the script failed (the job then draws for itself: a draw is
        the same whether or not one ran before it)."""
        keys, args = self._draw_call(destination, job_id, limit)
        pipe.eval(_DRAW, len(keys), *keys, *args)

        def drawn(answers: Sequence[Any]) -> list[str] | None:
            got = answers[0] if answers else None
            if not isinstance(got, list):  # an error reply of the script (a key of another type)
                return None
            return [reply_text(x) for x in got]

        return drawn

    def drawn_done(self, job_id: str) -> None:
        """The drain job's messages are delivered, deferred with a job of their own, or gone."""
        self.rq.connection.delete(drawn_key(job_id))

    def pending_ids(self, destination: str) -> list[str]:
        """The ids in ``destination``'s pending list (an operator's question: the whole list)."""
        return [reply_text(x) for x in self.rq.connection.lrange(pend_key(destination), 0, -1)]

    def drawn(self, job_id: str) -> list[str]:
        """The ids drain job ``job_id`` took (none once it finished)."""
        return [reply_text(x) for x in self.rq.connection.lrange(drawn_key(job_id), 0, -1)]

    def armed(self) -> dict[str, str]:
        """Destination -> the drain job queued for its pending list."""
        return {reply_text(d): reply_text(j) for d, j in self.rq.connection.hgetall(ARMED).items()}

    def empty(self) -> None:
        """Nothing queued to run: RQ's ready list emptied (its jobs deleted, as ``rq empty`` does),
        the pending lists with their marks and count gone. The messages stay in the store: a
        flush, or the sweep once they are overdue, queues them again."""
        r = self.rq.connection
        self.rq.empty()  # type: ignore[no-untyped-call]
        pends = list(r.scan_iter(pend_key("*"), count=1000))
        r.delete(ARMED, PEND_COUNT, *pends)

    def pending(self) -> int:
        """Messages in the pending lists, no job has taken them yet."""
        return int(self.rq.connection.get(PEND_COUNT) or 0)

    @property
    def pending_key(self) -> str:
        """The count of messages in the pending lists (GET)."""
        return PEND_COUNT

    @property
    def drawn_avg_key(self) -> str:
        """Messages a drain job took, a moving average over the draws (GET; float, or nothing
        before the first draw): what a running job holds, for the ingress's flow control."""
        return DRAWN_AVG

    def rearm_lost(self) -> list[str]:
        """Destinations whose mark names a job that will never run (deleted, or finished with by
        RQ without having started, which drops the mark): a new drain job for each that has ids
        pending, the stale mark dropped otherwise. Returns those destinations. The workers'
        periodic clean-up calls it (worker/pool.py)."""
        r = self.rq.connection
        marks = self.armed()
        if not marks:
            return []
        with r.pipeline(transaction=False) as pipe:
            for job_id in marks.values():
                pipe.hget(Job.key_for(job_id), "status")
            statuses = pipe.execute()
        lost = [d for (d, _), st in zip(marks.items(), statuses, strict=True) if st is None or st in _NOT_COMING]
        for dest in lost:
            job_id, writes = self._job_writes(dest)
            args: list[str | int | bytes] = [marks[dest], dest, job_id, 0, len(writes), *writes]
            self._arm(keys=[ARMED, PEND_COUNT, pend_key(dest)], args=args)
        return lost

    def schedule(self, destination: str, ids: Sequence[str], delay: float) -> None:
        """A later delivery attempt of these messages to one destination (RQ's scheduler runs it)."""
        self.rq.enqueue_in(
            datetime.timedelta(seconds=max(0.0, delay)),
            self.job_func,
            destination,
            list(ids),
            job_timeout=self.job_timeout,
            **_JOB_KEEP,
        )

    def enqueue_now(self, destination: str, ids: Sequence[str], *, force: bool = False) -> None:
        """A delivery attempt now. ``force`` (`mtaq queue flush`) also tries deferred recipients
        whose next attempt is not due yet; otherwise a job leaves those to their retry job."""
        self.rq.enqueue(self.job_func, destination, list(ids), force, job_timeout=self.job_timeout, **_JOB_KEEP)

    def enqueue_sized(self, by_hop: Mapping[str, Sequence[tuple[str, int]]], *, force: bool = False) -> int:
        """Jobs now for (queue id, size) pairs per next hop, within the job limits; returns how many
        messages were queued (a message counts once per hop)."""
        queued = 0
        for hop, sized in by_hop.items():
            for ids in self.batches(sized):
                self.enqueue_now(hop, ids, force=force)
                queued += len(ids)
        return queued

    def counts(self) -> QueueCounts:
        q = self.rq
        return QueueCounts(
            waiting=q.count,
            running=StartedJobRegistry(queue=q).count,
            scheduled=ScheduledJobRegistry(queue=q).count,  # type: ignore[no-untyped-call]
            failed=FailedJobRegistry(queue=q).count,
            pending=self.pending(),
        )

    # -- RQ's keys and jobs, for those who read them (the ingress's flow control, the operator's tools)
    @property
    def ready_key(self) -> str:
        """The list of jobs no worker has taken yet (LLEN: how many)."""
        return str(self.rq.key)

    @property
    def taken_key(self) -> str:
        """RQ's intermediate list: jobs a worker has taken off the ready list and not yet registered
        as started (LLEN: how many; for a moment a job may be in both)."""
        return str(IntermediateQueue.get_intermediate_queue_key(self.rq.key))

    @property
    def running_key(self) -> str:
        """The sorted set of jobs workers hold now (RQ's StartedJobRegistry; ZCARD: how many)."""
        return str(StartedJobRegistry(queue=self.rq).key)

    def jobs(self, job_ids: Sequence[str], chunk: int = 500) -> Iterable[QueuedJob]:
        """The delivery jobs of these ids that still exist, ``chunk`` fetched per round trip."""
        conn = self.rq.connection
        for start in range(0, len(job_ids), chunk):
            for job in Job.fetch_many(list(job_ids[start : start + chunk]), connection=conn, serializer=JSONSerializer):
                if job is not None:
                    yield QueuedJob.of(job)

    def waiting_job_ids(self) -> list[str]:
        """Jobs not started: ready now, or scheduled for later (retries); each once."""
        scheduled = ScheduledJobRegistry(queue=self.rq)  # type: ignore[no-untyped-call]
        return list(dict.fromkeys([*self.rq.get_job_ids(), *scheduled.get_job_ids(cleanup=False)]))

    def running_destinations(self) -> Counter[str]:
        """Running delivery jobs per destination (a job is one destination's batch)."""
        ids = StartedJobRegistry(queue=self.rq).get_job_ids(cleanup=False)
        return Counter(j.destination for j in self.jobs(ids) if j.destination)

    def delete_jobs(self, job_ids: Iterable[str]) -> None:
        """Delete these jobs (waiting or scheduled: off their list or registry too)."""
        conn = self.rq.connection
        for job in Job.fetch_many(list(job_ids), connection=conn, serializer=JSONSerializer):
            if job is not None:
                job.delete()


def _overwritten(cmd: tuple[Any, ...], later: Sequence[tuple[Any, ...]]) -> bool:
    """Whether a later HSET of the same key writes every field of this one."""
    fields = set(cmd[2::2])
    return any(c[0] == "HSET" and c[1] == cmd[1] and fields <= set(c[2::2]) for c in later)
