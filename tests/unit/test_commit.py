"""The group committer's error classification, failure handling and backpressure gate."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
import redis

from common.envelope import Envelope, Recipient
from common.store import Message, StoreFull, StoreNotReplicated, StoreUnavailable
from ingress import replies
from ingress.commit import (
    OOM_PAUSE,
    REPLICA_PAUSE,
    SETTLE_WAIT,
    SETTLE_WAIT_ALONE,
    WAIT_BYTES,
    Committer,
    StorageRefused,
    answer_lost,
    never_sent,
    storage_reply,
)


@pytest.mark.parametrize(
    ("error", "reply"),
    [
        (StoreFull("command not allowed when used memory > 'maxmemory'."), replies.INSUFFICIENT_STORAGE),
        (StoreUnavailable("Connection refused"), replies.STORAGE_FAILED),
        (TypeError("a bug"), replies.STORAGE_FAILED),
    ],
)
def test_storage_reply(error: Exception, reply: replies.Reply) -> None:
    assert storage_reply(error) is reply


class FakeStore:
    """Stands in for the Spool (commit) and its Store (queue_size) at once."""

    def __init__(self, error: Exception | None = None, size: int = 0) -> None:
        self.error = error
        self.size = size
        self.sizes_asked = 0
        self.committed: list[str] = []
        self.store = self
        self.replicas = 0  # redis_min_replicas
        self.marks: set[str] = set()
        self.redis: object = None
        self.inline = True  # the layout gate (common/store.py LAYOUT_KEY) open
        self.layout_asked = 0

    def refresh_layout(self) -> bool:
        self.layout_asked += 1
        self.inline = True
        return True

    def commit(self, messages: Sequence[Message], *, mark: str = "") -> int:
        if self.error is not None:
            raise self.error
        if mark:
            self.marks.add(mark)
        self.committed += [m.envelope.id for m in messages]
        self.size += len(messages)
        return 1 if messages else 0  # one delivery job: every test message goes to one next hop

    def queue_size(self) -> int:
        self.sizes_asked += 1
        return self.size


def msg(qid: str) -> Message:
    return Message(Envelope(id=qid, sender="a@b.test", recipients=[Recipient("c@d.test")]), b"x\r\n")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_any_failure_answers_every_client_of_the_batch() -> None:
    async def go() -> list[object]:
        c = Committer(FakeStore(error=TypeError("unexpected")))  # type: ignore[arg-type]
        return await asyncio.gather(*(c.submit(msg(str(i))) for i in range(3)), return_exceptions=True)

    results = run(go())
    assert all(isinstance(r, StorageRefused) and r.reply is replies.STORAGE_FAILED for r in results)


def test_each_stored_batch_is_told_with_its_jobs_and_a_failing_listener_fails_no_client() -> None:
    told: list[tuple[int, int]] = []

    def listener(messages: int, jobs: int) -> None:
        told.append((messages, jobs))
        raise RuntimeError("a statistic that broke")

    async def go() -> list[object]:
        c = Committer(FakeStore(), on_commit=listener)  # type: ignore[arg-type]
        return await asyncio.gather(*(c.submit(msg(str(i))) for i in range(3)), return_exceptions=True)

    assert run(go()) == [None, None, None]
    assert sum(m for m, _ in told) == 3 and all(j == 1 for _, j in told)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Sleeps:
    """An asyncio.sleep that records what was asked and only lets the other tasks run."""

    def __init__(self) -> None:
        self.asked: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)
        await asyncio.sleep(0)


def test_oom_closes_the_gate_for_oom_pause() -> None:
    clock = Clock()

    async def go() -> list[replies.Reply | None]:
        c = Committer(FakeStore(error=StoreFull("x")), clock=clock)  # type: ignore[arg-type]
        with pytest.raises(StorageRefused) as refused:
            await c.submit(msg("1"))
        gates = [refused.value.reply, c.gate()]
        clock.now += OOM_PAUSE - 0.01
        gates.append(c.gate())
        clock.now += 0.01
        gates.append(c.gate())
        return gates

    assert run(go()) == [replies.INSUFFICIENT_STORAGE, replies.INSUFFICIENT_STORAGE, replies.INSUFFICIENT_STORAGE, None]


def test_max_queue_gate() -> None:
    async def go() -> list[replies.Reply | None]:
        store = FakeStore()
        sleeps = Sleeps()
        c = Committer(store, max_queue=2, sleep=sleeps)  # type: ignore[arg-type]
        gates = [c.gate()]
        await c.submit(msg("1"))
        gates.append(c.gate())
        await c.submit(msg("2"))
        gates.append(c.gate())
        store.size = 0  # the workers drained the queue
        task = asyncio.create_task(c.watch_queue(interval=5.0))
        while not sleeps.asked:  # one round of the watch: it read the size, then slept
            await asyncio.sleep(0)
        task.cancel()
        gates.append(c.gate())
        assert sleeps.asked == [5.0]
        return gates

    assert run(go()) == [None, None, replies.INSUFFICIENT_STORAGE, None]


class BatchRecorder(FakeStore):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def commit(self, messages: Sequence[Message], *, mark: str = "") -> int:
        self.batches.append(len(messages))
        return super().commit(messages, mark=mark)


def test_commit_wait_adds_no_delay_when_idle_and_grows_batches_under_load() -> None:
    sleeps = Sleeps()

    async def go() -> tuple[list[float], list[int]]:
        store = BatchRecorder()
        c = Committer(store, wait=0.2, sleep=sleeps)  # type: ignore[arg-type]
        await c.submit(msg("idle"))
        idle = list(sleeps.asked)
        # a burst: the first commit takes what is there, later ones wait for the rest
        await asyncio.gather(*(c.submit(msg(f"a{i}")) for i in range(2)))
        burst = [asyncio.create_task(c.submit(msg(f"b{i}"))) for i in range(3)]
        await asyncio.sleep(0)  # the committer takes b0-b2's turn to wait ...
        burst += [asyncio.create_task(c.submit(msg(f"c{i}"))) for i in range(3)]  # ... and c0-c2 arrive meanwhile
        await asyncio.gather(*burst)
        return idle, store.batches

    idle, batches = run(go())
    assert idle == []  # a lone message is not held back by the wait
    assert batches[0] == 1 and batches[1] == 2
    assert batches[2:] == [6]  # after a batch of 2, the committer waited and took the whole burst
    assert sleeps.asked and all(s == 0.2 for s in sleeps.asked)


def test_commit_wait_ends_once_every_open_transaction_has_submitted() -> None:
    """The wait is an upper bound: the batch goes as soon as every session with a transaction open
    waits in it (an hour-long wait would otherwise time this test out)."""

    async def go() -> list[int]:
        store = BatchRecorder()
        open_now = [2]
        c = Committer(store, wait=3600.0, open_transactions=lambda: open_now[0])  # type: ignore[arg-type]
        await asyncio.gather(*(c.submit(msg(f"a{i}")) for i in range(2)))  # batch of 2: load from now on
        open_now[0] = 4
        first = [asyncio.create_task(c.submit(msg(f"b{i}"))) for i in range(3)]
        await asyncio.sleep(0.01)
        assert not any(t.done() for t in first)  # one of the four is missing: still gathering
        last = asyncio.create_task(c.submit(msg("b3")))
        await asyncio.wait_for(asyncio.gather(*first, last), timeout=60)
        open_now[0] = 0
        await asyncio.wait_for(c.submit(msg("alone")), timeout=60)  # nobody else in a transaction
        return store.batches

    assert run(go()) == [2, 4, 1]


def test_a_batch_of_wait_bytes_goes_without_waiting() -> None:
    """Large messages: once the batch holds wait_bytes octets it is written at once, though sessions
    with a transaction open have yet to submit (the hour-long wait would time this test out)."""

    def big(qid: str) -> Message:
        return Message(Envelope(id=qid, sender="a@b.test", recipients=[Recipient("c@d.test")]), b"x" * 600)

    async def go() -> list[int]:
        store = BatchRecorder()
        c = Committer(store, wait=3600.0, wait_bytes=1000, open_transactions=lambda: 10)  # type: ignore[arg-type]
        await asyncio.gather(*(c.submit(big(f"a{i}")) for i in range(2)))  # batch of 2: load from now on
        first = asyncio.create_task(c.submit(big("b0")))
        await asyncio.sleep(0.01)
        assert not first.done()  # 600 octets of 1000: gathering
        await asyncio.wait_for(asyncio.gather(first, c.submit(big("b1"))), timeout=60)
        return store.batches

    assert run(go()) == [2, 2]
    assert WAIT_BYTES == 1 << 20


class FakeInfo:
    """A primary's INFO replication: ``online`` replicas."""

    def __init__(self, online: int) -> None:
        self.online = online

    def info(self, section: str) -> dict[str, object]:
        assert section == "replication"
        replica = {"ip": "10.0.0.9", "port": 6379, "state": "online", "offset": 5}
        replicas = {f"slave{i}": replica for i in range(self.online)}
        return {"role": "master", "master_repl_offset": 5, **replicas}


