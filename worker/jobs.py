"""The RQ job functions: thin. Load the batch, hand it to relay.deliver, record the outcomes,
schedule the retry, finish messages whose last recipient is final (DSN, then delete).

Redis round trips per job: one to load the batch, one per SMTP transaction to mark its final
recipients (right after the remote reply, so a re-run job never sends them again), one for the
deferred ones, one to finish every completed message (DSNs and deletes in one transaction)."""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache

from common import metrics
from common.envelope import RcptState, RecipientStatus, domain_of
from common.redisconn import connect
from common.settings import Settings
from common.spool import Spool
from common.store import Message, Store
from worker.delays import warn_delayed
from worker.dsn import make_dsn
from worker.mx import MXResolver, make_resolver
from worker.relay import Kind, Outcome, Parcel, log_attempt
from worker.relay import deliver as relay_deliver
from worker.retry import lifetime, next_retry
from worker.smtpclient import ConnectionCache

__all__ = ["Context", "deliver", "make_context", "make_dsn", "set_context"]

log = logging.getLogger("mtaq.worker")


@dataclass
class Context:
    settings: Settings
    spool: Spool
    resolver: MXResolver
    connections: ConnectionCache = field(default_factory=ConnectionCache)

    @property
    def store(self) -> Store:
        return self.spool.store


_context: Context | None = None


def set_context(ctx: Context | None) -> None:
    global _context
    _context = ctx


@cache
def _default_context() -> Context:
    settings = Settings.from_env()
    return make_context(settings, Spool.from_settings(settings, connect(settings)))


def make_context(settings: Settings, spool: Spool) -> Context:
    resolver = MXResolver(
        make_resolver(settings.dns_server_list),
        local_names=[settings.hostname],
        max_addresses=settings.max_mx_addresses,
    )
    return Context(settings, spool, resolver)


def context() -> Context:
    return _context if _context is not None else _default_context()


_STATE_OF = {Kind.SENT: RcptState.DELIVERED, Kind.BOUNCED: RcptState.BOUNCED, Kind.DEFERRED: RcptState.DEFERRED}


class _Batch:
    """One job's messages and what has been recorded of them so far."""

    def __init__(self, ctx: Context, loaded: dict[str, tuple[Message, dict[int, RecipientStatus]]]) -> None:
        self.ctx = ctx
        self.loaded = loaded
        self.recorded: dict[str, dict[int, RecipientStatus]] = {qid: {} for qid in loaded}
        self.finished: list[str] = []

    def status(self, p: Parcel, i: int, now: float, delay: float | None) -> RecipientStatus:
        out = p.outcomes[i]
        state = _STATE_OF[out.kind]
        if state is RcptState.DEFERRED and delay is None:
            state = RcptState.BOUNCED  # past queue_lifetime: bounce with the last reply
            out = Outcome(
                Kind.BOUNCED,
                out.dsn,
                f"{out.reply} (gave up after {now - p.envelope.received_at:.0f}s in queue)",
                out.relay,
                out.remote_mta,
            )
        log_attempt(p.envelope.id, p.envelope.recipients[i].address, out, p.envelope.received_at, out.kind.value)
        old = self.loaded[p.envelope.id][1].get(i, RecipientStatus())
        metrics.delivery_attempt(state is not RcptState.DEFERRED, now - p.envelope.received_at, old.attempts)
        return RecipientStatus(
            state=state,
            attempts=old.attempts + 1,
            dsn=out.dsn,
            reply=out.reply,
            relay=out.relay,
            remote_mta=out.remote_mta,
            updated=now,
            next_attempt=now + delay if state is RcptState.DEFERRED and delay else 0.0,
        )

    def write(self, updates: dict[str, dict[int, RecipientStatus]]) -> None:
        for qid, results in self.ctx.store.set_statuses(updates).items():
            self.recorded[qid].update(updates[qid])
            if 0 in results:
                self.finished.append(qid)

    def record_final(self, p: Parcel, positions: list[int]) -> None:
        now = time.time()
        self.write({p.envelope.id: {i: self.status(p, i, now, None) for i in positions}})


def _all_final(msg: Message, statuses: dict[int, RecipientStatus]) -> bool:
    return all(statuses.get(i, RecipientStatus()).final for i in range(len(msg.envelope.recipients)))


