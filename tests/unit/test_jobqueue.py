"""common/jobqueue.py as the one reader and writer of RQ's side of the queue: the arguments a
delivery job carries, read back as a QueuedJob, and the keys of RQ's lists and registries."""

from __future__ import annotations

import time
from collections import Counter

import fakeredis
import pytest
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from common.jobqueue import CRASH_RETRY, DRAIN_FUNC, DeliveryQueue, QueuedJob
from common.settings import Settings
from common.store import pend_key


@pytest.fixture
def dq() -> DeliveryQueue:
    return DeliveryQueue(fakeredis.FakeRedis(), "mtaq")


def test_every_way_of_writing_a_job_reads_back_alike(dq: DeliveryQueue) -> None:
    pipe = dq.rq.connection.pipeline()
    dq.stage(pipe, {"a.test": [("q1", 10), ("q2", 10)]})
    pipe.execute()
    dq.enqueue_now("b.test", ["q3"], force=True)
    dq.schedule("c.test", ["q4", "q5"], 600)
    found = sorted((j.destination, j.ids) for j in dq.jobs(dq.waiting_job_ids()))
    # a drain job names no messages: they wait in its destination's pending list
    assert found == [("a.test", ()), ("b.test", ("q3",)), ("c.test", ("q4", "q5"))]
    assert dq.pending_ids("a.test") == ["q1", "q2"]


def stage(dq: DeliveryQueue, dest: str, *ids: str) -> None:
    pipe = dq.rq.connection.pipeline()
    dq.stage(pipe, {dest: [(q, 10) for q in ids]})
    pipe.execute()


def test_a_drain_job_is_queued_as_rq_would_queue_it(dq: DeliveryQueue) -> None:
    stage(dq, "a.test", "q1")
    [job_id] = dq.rq.get_job_ids()
    job = Job.fetch(job_id, connection=dq.rq.connection, serializer=JSONSerializer)
    assert (job.func_name, job.args, job.origin) == (DRAIN_FUNC, ["a.test", job_id], "mtaq")
    assert job.get_status() == JobStatus.QUEUED and job.result_ttl == 0 and job.retries_left == CRASH_RETRY.max
    assert job.timeout == dq.job_timeout and job.enqueued_at is not None
    assert dq.rq.connection.sismember("rq:queues", dq.rq.key)
    assert dq.armed() == {"a.test": job_id}


def test_a_draw_takes_its_share_and_queues_the_next_job_for_the_rest(dq: DeliveryQueue) -> None:
    stage(dq, "a.test", "q1", "q2", "q3")
    [first] = dq.rq.get_job_ids()
    dq.rq.connection.lpop(dq.ready_key)  # a worker took it
    assert dq.draw("a.test", first, 2) == ["q1", "q2"]
    [second] = dq.rq.get_job_ids()
    assert dq.armed() == {"a.test": second} and second != first
    assert dq.pending_ids("a.test") == ["q3"] and dq.pending() == 1
    assert dq.counts().pending == 1  # `mtaq queue stats`: messages no drain job has taken yet
    # RQ runs the first again (its worker died): the same messages, and no third job
    assert dq.draw("a.test", first, 2) == ["q1", "q2"]
    assert dq.rq.get_job_ids() == [second]
    dq.drawn_done(first)
    assert dq.drawn(first) == []
    dq.rq.connection.lpop(dq.ready_key)
    assert dq.draw("a.test", second, 2) == ["q3"]
    assert dq.armed() == {} and dq.rq.get_job_ids() == [] and dq.pending() == 0


def test_a_commit_after_the_draw_queues_a_new_job(dq: DeliveryQueue) -> None:
    stage(dq, "a.test", "q1")
    [first] = dq.rq.get_job_ids()
    dq.rq.connection.lpop(dq.ready_key)
    stage(dq, "a.test", "q2")  # before the draw: the queued job will take it
    assert dq.rq.get_job_ids() == []
    assert dq.draw("a.test", first, 10) == ["q1", "q2"]
    stage(dq, "a.test", "q3")  # after it: a job of its own
    [second] = dq.rq.get_job_ids()
    assert dq.armed() == {"a.test": second}


