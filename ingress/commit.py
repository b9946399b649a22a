"""Group commit: messages whose DATA has ended wait here, and one writer stores everything buffered
in one MULTI/EXEC, then answers all of those clients. Idle, a batch is one message and adds no
delay; under load batches grow by themselves, as a database's group commit does."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis

from common.events import Event
from common.replication import online_replicas
from common.spool import Spool
from common.store import Message, StoreError, StoreFull, StoreNotReplicated, StoreUnavailable
from ingress import replies
from ingress.replies import Reply

__all__ = ["WAIT_BYTES", "Committer", "StorageRefused", "answer_lost", "never_sent", "storage_reply"]

log = logging.getLogger("mtaq.ingress")

# After Redis refused a write for lack of memory, new mail is refused this long without asking it
# again (every session would otherwise take its DATA only to be refused at the commit).
OOM_PAUSE = 1.0
# After a commit that too few replicas acknowledged (redis_min_replicas), or that found no primary,
# new mail is refused (451 4.3.0) without storing it until the primary has its replicas again: each
# unreplicated commit is stored on the primary all the same (a failover's new primary starts
# without a replica), and every retry of the client would store another copy.
REPLICA_PAUSE = 2.0
# A commit interrupted by the loss of the primary is settled within this long (a Sentinel failover
# and a replica's sync take seconds; an SMTP client waits up to 10 minutes for its answer after
# DATA, RFC 5321 4.5.3.2.6), looking every SETTLE_POLL seconds.
SETTLE_WAIT = 120.0
SETTLE_POLL = 0.5
# With one Redis (no replicas required) a commit whose connection broke after it was sent (closed by
# the server, reset, timed out) may have been stored all the same: Redis applies MULTI/EXEC and
# appends it to its AOF before it answers, and a Redis killed in between has it when it starts
# again. A 451 then made the client send a second copy (the chaos test: 10 messages accepted twice
# at one Redis kill). So the committer asks, every SETTLE_POLL_ALONE for SETTLE_WAIT_ALONE at most,
# whether the batch's messages are there (its own keys: no mark to write on every commit), and
# answers 250 if they are. If they are not, or Redis stays away, the 451 stands: the batch is not
# stored again, because without a mark "not there" may be a commit still on its way (a hung Redis
# that runs the old EXEC when it resumes) or one delivered and removed already, and a second commit
# under the same queue ids would be delivered twice and counted twice. A commit refused at connect
# was never sent and gets its 451 at once.
SETTLE_WAIT_ALONE = 10.0
SETTLE_POLL_ALONE = 0.1
# A batch that holds this many octets of messages is written without waiting for more: what a
# commit costs then grows with its octets (Redis reads, appends and fsyncs each one), not with its
# commits, so waiting only holds every session of the batch back together. With 1 MiB messages from
# 10 sessions the wait made commits of all ten (36-60 ms each) that no session sent data during,
# then ten sessions sending at once: a convoy. Small messages never reach it (20 x 4 KiB = 80 KiB).
WAIT_BYTES = 1 << 20


class StorageRefused(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def _chain(e: BaseException) -> list[BaseException]:
    """An exception and its causes: StoreUnavailable <- redis.ConnectionError <- OSError."""
    out: list[BaseException] = []
    seen: BaseException | None = e
    while seen is not None and len(out) < 8:
        out.append(seen)
        seen = seen.__cause__ or seen.__context__
    return out


def never_sent(e: BaseException) -> bool:
    """Whether a StoreUnavailable came from a connection that could not be made (refused, no Unix
    socket, a connect that timed out or failed authentication, a Redis still loading): nothing of
    the commit reached Redis. Our clients make one attempt a command (common/redisconn.py connect:
    no retries), so the error is that attempt's."""
    for x in _chain(e):
        if isinstance(x, ConnectionRefusedError | FileNotFoundError):
            return True
        if isinstance(x, redis.AuthenticationError | redis.BusyLoadingError):
            return True
        if isinstance(x, redis.ConnectionError | redis.TimeoutError) and "connecting to" in str(x).lower():
            return True  # redis-py's words for a failed connect ("Error 113 connecting to ...")
    return False


def answer_lost(e: BaseException) -> bool:
    """Whether the connection broke (closed, reset, timed out) rather than Redis answering with an
    error (READONLY, MISCONF, a script's error: nothing stored)."""
    return any(isinstance(x, redis.ConnectionError | redis.TimeoutError | OSError) for x in _chain(e)[1:])


def storage_reply(e: Exception) -> Reply:
    """452 4.3.1 when Redis refuses to grow (OOM under noeviction), which tells the client to come
    back later without counting against it; 451 4.3.0 for anything else that kept mail out."""
    return replies.INSUFFICIENT_STORAGE if isinstance(e, StoreFull) else replies.STORAGE_FAILED


