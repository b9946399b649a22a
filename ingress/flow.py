"""Mail input flow control, Postfix's ``in_flow_delay``: when delivery lags behind the ingress, a
new message's ``MAIL FROM`` waits for its 250 until delivery catches up, or ``in_flow_delay``
seconds at most, then goes on. It slows clients, never refuses them; the queue stops growing
faster than the workers empty it, so new mail does not wait behind a backlog the ingress made.

The signal: delivery jobs no worker has finished, RQ's ready list (``rq:queue:<name>``, LLEN)
plus the jobs workers hold (its intermediate list, LLEN, where a job waits between a worker's
dequeue and its registration, and its StartedJobRegistry, ZCARD). Workers take jobs as soon as
they have a free job slot (``worker_concurrency`` each) and hold them while their messages wait for a
conversation, so the ready list alone stays empty while a backlog builds inside the workers. One
poller per ingress process reads both every ``interval`` while mail comes in (a MAIL within
``ACTIVE_FOR`` seconds, or one held now); otherwise every ``STALE_AFTER / 2`` while the gate is
closed (the next MAIL needs a sample younger than STALE_AFTER) and every ``IDLE_INTERVAL`` while it
is open, waking at the first MAIL: an idle ingress does not ask Redis five times a second (on issue 15's ceiling load,
800 messages taken in 3 s and delivered in 23, those idle polls were 1.4 of the 33 Redis commands
a message cost; later the polls while a lag went on with all the mail taken, 0.45 of 14.5: 0.17
since). Every session asks the sample (``FlowGate.must_wait``): no Redis call per message. Retries
wait in RQ's scheduled registry and jobs for a destination that is down go back there at once
(worker/service.py), so neither counts.
Jobs in conversation with a slow destination do count: only the worker could tell a message that
waits for a conversation from one in one. With no worker at all the ready list only grows: each
message waits ``in_flow_delay``, never forever.

The limit (``in_flow_backlog``) is in messages: the messages in the destinations' pending lists
that no drain job has taken yet (``mtaq:pend-count``, common/jobqueue.py), plus unfinished jobs
times the messages per job: what drain jobs took, a moving average the workers keep in Redis
(``mtaq:drawn-avg``); before any draw, an average over this ingress's group commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis

from common import metrics

__all__ = ["Backlog", "FlowGate", "lagging", "read_backlog"]

log = logging.getLogger("mtaq.ingress")

# The log says "on" when a lag begins and "off" once none was seen for this long: a backlog that
# hovers at the limit opens and closes the gate every poll, and that is one episode, not many lines.
QUIET = 5.0
# Weight of each group commit in the moving average of messages per job.
PER_JOB_WEIGHT = 0.2
# A sample older than this is no sample: a poller stuck on a slow Redis must not hold mail on an old
# word (the commit will find out what is wrong with Redis and answer for it).
STALE_AFTER = 2.0
# Seconds between polls while mail comes in. A held MAIL goes on at the first sample that says
# delivery caught up, so this is what flow control adds to a held MAIL at most; a poll is four
# Redis commands, and at 0.1 s they were 0.86 of the 19 a message cost on issue 15's ceiling load
# (the ingress is held there through most of the run).
POLL_INTERVAL = 0.2
# The poller keeps its pace (``interval``) this long after a MAIL, then polls every IDLE_INTERVAL
# until the next MAIL wakes it.
ACTIVE_FOR = 2.0
IDLE_INTERVAL = 5.0


@dataclass(frozen=True, slots=True)
class Backlog:
    """The delivery queue as a poll saw it at ``taken`` (the gate's clock)."""

    ready: int  # jobs no worker has taken yet
    running: int  # jobs workers hold, their messages in or waiting for a conversation
    taken: float
    pending: int = 0  # messages in the pending lists, waiting for a drain job to take them
    per_job: float = 0.0  # messages a drain job took, on average (0: unknown)

    @property
    def jobs(self) -> int:
        return self.ready + self.running


def lagging(sample: Backlog | None, now: float, limit: int, per_job: float = 1.0) -> bool:
    """Whether delivery lags: unfinished jobs of ``per_job`` messages each come to ``limit``
    messages or more, by a sample no older than STALE_AFTER. No sample (the read failed), or a
    stale one: not lagging."""
    if sample is None or now - sample.taken > STALE_AFTER:
        return False
    per_job = sample.per_job or per_job
    return (sample.jobs > 0 or sample.pending > 0) and sample.jobs * per_job + sample.pending >= limit


def read_backlog(
    r: redis.Redis,
    ready_key: str,
    taken_key: str,
    running_key: str,
    taken: float,
    pending_key: str = "",
    per_job_key: str = "",
) -> Backlog:
    """One look at the delivery queue (one round trip): LLEN of RQ's ready list; the jobs workers
    hold: LLEN of its intermediate list (taken, not yet registered: counted nowhere else) plus the
    ZCARD of its started registry; the messages pending and a drain job's size (``pending_key``,
    ``per_job_key``, when given: one MGET, a command a poll fewer than two GETs, issue 15)."""
    pipe = r.pipeline(transaction=False)
    pipe.llen(ready_key)
    pipe.llen(taken_key)
    pipe.zcard(running_key)
    counts = [key for key in (pending_key, per_job_key) if key]
    if counts:
        pipe.mget(counts)
    ready, just_taken, running, *extra = pipe.execute()
    got = extra[0] if counts else []
    pending = max(0, int(got[0] or 0)) if pending_key else 0
    per_job = max(0.0, float(got[-1] or 0)) if per_job_key else 0.0
    return Backlog(int(ready), int(just_taken) + int(running), taken, pending, per_job)


class FlowGate:
    """The ingress process's flow control: ``watch()`` keeps a sample of the ready list,
    ``must_wait()`` is the sessions' question at MAIL, ``wait()`` holds one MAIL at most ``delay``
    and lets every held MAIL go as soon as a sample says delivery caught up. ``read`` is the
    (blocking) look at Redis; ``clock`` and ``sleep`` are time.monotonic and asyncio.sleep unless
    a test gives its own."""

    def __init__(
        self,
        read: Callable[[float], Backlog],
        *,
        delay: float,
        limit: int,
        interval: float = POLL_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.read = read
        self.delay = delay
        self.limit = max(1, limit)
        self.per_job = 1.0  # messages per delivery job this ingress writes (moving average)
        self.interval = interval
        self.clock = clock
        self.sleep = sleep
        self.sample: Backlog | None = None
        self.engaged = False  # in a lag episode (for the log): lagging now, or within QUIET
        self._last_lag = 0.0
        self._caught_up = asyncio.Event()
        self._caught_up.set()
        self._last_mail = -ACTIVE_FOR  # when a session last asked (the poller's pace)
        self._mail = asyncio.Event()  # set by a MAIL while the poller idles: poll now
        self.holding = 0  # MAILs waiting in wait() now (the poller keeps its pace for them)
        self.held = 0  # MAILs held in this episode (for the log line)
        self.held_total = 0
        self.timed_out = 0  # of those, how many went on after the whole delay

    def must_wait(self) -> bool:
        """At MAIL: hold this one? A look at the sample, no IO; False when flow control is off."""
        self._last_mail = self.clock()
        if not self._mail.is_set():
            self._mail.set()
        return (
            self.delay > 0
            and not self._caught_up.is_set()
            and lagging(self.sample, self.clock(), self.limit, self.per_job)
        )

    def observe(self, sample: Backlog | None) -> None:
        """A new sample (None: the read failed): close the gate while delivery lags, open it (and
        let every held MAIL go) as soon as it does not. The log line is per episode."""
        self.sample = sample
        now = self.clock()
        if self.delay > 0 and lagging(sample, now, self.limit, self.per_job):
            assert sample is not None
            self._caught_up.clear()
            self._last_lag = now
            if not self.engaged:
                self.engaged = True
                self.held = 0
                log.info(
                    "mail input flow control on: %d delivery jobs unfinished (%d held by workers, %d waiting "
                    "for one), about %d messages, limit %d: new mail waits up to %gs at MAIL",
                    sample.jobs,
                    sample.running,
                    sample.ready,
                    round(sample.jobs * (sample.per_job or self.per_job)) + sample.pending,
                    self.limit,
                    self.delay,
                )
            return
        self._caught_up.set()
        if self.engaged and now - self._last_lag >= QUIET:
            self.engaged = False
            log.info(
                "mail input flow control off: delivery kept up for %gs (%d MAIL(s) held, %d of them the whole %gs)",
                QUIET,
                self.held,
                self.timed_out,
                self.delay,
            )
            self.timed_out = 0

    def wrote(self, messages: int, jobs: int) -> None:
        """A group commit stored ``messages`` in ``jobs`` delivery jobs: the size of a job moves
        with load (one per commit and next hop), so the limit is in messages, not jobs."""
        if messages > 0 and jobs > 0:
            self.per_job += PER_JOB_WEIGHT * (messages / jobs - self.per_job)

    async def wait(self) -> bool:
        """Hold one MAIL until delivery catches up (True) or ``delay`` passes (False)."""
        if self._caught_up.is_set():
            return True
        self.held += 1
        self.held_total += 1
        metrics.flow_held()
        released = asyncio.ensure_future(self._caught_up.wait())
        nap = asyncio.ensure_future(self.sleep(self.delay))
        self.holding += 1
        try:
            await asyncio.wait({released, nap}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.holding -= 1
            released.cancel()
            nap.cancel()
        if released.done() and not released.cancelled():
            return True
        self.timed_out += 1
        return False

    async def step(self) -> None:
        """One poll: read the ready list off the event loop and observe what it says."""
        sample: Backlog | None = None
        with contextlib.suppress(redis.RedisError, OSError, ValueError):
            sample = await asyncio.to_thread(self.read, self.clock())
        self.observe(sample)

    async def watch(self) -> None:
        """Poll every ``interval`` for the life of the ingress (nothing when flow control is off)."""
        if self.delay <= 0:
            return
        while True:
            await self.step()
            # At the pace while a MAIL may be waiting for the next sample: not while a lag merely
            # goes on (all mail taken, the workers still delivering), where nobody reads it. The
            # next MAIL wakes the poller; the "off" line comes at an idle poll then. While the gate
            # is closed, idle polls keep the sample younger than STALE_AFTER: a MAIL reads an older
            # one as none and would go through while the lag goes on (found in review).
            if self.holding or self.clock() - self._last_mail < ACTIVE_FOR:
                await self.sleep(self.interval)
                continue
            idle = IDLE_INTERVAL if self._caught_up.is_set() else min(IDLE_INTERVAL, STALE_AFTER / 2)
            self._mail.clear()
            mail = asyncio.ensure_future(self._mail.wait())
            nap = asyncio.ensure_future(self.sleep(idle))
            try:
                await asyncio.wait({mail, nap}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                mail.cancel()
                nap.cancel()
