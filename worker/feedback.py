"""What the worker writes beside a delivery outcome, in the same round trip: its event for the
stream ``mtaq:events`` (common/events.py) and, for a hard bounce of an address that does not
exist (``InvalidRecipient``), its entry in the suppression list (common/suppression.py)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from common.classify import BounceClass, classify
from common.envelope import RcptState, RecipientStatus
from common.events import Event, message_id_of, outcome_event
from common.store import Message, Store
from common.suppression import stage_add

__all__ = ["Feedback"]


class Feedback:
    def __init__(self, store: Store, suppression_ttl: float = 0.0, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.suppression_ttl = suppression_ttl
        self.clock = clock

    def extras(
        self, entries: Sequence[tuple[str, int, RecipientStatus]], messages: Mapping[str, Message]
    ) -> dict[str, Any]:
        """The ``events`` and ``also`` arguments of ``Store.set_status_list`` for these entries."""
        events: list[Event | None] = []
        hard: list[str] = []
        ids: dict[str, str] = {}
        for qid, idx, st in entries:
            msg = messages.get(qid)
            if msg is None or idx >= len(msg.envelope.recipients):
                events.append(None)
                continue
            if self.store.events_max > 0:
                if qid not in ids:
                    ids[qid] = message_id_of(msg.body)
                events.append(outcome_event(msg.envelope, idx, st, ids[qid]))
            if (
                st.state is RcptState.BOUNCED
                and st.dsn.startswith("5")
                and classify(st.dsn, st.reply) is BounceClass.INVALID_RECIPIENT
            ):
                hard.append(msg.envelope.recipients[idx].address)
        also = None
        if hard and self.suppression_ttl > 0:
            also = functools.partial(_suppress, addresses=hard, now=self.clock(), ttl=self.suppression_ttl)
        return {"events": events if any(e is not None for e in events) else [], "also": also}


def _suppress(pipe: Any, *, addresses: list[str], now: float, ttl: float) -> None:
    stage_add(pipe, addresses, now, ttl)
