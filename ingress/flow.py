"""Mail input flow control, Postfix's ``in_flow_delay``: when delivery lags behind the ingress, a
new message's ``MAIL FROM`` waits for its 250 until delivery catches up, or ``in_flow_delay``
seconds at most, then goes on. It slows clients, never refuses them; the queue stops growing
faster than the workers empty it, so new mail does not wait behind a backlog the ingress made.

The signal: how long the oldest delivery job in RQ's ready list (``rq:queue:<name>``, jobs no
worker has taken yet) has waited. One poller per ingress process reads it every ``interval`` and
every session asks the sample (``FlowGate.lagging``): no Redis call per message. Only mail waiting
to *start* delivery counts: retries wait in RQ's scheduled registry, and jobs for a destination
that is down are taken by a worker and handed back to the scheduler at once, so neither keeps the
ready list's head old unless every worker is busy -- and then new mail would wait behind them too.
With no worker at all the head only ages: each message waits ``in_flow_delay``, never forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis

__all__ = ["Backlog", "FlowGate", "lagging", "read_backlog"]

log = logging.getLogger("mtaq.ingress")

# A sample older than this is no sample: a poller stuck on a slow Redis must not hold mail on an old
# word (the commit will find out what is wrong with Redis and answer for it).
STALE_AFTER = 2.0
# RQ's job hash field and its format (rq.utils.utcformat)
_ENQUEUED_AT = "enqueued_at"
_RQ_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"


@dataclass(frozen=True, slots=True)
class Backlog:
    """What the ready list looked like at ``taken`` (the gate's clock)."""

    jobs: int  # delivery jobs no worker has taken yet
    oldest_wait: float  # seconds the first of them has waited; 0 when there is none
    taken: float


def lagging(sample: Backlog | None, now: float, wait: float) -> bool:
    """Whether delivery lags: the oldest job not yet taken has waited ``wait`` seconds or more,
    by a sample no older than STALE_AFTER. No sample, or a stale one: not lagging."""
    if sample is None or now - sample.taken > STALE_AFTER:
        return False
    return sample.jobs > 0 and sample.oldest_wait >= wait


def read_backlog(r: redis.Redis, key: str, taken: float) -> Backlog:
    """One look at RQ's ready list ``key``: its length and its head job's age (two round trips)."""
    pipe = r.pipeline(transaction=False)
    pipe.llen(key)
    pipe.lindex(key, 0)
    jobs, head = pipe.execute()
    if not jobs or head is None:
        return Backlog(0, 0.0, taken)
    job_id = head.decode() if isinstance(head, bytes) else str(head)
    raw = r.hget(f"rq:job:{job_id}", _ENQUEUED_AT)
    if raw is None:  # taken (and its hash gone) between the two reads: the list moves
        return Backlog(int(jobs), 0.0, taken)
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    enqueued = datetime.datetime.strptime(text, _RQ_TIME).replace(tzinfo=datetime.UTC)
    age = (datetime.datetime.now(datetime.UTC) - enqueued).total_seconds()
    return Backlog(int(jobs), max(0.0, age), taken)


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
        wait: float,
        interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.read = read
        self.delay = delay
        self.wait_threshold = wait
        self.interval = interval
        self.clock = clock
        self.sleep = sleep
        self.sample: Backlog | None = None
        self.engaged = False
        self._caught_up = asyncio.Event()
        self._caught_up.set()
        self.held = 0  # MAILs held since flow control last engaged (for the log line)
        self.held_total = 0
        self.timed_out = 0  # of those, how many went on after the whole delay

    def must_wait(self) -> bool:
        """At MAIL: hold this one? A look at the sample, no IO; False when flow control is off."""
        return self.engaged and self.delay > 0 and lagging(self.sample, self.clock(), self.wait_threshold)

    def observe(self, sample: Backlog | None) -> None:
        """A new sample (None: the read failed). Engages or releases, and logs each change once."""
        self.sample = sample
        now_lagging = self.delay > 0 and lagging(sample, self.clock(), self.wait_threshold)
        if now_lagging and not self.engaged:
            assert sample is not None
            self.engaged = True
            self.held = 0
            self._caught_up.clear()
            log.info(
                "mail input flow control on: %d delivery job(s) wait for a worker, the oldest %.2fs; "
                "new mail waits up to %gs at MAIL",
                sample.jobs,
                sample.oldest_wait,
                self.delay,
            )
        elif not now_lagging and self.engaged:
            self.engaged = False
            self._caught_up.set()
            log.info("mail input flow control off: delivery caught up (%d MAIL(s) held meanwhile)", self.held)

    async def wait(self) -> bool:
        """Hold one MAIL until delivery catches up (True) or ``delay`` passes (False)."""
        self.held += 1
        self.held_total += 1
        if self._caught_up.is_set():
            return True
        released = asyncio.ensure_future(self._caught_up.wait())
        nap = asyncio.ensure_future(self.sleep(self.delay))
        try:
            await asyncio.wait({released, nap}, return_when=asyncio.FIRST_COMPLETED)
        finally:
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
            await self.sleep(self.interval)
