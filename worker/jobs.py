"""The RQ job functions: thin. Load the batch, hand it to relay.deliver, record the outcomes,
schedule the retry, finish messages whose last recipient is final (DSN, then delete)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from common.envelope import Envelope, RcptState, Recipient, RecipientStatus, new_queue_id
from common.redisconn import connect
from common.settings import Settings
from common.store import Message, Store, next_hop
from worker.dsn import DsnRecipient, build_dsn
from worker.mx import MXResolver, make_resolver
from worker.relay import Kind, Outcome, Parcel, log_attempt
from worker.relay import deliver as relay_deliver
from worker.retry import next_retry

__all__ = ["Context", "deliver", "finish_message", "set_context"]

log = logging.getLogger("mtaq.worker")


@dataclass
class Context:
    settings: Settings
    store: Store
    resolver: MXResolver


_context: Context | None = None


def set_context(ctx: Context | None) -> None:
    global _context
    _context = ctx


@cache
def _default_context() -> Context:
    settings = Settings.from_env()
    return make_context(settings, Store(connect(settings), settings.queue_name, relayhost=settings.relayhost,
                                        job_max_messages=settings.job_max_messages,
                                        job_timeout=settings.job_timeout))


def make_context(settings: Settings, store: Store) -> Context:
    resolver = MXResolver(make_resolver(settings.dns_server_list), local_names=[settings.hostname],
                          max_addresses=settings.max_mx_addresses)
    return Context(settings, store, resolver)


def context() -> Context:
    return _context if _context is not None else _default_context()


def deliver(destination: str, ids: Sequence[str]) -> None:
    """RQ job: deliver the pending recipients of these messages that go to ``destination``."""
    ctx = context()
    store, s = ctx.store, ctx.settings
    parcels: list[Parcel] = []
    for qid in ids:
        msg = store.load(qid)
        if msg is None:
            continue  # finished meanwhile (a re-run job after a crash)
        statuses = store.statuses(qid)
        idx = [i for i, r in enumerate(msg.envelope.recipients)
               if next_hop(r.address, store.relayhost) == destination
               and not statuses.get(i, RecipientStatus()).final]
        if idx:
            parcels.append(Parcel(msg.envelope, msg.body, idx))
    if not parcels:
        return
    relay_deliver(destination, parcels, resolver=ctx.resolver, port=s.smtp_port, helo_name=s.hostname,
                  connect_timeout=s.connect_timeout, timeout=s.smtp_timeout)
    now = time.time()
    retry_ids: list[str] = []
    retry_delay: float | None = None
    for p in parcels:
        statuses = store.statuses(p.envelope.id)
        updates: dict[int, RecipientStatus] = {}
        delay = next_retry(p.envelope.received_at, now, min_backoff=s.min_backoff, max_backoff=s.max_backoff,
                           queue_lifetime=s.queue_lifetime)
        for i in p.rcpt_idx:
            out = p.outcomes[i]
            old = statuses.get(i, RecipientStatus())
            state = {Kind.SENT: RcptState.DELIVERED, Kind.BOUNCED: RcptState.BOUNCED}.get(out.kind, RcptState.DEFERRED)
            status_word = out.kind.value
            if state is RcptState.DEFERRED and delay is None:
                state, status_word = RcptState.BOUNCED, "bounced"
                out = Outcome(Kind.BOUNCED, out.dsn, f"{out.reply} (message expired after "
                              f"{now - p.envelope.received_at:.0f}s in queue)", out.relay, out.remote_mta)
            log_attempt(p.envelope.id, p.envelope.recipients[i].address, out, p.envelope.received_at, status_word)
            updates[i] = RecipientStatus(state=state, attempts=old.attempts + 1, dsn=out.dsn, reply=out.reply,
                                         relay=out.relay, remote_mta=out.remote_mta, updated=now)
        results = store.set_statuses(p.envelope.id, updates)
        if any(st.state is RcptState.DEFERRED for st in updates.values()) and delay is not None:
            retry_ids.append(p.envelope.id)
            retry_delay = delay if retry_delay is None else min(retry_delay, delay)
        if 0 in results:
            finish_message(ctx, p.envelope.id)
    if retry_ids and retry_delay is not None:
        store.schedule(destination, retry_ids, retry_delay)
        log.debug("%d message(s) for %s retry in %.0fs", len(retry_ids), destination, retry_delay)


def finish_message(ctx: Context, qid: str) -> None:
    """Every recipient is final: send the DSN the sender asked for (if any) and remove the message,
    both in one transaction."""
    store = ctx.store
    msg = store.load(qid)
    if msg is None:
        return
    statuses = store.statuses(qid)
    dsn = make_dsn(msg, statuses, ctx.settings.hostname, time.time())
    store.commit([dsn] if dsn is not None else [], delete=[qid])
    if dsn is not None:
        log.info("%s: sender non-delivery notification: %s", qid, dsn.envelope.id)


def make_dsn(msg: Message, statuses: dict[int, RecipientStatus], hostname: str, now: float) -> Message | None:
    """The RFC 3464 report for a finished message, or None: never for mail from <> (no loops),
    failures unless NOTIFY said otherwise, successes only when NOTIFY=SUCCESS asked."""
    env = msg.envelope
    if env.is_bounce:
        return None
    report: list[DsnRecipient] = []
    for i, r in enumerate(env.recipients):
        st = statuses.get(i)
        if st is None:
            continue
        if st.state is RcptState.BOUNCED and r.wants("FAILURE"):
            action = "failed"
        elif st.state is RcptState.DELIVERED and r.wants("SUCCESS"):
            # we do not pass NOTIFY on to the next hop, so we report "relayed" (RFC 3461 §4.1)
            action = "relayed"
        else:
            continue
        report.append(DsnRecipient(address=r.address, orcpt=r.orcpt, action=action, status=st.dsn or "5.0.0",
                                   remote_mta=st.remote_mta, diagnostic=st.reply, last_attempt=st.updated or None))
    if not report:
        return None
    body = build_dsn(reporting_mta=hostname, queue_id=env.id, envid=env.envid, arrival=env.received_at,
                     original_sender=env.sender, recipients=report, original=msg.body, ret=env.ret, now=now)
    bounce = Envelope(id=new_queue_id(), sender="", recipients=[Recipient(env.sender)], received_at=now,
                      helo=hostname, client_addr="127.0.0.1", client_name="localhost", protocol="local")
    return Message(bounce, body)
