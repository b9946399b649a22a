"""What mtaq relies on in RQ, checked against the RQ installed.

pyproject.toml pins rq to the range these tests pass on. worker/pool.py's ConcurrentWorker overrides
BaseWorker methods and touches its private attributes; common/jobqueue.py writes and reads jobs and
RQ's keys (the ingress's flow control counts them: ingress/flow.py). Before widening the pin, run
this file against the new RQ: each failure names what moved and where mtaq uses it."""

from __future__ import annotations

import importlib
import inspect
import signal
from collections.abc import Callable, Iterator
from typing import Any

import fakeredis
import pytest
import rq
from rq import Queue, Retry, SimpleWorker, worker_registration
from rq.executions import Execution, ExecutionRegistry
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job, JobStatus
from rq.registry import BaseRegistry, FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry, clean_registries
from rq.serializers import JSONSerializer
from rq.worker import BaseWorker

from common.jobqueue import DeliveryQueue
from common.leasebook import LeaseBook
from common.store import Store, leases_key
from worker import rqbook
from worker.intake import Intake
from worker.leases import Leases
from worker.pool import ConcurrentWorker


class _Service:
    """What ConcurrentWorker asks of the delivery service: heartbeats and a stop (and, where the
    worker sizes its job slots from the service, how many conversations it holds; what its jobs
    hold; the queue whose lost drain jobs its clean-up queues again)."""

    concurrency = 100

    def __init__(self, r: fakeredis.FakeRedis) -> None:
        self.beats = 0
        self.stopped = False
        self.intake = Intake(10, 10, lambda: 0)
        self.queue = DeliveryQueue(r)
        self.store = Store(r)  # the layout gate's (open: one key a message)

    def heartbeat(self) -> None:
        self.beats += 1

    def stop(self) -> None:
        self.stopped = True

    def start_ride(self, destination: str, job_id: str) -> None:
        return None  # a drain job's draw rides RQ's start only with a DeliveryService

    def job_ended(self, job_id: str) -> None:
        self.intake.end(job_id)


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


@pytest.fixture
def worker(r: fakeredis.FakeRedis) -> ConcurrentWorker:
    q = Queue("mtaq", connection=r, serializer=JSONSerializer)
    service: Any = _Service(r)  # a DeliveryService, as far as the worker's loop is concerned
    # the keyword arguments worker/process.py passes
    return ConcurrentWorker(
        [q], connection=r, serializer=JSONSerializer, worker_ttl=60, maintenance_interval=10, service=service
    )


def params(f: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(f).parameters)


# -- worker/pool.py ---------------------------------------------------------------------------------

# Every BaseWorker method ConcurrentWorker overrides. A new override is added here on purpose (the
# test below fails until it is), so that this list stays the whole of what pool.py replaces.
OVERRIDES = {
    "__init__",
    "dequeue_job_and_maintain_ttl",
    "execute_job",
    "handle_job_success",
    # a job's staged lease ends written before RQ queues it again (worker/leases.py)
    "handle_job_failure",
    # RQ's bookkeeping per job in two transactions (worker/rqbook.py)
    "prepare_execution",
    "prepare_job_execution",
    "handle_execution_ended",
    "get_heartbeat_ttl",
    "request_stop",
    "teardown",
    "clean_registries",
    "should_run_maintenance_tasks",
    # a Redis failover: RQ's loop quits on an error these raise; ours wait it out
    "check_for_suspension",
    "heartbeat",
    # the worker's hash says what it reads (one key a message), and a birth may open the layout gate
    "serialize",
    "register_birth",
    # RQ's scheduler at our interval (worker/pool.py SCHEDULER_INTERVAL)
    "_start_scheduler",
    # the command channel's thread at our read timeout (worker/pool.py PUBSUB_POLL)
    "subscribe",
}


def test_the_overrides_are_the_ones_listed() -> None:
    rqs = {n for c in BaseWorker.__mro__ if c is not object for n in vars(c)}

    def replaced(name: str, value: Any) -> bool:
        method = callable(value) and not inspect.isclass(value)
        return name in rqs and (method or isinstance(value, property)) and not name.startswith("__")

    ours = {n for n, v in vars(ConcurrentWorker).items() if replaced(n, v)} | {"__init__"}
    assert ours == OVERRIDES, "ConcurrentWorker overrides changed: update OVERRIDES and check them against RQ"
    # the one class attribute replaced: job timeouts by a timer thread, since jobs run off the main thread
    assert "death_penalty_class" in rqs, f"RQ {rq.__version__}: BaseWorker.death_penalty_class is gone"


