"""The suppression list at RCPT (issue 19): every recipient is looked up in this process's copy of
the list (common/suppression.SuppressionCache), a dict access with no Redis round trip; the copy
follows the list's changes once a second (``watch``). A suppressed address gets ``550 5.1.1
<addr>: recipient suppressed after a hard bounce on <date>`` and a ``suppressed`` event; the other
recipients of the transaction are not concerned."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

import redis

from common.events import Event, suppressed_event
from common.store import Store
from common.suppression import SuppressionCache
from ingress.replies import Reply

__all__ = ["REFRESH", "SuppressionGate", "suppressed_reply"]

log = logging.getLogger("mtaq.ingress")

REFRESH = 1.0  # seconds between looks at the list's changes: how soon a new entry is refused everywhere


def suppressed_reply(address: str, since: float) -> Reply:
    day = datetime.fromtimestamp(since, UTC).strftime("%Y-%m-%d")
    # the address as the client gave it, when it is plain ASCII (a reply is ASCII text)
    shown = f"<{address}>" if address.isascii() and address.isprintable() else "recipient"
    return Reply(550, "5.1.1", f"{shown}: recipient suppressed after a hard bounce on {day}")


class SuppressionGate:
    """``check`` is the session's ``suppressed`` hook; ``report`` writes an event off the loop."""

    def __init__(
        self,
        cache: SuppressionCache,
        report: Callable[[Event], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cache = cache
        self.report = report
        self.clock = clock
        self.refused = 0

    def check(self, sender: str, address: str) -> Reply | None:
        entry = self.cache.check(address)
        if entry is None:
            return None
        reply = suppressed_reply(address, entry.since)
        self.refused += 1
        self.report(suppressed_event(sender, address, f"{reply.code} {reply.enhanced} {reply.text}", self.clock()))
        return reply

    async def load(self) -> None:
        """The first copy, before the ingress listens (a RCPT in its first second is checked too);
        Redis down at start: ``watch`` loads it once Redis answers."""
        try:
            await asyncio.to_thread(self.cache.refresh)
        except (redis.RedisError, OSError) as e:
            log.warning("suppression list: cannot load it yet (%s); retried every %.0fs", e, REFRESH)

    async def watch(self, interval: float = REFRESH) -> None:
        """Keep the copy current; while Redis is unreachable the copy in hand goes on answering."""
        failing = False
        while True:
            try:
                await asyncio.to_thread(self.cache.refresh)
                failing = False
            except (redis.RedisError, OSError) as e:
                if not failing:
                    log.warning("suppression list: cannot read its changes (%s); the copy in memory answers", e)
                failing = True
            await asyncio.sleep(interval)


def event_writer(store: Store, spawn: Callable[[Callable[[], None]], None]) -> Callable[[Event], None]:
    """A ``report`` that XADDs each event from a thread (a refusal is no state change: its own
    round trip, off the event loop; a lost one is logged, never a failed RCPT)."""

    def write(ev: Event) -> None:
        def run() -> None:
            try:
                pipe = store.redis.pipeline(transaction=False)
                store.stage_events(pipe, [ev])
                pipe.execute()
            except (redis.RedisError, OSError) as e:
                log.warning("suppressed event for <%s> not written: %s", ev.recipient, e)

        spawn(run)

    return write
