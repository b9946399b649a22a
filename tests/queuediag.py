"""What a test prints about the messages still queued when it expected an empty queue: each one's
recipients, leases and every RQ job that names it (with the job's status and registry), and the
log lines that mention it. The chaos tests fail with this instead of a bare count, so that a
failure seen once in CI says where the message was stuck."""

from __future__ import annotations

import json

import redis
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from common.jobqueue import DRAIN_FUNC, DeliveryQueue, QueuedJob
from common.store import INDEX, Store, holder_key, leases_key, msg_key, pend_key

__all__ = ["describe_stuck"]


def _text(x: bytes | str) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else x


def _jobs_naming(r: redis.Redis, qid: str) -> list[str]:
    """Every RQ job whose arguments name ``qid`` (whatever registry holds it, or none), with where
    RQ keeps it: the ready list, the intermediate list (taken by a worker, not yet started), and
    the started, scheduled, failed and finished registries."""
    queue = DeliveryQueue(r)
    rq = queue.rq
    ids = [_text(k).removeprefix(Job.redis_job_namespace_prefix) for k in r.scan_iter("rq:job:*", count=1000)]
    ids = [i for i in ids if ":" not in i]  # rq:job:<id> only, not its executions or dependents
    jobs = [j for j in Job.fetch_many(ids, connection=r, serializer=JSONSerializer) if j is not None]
    ready = {_text(x) for x in r.lrange(queue.ready_key, 0, -1)}
    taken = {_text(x) for x in r.lrange(queue.taken_key, 0, -1)}
    running = [_text(m) for m in r.zrange(queue.running_key, 0, -1) if isinstance(m, bytes | str)]
    registries = {
        "scheduled": rq.scheduled_job_registry,
        "failed": rq.failed_job_registry,
        "finished": rq.finished_job_registry,
    }
    armed = queue.armed()
    found = []
    for job in jobs:
        named = QueuedJob.of(job)
        if job.func_name == DRAIN_FUNC:
            # a drain job names the ids it took, or, queued, its destination's pending list
            ids = queue.drawn(job.id)
            if armed.get(named.destination) == job.id:
                ids += queue.pending_ids(named.destination)
            if qid not in ids:
                continue
        elif qid not in named.ids:
            continue
        where = [f"started:{m}" for m in running if m.startswith(job.id)]
        where += [name for name, reg in registries.items() if job.id in reg]
        where += ["ready list"] * (job.id in ready) + ["intermediate list"] * (job.id in taken)
        found.append(
            f"job {job.id} status={JobStatus(job.get_status(refresh=False)).value} retries_left={job.retries_left} "
            f"in {where or 'nothing'}: {(job.func_name or '').rsplit('.', 1)[-1]}{tuple(job.args)}"[:300]
        )
    return found


def _pending_at(r: redis.Redis, qid: str) -> list[str]:
    """The destinations whose pending list holds ``qid`` (common/jobqueue.py's drain jobs)."""
    queue = DeliveryQueue(r)
    dests = {_text(k).removeprefix(pend_key("")) for k in r.scan_iter(pend_key("*"), count=1000)}
    return sorted(d for d in dests if qid in queue.pending_ids(d))


def describe_stuck(r: redis.Redis, logs: str, limit: int = 3) -> str:
    """A few lines per queued message (at most ``limit`` messages)."""
    ids = [_text(x) for x in r.zrange(INDEX, 0, limit - 1) if isinstance(x, bytes | str)]
    lines = []
    for qid in ids:
        states = {i: (st.state.value, st.attempts, st.next_attempt) for i, st in Store(r).statuses(qid).items()}
        leases = {  # destination -> the holding job's token, and whether it is alive
            _text(k)[len(leases_key("")) :]: (_text(t), bool(r.exists(holder_key(_text(t)))))
            for k in r.scan_iter(leases_key("*"))
            if (t := r.hget(k, qid)) is not None
        }
        summary = r.hget(msg_key(qid), "q")
        left = "-" if summary is None else str(sum(json.loads(summary)[k] for k in "pd"))  # open recipients
        lines.append(f"{qid}: left={left} recipients={states} leases={leases}")
        lines += ["  " + j for j in _jobs_naming(r, qid)] or ["  no RQ job names it"]
        lines += [f"  in the pending list of {d}" for d in _pending_at(r, qid)]
        lines += ["  log: " + ln for ln in logs.splitlines() if qid in ln][-15:]
    return "\n".join(lines)