@pytest.mark.parametrize("name", sorted(OVERRIDES - {"__init__", "should_run_maintenance_tasks"}))
def test_each_override_has_rqs_signature(name: str) -> None:
    assert hasattr(SimpleWorker, name), (
        f"RQ {rq.__version__}: BaseWorker.{name} is gone; worker/pool.py overrides it and RQ no longer calls it"
    )
    theirs, ours = params(getattr(SimpleWorker, name)), params(getattr(ConcurrentWorker, name))
    assert ours == theirs, (
        f"RQ {rq.__version__}: BaseWorker.{name}{tuple(theirs)} is not what worker/pool.py overrides "
        f"({tuple(ours)}): RQ calls it with other arguments now"
    )


def test_maintenance_is_still_a_property_we_can_turn_off() -> None:
    assert isinstance(inspect.getattr_static(BaseWorker, "should_run_maintenance_tasks"), property), (
        f"RQ {rq.__version__}: BaseWorker.should_run_maintenance_tasks is no longer a property; worker/pool.py "
        "overrides it to keep registry clean-up out of the dequeue loop"
    )


# (callable, positional arguments, keyword arguments) as pool.py and jobqueue.py call them
def _calls() -> Iterator[tuple[str, Callable[..., Any], int, tuple[str, ...]]]:
    yield (
        "BaseWorker.__init__",
        BaseWorker.__init__,
        2,
        ("connection", "serializer", "worker_ttl", "maintenance_interval"),
    )
    yield "BaseWorker.prepare_execution", SimpleWorker.prepare_execution, 2, ()
    yield "BaseWorker.perform_job", SimpleWorker.perform_job, 4, ()
    yield "BaseWorker.set_state", SimpleWorker.set_state, 2, ()
    yield "BaseWorker.heartbeat", SimpleWorker.heartbeat, 2, ("pipeline",)
    yield "BaseWorker.request_force_stop", SimpleWorker.request_force_stop, 3, ()
    yield "BaseWorker.run_maintenance_tasks", SimpleWorker.run_maintenance_tasks, 1, ()
    yield "BaseWorker.get_redis_server_version", SimpleWorker.get_redis_server_version, 1, ()
    yield "BaseWorker.handle_job_failure", SimpleWorker.handle_job_failure, 3, ("exc_string",)
    yield "BaseWorker.work", SimpleWorker.work, 1, ("burst", "with_scheduler", "logging_level")
    deq = ("connection", "job_class", "serializer", "death_penalty_class")
    yield "Queue.dequeue_any", Queue.dequeue_any, 2, deq
    yield "Queue.prepare_data", Queue.prepare_data, 1, ("args", "timeout", "result_ttl", "failure_ttl", "retry")
    yield "Queue.enqueue_many", Queue.enqueue_many, 2, ("pipeline",)
    yield "Queue.enqueue_in", Queue.enqueue_in, 5, ("job_timeout", "result_ttl", "failure_ttl", "retry")
    yield "Queue.enqueue", Queue.enqueue, 5, ("job_timeout", "result_ttl", "failure_ttl", "retry")
    yield "Queue.fetch_job", Queue.fetch_job, 2, ()
    yield "Job.heartbeat", Job.heartbeat, 3, ("pipeline", "xx")
    yield "Job.fetch_many", Job.fetch_many, 1, ("connection", "serializer")
    yield "Job.delete", Job.delete, 1, ()
    yield "Execution", Execution, 2, ("connection",)
    yield "Execution.heartbeat", Execution.heartbeat, 3, ("pipeline",)
    yield "ExecutionRegistry", ExecutionRegistry, 1, ("connection",)
    yield "IntermediateQueue", IntermediateQueue, 1, ("connection",)
    for m in ("set_first_seen", "get_first_seen", "remove"):
        yield f"IntermediateQueue.{m}", getattr(IntermediateQueue, m), 2, ()
    yield "BaseRegistry.get_job_ids", BaseRegistry.get_job_ids, 1, ("cleanup",)
    yield "BaseRegistry", StartedJobRegistry, 0, ("queue",)
    yield "clean_registries", clean_registries, 2, ()
    # pool._enqueue_overdue does RQ's scheduler's work for jobs it left behind
    yield "ScheduledJobRegistry.get_jobs_to_schedule", ScheduledJobRegistry.get_jobs_to_schedule, 2, ()
    yield "ScheduledJobRegistry.remove", ScheduledJobRegistry.remove, 2, ("pipeline",)
    yield "Queue._enqueue_job", Queue._enqueue_job, 2, ("pipeline", "at_front")
    yield "Job.should_enqueue_at_front", Job.should_enqueue_at_front, 1, ()
    yield "worker_registration.clean_worker_registry", worker_registration.clean_worker_registry, 1, ()
    yield "Retry", Retry, 0, ("max", "interval")