def test_a_lost_drain_job_is_queued_again(dq: DeliveryQueue) -> None:
    stage(dq, "a.test", "q1")
    stage(dq, "b.test", "q2")
    [lost, kept] = dq.rq.get_job_ids()
    assert dq.rearm_lost() == []
    dq.delete_jobs([lost])  # an operator's `rq empty`, say
    assert dq.rearm_lost() == ["a.test"]
    new = dq.armed()["a.test"]
    assert new != lost and sorted(dq.rq.get_job_ids()) == sorted([kept, new])
    # a mark whose list is empty is only dropped
    dq.rq.connection.delete(pend_key("b.test"))
    dq.delete_jobs([kept])
    assert dq.rearm_lost() == ["b.test"]
    assert dq.armed() == {"a.test": new} and dq.rq.get_job_ids() == [new]


def test_a_job_that_is_not_ours_has_no_destination_and_no_messages(dq: DeliveryQueue) -> None:
    job = Queue("mtaq", connection=dq.rq.connection, serializer=JSONSerializer).enqueue("os.getpid")
    assert QueuedJob.of(job) == QueuedJob(job.id, "", ())


def test_jobs_skips_ids_that_are_gone_and_fetches_in_chunks(dq: DeliveryQueue) -> None:
    for i in range(5):
        dq.enqueue_now("a.test", [f"q{i}"])
    ids = dq.waiting_job_ids()
    assert [j.ids for j in dq.jobs([*ids, "no-such-job"], chunk=2)] == [(f"q{i}",) for i in range(5)]


def test_waiting_job_ids_are_ready_and_scheduled_once_each(dq: DeliveryQueue) -> None:
    dq.enqueue_now("a.test", ["q1"])
    dq.schedule("a.test", ["q2"], 60)
    assert len(dq.waiting_job_ids()) == 2
    assert dq.rq.connection.llen(dq.ready_key) == 1


def test_delete_jobs_takes_them_off_their_list_and_registry(dq: DeliveryQueue) -> None:
    dq.enqueue_now("a.test", ["q1"])
    dq.schedule("a.test", ["q2"], 60)
    dq.enqueue_now("b.test", ["q3"])
    doomed = [j.job_id for j in dq.jobs(dq.waiting_job_ids()) if j.destination == "a.test"]
    dq.delete_jobs([*doomed, "no-such-job"])
    assert [j.destination for j in dq.jobs(dq.waiting_job_ids())] == ["b.test"]
    assert all(Job.exists(j, connection=dq.rq.connection) is False for j in doomed)


def test_running_destinations_counts_the_started_registry(dq: DeliveryQueue) -> None:
    r = dq.rq.connection
    for dest in ("a.test", "a.test", "b.test"):
        dq.enqueue_now(dest, ["q"])
    for job_id in dq.waiting_job_ids():
        # what a worker writes when it starts one: "<job id>:<execution id>" (test_rq_contract.py)
        r.zadd(dq.running_key, {f"{job_id}:exec": time.time() + 60})
    assert dq.running_destinations() == Counter({"a.test": 2, "b.test": 1})
    assert dq.counts().running == 3


@pytest.mark.parametrize(
    ("conversations", "limit", "job_max", "share"),
    [(10, 20, 100, 20), (100, 20, 100, 20), (4, 20, 100, 8), (10, 20, 5, 5)],
)
def test_a_drain_jobs_share_is_two_rounds_of_a_process_within_the_limits(
    conversations: int, limit: int, job_max: int, share: int
) -> None:
    """min(2 * worker_concurrency, destination_concurrency, job_max_messages): RQ's bookkeeping is
    paid per job (issue 15), and a process holds twice its conversations anyway."""
    settings = Settings(worker_concurrency=conversations, destination_concurrency=limit, job_max_messages=job_max)
    assert DeliveryQueue.from_settings(settings, fakeredis.FakeRedis()).draw_size == share
