"""The delivery queue: RQ jobs ``deliver(next hop, [queue ids], force)``, their options, batching
within the job limits, and counts. The messages themselves are in common/store.py.

This module is the one owner of what RQ keeps for us, as common/store.py is of the ``mtaq:`` keys:
the layout of a job's arguments (written by ``stage``/``schedule``/``enqueue_now``, read back by
``QueuedJob.of``) and the keys of RQ's lists and registries (``ready_key``, ``running_key``). Every
other module asks here; tests/unit/test_rq_contract.py checks what we rely on in RQ itself."""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from rq import Queue, Retry
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from common.settings import Settings

__all__ = ["CRASH_RETRY", "DELIVER_FUNC", "DeliveryQueue", "QueueCounts", "QueuedJob"]

# The job function, by import path: RQ needs a string, and common/ must not import worker/.
# tests/unit/test_layout.py resolves it to the real function.
DELIVER_FUNC = "worker.jobs.deliver"
# Crash safety net only: a job whose worker died (SIGKILL, OOM) is found abandoned by RQ's registry
# cleanup and run again; recipients already delivered are skipped by their state. Delivery backoff
# is ours (worker/retry.py), never RQ's.
# The first re-run is immediate (the abandonment is only seen once the job's execution heartbeat
# lapsed, seconds after the death: worker/pool.py) and needs no scheduler; a worker killed over and
# over is retried for a while.
CRASH_RETRY = Retry(max=20, interval=[0, 5, 10, 30])
# Every delivery job: no result kept (there is none), a failed one kept 30 days for `rq` inspection.
_JOB_KEEP: dict[str, Any] = {"result_ttl": 0, "failure_ttl": 30 * 86400, "retry": CRASH_RETRY}


@dataclass(frozen=True, slots=True)
class QueueCounts:
    waiting: int
    running: int
    scheduled: int  # retries waiting for their time
    failed: int


@dataclass(frozen=True, slots=True)
class QueuedJob:
    """A delivery job as RQ keeps it: ``deliver(destination, ids, force)``."""

    job_id: str
    destination: str
    ids: tuple[str, ...]

    @classmethod
    def of(cls, job: Job) -> QueuedJob:
        """Read the arguments ``DeliveryQueue`` wrote (positional: next hop, queue ids, [force]);
        a job that is not ours (no arguments) has no destination and no messages."""
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
    ) -> None:
        self.rq = Queue(name, connection=r, serializer=JSONSerializer)
        self.job_func = job_func
        self.job_max_messages = max(1, job_max_messages)
        self.job_max_bytes = job_max_bytes
        self.job_timeout = job_timeout

    @classmethod
    def from_settings(cls, settings: Settings, r: redis.Redis) -> DeliveryQueue:
        return cls(
            r,
            settings.queue_name,
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

    def stage(self, pipe: Any, by_hop: Mapping[str, Sequence[tuple[str, int]]]) -> int:
        """Add the jobs for (queue id, size) pairs per next hop to the caller's MULTI/EXEC
        (common/spool.py: a message and its jobs are stored together or not at all); returns how
        many jobs that is."""
        jobs = [
            Queue.prepare_data(self.job_func, args=(hop, ids), timeout=self.job_timeout, **_JOB_KEEP)
            for hop, sized in by_hop.items()
            for ids in self.batches(sized)
        ]
        if jobs:
            self.rq.enqueue_many(jobs, pipeline=pipe)
        return len(jobs)

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