@pytest.mark.parametrize(("name", "f", "positional", "keywords"), list(_calls()), ids=[c[0] for c in _calls()])
def test_what_we_call_takes_the_arguments_we_pass(
    name: str, f: Callable[..., Any], positional: int, keywords: tuple[str, ...]
) -> None:
    try:
        inspect.signature(f).bind(*[None] * positional, **dict.fromkeys(keywords))
    except TypeError as e:
        pytest.fail(f"RQ {rq.__version__}: {name}{inspect.signature(f)} no longer takes what mtaq passes ({e})")


PRIVATE = {
    "_stop_requested": bool,  # request_stop sets it; dequeue_job_and_maintain_ttl polls it
    "_ordered_queues": list,  # the queues dequeue_any is given
    "_exc_handlers": list,  # handed to clean_registries
}


def test_the_private_attributes_pool_touches_exist_after_construction(worker: ConcurrentWorker) -> None:
    for attr, kind in PRIVATE.items():
        assert isinstance(getattr(worker, attr, None), kind), (
            f"RQ {rq.__version__}: BaseWorker.{attr} is gone or no longer a {kind.__name__}; worker/pool.py uses it"
        )
    # set by request_stop for RQ's own shutdown reporting: it must be one RQ still has
    assert hasattr(worker, "_shutdown_requested_date"), f"RQ {rq.__version__}: _shutdown_requested_date is gone"
    for attr in ("queue_class", "job_class", "serializer", "death_penalty_class", "queues", "last_cleaned_at"):
        assert hasattr(worker, attr), f"RQ {rq.__version__}: BaseWorker.{attr} is gone; worker/pool.py uses it"
    assert worker._ordered_queues == worker.queues


def test_a_burst_runs_a_job_through_our_overrides(worker: ConcurrentWorker, r: fakeredis.FakeRedis) -> None:
    """The loop end to end: RQ's work() dequeues through our dequeue_job_and_maintain_ttl, runs the job in
    a thread through execute_job, records it through handle_job_success, leaves through teardown."""
    q = worker.queues[0]
    job = q.enqueue("os.getpid", result_ttl=60)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # work() installs its own
    try:
        assert worker.work(burst=True, logging_level="ERROR") is True
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert job.get_status(refresh=True) == JobStatus.FINISHED, "the job did not run through ConcurrentWorker"
    assert StartedJobRegistry(queue=q).count == 0


# -- common/jobqueue.py and ingress/flow.py: RQ's keys -------------------------------------------------


def test_the_key_formats_stay(r: fakeredis.FakeRedis) -> None:
    """Keys a running deployment has in Redis: a release that renames them strands its queue."""
    q = Queue("mtaq", connection=r, serializer=JSONSerializer)
    found = {
        "ready": q.key,
        "running": StartedJobRegistry(queue=q).key,
        "scheduled": ScheduledJobRegistry(queue=q).key,  # type: ignore[no-untyped-call]
        "failed": FailedJobRegistry(queue=q).key,
        "intermediate": IntermediateQueue(q.key, connection=r).key,
    }
    assert found == {
        "ready": "rq:queue:mtaq",
        "running": "rq:wip:mtaq",
        "scheduled": "rq:scheduled:mtaq",
        "failed": "rq:failed:mtaq",
        "intermediate": "rq:queue:mtaq:intermediate",
    }, f"RQ {rq.__version__} names its keys differently"
    dq = DeliveryQueue(r, "mtaq")
    assert (dq.ready_key, dq.running_key) == (found["ready"], found["running"])


def test_ready_is_a_list_and_running_a_sorted_set_of_job_and_execution(r: fakeredis.FakeRedis) -> None:
    """ingress/flow.py counts them with LLEN and ZCARD in one pipelined round trip; jobqueue reads the
    running entries back to job ids."""
    dq = DeliveryQueue(r, "mtaq")
    dq.enqueue_now("a.test", ["q1"])
    assert r.type(dq.ready_key) == b"list" and r.llen(dq.ready_key) == 1
    assert StartedJobRegistry.parse_job_id("job-id:execution-id") == "job-id", (
        f"RQ {rq.__version__}: a running entry is no longer '<job id>:<execution id>'"
    )
    registry = StartedJobRegistry(queue=dq.rq)
    [job_id] = dq.rq.get_job_ids()
    job = dq.rq.fetch_job(job_id)
    assert job is not None
    with r.pipeline() as pipe:
        registry.add_execution(Execution("exec1", job_id, connection=r), pipeline=pipe, ttl=60)
        pipe.execute()
    assert r.type(dq.running_key) == b"zset" and r.zcard(dq.running_key) == 1
    assert registry.get_job_ids(cleanup=False) == [job_id]


def test_our_job_arguments_travel_as_json(r: fakeredis.FakeRedis) -> None:
    """A job's arguments come back as written (JSON: lists, not tuples), which QueuedJob reads."""
    dq = DeliveryQueue(r, "mtaq")
    dq.enqueue_now("a.test", ["q1", "q2"], force=True)
    [job] = Job.fetch_many(dq.rq.get_job_ids(), connection=r, serializer=JSONSerializer)
    assert job is not None and list(job.args) == ["a.test", ["q1", "q2"], True]
    assert job.func_name == "worker.jobs.deliver" and job.retries_left == 20


