"""worker/pool.py on fakeredis: the concurrent RQ worker runs delivery jobs in threads (burst
mode, an in-memory SMTP peer), sizes its job slots from the service, and its heartbeat pushes on
the service's leases."""

from __future__ import annotations

import datetime
import functools
import threading
import time
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
import redis
from rq import Queue
from rq.exceptions import StopRequested
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.suspension import suspend

from common.envelope import Envelope, Recipient
from common.jobqueue import CRASH_RETRY
from common.statusscript import LAYOUT_INLINE
from common.store import LAYOUT_KEY, RECOVERY_LOCK, WORKER_LAYOUT_FIELD, Message, Store
from tests.unit.fakeclock import FakeClock
from tests.unit.fakepeer import FakePeer, service_on
from worker import jobs
from worker.pool import (
    EXECUTION_TTL,
    HEARTBEAT,
    INTERMEDIATE_GRACE,
    PUBSUB_POLL,
    RECOVERY_INTERVAL,
    RECOVERY_LOCK_TTL,
    SCHEDULER_INTERVAL,
    SCHEDULER_LATE,
    SUSPENSION_CHECK,
    ConcurrentWorker,
)
from worker.service import LEASE_TTL, DeliveryService


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


@pytest.fixture
def peer() -> FakePeer:
    return FakePeer()


@pytest.fixture
def service(r: fakeredis.FakeRedis, peer: FakePeer) -> Iterator[DeliveryService]:
    svc = service_on(r, peer, FakeClock(time.time()), worker_concurrency=3, job_max_messages=2)
    jobs.install(svc)
    yield svc
    jobs.install(None)
    svc.stop()


def worker(r: fakeredis.FakeRedis, service: DeliveryService) -> ConcurrentWorker:
    return ConcurrentWorker([service.queue.rq], connection=r, serializer=JSONSerializer, service=service)


def test_job_slots_are_the_services_conversations(r: fakeredis.FakeRedis, service: DeliveryService) -> None:
    w = worker(r, service)
    assert w.concurrency == service.concurrency == 3
    assert w.get_heartbeat_ttl(None, 0.0) == EXECUTION_TTL  # type: ignore[arg-type]
    # a dead worker's job is re-run once its execution lapsed: its leases must have lapsed by then,
    # or the re-run finds its own messages busy and leaves them for later
    assert LEASE_TTL <= EXECUTION_TTL


def test_a_burst_runs_the_queued_jobs_and_the_mail_goes_out(
    r: fakeredis.FakeRedis, service: DeliveryService, peer: FakePeer
) -> None:
    msgs = [
        Message(Envelope(id=f"Q{i}", sender="a@x.test", recipients=[Recipient(f"u{i}@y.test")]), b"x\r\n")
        for i in range(5)
    ]
    assert service.spool.commit(msgs) == 3  # two messages a job
    w = worker(r, service)
    assert w.work(burst=True, with_scheduler=False)
    assert sorted(x for _, _, (x,) in peer.taken) == [f"u{i}@y.test" for i in range(5)]
    assert service.store.load_many([m.envelope.id for m in msgs]) == [None] * 5
    assert len(service.queue.rq) == 0 and len(service.queue.rq.started_job_registry) == 0


