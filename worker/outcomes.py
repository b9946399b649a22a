"""A delivery job's batch of messages and the recording of their outcomes (worker/service.py runs
the jobs): ``Batch`` holds what is known and recorded of the job's messages, ``JobShare`` is the
job's share of a destination's lane (its ``Owner``, worker/lane.py), and ``OutcomeWriter`` is the
group commit of final outcomes, one thread per worker process: conversations hand it each
transaction's outcomes and go on."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from common import metrics
from common.classify import classify
from common.envelope import LOG_STATUS, RcptState, RecipientStatus
from common.redisconn import REDIS_AWAY
from common.store import REMOVED, Message, Store
from common.storeio import Ride
from worker.feedback import Feedback
from worker.journal import ADOPT_EVERY, OutcomeJournal, adopt, encode, record_adopted
from worker.parcel import Outcome, Parcel
from worker.plan import Loaded
from worker.relay import log_attempt

__all__ = ["WRITE_PATIENCE", "Batch", "JobShare", "OutcomeWriter", "write_outcomes"]

log = logging.getLogger("mtaq.worker")

WRITE_PATIENCE = 30.0  # seconds a delivery outcome waits for Redis to come back before the job fails
# A write that has taken longer than this (Redis stopped, restarting, saturated) holds every
# conversation of the process before its next transaction, and any that hands outcomes in
# meanwhile, until it is done: a worker killed then sends again whatever it had delivered and not
# yet recorded, and without the hold its conversations went on delivering through a Redis outage
# (the chaos test, a worker killed every second and Redis stopped for 5 s: 42 messages of 2,000
# sent twice after we had read the 250, in one run of many). At 0.5 s a conversation with a server
# that answers in 50 ms still delivered ten messages into the outage before it was held; at 0.2 s,
# 15 of one run's 19 such duplicates were taken by the sinks 70-230 ms after Redis stopped (the
# workers were killed before it came back). A write takes 3-6 ms (its gather and fsync; p99 about
# 30 ms with a worker starting every second on 2 CPUs): a hold that a slow write causes costs its
# conversations the rest of that write, and nothing is logged unless it lasts STALL_WARN.
WRITE_STALL = 0.05
# With redis_min_replicas every write also waits for a replica's WAIT acknowledgement (a round trip
# to it, which may be a zone away): held after 50 ms, conversations would wait at every write.
WRITE_STALL_REPLICATED = 0.2
# A Redis far away (its round trip alone tens of milliseconds) would make every write a stall: the
# limit is also STALL_FACTOR times the process's usual write (a running average of its writes'
# times, each counted at most WRITE_STALL_REPLICATED, so an outage does not lift it for long), up
# to WRITE_STALL_REPLICATED, the limit before session 15.
STALL_FACTOR = 4.0
STALL_WARN = 1.0  # seconds a stall lasts before it is logged (an outage, not a slow write)
# Seconds between attempts while Redis is away (a write, then PINGs past WRITE_PATIENCE): the sooner
# a write goes through once Redis is back, the fewer deliveries a worker killed then sends again.
RETRY_PAUSE = 0.1
RETRY_LOG_EVERY = 5.0  # seconds between the warnings of one outage
# Before a write, the writer gathers: it waits while outcomes keep coming, GATHER_GAP seconds after
# the last at most, GATHER_MAX after the first. Transactions end in bursts (remote servers answer
# DATA together: smtp-sink -w answers on its one-second timer, real ones after their own queue
# writes), and without it a burst went out in a write per round trip of the one before: 2.5
# outcomes a write on issue 15's ceiling load, where each write also costs its script call, the
# stats' and queue counters' increments, the events' XADD and an fsync (about 5 Redis commands a
# write, 2 a message). A lone outcome waits GATHER_GAP; what a crash forgets (a delivery sent
# again) grows by at most GATHER_MAX.
GATHER_GAP = 0.001
GATHER_MAX = 0.004


class JobShare:
    """A job's share of a lane: its final outcomes go to its batch; it waits for its parcels."""

    def __init__(self, batch: Batch, parcels: list[Parcel]) -> None:
        self.batch = batch
        self.left = {id(p) for p in parcels}
        self._cond = threading.Condition()

    def record(self, parcel: Parcel, positions: list[int]) -> None:
        self.batch.record_final(parcel, positions)

    def done(self, parcel: Parcel) -> None:
        with self._cond:
            self.left.discard(id(parcel))
            if not self.left:
                self._cond.notify_all()

    def withdrawn(self, parcels: list[Parcel]) -> list[Parcel]:
        for p in parcels:
            self.done(p)
        return parcels

    def wait(self, timeout: float) -> bool:
        """True once every parcel is done."""
        with self._cond:
            if self.left:
                self._cond.wait(timeout)
            return not self.left


