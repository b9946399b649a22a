"""The queue sweep: what no job will pick up by itself, found and handed back to the jobs.

Jobs carry the whole delivery schedule, so a message is only stuck when its job is gone: a job that
failed for good (RQ's FailedJobRegistry), a message whose finishing was interrupted, a relayhost
changed under a queued job. Like Postfix's queue manager scanning its deferred queue, one worker at
a time (a Redis lock) walks the queue every ``maintenance_interval`` and
- finishes messages whose recipients are all final (DSN and delete), once they have been so for a
  while (a job may be finishing them right now);
- queues a job now for recipients overdue by more than a job's lifetime: never tried although
  queued that long, or deferred past their next attempt. A job they still have is harmless: the
  lease keeps two jobs off one message, and a recipient not yet due is left alone;
- drops dead jobs' leases that nobody took over (common/leasebook.py).
Expired recipients need nothing special: the job bounces them when it finds them past the lifetime.
The same walk recounts the queue's counters and indexes (common/queuerecount.Recount): whatever
drifted is corrected.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from common.envelope import RcptState, RecipientStatus
from common.leasebook import LeaseBook
from common.queuerecount import Recount, RecountReport
from common.spool import Spool
from common.store import QDESTS, SWEEP_LOCK, Message
from common.storeio import reply_text
from worker.finisher import Finisher

__all__ = ["SweepReport", "start_sweeper", "sweep"]

log = logging.getLogger("mtaq.sweep")

CHUNK = 500
# A message complete for this long is not being finished by a job any more.
SETTLED = 60.0


@dataclass
class SweepReport:
    messages: int = 0
    finished: int = 0
    requeued: int = 0
    pruned: int = 0  # dead jobs' leases dropped
    recount: RecountReport | None = None


def overdue(st: RecipientStatus, received_at: float, now: float, grace: float) -> bool:
    if st.final:
        return False
    due_since = received_at if st.state is RcptState.PENDING else st.next_attempt
    return due_since < now - grace


def sweep(spool: Spool, finisher: Finisher, job_timeout: float, now: float | None = None) -> SweepReport:
    """One walk of the queue: finish what is settled, requeue what is overdue by more than a job's
    lifetime (``job_timeout``) and two minutes."""
    now = time.time() if now is None else now
    store = spool.store
    grace = job_timeout + 120.0
    report = SweepReport()
    counting = Recount(store, spool.router.hop)
    # dead jobs' leases on messages nobody leased again (deleted, or finished by another job), at
    # the destinations listed before the recount drops the emptied ones; an idle destination's go
    # with its hash (common/leasebook.py HASH_TTL)
    dests = [reply_text(d) for d in store.redis.smembers(QDESTS)]
    report.pruned = LeaseBook(store.redis).prune(dests)
    try:
        _walk(spool, finisher, report, counting, now, grace)
        report.recount = counting.finish()
    finally:
        counting.close()
    if report.finished or report.requeued or report.pruned:
        log.warning(
            "sweep: %d message(s) in queue, finished %d left behind, requeued %d overdue, "
            "dropped %d lease(s) of dead jobs",
            report.messages,
            report.finished,
            report.requeued,
            report.pruned,
        )
    return report


def _walk(spool: Spool, finisher: Finisher, report: SweepReport, counting: Recount, now: float, grace: float) -> None:
    store = spool.store
    for chunk in store.walk(CHUNK):
        done: list[tuple[Message, dict[int, RecipientStatus]]] = []
        lost: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for found in chunk:
            report.messages += 1
            msg, states = found
            env = msg.envelope
            everyone = [states.get(i, RecipientStatus()) for i in range(len(env.recipients))]
            if all(st.final for st in everyone):
                if max((st.updated for st in everyone), default=0.0) < now - SETTLED:
                    done.append(found)
                continue
            hops = {
                spool.router.hop(r.address)
                for r, st in zip(env.recipients, everyone, strict=True)
                if overdue(st, env.received_at, now, grace)
            }
            for hop in hops:
                lost[hop].append((env.id, len(msg.body)))
        finisher.finish(done)
        report.finished += len(done)
        report.requeued += spool.queue.enqueue_sized(lost)
        counting.add([m for m, _ in chunk])  # after finishing: those are gone, and not counted


def start_sweeper(
    spool: Spool,
    finisher: Finisher,
    job_timeout: float,
    interval: float,
    *,
    daily: Callable[[], None] | None = None,
) -> threading.Thread:
    """A daemon thread in each worker; the Redis lock makes one sweep per interval cluster-wide.
    ``daily`` runs after each sweep (yesterday's TLS-RPT reports: once cluster-wide, by its own
    claim in Redis)."""

    def loop() -> None:
        while True:
            time.sleep(interval * random.uniform(0.5, 1.0))
            try:
                if spool.store.try_lock(SWEEP_LOCK, int(interval * 0.5) or 1):
                    sweep(spool, finisher, job_timeout)
            except Exception:
                log.exception("sweep failed; next try in about %.0fs", interval)
            if daily is not None:
                try:
                    daily()
                except Exception:
                    log.exception("TLS-RPT reports not sent; next try in about %.0fs", interval)

    t = threading.Thread(target=loop, name="mtaq-sweep", daemon=True)
    t.start()
    return t