def test_too_few_replicas_refuse_new_mail_without_storing_until_they_are_back() -> None:
    clock = Clock()
    store = FakeStore(error=StoreNotReplicated("0 of 1 replica(s) acknowledged the write within 1000 ms"))
    primary = FakeInfo(online=0)
    store.replicas = 1
    store.redis = primary

    async def go() -> list[replies.Reply | None]:
        c = Committer(store, clock=clock)  # type: ignore[arg-type]
        with pytest.raises(StorageRefused) as refused:
            await c.submit(msg("1"))  # stored on the primary alone: 451, and the gate closes
        gates = [refused.value.reply, c.gate()]
        clock.now += REPLICA_PAUSE - 0.01
        await c._check_replicas()  # still none: the pause goes on past its first end
        clock.now += 0.02
        gates.append(c.gate())
        primary.online = 1
        await c._check_replicas()  # back: the gate opens at once
        gates.append(c.gate())
        return gates

    assert run(go()) == [replies.STORAGE_FAILED, replies.STORAGE_FAILED, replies.STORAGE_FAILED, None]


class Interrupted(FakeStore):
    """A primary lost in the middle of the first commit, which the new primary then has or not."""

    def __init__(self, replicated: bool) -> None:
        super().__init__(error=StoreUnavailable("Connection closed by server."))
        self.replicas = 1
        self.redis = FakeInfo(online=0)
        self.replicated = replicated

    def commit(self, messages: Sequence[Message], *, mark: str = "") -> int:
        if self.error is not None:
            error, self.error = self.error, None
            if self.replicated:
                self.marks.add(mark)  # stored, and already delivered and gone: only the mark is left
            raise error
        return super().commit(messages, mark=mark)

    def has_commit_mark(self, mark: str) -> bool:
        return mark in self.marks


