"""What a conversation carries and what it finds out: a ``Parcel`` is one message and its
recipients for one destination, an ``Outcome`` what one recipient got.

Outcomes are per recipient, in mtaq's one vocabulary (``RcptState``): DELIVERED, BOUNCED (a
permanent failure) or DEFERRED (a transient failure: retry later), as in python-slimta. A function
that cannot do its job for some recipients refuses by raising ``Undeliverable``, which carries the
outcome they get.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from common.envelope import Envelope, RcptState
from worker.tlspolicy import tls_required_no

__all__ = ["Outcome", "Parcel", "Undeliverable", "default_left", "fail_all"]


@dataclass(frozen=True, slots=True)
class Outcome:
    state: RcptState  # DELIVERED, BOUNCED or DEFERRED (never PENDING)
    dsn: str
    reply: str  # what to show: the remote reply, or our own diagnostic
    relay: str  # host[ip]:port, or "none"
    remote_mta: str = ""
    tls: str = ""  # what the session had: "none", "opportunistic", "verified(dane) TLSv1.3 <cipher>"


class Undeliverable(Exception):
    """The recipients at hand cannot be delivered here: ``outcome`` says what they get."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(f"{outcome.dsn} {outcome.reply}")
        self.outcome = outcome


@dataclass(slots=True)
class Parcel:
    """One message and the recipients (positions in its envelope) to deliver to this destination."""

    envelope: Envelope
    body: bytes
    rcpt_idx: list[int]
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    # what goes to a server without 8BITMIME: worked out (and logged) once per parcel
    body_7bit: bytes | None = field(default=None, repr=False)

    def pending(self) -> list[int]:
        return [i for i in self.rcpt_idx if i not in self.outcomes or self.outcomes[i].state is RcptState.DEFERRED]

    @property
    def relaxed(self) -> bool:
        """``TLS-Required: No`` (RFC 8689 §4.2.1): TLS policy failures do not stop this message.
        REQUIRETLS on MAIL wins over the header."""
        return not self.envelope.requiretls and tls_required_no(self.body)


def fail_all(parcels: Sequence[Parcel], outcome: Outcome) -> None:
    """Every recipient still pending gets ``outcome``."""
    for p in parcels:
        for i in p.pending():
            p.outcomes[i] = outcome


def default_left(parcels: Sequence[Parcel], outcome: Outcome) -> None:
    """Recipients still pending that no server answered get ``outcome`` (the last connection
    failure); those with a transient reply keep it."""
    for p in parcels:
        for i in p.pending():
            if i not in p.outcomes:
                p.outcomes[i] = outcome
