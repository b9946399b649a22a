"""What a delivery job does with the messages it loaded, worked out without IO: which recipients
are due here, which messages are on hold, which go another way now (the relayhost changed since
they were queued), which are complete and only need finishing. After the leases are taken,
``Plan.busy`` says which due messages another job holds."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from common.envelope import RcptState, RecipientStatus, domain_of
from common.store import Message

__all__ = ["DUE_SLACK", "Loaded", "Plan", "all_final", "plan"]

DUE_SLACK = 1.0  # seconds early a deferred recipient is still taken (its retry job may run early)

Loaded = dict[str, tuple[Message, dict[int, RecipientStatus]]]


def all_final(msg: Message, statuses: dict[int, RecipientStatus]) -> bool:
    return all(statuses.get(i, RecipientStatus()).final for i in range(len(msg.envelope.recipients)))


@dataclass(slots=True)
class Plan:
    loaded: Loaded = field(default_factory=dict)  # the messages the job works on: due or complete
    due: dict[str, list[int]] = field(default_factory=dict)  # queue id -> recipient positions
    held: list[str] = field(default_factory=list)  # on hold: no delivery, expiry or bounce
    reroute: dict[str, list[str]] = field(default_factory=dict)  # next hop now -> queue ids
    complete: list[str] = field(default_factory=list)  # every recipient final: to finish
    gone: list[str] = field(default_factory=list)  # not found: finished meanwhile

    def busy(self, leased: Collection[str]) -> list[str]:
        """The due messages whose lease another job holds."""
        return [q for q in self.due if q not in leased]


def plan(
    destination: str,
    ids: Iterable[str],
    found: Iterable[tuple[Message, dict[int, RecipientStatus]] | None],
    held: Collection[str],
    hop: Callable[[str], str],
    now: float,
    *,
    force: bool = False,
) -> Plan:
    """``found`` is what loading ``ids`` returned (None: the message is gone), ``held`` the ids on
    hold, ``hop(address)`` the next hop a recipient goes to now. ``force`` (a flush) takes deferred
    recipients whose next attempt is not due yet."""
    out = Plan()
    for asked, got in zip(ids, found, strict=True):
        if got is None:
            out.gone.append(asked)  # finished meanwhile (a re-run job after a crash)
            continue
        msg, statuses = got
        qid = msg.envelope.id
        if qid in held:
            out.held.append(qid)
            continue
        if all_final(msg, statuses):
            out.complete.append(qid)
            out.loaded[qid] = got
            continue
        mine: list[int] = []
        for i, r in enumerate(msg.envelope.recipients):
            st = statuses.get(i, RecipientStatus())
            to = hop(r.address)
            if st.final or destination not in (to, domain_of(r.address)):
                continue
            if to != destination:  # queued before the relayhost changed: send it the way it goes now
                ids_there = out.reroute.setdefault(to, [])
                if qid not in ids_there:
                    ids_there.append(qid)
            elif force or st.state is RcptState.PENDING or st.next_attempt <= now + DUE_SLACK:
                mine.append(i)
        if mine:
            out.loaded[qid] = got
            out.due[qid] = mine
    return out