def _nap(clock: Clock, primary: FakeInfo, back_at: float) -> Any:
    async def nap(seconds: float) -> None:
        clock.now += seconds
        if clock.now >= back_at:  # the new primary has its replica
            primary.online = 1
        await asyncio.sleep(0)

    return nap


@pytest.mark.parametrize("replicated", [True, False])
def test_a_commit_cut_off_by_a_failover_stores_each_message_once_and_answers_250(replicated: bool) -> None:
    clock = Clock()
    store = Interrupted(replicated)
    assert isinstance(store.redis, FakeInfo)

    async def go() -> list[object]:
        c = Committer(store, clock=clock, sleep=_nap(clock, store.redis, 5))  # type: ignore[arg-type]
        return list(await asyncio.gather(c.submit(msg("1")), c.submit(msg("2")), return_exceptions=True))

    assert run(go()) == [None, None]  # both clients get 250 ...
    # ... and the batch was stored again only where the new primary had not got it
    assert store.committed == ([] if replicated else ["1", "2"])
    assert clock.now >= 5


def test_a_commit_cut_off_for_good_answers_451_after_settle_wait() -> None:
    clock = Clock()
    store = Interrupted(replicated=False)
    assert isinstance(store.redis, FakeInfo)

    async def go() -> list[object]:
        c = Committer(store, clock=clock, sleep=_nap(clock, store.redis, float("inf")))  # type: ignore[arg-type]
        return list(await asyncio.gather(c.submit(msg("1")), return_exceptions=True))

    (outcome,) = run(go())
    assert isinstance(outcome, StorageRefused) and outcome.reply is replies.STORAGE_FAILED
    assert store.committed == [] and clock.now >= SETTLE_WAIT