def burst(worker: ConcurrentWorker, deliver: Callable[..., None], *patches: tuple[object, str, object]) -> bool:
    """The worker's loop in burst mode, its jobs' ``worker.jobs.deliver`` replaced by ``deliver`` (and
    each (target, name, value) of ``patches`` set); work() installs signal handlers of its own, put
    back after."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(importlib.import_module("worker.jobs"), "deliver", deliver)
        for target, name, value in patches:
            mp.setattr(target, name, value)
        try:
            return bool(worker.work(burst=True, logging_level="ERROR"))
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)


def test_a_delivery_job_is_booked_in_two_transactions_and_leaves_nothing(
    worker: ConcurrentWorker, r: fakeredis.FakeRedis
) -> None:
    """worker/rqbook.py: a delivery job (no result kept) runs through the lean start and success; while
    it runs RQ's registries show it as RQ's own would (what the crash recovery reads), and after it
    nothing of it is left, and the worker's statistics arrive with its next heartbeat."""
    q = worker.queues[0]
    seen: dict[str, Any] = {}

    def deliver(destination: str, ids: list[str], force: bool = False) -> None:
        seen["running"] = StartedJobRegistry(queue=q).get_job_ids(cleanup=False)
        seen["status"] = Job.fetch(seen["running"][0], connection=r, serializer=JSONSerializer).get_status()
        seen["executions"] = r.smembers(f"rq:worker:{worker.name}:executions")

    DeliveryQueue(r).enqueue_now("example.test", ["q1"])
    job_id = q.get_job_ids()[0]
    assert burst(worker, deliver) is True
    assert seen["running"] == [job_id] and seen["status"] == JobStatus.STARTED
    assert len(seen["executions"]) == 1
    assert not r.exists(f"rq:job:{job_id}", f"rq:executions:{job_id}"), "the finished job was left behind"
    assert StartedJobRegistry(queue=q).count == 0 and FailedJobRegistry(queue=q).count == 0
    assert not r.keys("rq:execution:*") and not r.smembers(f"rq:worker:{worker.name}:executions")
    worker.beat()
    assert int(r.hget(worker.key, "successful_job_count") or 0) == 1


def test_a_delivery_job_s_leases_end_in_its_success_write(worker: ConcurrentWorker, r: fakeredis.FakeRedis) -> None:
    """worker/leases.py ``ends_with_success``: on the job's thread, the leases' end waits for
    rqbook.succeeded and goes in its pipeline (one writing round trip a job fewer)."""
    leases = Leases(LeaseBook(r), 20.0)
    seen: dict[str, Any] = {}
    writes: list[int] = []
    real = rqbook.succeeded

    def deliver(destination: str, ids: list[str], force: bool = False) -> None:
        with leases.taken(ids, destination):
            pass
        seen["after the block"] = r.hgetall(leases_key(destination))

    def succeeded(connection: Any, job: Job, execution: Execution, also: Any = ()) -> None:
        writes.append(len(also))
        real(connection, job, execution, also)

    DeliveryQueue(r).enqueue_now("example.test", ["q1"])
    assert burst(worker, deliver, (rqbook, "succeeded", succeeded)) is True
    assert set(seen["after the block"]) == {b"q1"}, "ended in a round trip of its own"
    assert writes == [1], "not in the success write"
    assert r.hgetall(leases_key("example.test")) == {} and not r.keys("mtaq:holder:*")


def test_a_job_that_fails_after_its_lease_block_ends_them_before_rq_queues_it_again(
    worker: ConcurrentWorker, r: fakeredis.FakeRedis
) -> None:
    """Its first retry is immediate (CRASH_RETRY): a re-run that found its messages still leased by
    the failed run would leave them for 20 s."""
    leases = Leases(LeaseBook(r), 20.0)
    at_failure: list[dict[Any, Any]] = []
    real = BaseWorker.handle_job_failure

    def deliver(destination: str, ids: list[str], force: bool = False) -> None:
        with leases.taken(ids, destination):
            pass
        raise RuntimeError("a reroute could not be queued")

    def handle_job_failure(self: BaseWorker, job: Job, *args: Any, **kw: Any) -> None:
        at_failure.append(r.hgetall(leases_key("example.test")))
        real(self, job, *args, **kw)

    DeliveryQueue(r).enqueue_now("example.test", ["q1"])
    burst(worker, deliver, (BaseWorker, "handle_job_failure", handle_job_failure))
    assert at_failure and at_failure[0] == {}, "still leased when RQ handled the failure"
