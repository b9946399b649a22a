"""The delivery service: what a delivery job does, built with everything it uses passed in
(settings, message storage, MX resolver, destination limits, clock). worker/jobs.py is the thin RQ
adapter over it; worker/pool.py runs many jobs at once in one process.

One job = one destination, some messages. It
1. hands the job back to RQ's scheduler when the destination is throttled (marked down after
   repeated connection failures) or its connection window is full (worker/limits.py);
2. loads the messages, leaves out what is on hold or not due (worker/plan.py, pure), leases each
   (message, destination) for ``LEASE_TTL`` seconds, pushed on by the heartbeat while the job lives
   and ended when it ends (worker/leases.py);
3. puts its parcels in the destination's lane (worker/lane.py), where this process's conversations
   take them (worker/crew.py starts more while the lane has more parcels than conversations and
   the destination has free slots), each up to ``destination_messages_per_connection`` messages;
4. hands final recipients to the outcome writer right after each transaction
   (worker/outcomes.py ``OutcomeWriter``: one round trip for whatever every conversation of the
   process handed it meanwhile; a re-run job never sends them again), records the deferrals,
   schedules the retry, finishes completed messages (DSN, delete, and the leases on them).

Redis round trips per job: one to load the batch, one to lease it, a share of the writer's turns
for the final recipients, one for the deferred ones, one to finish the completed messages that
need it, one to end its leases (all of them: a job's leases are one hash's fields,
common/leasebook.py). A message of one recipient finished with no report due is removed by its
outcome's own script (worker/outcomes.py ``Batch.last``): no finishing round trip for it (issue
15, docs/architecture.md "What a message costs Redis").
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from common.envelope import RcptState, RecipientStatus
from common.leasebook import LeaseBook
from common.mx import MXResolver
from common.settings import Settings
from common.spool import Spool
from common.store import Message, drawn_key
from common.storeio import Ride
from worker.crew import Crew
from worker.delays import warn_delayed
from worker.feedback import Feedback
from worker.finisher import DsnMaker, Finisher, ReportSign
from worker.intake import Intake
from worker.journal import OutcomeJournal
from worker.lane import Lanes
from worker.leases import Leases
from worker.limits import DestinationLimits, Down
from worker.outcomes import Batch, JobShare, OutcomeWriter
from worker.parcel import Outcome, Parcel, Undeliverable, default_left, fail_all
from worker.plan import Loaded, Plan, all_final, plan
from worker.relay import Dialer, resolve
from worker.retry import lifetime, next_retry
from worker.signing import DeliverySigner, Unsignable
from worker.smarthost import smarthost_from_settings
from worker.tlsgate import TLSGate

__all__ = ["BUSY_RETRY", "LEASE_TTL", "DeliveryService"]

log = logging.getLogger("mtaq.worker")

# Seconds a (message, destination) lease outlives its holder's last heartbeat: as long as the RQ
# execution it belongs to (worker/pool.EXECUTION_TTL), which the same heartbeat pushes on. A dead
# worker's job is re-run only once its execution has lapsed; by then its leases have too, and the
# re-run takes them at once (at 30 s it found them held, looked again 31-35 s later, and a killed
# worker's mail moved only after 50-60 s).
LEASE_TTL = 20.0
BUSY_RETRY = 1.0  # a job handed back for want of a connection slot runs again after about this long

TLS_LOOKUP_FAILED = Outcome(
    RcptState.DEFERRED, "4.7.5", "TLS policy lookup failed (MTA-STS/DANE; see the worker log)", "none"
)


class DeliveryService:
    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        resolver: MXResolver,
        limits: DestinationLimits,
        *,
        dsn: DsnMaker,
        sign: ReportSign = lambda report, now: report,
        dkim: DeliverySigner | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        dialer: Dialer | None = None,
        tls: TLSGate | None = None,
        journal: OutcomeJournal | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.store = spool.store
        self.queue = spool.queue
        self.resolver = resolver
        self.limits = limits
        self.sign = sign  # DKIM on the reports we write (worker/signing.py)
        self.dkim = dkim or DeliverySigner(None)  # the signatures the ingress prepared (Envelope.dkim)
        self.clock = clock
        if dialer is None:  # how conversations open connections (unit tests: an in-memory peer)
            dialer = Dialer(
                settings.hostname,
                settings.smtp_port,
                settings.connect_timeout,
                settings.smtp_timeout,
                max(1, settings.destination_messages_per_connection),
                smarthost_from_settings(settings),  # SmarthostError: one line, exit 78 (mtaq/cli.py)
            )
        self.lanes = Lanes()
        feedback = Feedback(spool.store, settings.suppression_ttl, clock)
        # slow start's news of a success rides the next outcome write (DestinationLimits.news)
        self.writer = OutcomeWriter(
            spool.store, feedback, journal=journal, ride=lambda pipe: limits.ride(pipe, self.crew.grew)
        )
        self.crew = Crew(dialer, limits, self.lanes, settings.worker_concurrency, sleep=sleep, hold=self.writer.hold)
        self.leases = Leases(LeaseBook(spool.store.redis), LEASE_TTL, clock)
        self.finisher = Finisher(spool, settings.hostname, dsn=dsn, sign=sign, clock=clock)
        self.tls = tls  # MTA-STS and DANE (worker/tlsgate.py); None: opportunistic TLS everywhere
        # another job while fewer messages wait here for a conversation than twice its
        # conversations (and at least a drain job's share): parcels of a destination whose
        # connection window is full wait too, and the conversations it cannot have are for other
        # destinations' jobs (bench.slowdest, one process of 100: e2e 99-108 msgs/s at 1x, 113-114
        # at 2x, as main)
        want = max(2 * self.concurrency, self.queue.draw_size)
        busy = min(self.concurrency, settings.destination_concurrency)  # one round (Intake.busy)
        self.intake = Intake(want, self.queue.draw_size, self.lanes.waiting, free=self.crew.permits.free, busy=busy)
        # drain job id -> what its draw took when RQ started it (start_ride), until the job runs
        self._drawn: dict[str, list[str]] = {}
        self._drawn_lock = threading.Lock()

    @property
    def concurrency(self) -> int:
        """How many conversations (and so delivery jobs) this process runs at once."""
        return self.crew.permits.capacity

    @property
    def stopping(self) -> bool:
        return self.crew.stopping.is_set()

    # -- the job ------------------------------------------------------------------------------------
    def start_ride(self, destination: str, job_id: str) -> Ride:
        """A drain job's draw, to go in RQ's start of the job (worker/rqbook.py ``start`` ``ride``,
        worker/pool.py): a writing round trip a job fewer. What it drew waits for ``drain``, which
        draws for itself if it finds nothing (the ride failed, or its answer was lost)."""

        def stage(pipe: Any) -> Callable[[Sequence[Any]], None]:
            drawn = self.queue.draw_in(pipe, destination, job_id, self.intake.share(job_id))

            def take(answers: Sequence[Any]) -> None:
                ids = drawn(answers)
                with self._drawn_lock:
                    if ids is not None:
                        self._drawn[job_id] = ids
                    else:  # none of an earlier run's either: the job draws for itself
                        self._drawn.pop(job_id, None)

            return take

        return stage

    def job_ended(self, job_id: str) -> None:
        """The job is over here, however it ended (worker/pool.py): what it held is given back."""
        self.intake.end(job_id)
        with self._drawn_lock:
            self._drawn.pop(job_id, None)

    def drain(self, destination: str, job_id: str) -> None:
        """A drain job (common/jobqueue.py): deliver what it takes off ``destination``'s pending
        list (or took when RQ started it: ``start_ride``). Its list of what it took goes only once
        they are dealt with: a re-run after a crash delivers the same messages (recipients already
        final are skipped)."""
        dropped = False
        with self._drawn_lock:
            drawn = self._drawn.pop(job_id, None)
        try:
            ids = drawn if drawn is not None else self.queue.draw(destination, job_id, self.intake.share(job_id))
            if ids:
                dropped = self.deliver(
                    destination, ids, landed=lambda: self.intake.landed(job_id), done=[drawn_key(job_id)]
                )
        finally:
            self.intake.landed(job_id)
        if not dropped:
            self.queue.drawn_done(job_id)

    def deliver(
        self,
        destination: str,
        ids: Sequence[str],
        force: bool = False,
        landed: Callable[[], None] | None = None,
        done: Sequence[str] = (),
    ) -> bool:
        """Deliver the due recipients of these messages that go to ``destination``.

        ``force`` (a flush) also takes deferred recipients whose next attempt is not due yet and
        tries a throttled destination. A message another job holds the lease of (for this
        destination) is left to that job. Messages found with every recipient final (their
        finishing was interrupted) are finished here. ``landed`` is told once the parcels are in
        their lane (worker/intake.py). ``done``: keys the caller deletes once these messages are
        dealt with (a drain job's drawn list), deleted with the leases' end when nothing is left
        to do after it; True when they were."""
        ids = list(ids)
        # whether the destination is down, asked in the load's round trip (not one of its own)
        look = None if force else self.limits.look_down(destination)
        loaded, held = self.store.load_with_hold(ids, ride=look.stage if look is not None else None)
        if look is not None and self._suspended(destination, ids, look.found):
            return False
        job = plan(destination, ids, loaded, held, self.spool.router.hop, self.clock(), force=force)
        with self.leases.taken(list(job.due), destination) as lease:
            if not job.reroute:
                # deleted with the leases' end if the block ends without an error (a failed job
                # keeps its drawn list for its re-run); a reroute below comes first
                lease.done = list(done)
            busy = job.busy(lease.taken)
            if busy:
                # Another job holds them now, or a dead worker's job did: look again once the
                # leases have lapsed (a live holder's are pushed on meanwhile, and the look sees them
                # busy again), so that nothing is left without a job. A live holder leaves them
                # final or with a retry of their own, and the look finds nothing to do.
                left = self.leases.book.left(busy, destination)
                self.queue.schedule(destination, busy, min(left, LEASE_TTL) + random.uniform(1.0, 3.0))
            batch = Batch(self.store, self.clock, self.writer, job.loaded, destination, self._quiet)
            batch.finished.extend(job.complete)
            try:
                parcels = self._signed(destination, batch, _parcels(job, lease.taken))
                if parcels:
                    self._run(destination, batch, parcels, landed)
            finally:
                batch.drain()
                if batch.finished:
                    # the leases of the messages deleted end in the same transaction
                    self.finish_messages(batch, set(lease.taken))
        for hop, qids in job.reroute.items():
            log.info("%d message(s) for %s now go to %s", len(qids), destination, hop)
            self.queue.enqueue_now(hop, qids)
        return bool(lease.done)

    def _signed(self, destination: str, batch: Batch, parcels: list[Parcel]) -> list[Parcel]:
        """The parcels with the DKIM signatures the ingress prepared finished in front of their
        message (worker/signing.py), once for all the job's attempts. One that cannot be signed
        here is deferred, not sent unsigned; the others go."""
        ready: list[Parcel] = []
        unsigned: list[Parcel] = []
        for p in parcels:
            try:
                p.body = self.dkim.signed(p.envelope, p.body, self.clock())
                ready.append(p)
                continue
            except Unsignable as e:  # our configuration: said loudly, the mail waits for it
                log.error("%s: %s: delivery deferred", p.envelope.id, e)
                why = f"cannot DKIM-sign: {e}"
            except Exception:  # a bug or a damaged envelope: this message waits, the job's others go
                log.exception("%s: DKIM signing failed: delivery deferred", p.envelope.id)
                why = "DKIM signing failed (see the worker log)"
            fail_all([p], Outcome(RcptState.DEFERRED, "4.3.5", why, "none"))
            unsigned.append(p)
        if unsigned:
            self._record_rest(destination, batch, unsigned)
        return ready

    def _quiet(self, msg: Message, states: dict[int, RecipientStatus]) -> bool:
        """No report is due for a message finished with these states."""
        return self.finisher.dsn(msg, states, self.finisher.hostname, self.clock()) is None

    def _suspended(self, destination: str, ids: list[str], down: Down | None) -> bool:
        """A destination marked down (worker/limits.py): the job goes back to the scheduler."""
        if down is None:
            return False
        delay = down.seconds + random.uniform(0.0, 5.0)
        log.info(
            "%s: delivery temporarily suspended (%s): %d message(s) retry in %.0fs",
            destination,
            down.reason,
            len(ids),
            delay,
        )
        self.queue.schedule(destination, ids, delay)
        return True

    def _run(
        self, destination: str, batch: Batch, parcels: list[Parcel], landed: Callable[[], None] | None = None
    ) -> None:
        """Put the job's parcels in its destination's lane, see that conversations run, wait for
        the parcels; then record what the conversations did not: deferrals, DNS verdicts."""
        try:
            found = resolve(self.resolver, destination, self.settings.smtp_port)
        except Undeliverable as e:
            fail_all(parcels, e.outcome)
            self._record_rest(destination, batch, parcels)
            return
        try:
            # a new lane asks what its destination's MX hosts require (DNS, maybe a policy fetch)
            new = self.tls is not None and self.lanes.get(destination) is None
            policies = self.tls.destination(destination, self.settings.smtp_port) if new and self.tls else None
        except Exception:
            log.exception("%s: TLS policy lookup failed", destination)
            fail_all(parcels, TLS_LOOKUP_FAILED)  # never a downgrade to plain text because of a bug
            self._record_rest(destination, batch, parcels)
            return
        share = JobShare(batch, parcels)
        with self.lanes.joined(destination, found, policies) as lane:
            lane.add(parcels, share)
            if landed is not None:
                landed()
            handed = self.crew.tend(destination, lane, share, parcels)
        batch.drain()  # the conversations' outcomes are written before the rest is worked out
        if handed:
            self._hand_back(destination, handed)
            parcels = [p for p in parcels if p not in handed]
        default_left(parcels, lane.last)
        self._record_rest(destination, batch, parcels)

    def _hand_back(self, destination: str, handed: list[Parcel]) -> None:
        ids = [p.envelope.id for p in handed]
        if self.stopping:
            log.info("%s: stopping: %d message(s) handed back to the queue", destination, len(ids))
            self.queue.enqueue_now(destination, ids)
        else:
            delay = BUSY_RETRY * random.uniform(0.5, 1.5)
            log.debug("%s: no connection slot: %d message(s) retry in %.1fs", destination, len(ids), delay)
            self.queue.schedule(destination, ids, delay)

    def _record_rest(self, destination: str, batch: Batch, parcels: list[Parcel]) -> None:
        s = self.settings
        now = self.clock()
        rest: dict[str, dict[int, RecipientStatus]] = {}
        retry_ids: list[str] = []
        retry_delay: float | None = None
        for p in parcels:
            qid = p.envelope.id
            delay = next_retry(
                p.envelope.received_at,
                now,
                min_backoff=s.min_backoff,
                max_backoff=s.max_backoff,
                queue_lifetime=lifetime(p.envelope.is_bounce, s.queue_lifetime, s.bounce_lifetime),
            )
            ups = {i: batch.account_attempt(p, i, now, delay) for i in p.rcpt_idx if i not in batch.recorded[qid]}
            if ups:
                rest[qid] = ups
            if delay is not None and any(u.state is RcptState.DEFERRED for u in ups.values()):
                retry_ids.append(qid)
                retry_delay = delay if retry_delay is None else min(retry_delay, delay)
        if rest:
            batch.write(rest)
        # delay warnings (issue 8.6): once the deferrals are recorded, see worker/delays.py
        states = {q: {**batch.loaded[q][1], **batch.recorded[q]} for q in retry_ids}
        warn_delayed(self.spool, s, [(batch.loaded[q][0], states[q]) for q in retry_ids], now, sign=self.sign)
        if retry_ids and retry_delay is not None:
            self.queue.schedule(destination, retry_ids, retry_delay)
            log.debug("%d message(s) for %s retry in %.0fs", len(retry_ids), destination, retry_delay)

    # -- finishing ----------------------------------------------------------------------------------
    def finish_messages(self, batch: Batch, leased: Collection[str] = ()) -> None:
        """Every recipient of these messages is final: queue the DSNs their senders asked for and
        remove the messages, all in one transaction. A message with recipients at other
        destinations has its states read again (another job finished those). ``leased``: messages
        whose lease for the batch's destination this job holds; those deleted lose it in the same
        transaction."""
        views: Loaded = {}
        stale: list[str] = []
        for qid in dict.fromkeys(batch.finished):
            msg, before = batch.loaded[qid]
            states = {**before, **batch.recorded.get(qid, {})}
            if all_final(msg, states):
                views[qid] = (msg, states)
            else:
                stale.append(qid)
        for found in self.store.load_many(stale) if stale else []:
            if found is None:
                continue
            if not all_final(*found):
                # the store counted no open recipient (its summary) but a state says otherwise:
                # keep the message; its open recipients have a job or the sweep finds them
                log.warning("%s: counted finished with a recipient still open; kept", found[0].envelope.id)
                continue
            views[found[0].envelope.id] = found
        self.finisher.finish(list(views.values()), batch.destination, leased)

    # -- liveness -----------------------------------------------------------------------------------
    def heartbeat(self) -> None:
        """Push on every lease this process holds: message leases, connection slots; close idle
        connections past their time. Called every few seconds (worker/pool.py)."""
        self.leases.renew()
        self.crew.heartbeat()

    def in_flight(self) -> int:
        """Messages held by this process's jobs now."""
        return self.leases.in_flight()

    def stop(self) -> None:
        """Stop taking messages: conversations end after their transaction, the rest is handed back."""
        self.crew.stop()


def _parcels(job: Plan, leased: Collection[str]) -> list[Parcel]:
    """The job's parcels: its due recipients of the messages it holds the lease of."""
    return [Parcel(job.loaded[q][0].envelope, job.loaded[q][0].body, job.due[q]) for q in leased]
