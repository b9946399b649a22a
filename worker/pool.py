"""An RQ worker that runs many delivery jobs at once, each in its own thread.

Why threads in one RQ worker (see docs/architecture.md, "Many conversations per worker"): a
delivery job spends nearly all its time waiting on a remote server, so what limits a worker is how
many conversations it can wait on at once, not CPU. RQ 3 tracks several executions per worker
(``Worker.executions``, ``get_current_executions()``), so every job running here is a real RQ
execution: in the StartedJobRegistry, with a heartbeat, visible in ``rq info`` and rq-dashboard,
failed or retried by RQ's own rules. RQ's ``WorkerPool`` would be one process per job (~40 MB each);
an asyncio loop would need an asyncio RQ and redis client underneath, which RQ is not.

- The main thread is RQ's loop: it dequeues a job only when one of ``worker_concurrency`` job
  slots is free, registers its execution, and hands it to a thread.
- A heartbeat thread pushes on, every ``HEARTBEAT`` seconds, the worker's key, every execution a
  quarter of ``EXECUTION_TTL`` old, and the leases the delivery service holds (messages, connection slots). A
  worker killed with SIGKILL stops heartbeating: its executions lapse after ``EXECUTION_TTL``
  seconds and RQ's registry clean-up (about every ``RECOVERY_INTERVAL`` seconds by one worker in
  turn, in a thread of its own so that a young worker takes jobs at once) re-runs
  their jobs at once (CRASH_RETRY); the message leases lapse with them, so the re-run may take them.
- Job timeouts: RQ's ``TimerDeathPenalty`` (the SIGALRM one only works in the main thread).
- SIGTERM (warm shutdown): no more jobs are taken; conversations end after the transaction in
  progress; what they had not started is handed back to the queue; the worker waits for its jobs
  (``STOP_GRACE``) and leaves. A second SIGTERM is a cold shutdown (RQ's).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import threading
import time
from typing import Any

import redis
from rq import SimpleWorker, worker_registration
from rq.defaults import DEFAULT_LOGGING_DATE_FORMAT, DEFAULT_LOGGING_FORMAT
from rq.exceptions import DequeueTimeout
from rq.executions import Execution
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job
from rq.queue import Queue
from rq.registry import clean_registries
from rq.scheduler import RQScheduler
from rq.suspension import WORKERS_SUSPENDED
from rq.timeouts import TimerDeathPenalty
from rq.utils import now as rq_now
from rq.worker import WorkerStatus

from common.jobqueue import DRAIN_FUNC, QueuedJob
from common.pdeathsig import set_parent_death_signal
from common.redisconn import REDIS_AWAY, NoReplicasError
from common.statusscript import LAYOUT_INLINE
from common.store import RECOVERY_LOCK, WORKER_LAYOUT_FIELD
from worker import rqbook
from worker.crew import Permit, Permits
from worker.leases import end_now, ends_with_success, restage, staged_ends
from worker.service import DeliveryService

__all__ = ["EXECUTION_TTL", "HEARTBEAT", "RECOVERY_INTERVAL", "ConcurrentWorker"]

log = logging.getLogger("mtaq.worker")

HEARTBEAT = 5.0  # seconds between heartbeats of executions and leases
EXECUTION_TTL = 20  # seconds an execution outlives its worker's last heartbeat
# A scheduled job this late means RQ's scheduler is not running: it looks every SCHEDULER_INTERVAL
# (registry scores are whole seconds: about 3 s of margin), and after the death of the worker it
# ran in, another worker takes over its lock only after RQ's 120 s
# fallback period. Within the minute a dead process's mail has to move, 30 s was too long: a job
# re-run after a crash and killed again waits its 5 s retry, then this, then the next clean-up
# (RECOVERY_INTERVAL), after the 20 s its first execution took to lapse. Were the scheduler
# merely slow, the job is queued twice: the second run finds its messages leased or done.
SCHEDULER_LATE = 5.0
# Seconds between the looks of RQ's scheduler for due jobs (RQ's default is 1). A look and its
# heartbeat are about ten Redis commands (a SCRIPT EXISTS, the heartbeat's transaction with its
# lock script, the registry's ZRANGEBYSCORE): half of what the whole system asked Redis a second
# while idle, and 0.28 of the 16 commands a delivered message cost on issue 15's ceiling load.
# What it moves are our retries (minutes apart) and hand-backs (seconds): one is up to this much
# later, well inside SCHEDULER_LATE, after which a worker moves it itself.
SCHEDULER_INTERVAL = 2
RECOVERY_INTERVAL = 10  # seconds between RQ registry clean-ups (abandoned jobs re-run)
# The clean-up's lock is a turn, not a mutex: whoever takes it cleans, and it is left to lapse, so
# one clean-up runs every RECOVERY_INTERVAL or so for the whole deployment however many workers
# try. Dropped at the end of each clean-up, as it was, every worker cleaned every interval: with 4
# workers about 15 round trips each (RQ's registries, the worker registry, the overdue and lost
# jobs), 6 round trips a second, the largest of what the system asked Redis by the clock (issue 15:
# each round trip wakes Redis, about 0.1 ms of its CPU on this machine, with nothing to do for
# most). It also bounds how long a worker killed while cleaning holds every clean-up up (30 s made
# a dead process's mail wait up to 30 s more: chaos test, 47 s to an empty queue after the killing);
# a clean-up that takes longer overlaps the next one, which finds the jobs the first has re-run
# gone from the registry.
RECOVERY_LOCK_TTL = RECOVERY_INTERVAL - 1
DEQUEUE_WAIT = 5  # seconds one BLMOVE waits: how soon a stop request is seen when idle
# seconds a dequeued job may go unregistered before it is handed back: a live worker registers it
# in a round trip or two; were it only slow, the job runs twice, and the second run finds its
# messages leased or done
INTERMEDIATE_GRACE = 5.0
STOP_GRACE = 30.0  # seconds a warm shutdown waits for the jobs in flight
BURST_POLL = 0.05  # seconds between looks at the queue while a burst waits for its running jobs
# Seconds between looks at `rq suspend`'s flag (RQ looks before every job). The heartbeat reads
# it with its own writes every HEARTBEAT seconds; the loop asks itself only when that look is
# older than this (the heartbeat thread stuck): a look a second of its own was a round trip a
# second a worker for a flag an operator sets by hand.
SUSPENSION_CHECK = HEARTBEAT + 1.0
# The read timeout of the thread that serves the worker's command channel (`rq` stop-job, shutdown).
# RQ's is 60 s, and at shutdown RQ unsubscribes, then stops the thread and waits for it (redis-py 8's
# stop() joins): a thread that read the UNSUBSCRIBE's answer before stop() waits those 60 s for a new
# subscription, and the worker's exit with it (`mtaq run` 27 s and more after Ctrl-C, found in
# session 14). A read that times out sends no command: the thread wakes once a second, and the
# connection's health check (a PING after 30 s without a reply) goes every 30 s, where it went
# every 60 (a review's MONITOR of a subscribed thread).
PUBSUB_POLL = 1.0
BIRTH_RETRY = 0.5  # seconds between tries to register while the primary takes no writes


class _Scheduler(RQScheduler):
    """RQ's scheduler, stopped when the worker that forked it dies: RQ's own outlived a worker
    SIGKILLed (the OOM killer), running on with the scheduler lock, a process nobody watches."""

    def start(self) -> Any:
        self._parent = os.getpid()
        return super().start()  # type: ignore[no-untyped-call]  # RQ's scheduler is untyped

    def work(self) -> None:
        # the forked child, first thing: SIGTERM (RQ's graceful stop, its locks released) when the
        # worker dies, or now if it already has
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != self._parent:
            os.kill(os.getpid(), signal.SIGTERM)
        super().work()  # type: ignore[no-untyped-call]


class ConcurrentWorker(SimpleWorker):
    death_penalty_class = TimerDeathPenalty

    def __init__(self, *args: Any, service: DeliveryService, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.service = service
        # as many jobs as conversations: a job waits on conversations, so more jobs than permits
        # would only wait, and fewer would leave permits idle (one setting, read by the service)
        self.concurrency = service.concurrency
        self._jobs = Permits(self.concurrency)  # job slots: one per job from dequeue to its end
        self._dequeued: Permit | None = None  # the slot of the job just dequeued, for execute_job
        self._running: dict[str, tuple[Job, Any, threading.Thread]] = {}  # execution id -> job, execution
        self._renewed: dict[str, float] = {}  # execution id -> when its expiry was last set (monotonic)
        self._running_lock = threading.Lock()
        self._beat_stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._done = rqbook.Tally()  # successful jobs and working time, written by the heartbeat
        self._suspension_seen = -SUSPENSION_CHECK  # monotonic time of the last look at `rq suspend`
        self._suspended = False  # what that look saw
        self._turn_left: float | None = None  # seconds left of another worker's clean-up turn, when refused
        self._beaten_at = -HEARTBEAT  # monotonic time of the last heartbeat of the worker's key

    # -- RQ's loop, with room for many jobs

    def _start_scheduler(
        self,
        burst: bool = False,
        logging_level: str | None = "INFO",
        date_format: str = DEFAULT_LOGGING_DATE_FORMAT,
        log_format: str = DEFAULT_LOGGING_FORMAT,
    ) -> None:
        """RQ's own (rq/worker/base.py), with our SCHEDULER_INTERVAL: the scheduler runs in a process
        of its own in whichever worker holds its lock, and RQ gives no other way to set it."""
        # RQ's scheduler is untyped: Any keeps mypy --strict from asking for its types
        scheduler: Any = _Scheduler(
            self.queues,
            connection=self.connection,
            interval=SCHEDULER_INTERVAL,
            logging_level=logging_level if logging_level is not None else self.log.level,
            date_format=date_format,
            log_format=log_format,
            serializer=self.serializer,
        )
        self.scheduler = scheduler
        scheduler.acquire_locks()
        if not scheduler.acquired_locks:
            return
        if burst:
            try:
                scheduler.register_birth()
                scheduler.enqueue_scheduled_jobs()
            finally:
                scheduler.release_locks()
                scheduler.register_death()
        else:
            scheduler.start()

    def subscribe(self) -> None:
        """RQ's (rq/worker/base.py), the thread's read timeout PUBSUB_POLL: RQ gives no other way to
        set it."""
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        thread: Any = self.pubsub.run_in_thread(  # RQ declares the attribute None
            sleep_time=PUBSUB_POLL, daemon=True, exception_handler=self._pubsub_exception_handler
        )
        self.pubsub_thread = thread

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        self._start_heartbeat()
        idle_since = time.monotonic()
        while True:
            if self._stop_requested:
                return None
            permit = self._jobs.take(timeout=1.0)
            if permit is None:
                continue  # every job slot busy: the queue waits in Redis, where others may take it
            with permit:  # given back here unless a job is dequeued: execute_job takes it on
                if not self.service.intake.wait_room(1.0):
                    # the jobs here hold a share and more for every conversation (worker/intake.py):
                    # the queue waits in Redis for a process with room
                    continue
                try:
                    result = self.queue_class.dequeue_any(
                        self._ordered_queues,
                        None if timeout is None else min(timeout, DEQUEUE_WAIT),
                        connection=self.connection,
                        job_class=self.job_class,
                        serializer=self.serializer,
                        death_penalty_class=self.death_penalty_class,
                    )
                except DequeueTimeout:
                    idle = time.monotonic() - idle_since
                    if max_idle_time is not None and not self._running and idle > max_idle_time:
                        return None
                    continue
                except REDIS_AWAY as e:
                    log.warning("worker %s: Redis unavailable (%s); trying again in 1s", self.name, e)
                    time.sleep(1.0)
                    continue
                if result is None:  # burst mode, nothing waiting: leave once no job is in flight
                    with self._running_lock:
                        running = bool(self._running)
                    if running:
                        # a running drain job may queue the next one for its destination
                        # (common/jobqueue.py): the queue is empty only once none runs
                        time.sleep(BURST_POLL)
                        continue
                    return None
                job, queue = result
                job.redis_server_version = self.get_redis_server_version()  # type: ignore[no-untyped-call]
                self._dequeued = permit.keep()
                return job, queue

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Register the execution here (the main thread), run the job in a thread of its own, which
        holds the job's slot until the job is done."""
        permit, self._dequeued = self._dequeued, None
        assert permit is not None, "execute_job without a dequeued job"
        with permit:  # given back here when the execution cannot be registered
            named = QueuedJob.of(job)
            self.service.intake.begin(job.id, None if job.func_name == DRAIN_FUNC else len(named.ids))
            started = time.monotonic()  # before its expiry is set: the renewal is never late
            try:
                execution = self.prepare_execution(job)
            except REDIS_AWAY as e:
                self.service.job_ended(job.id)
                # a failover between the dequeue and this: the job waits in RQ's intermediate queue,
                # from which the recovery hands it back (_rescue_intermediate); or, if the start's
                # transaction was applied and its answer lost, it is in the StartedJobRegistry and
                # RQ's clean-up runs it again once the execution lapses (a drain job's re-run finds
                # what the start drew)
                log.warning(
                    "worker %s: Redis unavailable starting job %s (%s); it is handed back", self.name, job.id, e
                )
                return
            t = threading.Thread(
                target=self._perform, args=(job, queue, execution, permit.keep()), name=f"rq-{job.id}", daemon=True
            )
            with self._running_lock:
                self._running[execution.id] = (job, execution, t)
                self._renewed[execution.id] = started  # prepare_execution gave it EXECUTION_TTL from then
        t.start()

    # -- RQ's bookkeeping per job, lean (worker/rqbook.py): two transactions a job
    def prepare_execution(self, job: Job) -> Execution:
        queue = self.queue_class(job.origin, connection=self.connection, serializer=self.serializer)
        # a drain job's draw goes in the same transaction (a writing round trip a job fewer)
        ride = None
        if job.func_name == DRAIN_FUNC and len(job.args or ()) > 1:
            # drain(destination, its id): the list it draws into is named by the argument
            ride = self.service.start_ride(str(job.args[0]), str(job.args[1]))
        execution = rqbook.start(
            self.connection, job, self.name, self.get_heartbeat_ttl(job), queue.intermediate_queue_key, ride
        )
        self.executions[execution.id] = execution
        if self.get_state() != WorkerStatus.BUSY:  # a write when the state changes, not per job
            self.set_state(WorkerStatus.BUSY)
        return execution

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        """Done by prepare_execution (the job is marked started there, in the same transaction)."""

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        # RQ heartbeats the job once more here, for its success or failure callbacks; ours have none
        job.ended_at = rq_now()

    def handle_job_success(self, job: Job, queue: Queue, started_job_registry: Any, execution: Any) -> None:
        if not rqbook.lean(job, self.default_result_ttl):  # not a delivery job: RQ's own way
            rqbook.forget_lapsed_executions(self.connection, job)
            super().handle_job_success(job, queue, started_job_registry, execution)
            return
        ends = staged_ends()  # the job's leases end in the same write (worker/leases.py)
        try:
            rqbook.succeeded(self.connection, job, execution, also=ends)
        except BaseException:
            restage(ends)  # made when the job's thread leaves them (_perform), or they lapse
            raise
        self.executions.pop(execution.id, None)
        if job.started_at is not None and job.ended_at is not None:
            self._done.add((job.ended_at - job.started_at).total_seconds())

    def handle_job_failure(
        self,
        job: Job,
        queue: Queue,
        started_job_registry: Any = None,
        exc_string: str = "",
        execution: Execution | None = None,
    ) -> None:
        # a job that failed after its leases' block: its ends go before RQ queues it again (its
        # first retry is immediate), or the re-run would find its messages leased
        end_now(staged_ends())
        super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)

    def _perform(self, job: Job, queue: Queue, execution: Any, permit: Permit) -> None:
        with permit:
            try:
                # the job's leases end with its success write (rqbook.succeeded), not in a round
                # trip of their own; ends that write did not take are made when this block ends,
                # before the job stops counting as running (teardown waits for that)
                with ends_with_success():
                    self.perform_job(job, queue, execution)
            except Exception:
                # Redis gone while RQ recorded the outcome: the execution lapses and RQ re-runs the job
                log.exception("worker %s: job %s could not be completed in RQ", self.name, job.id)
            finally:
                self.service.job_ended(job.id)
                with self._running_lock:
                    self._running.pop(execution.id, None)
                    self._renewed.pop(execution.id, None)
        with contextlib.suppress(redis.RedisError):  # the next heartbeat says it
            self._set_idle_if_done()

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        # An execution lives EXECUTION_TTL past the last heartbeat, however long the job may run
        # (job_timeout is enforced by the death penalty): a dead worker's jobs are seen in seconds.
        return EXECUTION_TTL

    def _set_idle_if_done(self) -> None:
        with self._running_lock:
            idle = not self._running
        if idle and self.get_state() != WorkerStatus.IDLE:
            self.set_state(WorkerStatus.IDLE)

    # -- RQ's main loop reads and writes Redis outside our methods too; any error there quits the
    # worker ("found an unhandled exception"). A Redis failover (docs/high-availability.md) is
    # such an error that lasts seconds: wait it out instead, as the dequeue does.
    def check_for_suspension(self, burst: bool) -> None:
        # RQ looks before every job: a round trip per job for a flag an operator sets by hand
        try:
            # RQ's look (rq.suspension.is_suspended) heartbeats the worker in the same transaction:
            # a write, and an fsync, a second a busy worker, where the heartbeat thread beats every
            # HEARTBEAT seconds anyway (issue 15: heartbeat+maintenance 0.74 -> 0.52 of the 15 Redis
            # commands a message on the ceiling load, MONITOR). A plain read (the heartbeat's, or
            # our own when that is stale: SUSPENSION_CHECK) first; RQ's own loop, which beats while
            # it waits, only once an operator has suspended the workers.
            now = time.monotonic()
            if now - self._suspension_seen >= SUSPENSION_CHECK:
                self._suspended = bool(self.connection.exists(WORKERS_SUSPENDED))
                self._suspension_seen = now
            if self._suspended:
                super().check_for_suspension(burst)
        except REDIS_AWAY as e:
            log.warning("worker %s: Redis unavailable (%s); trying again in 1s", self.name, e)
            time.sleep(1.0)

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        if pipeline is not None:  # queued in a pipeline: its execute() reports errors
            self._beaten_at = time.monotonic()
            super().heartbeat(timeout, pipeline=pipeline)
            return
        if time.monotonic() - self._beaten_at < HEARTBEAT:
            # RQ's loop beats after every job it starts (three writes a job); the heartbeat thread
            # beats every HEARTBEAT seconds whatever the loop does
            return
        self._beaten_at = time.monotonic()
        try:
            super().heartbeat(timeout)
        except REDIS_AWAY as e:
            log.warning("worker %s: heartbeat failed (%s); the heartbeat thread tries again", self.name, e)

    # -- liveness
    def _start_heartbeat(self) -> None:
        if self._beat is not None:
            return
        self._beat = threading.Thread(target=self._heartbeat_loop, name="mtaq-heartbeat", daemon=True)
        self._beat.start()
        threading.Thread(target=self._recovery_loop, name="mtaq-recovery", daemon=True).start()

    def serialize(self) -> dict[str, Any]:
        """RQ's worker hash, and what it reads: one key a message (common/store.py LAYOUT_KEY)."""
        out: dict[str, Any] = super().serialize()
        out[WORKER_LAYOUT_FIELD] = LAYOUT_INLINE
        return out

    def register_birth(self) -> None:
        """RQ's, waiting while the primary takes no writes for want of a replica in sync (the ha
        set-up's fence, docs/high-availability.md): at `docker compose up` the replica syncs a
        moment after the primary answers, and a worker that quit then was restarted over and over."""
        said = False
        while True:
            try:
                super().register_birth()  # type: ignore[no-untyped-call]
                break
            except NoReplicasError as e:
                if self._stop_requested:
                    raise
                if not said:
                    log.warning("worker %s: waiting for Redis to take writes (%s)", self.name, e)
                    said = True
                time.sleep(BIRTH_RETRY)
        self._open_layout()

    def _open_layout(self) -> None:
        """Open the layout gate once every registered worker reads one key a message."""
        if not self.service.store.inline:
            self.service.store.open_layout(sorted(worker_registration.get_keys(connection=self.connection)))

    def _heartbeat_loop(self) -> None:
        while not self._beat_stop.wait(HEARTBEAT):
            try:
                self.beat()
            except Exception as e:
                log.warning("worker %s: heartbeat failed (%s); next in %.0fs", self.name, e, HEARTBEAT)

    def beat(self) -> None:
        """One heartbeat: the worker, its executions and their jobs, the service's leases."""
        now = time.monotonic()
        with self._running_lock:
            running = list(self._running.values())
            # an execution is pushed on at the first beat once it is a quarter of its TTL old, as
            # the leases are (worker/leases.py), then at every beat: a job younger than that still
            # has 15 s of its 20, and most jobs end before (issue 15: five commands a running job
            # every beat were 0.3 of the 16 a message cost on the ceiling load). The first renewal
            # comes 5-10 s after the start, leaving about 9 s in hand (the registry's expiry is in
            # whole seconds)
            due = [x for x in running if now - self._renewed.get(x[1].id, float("-inf")) >= EXECUTION_TTL / 4]
        with self.connection.pipeline() as pipe:
            pipe.exists(WORKERS_SUSPENDED)  # the loop's look at `rq suspend` (SUSPENSION_CHECK)
            self.heartbeat(EXECUTION_TTL + 60, pipeline=pipe)
            self._done.flush(pipe, self.key)
            if running and self.get_state() != WorkerStatus.BUSY:
                # a job started as the last one ended, whose thread saw none running: set right here
                self.set_state(WorkerStatus.BUSY, pipeline=pipe)
            for job, execution, _ in due:
                # the execution's heartbeat is what RQ's registries read; the job's own (its hash's
                # last_heartbeat, which RQ 3 keeps for older readers) is left out: a write a running
                # job every beat, and one landing just after the job ended and was deleted would
                # leave a job hash of that field alone, without a TTL (rq#1450)
                execution.heartbeat(job.started_job_registry, EXECUTION_TTL, pipeline=pipe)
            suspended = pipe.execute()[0]
        self._suspended, self._suspension_seen = bool(suspended), now
        with self._running_lock:
            for _, execution, _ in due:
                if execution.id in self._running:
                    self._renewed[execution.id] = now
        self.service.heartbeat()
        self.service.store.refresh_layout()  # asks Redis only until every worker reads one key a message
        if not running:
            self._set_idle_if_done()

    # -- stopping
    def request_stop(self, signum: Any, frame: Any) -> None:
        """Warm shutdown: the main loop sees the flag within DEQUEUE_WAIT seconds."""
        log.info("worker %s: stopping: finishing %d job(s) in flight", self.name, len(self._running))
        self._shutdown_requested_date = rq_now()
        self._stop_requested = True
        self.service.stop()
        signal.signal(signal.SIGINT, self.request_force_stop)
        signal.signal(signal.SIGTERM, self.request_force_stop)

    def teardown(self) -> None:
        deadline = time.monotonic() + STOP_GRACE
        while True:
            with self._running_lock:
                threads = [t for _, _, t in self._running.values()]
            if not threads or time.monotonic() > deadline:
                break
            threads[0].join(max(0.1, deadline - time.monotonic()))
        if threads:
            log.warning("worker %s: %d job(s) still running at exit; RQ re-runs them", self.name, len(threads))
        self.service.stop()
        self._beat_stop.set()
        super().teardown()  # type: ignore[no-untyped-call]

    def clean_registries(self) -> None:
        """RQ's registry clean-up (abandoned jobs re-run, dead workers forgotten), under a lock of
        our own: RQ's lasts 899 s, so a worker killed while cleaning would stop every clean-up for a
        quarter of an hour, and the mail of every worker that dies meanwhile with it."""
        self._turn_left = None
        for queue in self.queues:
            key = f"{RECOVERY_LOCK}:{queue.name}"
            with self.connection.pipeline(transaction=False) as pipe:
                pipe.set(key, self.name, nx=True, ex=RECOVERY_LOCK_TTL)
                pipe.pttl(key)
                took, left_ms = pipe.execute()
            if not took:
                # another worker's turn: look again once it lapses (_recovery_loop), not a whole
                # interval later, or a turn whose holder died would leave up to two intervals
                # between clean-ups
                self._turn_left = max(0.0, int(left_ms) / 1000.0)
                continue
            clean_registries(queue, self._exc_handlers)
            worker_registration.clean_worker_registry(queue)
            self._open_layout()  # the dead ones forgotten: those left say what they read
            self._rescue_intermediate(queue)
            self._enqueue_overdue(queue)
            self._rearm_lost()
        self.last_cleaned_at = rq_now()  # type: ignore[assignment]

    def _rearm_lost(self) -> None:
        """A destination's pending list whose drain job will never run (deleted by an operator,
        lost in Redis) gets a new one (common/jobqueue.py ``rearm_lost``)."""
        lost = self.service.queue.rearm_lost()
        if lost:
            log.warning("worker %s: the drain job of %s was gone: queued again", self.name, ", ".join(lost))

    def _enqueue_overdue(self, queue: Queue) -> None:
        """Scheduled jobs overdue by SCHEDULER_LATE: RQ's scheduler, which moves due jobs to the
        queue, is not working. It runs in one worker at a time under a lock with a TTL; after a
        Redis restart or the death of its worker it is back only once that lock lapses, and a
        job re-run after a crash (CRASH_RETRY's intervals) waits for it meanwhile. Do its work
        for what it left behind, as it would (chaos test: one message stuck past the minute)."""
        registry = queue.scheduled_job_registry
        ids = registry.get_jobs_to_schedule(int(time.time() - SCHEDULER_LATE))
        if not ids:
            return
        jobs = Job.fetch_many(ids, connection=self.connection, serializer=self.serializer)
        with self.connection.pipeline() as pipe:
            for job_id, job in zip(ids, jobs, strict=True):
                if job is not None:
                    queue._enqueue_job(job, pipeline=pipe, at_front=job.should_enqueue_at_front())
                registry.remove(job_id, pipeline=pipe)
            pipe.execute()
        log.warning(
            "worker %s: %d scheduled job(s) overdue (RQ's scheduler is not running): queued", self.name, len(ids)
        )

    def _rescue_intermediate(self, queue: Queue) -> None:
        """A job taken off the queue by a worker that died before it registered the execution sits
        in RQ's intermediate queue; RQ fails it after a minute. We hand it back once a clean-up has
        seen it there INTERMEDIATE_GRACE seconds: mail held by a dead worker is to go out again
        within 60 s."""
        inter = IntermediateQueue(queue.key, connection=self.connection)
        for job_id in inter.get_job_ids():
            if job_id in queue.started_job_registry:
                continue
            if inter.set_first_seen(job_id):
                continue
            first = inter.get_first_seen(job_id)
            if first is None or (rq_now() - first).total_seconds() < INTERMEDIATE_GRACE:
                continue
            job = queue.fetch_job(job_id)
            if job is None:
                inter.remove(job_id)
                continue
            # back at the head of the queue, as it was: the job never ran, so it is not its failure
            # (RQ counts one: a retry used, and the next retry's delay waited for nothing)
            log.warning("worker %s: job %s was taken by a worker that died: handed back", self.name, job_id)
            with self.connection.pipeline() as pipe:
                queue._enqueue_job(job, pipeline=pipe, at_front=True)
                pipe.lrem(inter.key, 1, job_id)
                pipe.delete(inter.get_first_seen_key(job_id))
                pipe.execute()

    @property
    def should_run_maintenance_tasks(self) -> bool:
        # RQ's own loop never runs them inline: the recovery thread does (_recovery_loop), so that
        # a worker takes jobs from its first second, however much a clean-up has to do.
        return False

    def _recovery_loop(self) -> None:
        while True:
            try:
                self.run_maintenance_tasks()  # type: ignore[no-untyped-call]
            except Exception as e:
                log.warning("worker %s: registry clean-up failed (%s); next in %ds", self.name, e, RECOVERY_INTERVAL)
            if self._beat_stop.wait(self.next_clean_up()):
                return

    def next_clean_up(self) -> float:
        """Seconds until this worker asks for the clean-up's turn again: RECOVERY_INTERVAL after its
        own turn; after another's, just past that turn's end (the waiting workers spread over a
        second: one of them takes it), so that one clean-up follows another about every
        RECOVERY_LOCK_TTL seconds whoever is alive."""
        if self._turn_left is None:
            return float(RECOVERY_INTERVAL)
        return min(float(RECOVERY_INTERVAL), self._turn_left + random.uniform(0.05, 1.0))
