"""The delivery service: what a delivery job does, built with everything it uses passed in
(settings, message storage, MX resolver, destination limits, clock). worker/jobs.py is the thin RQ
adapter over it; worker/pool.py runs many jobs at once in one process.

One job = one destination, some messages. It
1. hands the job back to RQ's scheduler when the destination is throttled (marked down after
   repeated connection failures) or its connection window is full (worker/limits.py);
2. loads the messages, leaves out what is on hold or not due, leases each (message, destination)
   for ``LEASE_TTL`` seconds, pushed on by the heartbeat while the job lives;
3. runs conversations: a cached idle connection or a new one, plus more in threads while the job
   has more messages than conversations and the destination has free slots, each up to
   ``destination_messages_per_connection`` messages;
4. hands final recipients to the outcome writer right after each transaction
   (worker/outcomes.py ``OutcomeWriter``: one round trip for whatever every conversation of the
   process handed it meanwhile; a re-run job never sends them again), records the deferrals,
   schedules the retry, finishes completed messages (DSN, delete, and the leases on them).

Redis round trips per job: one to load the batch, one to lease it, a share of the writer's turns
for the final recipients, one for the deferred ones, one to finish every completed message, one to
release the leases of the messages not finished.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence

import redis

from common.envelope import RcptState, RecipientStatus, domain_of
from common.settings import Settings
from common.spool import Spool
from common.store import Message, lease_key
from worker.delays import warn_delayed
from worker.feedback import Feedback
from worker.limits import DestinationLimits, Slot
from worker.mx import MXResolver, Target
from worker.outcomes import Batch, Loaded, OutcomeWriter, Owner
from worker.relay import (
    Dialer,
    Opened,
    Parcel,
    Undeliverable,
    Work,
    converse,
    fail_all,
    resolve,
)
from worker.retry import lifetime, next_retry
from worker.smtpclient import ConnectionCache

__all__ = ["FINISH_CLAIM", "LEASE_TTL", "DeliveryService"]

log = logging.getLogger("mtaq.worker")

LEASE_TTL = 30.0  # seconds a (message, destination) lease outlives its holder's last heartbeat
SLOT_WAIT = 5.0  # seconds a job waits for a connection slot before handing itself back
PERMIT_WAIT = 2.0  # ... for a conversation of this process's worker_concurrency
BUSY_RETRY = 1.0  # a handed-back job runs again after about this long
STAFF_PAUSE = 0.2  # after a full window, seconds before a lane asks for a slot again
# How long a finisher's claim on a message lasts: another finisher (a job for another destination, a
# sweep) that saw the same message complete stays away meanwhile, so exactly one DSN is built. Short:
# a finisher that died has its message finished by the next look, within a minute.
FINISH_CLAIM = 30.0

# KEYS: lease; ARGV: token, ms. Push on a lease only while it is still ours.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# the RFC 3464 report for a finished message (worker.jobs.make_dsn), or None
DsnMaker = Callable[[Message, dict[int, RecipientStatus], str, float], Message | None]


def _all_final(msg: Message, statuses: dict[int, RecipientStatus]) -> bool:
    return all(statuses.get(i, RecipientStatus()).final for i in range(len(msg.envelope.recipients)))


class DeliveryService:
    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        resolver: MXResolver,
        limits: DestinationLimits,
        *,
        dsn: DsnMaker,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.store = spool.store
        self.queue = spool.queue
        self.resolver = resolver
        self.limits = limits
        self.dsn = dsn
        self.clock = clock
        self.sleep = sleep
        self.permits = threading.BoundedSemaphore(max(1, settings.worker_concurrency))
        self.cache = ConnectionCache(on_drop=self._drop_idle)
        self.dialer = Dialer(
            settings.hostname,
            settings.smtp_port,
            settings.connect_timeout,
            settings.smtp_timeout,
            max(1, settings.destination_messages_per_connection),
        )
        self.stopping = threading.Event()
        self._leases: dict[str, tuple[str, list[str]]] = {}  # token -> (destination, queue ids)
        self._lock = threading.Lock()
        self._freed = threading.Condition()  # a conversation ended: a connection or slot is free
        self._lanes: dict[str, Work] = {}  # destination -> the parcels its conversations take from
        self._lane_users: dict[str, int] = defaultdict(int)  # jobs with parcels in that lane
        self._renew = spool.store.redis.register_script(_RENEW)
        self.writer = OutcomeWriter(spool.store, Feedback(spool.store, settings.suppression_ttl, clock))

    # -- the job ------------------------------------------------------------------------------------
    def deliver(self, destination: str, ids: Sequence[str], force: bool = False) -> None:
        """Deliver the due recipients of these messages that go to ``destination``.

        ``force`` (a flush) also takes deferred recipients whose next attempt is not due yet and
        tries a throttled destination. A message another job holds the lease of (for this
        destination) is left to that job. Messages found with every recipient final (their
        finishing was interrupted) are finished here."""
        if not force:
            down = self.limits.down(destination)
            if down is not None:
                delay = down.seconds + random.uniform(0.0, 5.0)
                log.info(
                    "%s: delivery temporarily suspended (%s): %d message(s) retry in %.0fs",
                    destination,
                    down.reason,
                    len(ids),
                    delay,
                )
                self.queue.schedule(destination, ids, delay)
                return
        store = self.store
        now = self.clock()
        loaded: Loaded = {}
        due: dict[str, list[int]] = {}
        reroute: dict[str, list[str]] = defaultdict(list)
        leftover: list[str] = []
        held = store.held(ids)
        for found in store.load_many(ids):
            if found is None:
                continue  # finished meanwhile (a re-run job after a crash)
            msg, statuses = found
            qid = msg.envelope.id
            if qid in held:
                continue  # on hold: no delivery, no expiry, no bounce until released
            if _all_final(msg, statuses):
                leftover.append(qid)
                loaded[qid] = found
                continue
            mine: list[int] = []
            for i, r in enumerate(msg.envelope.recipients):
                st = statuses.get(i, RecipientStatus())
                hop = self.spool.router.hop(r.address)
                if st.final or destination not in (hop, domain_of(r.address)):
                    continue
                if hop != destination:  # queued before the relayhost changed: send it the way it goes now
                    if qid not in reroute[hop]:
                        reroute[hop].append(qid)
                elif force or st.state is RcptState.PENDING or st.next_attempt <= now + 1:
                    mine.append(i)
            if mine:
                loaded[qid] = found
                due[qid] = mine
        token = uuid.uuid4().hex
        leased = store.lease(list(due), destination, token, LEASE_TTL) if due else []
        taken = set(leased)
        busy = [q for q in due if q not in taken]
        if busy:
            # Another job holds them now, or a dead worker's job did (its lease lapses within
            # LEASE_TTL): look again then, so that nothing is left without a job. A live holder
            # leaves them final or with a retry of their own, and the look finds nothing to do.
            self.queue.schedule(destination, busy, LEASE_TTL + random.uniform(1.0, 5.0))
        if leased:
            with self._lock:
                self._leases[token] = (destination, leased)
        batch = Batch(self.store, self.clock, self.writer, loaded, destination)
        batch.finished.extend(leftover)
        try:
            parcels = [Parcel(loaded[q][0].envelope, loaded[q][0].body, due[q]) for q in leased]
            if parcels:
                self._run(destination, batch, parcels)
        finally:
            gone: set[str] = set()
            try:
                batch.drain()
                if batch.finished:
                    # the leases of the messages deleted go in the same transaction
                    gone = self.finish_messages(batch, taken)
            finally:
                with self._lock:
                    self._leases.pop(token, None)
                rest = [q for q in leased if q not in gone]
                if rest:
                    store.release_leases(rest, destination, token)
        for hop, qids in reroute.items():
            log.info("%d message(s) for %s now go to %s", len(qids), destination, hop)
            self.queue.enqueue_now(hop, qids)

    def _run(self, destination: str, batch: Batch, parcels: list[Parcel]) -> None:
        """Put the job's parcels in its destination's lane (the parcels this process's
        conversations with it take from), see that conversations run, wait for the parcels; then
        record what the conversations did not: deferrals, DNS verdicts."""
        try:
            found = resolve(self.resolver, destination, self.settings.smtp_port)
        except Undeliverable as e:
            fail_all(parcels, e.outcome)
            self._record_rest(destination, batch, parcels)
            return
        owner = Owner(batch, parcels)
        lane = self._lane(destination, found)
        try:
            lane.add(parcels, owner)
            handed = self._tend(destination, lane, owner, parcels)
        finally:
            self._leave_lane(destination, lane)
        batch.drain()  # the conversations' outcomes are written before the rest is worked out
        if handed:
            ids = [p.envelope.id for p in handed]
            if self.stopping.is_set():
                log.info("%s: stopping: %d message(s) handed back to the queue", destination, len(ids))
                self.queue.enqueue_now(destination, ids)
            else:
                delay = BUSY_RETRY * random.uniform(0.5, 1.5)
                log.debug("%s: no connection slot: %d message(s) retry in %.1fs", destination, len(ids), delay)
                self.queue.schedule(destination, ids, delay)
            parcels = [p for p in parcels if p not in handed]
        for p in parcels:
            for i in p.pending():
                if i not in p.outcomes:
                    p.outcomes[i] = lane.last
        self._record_rest(destination, batch, parcels)

    def _tend(self, destination: str, lane: Work, owner: Owner, parcels: list[Parcel]) -> list[Parcel]:
        """Until the job's parcels are done: start conversations while the lane has more parcels
        than conversations (and slots and permits allow). Returns the parcels handed back: when
        stopping, or when no conversation could be had for SLOT_WAIT seconds."""
        no_slot_since: float | None = None
        handed: list[Parcel] = []
        while not owner.wait(0.2):
            if handed:
                continue  # what a conversation had taken finishes its transaction
            if self.stopping.is_set():
                handed = owner.withdrawn(lane.withdraw(parcels))
                continue
            started = self._staff(destination, lane)
            with self._freed:
                idle = lane.conversations == 0
            if not idle or started:
                no_slot_since = None
                continue
            if no_slot_since is None:
                no_slot_since = time.monotonic()
            elif time.monotonic() - no_slot_since > SLOT_WAIT:
                handed = owner.withdrawn(lane.withdraw(parcels))
        return handed

    def _lane(self, destination: str, targets: list[Target]) -> Work:
        with self._freed:
            lane = self._lanes.get(destination)
            if lane is None:
                lane = self._lanes[destination] = Work(targets)
            self._lane_users[destination] += 1
            return lane

    def _leave_lane(self, destination: str, lane: Work) -> None:
        with self._freed:
            self._lane_users[destination] -= 1
            if self._lane_users[destination] <= 0 and lane.conversations == 0:
                self._lanes.pop(destination, None)
                self._lane_users.pop(destination, None)

    def _staff(self, destination: str, lane: Work) -> bool:
        """Start conversations while the lane has more parcels waiting than conversations."""
        started = False
        if time.monotonic() < lane.staff_after:
            return False  # the window was full a moment ago: the jobs waiting on a lane ask in turn
        while not self.stopping.is_set():
            with self._freed:
                if len(lane) <= lane.conversations:
                    break
            if not self.permits.acquire(blocking=False):
                break
            conversation = self._conversation(destination, lane)
            if conversation is None:
                self.permits.release()
                lane.staff_after = time.monotonic() + STAFF_PAUSE
                break
            opened, slot = conversation
            with self._freed:
                lane.conversations += 1
            threading.Thread(
                target=self._conversation_thread,
                args=(destination, lane, opened, slot),
                name=f"mtaq-smtp-{destination}",
                daemon=True,
            ).start()
            started = True
        return started

    def _conversation(self, destination: str, lane: Work) -> tuple[Opened | None, Slot] | None:
        """A cached idle connection (it holds its slot) to one of the lane's addresses, or a slot
        for a new connection; None when the destination's window is full."""
        while True:
            cached = self.cache.take(destination)
            if cached is None:
                break
            conn, extra = cached
            assert isinstance(extra, tuple)
            slot, to, sent = extra
            # to which of the lane's addresses (equal MX preferences are shuffled)
            where = [n for n, t in enumerate(lane.targets) if (t.ip, t.port) == (to.ip, to.port)]
            if where:
                return Opened(conn, where[0], sent, to), slot
            conn.quit()
            self.limits.release(slot)
        got = self.limits.acquire(destination)
        return None if got is None else (None, got)

    def _conversation_thread(self, destination: str, lane: Work, opened: Opened | None, slot: Slot) -> None:
        result: Opened | None = None
        reached = False
        try:
            result, reached = converse(
                lane,
                self.dialer,
                opened=opened,
                stopping=self.stopping.is_set,
                pace=lambda: self._pace(destination),
                feedback=lambda ok, why: self._feedback(destination, ok, why),
            )
        except Exception:
            log.exception("%s: conversation failed", destination)
        finally:
            self.permits.release()
            if result is not None and result.to is not None and result.conn.alive and not self.stopping.is_set():
                self.cache.give(destination, result.conn, (slot, result.to, result.sent))
            else:
                if result is not None:
                    result.conn.quit()
                self.limits.release(slot)
            with self._freed:
                lane.conversations -= 1
                lane.staff_after = 0.0  # a connection (cached) or slot is free: the next look takes it
                alone = lane.conversations == 0
                if alone and self._lane_users.get(destination, 0) <= 0 and self._lanes.get(destination) is lane:
                    del self._lanes[destination]  # the next job resolves the destination afresh
            if alone and not reached and not self.stopping.is_set():
                # every address failed and no other conversation runs: what waits gets the last
                # failure now, rather than the next conversation failing the same way
                lane.left()
            with self._freed:
                self._freed.notify_all()

    def _drop_idle(self, extra: object) -> None:
        slot = extra[0] if isinstance(extra, tuple) else None
        if isinstance(slot, Slot):
            self.limits.release(slot)

    def _pace(self, destination: str) -> None:
        wait = self.limits.pace(destination)
        if wait > 0:
            self.sleep(wait)

    def _feedback(self, destination: str, ok: bool, why: str) -> None:
        try:
            if ok:
                self.limits.succeeded(destination)
            else:
                self.limits.failed(destination, why)
        except redis.RedisError:
            log.warning("%s: could not record the connection outcome (Redis unavailable)", destination)

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
            ups = {i: batch.status(p, i, now, delay) for i in p.rcpt_idx if i not in batch.recorded[qid]}
            if ups:
                rest[qid] = ups
            if delay is not None and any(u.state is RcptState.DEFERRED for u in ups.values()):
                retry_ids.append(qid)
                retry_delay = delay if retry_delay is None else min(retry_delay, delay)
        if rest:
            batch.write(rest)
        # delay warnings (issue 8.6): once the deferrals are recorded, see worker/delays.py
        states = {q: {**batch.loaded[q][1], **batch.recorded[q]} for q in retry_ids}
        warn_delayed(self.spool, s, [(batch.loaded[q][0], states[q]) for q in retry_ids], now)
        if retry_ids and retry_delay is not None:
            self.queue.schedule(destination, retry_ids, retry_delay)
            log.debug("%d message(s) for %s retry in %.0fs", len(retry_ids), destination, retry_delay)

    # -- finishing ----------------------------------------------------------------------------------
    def finish_messages(self, batch: Batch, leased: Collection[str] = ()) -> set[str]:
        """Every recipient of these messages is final: queue the DSNs their senders asked for and
        remove the messages, all in one transaction. A message with recipients at other
        destinations has its states read again (another job finished those). ``leased``: messages
        whose lease for the batch's destination this job holds; those deleted lose it in the same
        transaction. Returns the ids deleted."""
        views: Loaded = {}
        stale: list[str] = []
        for qid in dict.fromkeys(batch.finished):
            msg, before = batch.loaded[qid]
            states = {**before, **batch.recorded.get(qid, {})}
            if _all_final(msg, states):
                views[qid] = (msg, states)
            else:
                stale.append(qid)
        for found in self.store.load_many(stale) if stale else []:
            if found is not None:
                views[found[0].envelope.id] = found
        return self.finish_loaded(list(views.values()), batch.destination, leased)

    def finish_loaded(
        self,
        done: Sequence[tuple[Message, dict[int, RecipientStatus]]],
        destination: str | None = None,
        leased: Collection[str] = (),
    ) -> set[str]:
        """DSNs and deletes of finished messages, in one transaction; returns the ids deleted.

        A message with a DSN due is claimed first (FINISH_CLAIM): two finishers that saw it
        complete at once build one report between them. One without a DSN is not: its recipients'
        states are final and cannot change, so every finisher finds no report due, and deleting a
        message twice is deleting it once (a round trip and a write fewer per message)."""
        if not done:
            return set()
        now = self.clock()
        reports = {m.envelope.id: self.dsn(m, st, self.settings.hostname, now) for m, st in done}
        due = [q for q, r in reports.items() if r is not None]
        claimed = set(self.store.lease(due, "finish", uuid.uuid4().hex, FINISH_CLAIM)) if due else set()
        others = [q for q in due if q not in claimed]
        if others and destination is not None:
            # another finisher has it, or had it and died: look again once its claim has lapsed
            self.queue.schedule(destination, others, FINISH_CLAIM + random.uniform(1.0, 5.0))
        done = [d for d in done if reports[d[0].envelope.id] is None or d[0].envelope.id in claimed]
        dsns: list[Message] = []
        for msg, _ in done:
            dsn = reports[msg.envelope.id]
            if dsn is not None:
                dsns.append(dsn)
                log.info("%s: sender delivery status notification: %s", msg.envelope.id, dsn.envelope.id)
            log.info("%s: removed", msg.envelope.id)
        ids = [m.envelope.id for m, _ in done]
        unlease = [(q, destination) for q in ids if q in leased] if destination is not None else []
        self.spool.commit(dsns, delete=ids, unlease=unlease)
        return set(ids)

    # -- liveness -----------------------------------------------------------------------------------
    def heartbeat(self) -> None:
        """Push on every lease this process holds: message leases, connection slots; close idle
        connections past their time. Called every few seconds (worker/pool.py)."""
        with self._lock:
            leases = list(self._leases.items())
        if leases:
            pipe = self.store.redis.pipeline(transaction=False)
            for token, (dest, qids) in leases:
                for qid in qids:
                    self._renew(keys=[lease_key(qid, dest)], args=[token, int(LEASE_TTL * 1000)], client=pipe)
            pipe.execute()
        self.limits.heartbeat()
        self.cache.sweep()

    def in_flight(self) -> int:
        """Messages held by this process's jobs now."""
        with self._lock:
            return sum(len(q) for _, q in self._leases.values())

    def stop(self) -> None:
        """Stop taking messages: conversations end after their transaction, the rest is handed back."""
        self.stopping.set()
        self.cache.sweep(everything=True)