def test_without_max_queue_the_watch_does_not_count_the_queue() -> None:
    """The count is for gate()'s max_queue alone: without a limit, no ZCARD a second."""

    async def go() -> int:
        store = FakeStore(size=5)
        sleeps = Sleeps()
        c = Committer(store, sleep=sleeps)  # type: ignore[arg-type]
        task = asyncio.create_task(c.watch_queue(interval=1.0))
        while len(sleeps.asked) < 2:
            await asyncio.sleep(0)
        task.cancel()
        assert c.gate() is None
        return store.sizes_asked

    assert run(go()) == 0


def test_the_watch_asks_for_the_layout_gate_until_it_is_open() -> None:
    async def go() -> tuple[int, bool]:
        store = FakeStore()
        store.inline = False  # not every worker reads one key a message yet
        sleeps = Sleeps()
        c = Committer(store, sleep=sleeps)  # type: ignore[arg-type]
        task = asyncio.create_task(c.watch_queue(interval=1.0))
        while len(sleeps.asked) < 2:  # two rounds of the watch
            await asyncio.sleep(0)
        task.cancel()
        return store.layout_asked, store.inline

    assert run(go()) == (1, True)  # asked once: open, then never again


class AloneInterrupted(FakeStore):
    """One Redis (no replicas required) killed during the first commit: restarted, it has the
    batch (applied and appended to its AOF before the answer was lost) or not."""

    def __init__(self, error: Exception, stored: bool, back_at: float, clock: Clock) -> None:
        super().__init__(error=error)
        self.stored = stored
        self.back_at = back_at
        self.clock = clock
        self.there: set[str] = set()
        self.redis = self
        self.asked = 0

    def commit(self, messages: Sequence[Message], *, mark: str = "") -> int:
        assert not mark, "no mark without replicas: its SET would cost every commit a command"
        if self.error is not None:
            error, self.error = self.error, None
            if self.stored:
                self.there.update(m.envelope.id for m in messages)
            raise error
        return super().commit(messages)

    def has_any(self, qids: Sequence[str]) -> bool:
        self.asked += 1
        if self.clock.now < self.back_at:
            raise StoreUnavailable("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        return any(q in self.there for q in qids)


def _raised(cause: OSError, text: str) -> StoreUnavailable:
    """As redis-py raises it (its error in the handling of the socket's), through common/store.py."""
    try:
        try:
            raise cause
        except OSError:
            raise redis.ConnectionError(text)  # noqa: B904
    except redis.ConnectionError as e:
        try:
            raise StoreUnavailable(str(e)) from e
        except StoreUnavailable as s:
            return s


def _refused_chained() -> StoreUnavailable:
    return _raised(ConnectionRefusedError(111, "Connection refused"), "Error 111 connecting to 127.0.0.1:6379.")


def test_never_sent_tells_a_refused_connection_from_one_broken_after_the_commit_went() -> None:
    assert never_sent(_refused_chained())
    assert not never_sent(StoreUnavailable("Connection closed by server."))
    assert not never_sent(StoreUnavailable("Timeout reading from socket"))


def _lost_answer() -> StoreUnavailable:
    """A connection the server closed mid-read."""
    return _raised(ConnectionResetError(104, "Connection reset by peer"), "Connection closed by server.")


def _answered(text: str) -> StoreUnavailable:
    """Redis answered with an error (common/store.py translated(): a ResponseError)."""
    try:
        raise StoreUnavailable(text) from redis.ResponseError(text)
    except StoreUnavailable as s:
        return s


def _nap_for(clock: Clock) -> Any:
    async def nap(seconds: float) -> None:
        clock.now += seconds
        await asyncio.sleep(0)

    return nap


def test_answer_lost_tells_a_broken_connection_from_an_error_redis_answered() -> None:
    assert answer_lost(_lost_answer()) and not never_sent(_lost_answer())
    assert not answer_lost(_answered("READONLY You can't write against a read only replica."))
    assert never_sent(_refused_chained())
    timeout = StoreUnavailable("Timeout connecting to server")
    timeout.__cause__ = redis.TimeoutError("Timeout connecting to server")
    assert never_sent(timeout)


@pytest.mark.parametrize("stored", [True, False])
def test_one_redis_killed_mid_commit_answers_250_when_it_has_the_batch(stored: bool) -> None:
    """The chaos test: Redis killed while a commit of ten was on its way; restarted, it had them, and
    the 451 made ten clients send a second copy. Not there: the 451 stands (never a second commit
    under the same queue ids, which a late EXEC or a delivered batch would make a double)."""
    clock = Clock()
    start = clock.now
    store = AloneInterrupted(_lost_answer(), stored, back_at=start + 2, clock=clock)

    async def go() -> list[object]:
        c = Committer(store, clock=clock, sleep=_nap_for(clock))  # type: ignore[arg-type]
        return list(await asyncio.gather(c.submit(msg("1")), c.submit(msg("2")), return_exceptions=True))

    outcomes = run(go())
    if stored:
        assert outcomes == [None, None]  # both clients get 250, once Redis is back
    else:
        assert all(isinstance(o, StorageRefused) and o.reply is replies.STORAGE_FAILED for o in outcomes)
    assert start + 2 <= clock.now < start + SETTLE_WAIT_ALONE, "answered as soon as Redis could say"
    assert store.committed == [], "never stored a second time"


def test_an_error_redis_answered_is_451_at_once() -> None:
    clock = Clock()
    start = clock.now
    store = AloneInterrupted(_answered("MISCONF Errors writing to the AOF file"), False, back_at=start, clock=clock)

    async def go() -> list[object]:
        c = Committer(store, clock=clock, sleep=_nap_for(clock))  # type: ignore[arg-type]
        return list(await asyncio.gather(c.submit(msg("1")), return_exceptions=True))

    (outcome,) = run(go())
    assert isinstance(outcome, StorageRefused) and outcome.reply is replies.STORAGE_FAILED
    assert clock.now == start and store.asked == 0, "Redis answered: nothing to settle"


def test_one_redis_refusing_the_connection_answers_451_at_once() -> None:
    clock = Clock()
    start = clock.now
    store = AloneInterrupted(_refused_chained(), stored=False, back_at=start, clock=clock)

    async def go() -> list[object]:
        c = Committer(store, clock=clock)  # type: ignore[arg-type]
        return list(await asyncio.gather(c.submit(msg("1")), return_exceptions=True))

    (outcome,) = run(go())
    assert isinstance(outcome, StorageRefused) and outcome.reply is replies.STORAGE_FAILED
    assert store.asked == 0 and clock.now == start, "nothing was sent: no settling"


def test_one_redis_that_stays_away_answers_451_after_settle_wait_alone() -> None:
    clock = Clock()
    start = clock.now
    store = AloneInterrupted(_lost_answer(), stored=False, back_at=1e9, clock=clock)

    c = Committer(store, clock=clock, sleep=_nap_for(clock))  # type: ignore[arg-type]

    async def go() -> list[object]:
        return list(await asyncio.gather(c.submit(msg("1")), return_exceptions=True))

    (outcome,) = run(go())
    assert isinstance(outcome, StorageRefused) and outcome.reply is replies.STORAGE_FAILED
    assert SETTLE_WAIT_ALONE <= clock.now - start < SETTLE_WAIT
    # without replicas a failed settle does not close the gate (REPLICA_PAUSE is theirs)
    assert c.gate() is None


def test_with_replicas_a_refused_connect_is_still_settled_through_the_failover() -> None:
    """The primary a Sentinel named refuses before the failover is done: settled as before (the
    new primary then takes the batch), not 451 at once."""

    class RefusedPrimary(Interrupted):
        def __init__(self) -> None:
            super().__init__(replicated=False)
            self.error = _refused_chained()

    clock = Clock()
    store = RefusedPrimary()
    assert isinstance(store.redis, FakeInfo)

    async def go() -> list[object]:
        c = Committer(store, clock=clock, sleep=_nap(clock, store.redis, clock.now + 5))  # type: ignore[arg-type]
        return list(await asyncio.gather(c.submit(msg("1")), return_exceptions=True))

    assert run(go()) == [None]
    assert store.committed == ["1"]