class Batch:
    """One job's messages and what has been recorded of them so far (conversations share it)."""

    def __init__(
        self,
        store: Store,
        clock: Callable[[], float],
        writer: OutcomeWriter,
        loaded: Loaded,
        destination: str | None = None,
        quiet: Callable[[Message, dict[int, RecipientStatus]], bool] | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.writer = writer
        self.destination = destination
        self.loaded = loaded
        # whether a finished message with these states has no report due (the finisher's DSN
        # maker says so); None: every finished message goes through the finisher
        self.quiet = quiet
        self.recorded: dict[str, dict[int, RecipientStatus]] = {qid: {} for qid in loaded}
        self.finished: list[str] = []
        self._lock = threading.Condition()
        self._writing = 0  # record_final turns handed to the writer, not yet written
        self._error: BaseException | None = None

    def account_attempt(self, p: Parcel, i: int, now: float, delay: float | None) -> RecipientStatus:
        """Account for one attempt at recipient ``i``: its delivery log line and metrics, and the
        status it leaves (to be written). ``delay``: when it is tried again if deferred (None: it
        is past queue_lifetime, and bounces)."""
        out, st = self._attempt(p, i, now, delay)
        self._account(p, i, out, st, now)
        return st

    def _attempt(self, p: Parcel, i: int, now: float, delay: float | None) -> tuple[Outcome, RecipientStatus]:
        """The outcome an attempt at recipient ``i`` counts as, and the status it leaves."""
        out = p.outcomes[i]
        if out.state is RcptState.DEFERRED and delay is None:
            # past queue_lifetime: bounce with the last reply
            out = Outcome(
                RcptState.BOUNCED,
                out.dsn,
                f"{out.reply} (gave up after {now - p.envelope.received_at:.0f}s in queue)",
                out.relay,
                out.remote_mta,
                out.tls,
            )
        old = self.loaded[p.envelope.id][1].get(i, RecipientStatus())
        return out, RecipientStatus(
            state=out.state,
            attempts=old.attempts + 1,
            dsn=out.dsn,
            reply=out.reply,
            relay=out.relay,
            remote_mta=out.remote_mta,
            tls=out.tls,
            updated=now,
            next_attempt=now + delay if out.state is RcptState.DEFERRED and delay else 0.0,
        )

    def _account(self, p: Parcel, i: int, out: Outcome, st: RecipientStatus, now: float) -> None:
        """An attempt's delivery log line and metrics (``st``: the status ``_attempt`` made of it)."""
        log_attempt(p.envelope.id, p.envelope.recipients[i].address, out, p.envelope.received_at)
        tried_before = st.attempts - 1  # _attempt counted this one in
        metrics.delivery_attempt(out.state is not RcptState.DEFERRED, now - p.envelope.received_at, tried_before)
        if out.state is not RcptState.DELIVERED:
            metrics.delivery_failure(out.state.value, classify(out.dsn, out.reply).value)
        metrics.delivery_tls(out.tls, LOG_STATUS[out.state])

    def write(self, updates: dict[str, dict[int, RecipientStatus]]) -> None:
        """Record outcomes now, waiting for Redis (``write_outcomes``)."""
        entries = _entries(updates)
        self.written(updates, write_outcomes(self.store, entries, self.writer.extras([(self, updates)], entries)))

    def last(self, updates: Mapping[str, Mapping[int, RecipientStatus]]) -> dict[str, str]:
        """queue id -> this job's destination, for the messages these outcomes finish with no report
        due: their outcome's script removes them (Store.set_status_list ``last``), with no
        finisher's round trip after it. Messages of one recipient only: the states of the others
        of a larger one may have been written by other jobs since this one loaded them."""
        if self.quiet is None or self.destination is None:
            return {}
        out = {}
        for qid, ups in updates.items():
            msg = self.loaded[qid][0] if qid in self.loaded else None
            if msg is None or len(msg.envelope.recipients) != 1 or len(ups) != 1:
                continue
            ((idx, st),) = ups.items()
            if st.final and self.quiet(msg, {idx: st}):
                out[qid] = self.destination
        return out

    def written(self, updates: dict[str, dict[int, RecipientStatus]], codes: Sequence[int]) -> None:
        """What the store answered for ``updates`` (in their order): recorded; finished messages noted."""
        with self._lock:
            for (qid, idx, st), code in zip(_entries(updates), codes, strict=True):
                self.recorded[qid][idx] = st
                if code == 0:
                    self.finished.append(qid)
                elif code == REMOVED:  # finished and removed by its outcome's own script
                    log.info("%s: removed", qid)

    def record_final(self, p: Parcel, positions: list[int]) -> None:
        """A transaction's final outcomes, handed to the service's outcome writer: the conversation
        goes on to its next message while they are written (``drain`` waits for them)."""
        now = self.clock()
        done = {i: self._attempt(p, i, now, None) for i in positions}
        with self._lock:
            self._writing += 1
        # handed in (and so in the journal) before the log line and metrics: a worker killed while
        # it logs, its threads waiting for the interpreter on a busy host, has sent nothing that
        # the journal does not hold (the chaos test: 7 of one run's deliveries logged, then sent
        # again); the hold of a stalled write comes after the log line, which it would delay
        self.writer.submit(self, {p.envelope.id: {i: st for i, (_, st) in done.items()}}, hold=False)
        for i, (out, st) in done.items():
            self._account(p, i, out, st, now)
        self.writer.hold()

    def settled(self, error: BaseException | None) -> None:
        """The writer is done with one ``record_final`` (``error``: it could not be written)."""
        with self._lock:
            self._writing -= 1
            if error is not None and self._error is None:
                self._error = error
            self._lock.notify_all()

    def drain(self) -> None:
        """Wait until every outcome handed to the writer is written; raises what a write raised
        (the job fails, RQ runs it again: what was not recorded is sent again, at least once)."""
        with self._lock:
            while self._writing:
                self._lock.wait()
            if self._error is not None:
                raise self._error


def _entries(updates: dict[str, dict[int, RecipientStatus]]) -> list[tuple[str, int, RecipientStatus]]:
    return [(qid, idx, st) for qid, ups in updates.items() for idx, st in ups.items()]


def write_outcomes(
    store: Store,
    entries: Sequence[tuple[str, int, RecipientStatus]],
    extras: Mapping[str, Any] | None = None,
    *,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[int]:
    """Record outcomes in one round trip (with ``extras``: their events and suppressions,
    worker/feedback.py). A Redis that is restarting is waited for (WRITE_PATIENCE): the mail has
    gone, and a failed job would send it again."""
    deadline = monotonic() + WRITE_PATIENCE
    next_log = 0.0
    while True:
        try:
            return store.set_status_list(entries, **(extras or {}))
        except REDIS_AWAY:
            now = monotonic()
            if now > deadline:
                raise
            if now >= next_log:
                log.warning("Redis unavailable: %d outcome(s) wait to be recorded", len(entries))
                next_log = now + RETRY_LOG_EVERY
            sleep(RETRY_PAUSE)


class OutcomeWriter:
    """Group commit of final outcomes: every conversation of this process hands the outcomes of a
    transaction here and goes on with its next message; one thread writes whatever has gathered in
    one round trip (one fsync) while the next gathers. The window in which a crash forgets a
    delivery (the message is sent again: at least once) is one round trip, as before; what changes
    is that a conversation no longer waits for Redis between messages."""

    def __init__(
        self,
        store: Store,
        feedback: Feedback | None = None,
        *,
        stall: float | None = None,
        gather: tuple[float, float] = (GATHER_GAP, GATHER_MAX),
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        journal: OutcomeJournal | None = None,
        ride: Ride | None = None,
    ) -> None:
        self.store = store
        self.feedback = feedback
        # commands that go in each write's round trip, with their own answers (Store.set_status_list
        # ``ride``): the deliveries' news for slow start (worker/limits.py DestinationLimits.ride)
        self.ride = ride
        # this process's outcome journal (worker/journal.py): every outcome handed in is appended
        # there first, and the file holds what is not yet in Redis; None: no journal
        self.journal = journal
        # where dead processes' journals are looked for, and this process's own (not adopted)
        self._journals = (journal.directory, journal.path) if journal is not None else None
        self._adaptive = stall is None  # a limit given (tests) is the limit
        if stall is None:
            stall = WRITE_STALL_REPLICATED if store.replicas else WRITE_STALL
        self.stall = stall
        self._usual = 0.005  # seconds a write takes here, a running average (STALL_FACTOR)
        self.gap, self.gather_max = gather
        self.monotonic = monotonic
        self.sleep = sleep
        self._cond = threading.Condition()
        self._pending: list[tuple[Batch, dict[str, dict[int, RecipientStatus]]]] = []
        self._lines: list[bytes] = []  # the journal's lines of _pending
        self._thread: threading.Thread | None = None
        self._writing_since: float | None = None  # when the write in progress began
        self._warned = False  # the write in progress has held conversations past STALL_WARN (logged once)

    def submit(self, batch: Batch, updates: dict[str, dict[int, RecipientStatus]], *, hold: bool = True) -> None:
        """Hand these outcomes to the next write; returns at once unless the write in progress has
        taken longer than ``stall``: then once it is over (WRITE_STALL says why). ``hold=False``:
        at once in any case (the caller holds after its log line, ``hold``)."""
        line = encode(_entries(updates)) if self.journal is not None else b""
        with self._cond:
            if self.journal is not None:
                try:
                    self.journal.append(line)  # under the lock: the file's lines follow _pending's
                    self._lines.append(line)
                except OSError as e:
                    self._journal_failed(e)
            self._pending.append((batch, updates))
            self._start()
            self._cond.notify_all()
            if hold:
                self._hold()

    def start(self) -> None:
        """Adopt dead processes' journals on this host now, before any job runs here (a job would
        send their messages again), and start the writing thread, which looks again every
        ADOPT_EVERY seconds (without start: at the first outcome)."""
        self._adopt()
        with self._cond:
            self._start()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mtaq-outcomes", daemon=True)
            self._thread.start()

    def hold(self) -> None:
        """Before a transaction (worker/crew.py): returns at once unless the write in progress has
        taken longer than ``stall``; then once it is over. What a conversation delivers while
        nothing can be recorded is what a killed worker sends again."""
        with self._cond:
            self._hold()

    def limit(self) -> float:
        """Seconds a write may take before it holds conversations (WRITE_STALL, STALL_FACTOR)."""
        if not self._adaptive:
            return self.stall
        return max(self.stall, min(WRITE_STALL_REPLICATED, STALL_FACTOR * self._usual))

    def _stalled(self) -> bool:
        return self._writing_since is not None and self.monotonic() - self._writing_since > self.limit()

    def _hold(self) -> None:
        while self._stalled():
            since = self._writing_since
            if not self._warned and since is not None and self.monotonic() - since > STALL_WARN:
                self._warned = True  # said once a stall: every conversation comes here
                log.warning(
                    "an outcome write has taken over %.1f s (Redis slow or away): conversations wait for it",
                    STALL_WARN,
                )
            self._cond.wait(0.05)

    def _written(self) -> None:
        """The write in progress is over (written, or failed: its jobs run again): conversations
        held by it go on, and the journal keeps what still waits."""
        with self._cond:
            if self.journal is not None:
                self._lines = self._lines[len(self._lines) - len(self._pending) :]
                try:
                    self.journal.written(self._lines)
                except OSError as e:
                    self._journal_failed(e)
            since = self._writing_since
            if since is not None:
                took = self.monotonic() - since
                if took > self.limit():
                    metrics.outcome_stall()
                    if self._warned:
                        log.info("the stalled outcome write is over after %.1f s", took)
                self._usual += (min(took, WRITE_STALL_REPLICATED) - self._usual) * 0.2
            self._writing_since = None
            self._warned = False
            self._cond.notify_all()

    def extras(
        self,
        turn: Sequence[tuple[Batch, dict[str, dict[int, RecipientStatus]]]],
        entries: Sequence[tuple[str, int, RecipientStatus]],
    ) -> dict[str, Any] | None:
        """The events and suppressions written with these outcomes (worker/feedback.py), and the
        messages they finish and remove (``Batch.last``)."""
        last = {qid: d for batch, updates in turn for qid, d in batch.last(updates).items()}
        out: dict[str, Any] = {"last": last} if last else {}
        if self.feedback is not None:
            messages = {qid: batch.loaded[qid][0] for batch, updates in turn for qid in updates if qid in batch.loaded}
            out.update(self.feedback.extras(entries, messages))
        if self.ride is not None:
            out["ride"] = self.ride
        return out or None

    def _gather(self) -> None:
        """Wait while outcomes keep coming (GATHER_GAP, GATHER_MAX); the lock held on entry and exit."""
        if self.gap <= 0:
            return
        start = self.monotonic()
        seen = len(self._pending)
        while True:
            left = self.gather_max - (self.monotonic() - start)
            if left <= 0:
                return
            self._cond.wait(min(self.gap, left))
            if len(self._pending) == seen:
                return
            seen = len(self._pending)

    def _await_redis(self) -> None:
        """Until Redis answers a PING, every RETRY_PAUSE seconds (the stall, and so the hold, goes on)."""
        while True:
            try:
                self.store.redis.ping()
                return
            except REDIS_AWAY:
                self.sleep(RETRY_PAUSE)

    def _adopt(self) -> None:
        """Record what dead processes' journals hold (worker/journal.py); a journal that cannot be
        recorded now (Redis away) is left for the next look. Never raises: the thread lives on.
        Goes on when this process's own journal has been turned off (a disk full)."""
        if self._journals is None:
            return
        directory, own = self._journals
        try:
            adopt(directory, own, functools.partial(record_adopted, self.store, self.feedback))
        except Exception:  # the directory gone, or a bug: said, looked at again later
            log.exception("adopting the outcome journals in %s failed", directory)

    def _journal_failed(self, error: OSError) -> None:
        """The journal could not be written (a disk full): the process goes on without it, as before
        the journal (a worker killed sends again what it had not recorded). The lock held."""
        if self.journal is None:
            return
        log.warning(
            "outcome journal %s off: %s (what a killed worker had not recorded is sent again)", self.journal.path, error
        )
        with contextlib.suppress(OSError):
            self.journal.close()  # removed: this process writes what waits itself
        self.journal = None
        self._lines = []

    def close(self) -> None:
        """The process ends: its journal is closed and removed, unless outcomes still wait in it
        (jobs past their grace, Redis away): then it stays, locked until the process is gone, for
        another worker on the host to record (while this one lives, its writer may still write them)."""
        with self._cond:
            if self.journal is not None:
                if self._lines:
                    self.journal.keep()
                else:
                    with contextlib.suppress(OSError):
                        self.journal.close()
                self.journal = None
                self._lines = []

    def _next_turn(self, look_at: float) -> list[tuple[Batch, dict[str, dict[int, RecipientStatus]]]] | None:
        """The outcomes to write next, once they have gathered; None: time to adopt journals."""
        with self._cond:
            while not self._pending:
                if self._journals is None:
                    self._cond.wait()
                    continue
                now = self.monotonic()
                if now >= look_at:
                    return None
                self._cond.wait(min(ADOPT_EVERY, look_at - now))
            self._gather()
            turn, self._pending = self._pending, []
            return turn

    def _run(self) -> None:
        look_at = self.monotonic()  # a dead process's journal is adopted first (start() has too)
        while True:
            if self._journals is not None and self.monotonic() >= look_at:
                self._adopt()
                look_at = self.monotonic() + ADOPT_EVERY
            turn = self._next_turn(look_at)
            if turn is None:
                continue
            entries = [e for _, updates in turn for e in _entries(updates)]
            try:
                # the events, suppressions and finished messages are worked out first (a DSN
                # built to see whether one is due can take milliseconds): the stall measures Redis
                extras = self.extras(turn, entries)
                with self._cond:
                    self._writing_since = self.monotonic()
                codes = write_outcomes(self.store, entries, extras)  # WRITE_PATIENCE in real time
            except BaseException as e:  # every job of the turn fails and is run again
                for batch, _ in turn:
                    batch.settled(e)
                if isinstance(e, REDIS_AWAY):
                    # Redis away past WRITE_PATIENCE: the conversations stay held until it answers
                    # (released now, each would deliver for another stall's worth before the next
                    # write held them again, with nowhere to record what it sent)
                    self._await_redis()
                self._written()
                continue
            self._written()
            at = 0
            for batch, updates in turn:
                n = sum(map(len, updates.values()))
                try:
                    batch.written(updates, codes[at : at + n])
                except Exception as e:  # a bug: that job fails (RQ runs it again), the thread lives on
                    log.exception("outcomes written, but not taken in by their job")
                    batch.settled(e)
                else:
                    batch.settled(None)
                at += n
