"""Delay warnings (issue 8.6): one ``Action: delayed`` report per message, queued like mail.

Called by the delivery job right after it has recorded a round of deferrals, with the messages
that were deferred and their recipient states as now recorded. The decisions are pure
(``worker/retry.py``: is it late enough; ``worker/dsn.py``: who wants to hear of it, never mail
from ``<>``); the once-per-message promise is the store's: a claim in the message's own hash
(``Store.claim_delay_warnings``), so two jobs for two destinations of one message, or a re-run
job, never send two. The report is queued like any mail (``Spool.commit``).

The claim is taken before the report is queued. A worker dying between the two loses that warning
(at most once), rather than risking two: a warning is advice, not mail anyone handed us.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from common.envelope import RecipientStatus
from common.events import Event, delayed_event, message_id_of
from common.settings import Settings
from common.spool import Spool
from common.store import Message
from worker.dsn import delay_warning_recipients, make_delay_dsn
from worker.retry import delay_warning_due, lifetime

__all__ = ["warn_delayed"]

log = logging.getLogger("mtaq.worker")


def warn_delayed(
    spool: Spool,
    settings: Settings,
    deferred: Sequence[tuple[Message, Mapping[int, RecipientStatus]]],
    now: float,
    *,
    sign: Callable[[Message, float], Message] = lambda report, now: report,
) -> list[str]:
    """Queue the delay warnings now due for these deferred messages; returns their queue ids."""
    if settings.delay_warning <= 0 or not deferred:
        return []
    due = [
        (msg, states)
        for msg, states in deferred
        if delay_warning_due(msg.envelope.received_at, now, settings.delay_warning)
        and delay_warning_recipients(msg.envelope, states)
    ]
    if not due:
        return []
    claimed = set(spool.store.claim_delay_warnings([m.envelope.id for m, _ in due], now))
    reports: list[Message] = []
    warned: list[str] = []
    events: list[Event] = []
    for msg, states in due:
        env = msg.envelope
        if env.id not in claimed:
            continue
        until = env.received_at + lifetime(env.is_bounce, settings.queue_lifetime, settings.bounce_lifetime)
        report = make_delay_dsn(msg, states, settings.hostname, now, retry_until=until)
        if report is None:
            continue
        reports.append(sign(report, now))
        warned.append(env.id)
        mid = message_id_of(msg.body)  # the `delayed` events go with the report (issue 19)
        events += [delayed_event(env, i, states[i], mid, now) for i in delay_warning_recipients(env, states)]
        log.info("%s: sender delay notification: %s", env.id, report.envelope.id)
    if reports:
        spool.commit(reports, events=events)
    return warned
