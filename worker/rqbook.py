"""RQ's bookkeeping of one job's execution, in two round trips instead of RQ's five
(issue 15: RQ's per-job bookkeeping was about 50 Redis commands a job, paid per message when jobs
carry one or two messages).

What RQ's registries say stays true, and so do the keys RQ's own clean-up reads to re-run a dead
worker's job (StartedJobRegistry.cleanup: the ``rq:wip`` entry ``job:execution`` scored with its
expiry, the job hash with status ``started``):

- ``start`` (the main thread, before the job's thread starts): the execution (its hash, the job's
  execution registry, the StartedJobRegistry entry, the worker's executions index) and the job's
  status ``started`` with its worker, and the job off RQ's intermediate list, in one MULTI/EXEC.
  RQ writes the same in two transactions with heartbeats of the worker and the job between them
  that the execution just written makes redundant (RQ's ``prepare_execution`` and
  ``prepare_job_execution``; the worker's heartbeat thread pushes them on every few seconds).
- ``succeeded``: a delivery job keeps no result (``result_ttl=0``) and has no dependents, so what
  RQ does on success comes down to removing the execution and the job: one pipeline of DEL (job,
  execution, the job's execution registry), ZREM (StartedJobRegistry) and SREM (the worker's
  index), which also ends the job's leases (worker/leases.py ``ends_with_success``). RQ reads
  the job's executions first (a round trip per execution), watches its dependents, heartbeats
  the job once more and removes the execution twice.

The worker's statistics (successful jobs, working time) are added up here and written with the
worker's next heartbeat (worker/pool.py ``beat``), a few seconds late, instead of twice per job.
tests/unit/test_rq_contract.py runs a job through these against the installed RQ."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from typing import Any

from rq.executions import Execution, ExecutionRegistry
from rq.job import Job, JobStatus
from rq.utils import now, utcformat

from common.jobqueue import CRASH_RETRY, DELIVER_FUNC, DRAIN_FUNC
from common.storeio import Ride
from worker.leases import StagedEnd

__all__ = ["Tally", "forget_lapsed_executions", "lean", "start", "succeeded"]


def lean(job: Job, default_result_ttl: int) -> bool:
    """Whether ``succeeded`` does all RQ would for this job: a delivery job (common/jobqueue.py),
    which keeps no result and never repeats; nothing depends on one. Other jobs (an operator's)
    go RQ's own way."""
    ours = job.func_name in (DELIVER_FUNC, DRAIN_FUNC)
    return ours and job.get_result_ttl(default_result_ttl) == 0 and not job.repeats_left


def start(
    connection: Any,
    job: Job,
    worker_name: str,
    ttl: int,
    intermediate_key: str,
    ride: Ride | None = None,
) -> Execution:
    """Register the execution of ``job`` by ``worker_name`` for ``ttl`` seconds (until the next
    heartbeat) and mark the job started, in one transaction; returns the execution. ``ride``
    queues the job's own first write in the same transaction (a drain job's draw: worker/service.py
    ``start_ride``) and returns the function its answers go to; an error of its own fails nothing
    here (its function sees it)."""
    execution = Execution(uuid.uuid4().hex, job.id, connection=connection, worker_name=worker_name)
    execution._job = job
    job.worker_name = worker_name
    job.started_at = job.last_heartbeat = now()
    with connection.pipeline() as pipe:
        execution.save(ttl=ttl, pipeline=pipe)  # HSET, EXPIRE
        ExecutionRegistry(job_id=job.id, connection=pipe).add(execution=execution, ttl=ttl, pipeline=pipe)
        job.started_job_registry.add_execution(execution, pipeline=pipe, ttl=ttl)
        # the worker's heartbeat keeps this index's TTL (BaseWorker.heartbeat)
        pipe.sadd(execution.worker_executions_key, execution.composite_key)
        pipe.hset(
            job.key,
            mapping={
                "last_heartbeat": utcformat(job.last_heartbeat),
                "status": JobStatus.STARTED,
                "started_at": utcformat(job.started_at),
                "worker_name": worker_name,
            },
        )
        pipe.lrem(intermediate_key, 1, job.id)
        ours = len(pipe)
        taken = ride(pipe) if ride is not None else None
        answers = pipe.execute(raise_on_error=False)
    for answer in answers[:ours]:
        if isinstance(answer, Exception):
            raise answer
    if taken is not None:
        taken(answers[ours:])
    job._status = JobStatus.STARTED
    return execution


def succeeded(connection: Any, job: Job, execution: Execution, also: Sequence[StagedEnd] = ()) -> None:
    """The job returned: its execution and the job itself go (result_ttl=0: no result is kept),
    with the ends of the leases the job left for this write (``also``: worker/leases.py
    ``ends_with_success``; one writing round trip a job fewer). Not a transaction (a MULTI and an
    EXEC fewer a job): cut short, it leaves registry entries naming a job that is gone, which RQ's
    clean-up drops as it does an expired one's, and leases that lapse with their holder key."""
    with connection.pipeline(transaction=False) as pipe:
        for end in also:
            end.queue(pipe)
        pipe.delete(job.key, execution.key, ExecutionRegistry(job_id=job.id, connection=connection).key)
        job.started_job_registry.remove_execution(execution, pipeline=pipe)  # ZREM
        pipe.srem(execution.worker_executions_key, execution.composite_key)
        pipe.execute()
    job._status = JobStatus.FINISHED


def forget_lapsed_executions(connection: Any, job: Job) -> None:
    """A job re-run after its worker died still lists the dead execution in its
    ExecutionRegistry for 60 s after that execution's hash expired (RQ scores the registry
    entry at TTL + 60), and RQ's clean-up of a finished job then fails with "Execution ... not
    found in Redis". Drop such entries first. A job never retried (all of CRASH_RETRY left)
    had no execution before this one: no round trip for it. (rqbook.succeeded deletes the
    registry whole: a delivery job needs none of this.)"""
    if job.retries_left is not None and job.retries_left >= CRASH_RETRY.max:
        return
    registry = ExecutionRegistry(job.id, connection=connection)
    ids = [i.decode() if isinstance(i, bytes) else str(i) for i in connection.zrange(registry.key, 0, -1)]
    if len(ids) < 2:
        return
    with connection.pipeline() as pipe:
        for eid in ids:
            pipe.exists(Execution(eid, job.id, connection=connection).key)
        alive = pipe.execute()
    gone = [eid for eid, there in zip(ids, alive, strict=True) if not there]
    if gone:
        connection.zrem(registry.key, *gone)


class Tally:
    """The worker's successful jobs and working time since its last heartbeat wrote them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.jobs = 0
        self.seconds = 0.0

    def add(self, seconds: float) -> None:
        with self._lock:
            self.jobs += 1
            self.seconds += seconds

    def flush(self, pipe: Any, worker_key: str) -> None:
        """Add what was counted to the worker's hash in ``pipe`` (RQ's fields) and start again."""
        with self._lock:
            jobs, seconds, self.jobs, self.seconds = self.jobs, self.seconds, 0, 0.0
        if jobs:
            pipe.hincrby(worker_key, "successful_job_count", jobs)
            pipe.hincrbyfloat(worker_key, "total_working_time", seconds)