def test_a_drain_jobs_draw_rides_rqs_start_of_it(
    r: fakeredis.FakeRedis, service: DeliveryService, peer: FakePeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """worker/service.py start_ride: the draw goes in the transaction that registers the job's
    execution (rqbook.start), not in a round trip of the job's own; a draw that failed there leaves
    the job to draw for itself (below)."""
    drain_job(service, 5)

    def own_round_trip(*args: object) -> list[str]:
        raise AssertionError("drew in a round trip of its own")

    monkeypatch.setattr(service.queue, "draw", own_round_trip)
    assert worker(r, service).work(burst=True, with_scheduler=False)
    assert sorted(x for _, _, (x,) in peer.taken) == [f"u{i}@y.test" for i in range(5)]
    assert service._drawn == {} and service.queue.pending_ids("y.test") == []


def test_a_drain_job_whose_draw_failed_in_rqs_start_draws_for_itself(
    r: fakeredis.FakeRedis, service: DeliveryService, peer: FakePeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = drain_job(service, 2)
    monkeypatch.setattr(service.queue, "draw_in", lambda *a: lambda answers: None)  # an error reply
    assert worker(r, service).work(burst=True, with_scheduler=False)
    assert len(peer.taken) == 2 and service.queue.drawn(job_id) == []


def test_the_heartbeat_pushes_on_the_services_leases(r: fakeredis.FakeRedis, service: DeliveryService) -> None:
    w = worker(r, service)
    w.register_birth()
    with service.leases.taken(["Q1"], "y.test") as lease:
        key = f"mtaq:holder:{lease.token}"  # the job's leases live while this key does
        r.pexpire(key, 50)
        clock = service.clock
        assert isinstance(clock, FakeClock)
        clock.now += service.leases.ttl / 4  # a lease is pushed on once a quarter of its TTL old
        w.beat()
        assert r.pttl(key) > 1000
    assert not r.exists(key) and not r.hlen("mtaq:leases:y.test")


def test_scheduled_jobs_rqs_scheduler_left_behind_are_queued(r: fakeredis.FakeRedis, service: DeliveryService) -> None:
    worker = ConcurrentWorker([service.spool.queue.rq], connection=r, serializer=JSONSerializer, service=service)
    queue = service.spool.queue.rq
    now = datetime.datetime.now(datetime.UTC)
    late = queue.enqueue_at(now - datetime.timedelta(seconds=SCHEDULER_LATE + 5), "worker.jobs.deliver", "a.test", [])
    recent = queue.enqueue_at(now - datetime.timedelta(seconds=1), "worker.jobs.deliver", "b.test", [])
    worker._enqueue_overdue(queue)
    # the one its scheduler should have moved long ago is queued; a just-due one is left to it
    assert queue.job_ids == [late.id]
    assert queue.scheduled_job_registry.get_job_ids() == [recent.id]


def test_rqs_scheduler_runs_at_our_interval(r: fakeredis.FakeRedis, service: DeliveryService) -> None:
    w = worker(r, service)
    job = service.queue.rq.enqueue_in(datetime.timedelta(seconds=-1), "worker.jobs.deliver", "x.test", ["A"])
    w._start_scheduler(burst=True)  # a burst's scheduler moves what is due at once, then stops
    assert w.scheduler is not None and w.scheduler.interval == SCHEDULER_INTERVAL < SCHEDULER_LATE
    assert job.id in service.queue.rq.job_ids


def test_a_job_a_dead_worker_took_goes_back_to_the_head_of_the_queue(
    r: fakeredis.FakeRedis, service: DeliveryService
) -> None:
    w = worker(r, service)
    queue = service.queue.rq
    taken = queue.enqueue("worker.jobs.deliver", "a.test", ["Q1"], retry=CRASH_RETRY)
    other = queue.enqueue("worker.jobs.deliver", "b.test", ["Q2"])
    r.lmove(queue.key, IntermediateQueue(queue.key, connection=r).key, "LEFT", "RIGHT")  # dequeued, then killed
    inter = IntermediateQueue(queue.key, connection=r)
    assert inter.get_job_ids() == [taken.id] and queue.job_ids == [other.id]
    w._rescue_intermediate(queue)  # first seen: a live worker may be registering it right now
    assert inter.get_job_ids() == [taken.id]
    r.set(inter.get_first_seen_key(taken.id), time.time() - INTERMEDIATE_GRACE - 1)
    w._rescue_intermediate(queue)
    # ahead of what came after it, with all its retries: it never ran
    assert queue.job_ids == [taken.id, other.id] and inter.get_job_ids() == []
    job = queue.fetch_job(taken.id)
    assert job is not None and job.retries_left == CRASH_RETRY.max
    assert not r.exists(inter.get_first_seen_key(taken.id))


def test_rqs_heartbeat_after_each_job_is_left_to_the_heartbeat_thread(
    r: fakeredis.FakeRedis, service: DeliveryService
) -> None:
    """RQ's loop beats after every job it starts (three writes a job): within HEARTBEAT seconds of
    the last beat nothing is written; past that the loop's beat goes through."""
    w = worker(r, service)
    w.register_birth()
    w.beat()
    r.expire(w.key, 5)
    w.heartbeat()
    assert 0 < r.ttl(w.key) <= 5
    w._beaten_at -= HEARTBEAT
    w.heartbeat()
    assert r.ttl(w.key) > 5


def test_the_suspension_look_writes_nothing_and_still_sees_rq_suspend(
    r: fakeredis.FakeRedis, service: DeliveryService
) -> None:
    """RQ's look at `rq suspend`'s flag heartbeats the worker in the same transaction: a write a
    second a busy worker. Ours reads the flag alone, and leaves the waiting to RQ once it is set."""
    w = worker(r, service)
    w.register_birth()
    w.beat()
    r.expire(w.key, 5)
    before = r.hget(w.key, "last_heartbeat")
    w._beaten_at -= HEARTBEAT  # a heartbeat would go through now: the look must not make one
    w.check_for_suspension(burst=True)
    assert r.hget(w.key, "last_heartbeat") == before and 0 < r.ttl(w.key) <= 5
    suspend(r)
    w.check_for_suspension(burst=True)  # within SUSPENSION_CHECK of the last look: not asked
    w._suspension_seen -= SUSPENSION_CHECK
    with pytest.raises(StopRequested):  # RQ's answer to a suspended burst
        w.check_for_suspension(burst=True)


def test_the_heartbeat_reads_rq_suspend_for_the_loop(
    r: fakeredis.FakeRedis, service: DeliveryService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop asks Redis itself only when the heartbeat's look is older than SUSPENSION_CHECK:
    a flag set is seen at the next beat, with no round trip of the loop's own."""
    w = worker(r, service)
    w.register_birth()
    w.beat()
    w.check_for_suspension(burst=True)  # the beat saw no flag: nothing asked, nothing raised
    suspend(r)
    w.check_for_suspension(burst=True)  # the beat's look is fresh: the flag is not seen yet
    w.beat()
    asked: list[object] = []
    monkeypatch.setattr(r, "exists", lambda *keys: asked.append(keys))
    with pytest.raises(StopRequested):
        w.check_for_suspension(burst=True)
    assert asked == []


def test_one_registry_clean_up_a_turn_however_many_workers(r: fakeredis.FakeRedis, service: DeliveryService) -> None:
    """The clean-up's lock is left to lapse (RECOVERY_LOCK_TTL): a second worker looking within
    the turn cleans nothing, and the first, killed while cleaning, holds the others up no longer."""
    first, second = worker(r, service), worker(r, service)
    for w in (first, second):
        w.register_birth()
    cleaned: list[str] = []
    for w in (first, second):
        w._rearm_lost = functools.partial(cleaned.append, w.name)  # type: ignore[method-assign]
    first.clean_registries()
    second.clean_registries()
    assert cleaned == [first.name]
    key = f"{RECOVERY_LOCK}:{service.queue.rq.name}"
    assert 0 < r.ttl(key) <= RECOVERY_LOCK_TTL < RECOVERY_INTERVAL
    assert first.next_clean_up() == RECOVERY_INTERVAL, "its own turn: a whole interval"
    left = r.pttl(key) / 1000.0
    assert left - 0.5 < second.next_clean_up() <= left + 1.0 < RECOVERY_INTERVAL, "another's: just past its end"
    r.delete(key)  # the turn lapsed
    second.clean_registries()
    assert cleaned == [first.name, second.name]


def running_job(r: fakeredis.FakeRedis, service: DeliveryService) -> tuple[ConcurrentWorker, Queue, Job, Any]:
    """A registered worker running one job (its execution registered, as RQ's loop leaves it)."""
    w = worker(r, service)
    w.register_birth()
    q = service.spool.queue.rq
    job = q.enqueue("os.getpid", result_ttl=0)
    execution = w.prepare_execution(job)
    w._running[execution.id] = (job, execution, threading.Thread())
    return w, q, job, execution


def test_a_beat_racing_the_end_of_a_job_leaves_no_stub_of_it(r: fakeredis.FakeRedis, service: DeliveryService) -> None:
    """The heartbeat read the running jobs just before one ended and was deleted: its beat must not
    create the job's hash again (a hash of last_heartbeat alone, with no TTL: rq#1450)."""
    w, q, job, execution = running_job(r, service)
    assert r.zscore(q.started_job_registry.key, execution.composite_key) is not None
    r.delete(job.key)  # the job ended and went, as the beat was reading the running jobs
    w.beat()
    assert not r.exists(job.key)


def drain_job(service: DeliveryService, n: int) -> str:
    """``n`` messages to y.test committed: the id of the drain job they armed."""
    msgs = [
        Message(Envelope(id=f"Q{i}", sender="a@x.test", recipients=[Recipient(f"u{i}@y.test")]), b"x\r\n")
        for i in range(n)
    ]
    service.spool.commit(msgs)
    [job_id] = service.queue.rq.get_job_ids()
    return job_id


def dies(*args: object, **kw: object) -> None:
    raise RuntimeError("the worker died mid-job")


def test_a_drain_job_run_again_after_a_failure_delivers_what_it_took(
    r: fakeredis.FakeRedis, service: DeliveryService, peer: FakePeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = drain_job(service, 3)
    real = service.deliver
    monkeypatch.setattr(service, "deliver", dies)
    with pytest.raises(RuntimeError):
        service.drain("y.test", job_id)
    assert service.queue.drawn(job_id) == ["Q0", "Q1"]  # its share (job_max_messages 2), kept
    monkeypatch.setattr(service, "deliver", real)
    service.drain("y.test", job_id)  # RQ runs it again: the same two, nothing new taken
    assert sorted(x for _, _, (x,) in peer.taken) == ["u0@y.test", "u1@y.test"]
    assert service.queue.drawn(job_id) == [] and service.queue.pending_ids("y.test") == ["Q2"]
    # the third went to the next drain job, queued by the first draw
    [next_id] = service.queue.rq.get_job_ids()[1:]
    service.drain("y.test", next_id)
    assert len(peer.taken) == 3 and service.intake.load == 0


def test_a_drain_job_drops_its_drawn_list_with_its_leases_end(
    r: fakeredis.FakeRedis, service: DeliveryService, peer: FakePeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The drawn list goes in the leases' end script, not in a round trip (a write, an fsync) of
    its own; a job that fails inside its leases keeps it for its re-run."""
    job_id = drain_job(service, 2)
    alone: list[str] = []
    monkeypatch.setattr(service.queue, "drawn_done", alone.append)
    run = service._run
    monkeypatch.setattr(service, "_run", dies)
    with pytest.raises(RuntimeError):
        service.drain("y.test", job_id)
    assert service.queue.drawn(job_id) == ["Q0", "Q1"] and alone == [], "kept for the re-run"
    assert r.hgetall("mtaq:leases:y.test") == {}, "the leases ended all the same"
    monkeypatch.setattr(service, "_run", run)
    service.drain("y.test", job_id)
    assert service.queue.drawn(job_id) == [] and alone == [], "dropped with the leases' end"
    assert len(peer.taken) == 2


def test_a_worker_says_it_reads_one_key_a_message_and_opens_the_gate_when_all_do(
    r: fakeredis.FakeRedis, service: DeliveryService
) -> None:
    """The layout gate (common/store.py LAYOUT_KEY): new mail is written in one key only once every
    registered worker reads it; a worker of an older mtaq (no mark in its RQ hash) keeps it closed."""
    service.store.inline = False
    r.sadd("rq:workers", "rq:worker:older")
    r.hset("rq:worker:older", mapping={"name": "older", "state": "busy"})  # an older mtaq's worker
    w = worker(r, service)
    w.register_birth()
    assert r.hget(w.key, WORKER_LAYOUT_FIELD) == LAYOUT_INLINE.encode()
    assert not service.store.inline and r.get(LAYOUT_KEY) is None  # the older one still runs
    r.srem("rq:workers", "rq:worker:older")  # gone (RQ's clean-up forgets a dead worker)
    w._open_layout()
    assert service.store.inline and r.get(LAYOUT_KEY) == LAYOUT_INLINE.encode()
    other = Store(r, inline=False)
    assert other.refresh_layout() and other.inline  # any process sees it at its next look


def test_an_execution_is_pushed_on_once_a_quarter_of_its_ttl_old(
    r: fakeredis.FakeRedis, service: DeliveryService
) -> None:
    """A job younger than a quarter of EXECUTION_TTL still has three quarters of it: its beat
    writes nothing (issue 15: most jobs end before); an older one's expiry is pushed on."""
    w, q, _, execution = running_job(r, service)
    w._renewed[execution.id] = time.monotonic()  # as the loop starting it does
    registry = q.started_job_registry.key
    r.zadd(registry, {execution.composite_key: 1.0})  # lapsing, were it written
    w.beat()
    assert r.zscore(registry, execution.composite_key) == 1.0, "young: left alone"
    w._renewed[execution.id] -= EXECUTION_TTL / 4
    w.beat()
    assert (r.zscore(registry, execution.composite_key) or 0) > time.time() + EXECUTION_TTL - 5


def test_a_worker_waits_to_register_while_the_primary_takes_no_writes(
    r: fakeredis.FakeRedis, service: DeliveryService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At `docker compose up --profile ha` the replica syncs a moment after the primary answers,
    and the primary takes no writes until then (min-replicas-to-write): the worker waits to
    register instead of quitting. Any other Redis error at birth still ends it (a wrong password
    must be said, not waited out)."""
    import rq.worker

    from common.redisconn import NoReplicasError

    refusals: list[Exception] = [NoReplicasError("NOREPLICAS"), NoReplicasError("NOREPLICAS")]
    real = rq.worker.BaseWorker.register_birth

    def birth(self: ConcurrentWorker) -> None:
        if refusals:
            raise refusals.pop(0)
        real(self)  # type: ignore[no-untyped-call]

    monkeypatch.setattr(rq.worker.BaseWorker, "register_birth", birth)
    monkeypatch.setattr("worker.pool.BIRTH_RETRY", 0.0)
    w = worker(r, service)
    w.register_birth()
    assert not refusals and r.exists(w.key)

    refusals.append(redis.AuthenticationError("invalid password"))
    with pytest.raises(redis.AuthenticationError):
        worker(r, service).register_birth()


def test_the_command_channel_thread_stops_within_a_poll_after_it_read_the_unsubscribe(
    r: fakeredis.FakeRedis, service: DeliveryService
) -> None:
    # RQ's shutdown: unsubscribe, then stop the thread and wait for it. A thread that read the
    # UNSUBSCRIBE's answer first waits for a new subscription as long as its read timeout (RQ's is
    # 60 s): the worker's exit waited with it.
    w = worker(r, service)
    w.subscribe()
    thread: Any = w.pubsub_thread
    pubsub: Any = w.pubsub
    time.sleep(0.05)
    pubsub.unsubscribe()
    time.sleep(0.05)  # RQ's main thread descheduled between its two calls: the thread reads first
    stopper = threading.Thread(target=thread.stop, daemon=True)
    started = time.monotonic()
    stopper.start()
    stopper.join(3.0)  # a bound of its own: a longer PUBSUB_POLL must fail here too
    assert not stopper.is_alive() and not thread.is_alive()
    assert time.monotonic() - started <= PUBSUB_POLL + 1 <= 2.5
    pubsub.close()