@dataclass(slots=True)
class _Pending:
    message: Message
    future: asyncio.Future[None]


class Committer:
    """``clock`` and ``sleep`` are time.monotonic and asyncio.sleep; tests give their own."""

    def __init__(
        self,
        spool: Spool,
        *,
        max_batch: int = 256,
        max_queue: int = 0,
        wait: float = 0.0,
        wait_bytes: int = WAIT_BYTES,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        open_transactions: Callable[[], int] | None = None,
        on_commit: Callable[[int, int], None] | None = None,
        events: Callable[[list[Message]], list[Event]] | None = None,
    ) -> None:
        self.spool = spool
        self.clock = clock
        self.sleep = sleep
        self.max_batch = max_batch
        self.wait = wait
        self.wait_bytes = wait_bytes  # a batch this large goes without waiting (WAIT_BYTES)
        # how many sessions have a transaction open (MAIL given, not yet answered after DATA),
        # those waiting here included; unknown: wait the whole `wait`
        self.open_transactions = open_transactions
        self.on_commit = on_commit  # told (messages, delivery jobs) of each batch in Redis (flow control)
        self.events = events  # the events of a batch, written in its MULTI/EXEC (reception; None: off)
        self._arrived: asyncio.Future[None] | None = None
        self._last_batch = 0
        self.max_queue = max_queue
        self._pending: list[_Pending] = []
        self._task: asyncio.Task[None] | None = None
        self._queue_size = 0
        self._full_until = 0.0  # after an OOM, refuse new mail for OOM_PAUSE without asking Redis
        self._unreplicated_until = 0.0  # after a commit too few replicas had: see REPLICA_PAUSE
        self.committed = 0

    async def submit(self, message: Message) -> None:
        """Resolve once the message and its jobs are in Redis; raise StorageRefused if they are not."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(message, fut))
        if self._arrived is not None and not self._arrived.done():
            self._arrived.set_result(None)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        await asyncio.shield(fut)

    async def _drain(self) -> None:
        while self._pending:
            if (
                self.wait
                and self._last_batch > 1
                and len(self._pending) < self.max_batch
                and self._pending_bytes() < self.wait_bytes
            ):
                # under load (the last batch carried several messages) trade a little latency for
                # bigger batches: fewer fsyncs, fewer and larger jobs. Idle, commit at once.
                await self._gather()
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            try:
                # with replicas required a commit leaves a mark, named by its first message, for
                # _settle to find if the primary is lost before the answer
                mark = batch[0].message.envelope.id if self.spool.store.replicas else ""
                try:
                    jobs = await asyncio.to_thread(self._commit, [p.message for p in batch], mark)
                except StoreUnavailable as e:
                    if isinstance(e, StoreNotReplicated):
                        raise
                    if not self.spool.store.replicas and (never_sent(e) or not answer_lost(e)):
                        raise  # Redis answered (an error) or never heard of it: nothing stored
                    # Redis or the primary went away mid-commit: the batch may be stored (and
                    # replicated; then a 451 makes the client send it again, a second copy) or not
                    if self.spool.store.replicas:
                        self._unreplicated_until = self.clock() + REPLICA_PAUSE
                    log.warning(
                        "queue write of %d message(s) interrupted (%s): finding out what was stored", len(batch), e
                    )
                    jobs = await self._settle([p.message for p in batch], mark, e)
            except Exception as e:  # whatever went wrong, every client of the batch gets an answer
                reply = storage_reply(e)
                if reply is replies.INSUFFICIENT_STORAGE:
                    self._full_until = self.clock() + OOM_PAUSE
                if self.spool.store.replicas and isinstance(e, StoreError):
                    # too few replicas, or a primary gone (a failover may follow: its successor
                    # starts without a replica): take no mail until a probe finds them
                    self._unreplicated_until = self.clock() + REPLICA_PAUSE
                log.warning(
                    "queue write of %d message(s) failed: %s -> %s",
                    len(batch),
                    e,
                    reply,
                    exc_info=not isinstance(e, StoreError),
                )
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(StorageRefused(reply))
                continue
            self._last_batch = len(batch)
            self.committed += len(batch)
            self._queue_size += len(batch)
            for p in batch:
                if not p.future.done():
                    p.future.set_result(None)
            if self.on_commit is not None:
                try:
                    self.on_commit(len(batch), jobs)
                except Exception:  # a statistic: never the reason a batch goes unanswered
                    log.exception("counting the jobs of a group commit failed")

    def _commit(self, messages: list[Message], mark: str) -> int:
        # without replicas required no mark, without events none: the same call as ever
        extra: dict[str, Any] = {}
        if mark:
            extra["mark"] = mark
        if self.events is not None:
            extra["events"] = self.events(messages)
        return self.spool.commit(messages, **extra)

    async def _settle(self, messages: list[Message], mark: str, error: StoreError) -> int:
        """After a commit broke off. With replicas required (``mark``): wait (up to SETTLE_WAIT) for
        a primary with its replicas, then store the batch again unless that primary has the
        commit's mark. If it has, the commit was replicated before the old primary died (its
        replicas synced from the new one since): its messages may even be delivered and gone by
        now. Either way its client gets 250 late rather than a 451 that makes it send a second
        copy. With one Redis: 250 if its messages are there once Redis answers (SETTLE_WAIT_ALONE
        says why it goes no further). Raises ``error`` otherwise. Returns the delivery jobs stored
        now."""
        store = self.spool.store
        if not store.replicas:
            ids = [m.envelope.id for m in messages]
            deadline = self.clock() + SETTLE_WAIT_ALONE
            while self.clock() < deadline:
                with contextlib.suppress(StoreError, OSError, redis.RedisError):
                    if not await asyncio.to_thread(store.has_any, ids):
                        break
                    log.info("interrupted queue write settled: %d message(s) stored before", len(messages))
                    return 0
                await self.sleep(SETTLE_POLL_ALONE)
            raise error
        deadline = self.clock() + SETTLE_WAIT
        while self.clock() < deadline:
            with contextlib.suppress(StoreError, OSError, redis.RedisError):
                if await asyncio.to_thread(online_replicas, store.redis) >= store.replicas:
                    if await asyncio.to_thread(store.has_commit_mark, mark):
                        log.info("interrupted queue write settled: %d message(s) stored before", len(messages))
                        return 0
                    log.info("interrupted queue write settled: %d message(s) stored now", len(messages))
                    return await asyncio.to_thread(self._commit, messages, mark)
            await self.sleep(SETTLE_POLL)
        raise error

    async def _gather(self) -> None:
        """Wait up to ``wait`` for more messages, but only while some session with a transaction
        open has yet to submit: once all of them wait here, waiting longer adds latency and no
        message. (Fewer, larger jobs are what pays: bench, smtp-source with 20 sessions, RQ and
        the workers' cost per job spread over more messages.)"""
        if self.open_transactions is None:
            await self.sleep(self.wait)
            return
        deadline = self.clock() + self.wait
        while len(self._pending) < min(self.max_batch, self.open_transactions()) and (
            self._pending_bytes() < self.wait_bytes
        ):
            left = deadline - self.clock()
            if left <= 0:
                return
            self._arrived = asyncio.get_running_loop().create_future()
            nap = asyncio.ensure_future(self.sleep(left))
            try:
                await asyncio.wait({self._arrived, nap}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._arrived = None
            if nap.done():
                return  # the whole wait is over
            nap.cancel()

    def _pending_bytes(self) -> int:
        return sum(len(p.message.body) for p in self._pending)

    async def flush(self) -> None:
        """Wait until everything submitted so far has an answer (graceful shutdown)."""
        while self._task is not None and not self._task.done():
            await asyncio.wait({self._task})

    # -- backpressure -----------------------------------------------------------------------------
    def gate(self) -> Reply | None:
        """Called by sessions at MAIL and at the end of DATA: 452 4.3.1 while Redis is full or the
        queue holds more than max_queue messages, else None."""
        if self.clock() < self._full_until:
            return replies.INSUFFICIENT_STORAGE
        if self.clock() < self._unreplicated_until:
            return replies.STORAGE_FAILED
        if self.max_queue and self._queue_size >= self.max_queue:
            return replies.INSUFFICIENT_STORAGE
        return None

    async def watch_queue(self, interval: float = 1.0) -> None:
        """Keep the queue size fresh for gate(); Redis being down shows up at commit, not here."""
        while True:
            with contextlib.suppress(StoreError):
                if not self.spool.store.inline:  # until every worker reads one key a message
                    await asyncio.to_thread(self.spool.store.refresh_layout)
                if self.max_queue:  # only gate() reads it: no ZCARD a second without a limit
                    seen = self.committed
                    size = await asyncio.to_thread(self.spool.store.queue_size)
                    # a commit that ended while ZCARD ran may be missing from its answer: never
                    # let a stale count undo it (the next round corrects any excess)
                    self._queue_size = size if self.committed == seen else max(size, self._queue_size)
            with contextlib.suppress(StoreError, OSError, redis.RedisError):
                await self._check_replicas()
            await self.sleep(interval)

    async def _check_replicas(self) -> None:
        """While refusing for want of replicas, ask the primary how many it has: the pause ends as
        soon as they are back, and goes on while they are not (no mail stored to find out)."""
        store = self.spool.store
        if not store.replicas or self.clock() >= self._unreplicated_until:
            return
        online = await asyncio.to_thread(online_replicas, store.redis)
        self._unreplicated_until = 0.0 if online >= store.replicas else self.clock() + REPLICA_PAUSE
