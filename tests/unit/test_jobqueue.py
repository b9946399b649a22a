"""common/jobqueue.py as the one reader and writer of RQ's side of the queue: the arguments a
delivery job carries, read back as a QueuedJob, and the keys of RQ's lists and registries."""

from __future__ import annotations

import time
from collections import Counter

import fakeredis
import pytest
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from common.jobqueue import DeliveryQueue, QueuedJob


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
    assert found == [("a.test", ("q1", "q2")), ("b.test", ("q3",)), ("c.test", ("q4", "q5"))]


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