def deliver(destination: str, ids: Sequence[str], force: bool = False) -> None:
    """RQ job: deliver the due recipients of these messages that go to ``destination``.

    ``force`` (a flush) also takes deferred recipients whose next attempt is not due yet. A message
    another job holds the lease of (for this destination) is left to that job. Messages found with
    every recipient final (their finishing was interrupted) are finished here."""
    ctx = context()
    store, s = ctx.store, ctx.settings
    now = time.time()
    loaded: dict[str, tuple[Message, dict[int, RecipientStatus]]] = {}
    due: dict[str, list[int]] = {}
    reroute: dict[str, list[str]] = defaultdict(list)
    leftover: list[str] = []
    on_hold = store.held(ids)  # an operator's hold: no send, no expiry, no bounce until released
    for found in store.load_many(ids):
        if found is None or found[0].envelope.id in on_hold:
            continue  # finished meanwhile (a re-run job after a crash), or held
        msg, statuses = found
        qid = msg.envelope.id
        if _all_final(msg, statuses):
            leftover.append(qid)
            loaded[qid] = found
            continue
        mine: list[int] = []
        for i, r in enumerate(msg.envelope.recipients):
            st = statuses.get(i, RecipientStatus())
            hop = ctx.spool.router.hop(r.address)
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
    leased = store.lease(list(due), destination, token, s.job_timeout + 60) if due else []
    batch = _Batch(ctx, loaded)
    batch.finished.extend(leftover)
    try:
        parcels = [Parcel(loaded[q][0].envelope, loaded[q][0].body, due[q]) for q in leased]
        if parcels:
            _deliver_parcels(ctx, batch, destination, parcels)
    finally:
        if leased:
            store.release_leases(leased, destination, token)
        if batch.finished:
            finish_messages(ctx, batch)
    for hop, qids in reroute.items():
        log.info("%d message(s) for %s now go to %s", len(qids), destination, hop)
        ctx.spool.queue.enqueue_now(hop, qids)


def _deliver_parcels(ctx: Context, batch: _Batch, destination: str, parcels: list[Parcel]) -> None:
    s = ctx.settings
    relay_deliver(
        destination,
        parcels,
        resolver=ctx.resolver,
        port=s.smtp_port,
        helo_name=s.hostname,
        connect_timeout=s.connect_timeout,
        timeout=s.smtp_timeout,
        record=batch.record_final,
        cache=ctx.connections,
    )
    # what relay did not record: deferrals (which may expire into bounces) and DNS verdicts
    now = time.time()
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
    warn_delayed(ctx.spool, s, [(batch.loaded[q][0], states[q]) for q in retry_ids], now)
    if retry_ids and retry_delay is not None:
        ctx.spool.queue.schedule(destination, retry_ids, retry_delay)
        log.debug("%d message(s) for %s retry in %.0fs", len(retry_ids), destination, retry_delay)


def finish_messages(ctx: Context, batch: _Batch) -> None:
    """Every recipient of these messages is final: queue the DSNs their senders asked for and
    remove the messages, all in one transaction. A message with recipients at other destinations
    has its states read again (another job finished those); otherwise this job's view is whole."""
    store = ctx.store
    views: dict[str, tuple[Message, dict[int, RecipientStatus]]] = {}
    stale: list[str] = []
    for qid in dict.fromkeys(batch.finished):
        msg, before = batch.loaded[qid]
        states = {**before, **batch.recorded.get(qid, {})}
        if _all_final(msg, states):
            views[qid] = (msg, states)
        else:
            stale.append(qid)
    for found in store.load_many(stale) if stale else []:
        if found is not None:
            views[found[0].envelope.id] = found
    finish_loaded(ctx, list(views.values()))


# How long a finisher's claim on a message lasts: another finisher (a job for another destination, a
# sweep) that saw the same message complete stays away meanwhile, so exactly one DSN is built.
FINISH_CLAIM = 3600.0


def finish_loaded(ctx: Context, done: Sequence[tuple[Message, dict[int, RecipientStatus]]]) -> None:
    """DSNs and deletes of finished messages, in one transaction, each claimed first."""
    if not done:
        return
    claimed = set(ctx.store.lease([m.envelope.id for m, _ in done], "finish", uuid.uuid4().hex, FINISH_CLAIM))
    done = [d for d in done if d[0].envelope.id in claimed]
    now = time.time()
    dsns: list[Message] = []
    for msg, states in done:
        dsn = make_dsn(msg, states, ctx.settings.hostname, now)
        if dsn is not None:
            dsns.append(dsn)
            log.info("%s: sender delivery status notification: %s", msg.envelope.id, dsn.envelope.id)
        log.info("%s: removed", msg.envelope.id)
    ctx.spool.commit(dsns, delete=[m.envelope.id for m, _ in done])
