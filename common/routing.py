"""Routing: which next hop a recipient goes to. Mail is grouped by it into delivery jobs (one job
per next hop), so the ingress, the workers and `mtaq queue flush` must all route alike. The
transport table (common/transport.py) comes first, then the relayhost, then the domain's MX."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from common.envelope import Envelope, domain_of
from common.settings import Settings
from common.smtp.hostport import literal_hop
from common.transport import TransportTable

__all__ = ["Router", "next_hop"]


def next_hop(address: str, relayhost: str) -> str:
    """The destination a recipient is delivered to and grouped by: its domain, or the relayhost.

    A relayhost is taken literally (no MX lookup), as Postfix does for ``[host]:port``."""
    return literal_hop(relayhost) if relayhost else domain_of(address)


@dataclass(frozen=True, slots=True)
class Router:
    relayhost: str = ""
    transport: TransportTable | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Router:
        """TransportTableError when the transport table cannot be read (one line, exit 78)."""
        transport = TransportTable(settings.transport_table) if settings.transport_table else None
        return cls(settings.relayhost, transport)

    def hop(self, address: str) -> str:
        if self.transport is not None:
            routed = self.transport.nexthop(domain_of(address))
            if routed is not None:
                return routed
        return next_hop(address, self.relayhost)

    def hops(self, envelope: Envelope) -> list[str]:
        """The distinct next hops of a message's recipients, in recipient order."""
        return list(dict.fromkeys(self.hop(r.address) for r in envelope.recipients))

    def by_hop(self, sized: Iterable[tuple[Envelope, int]]) -> dict[str, list[tuple[str, int]]]:
        """(envelope, message size) pairs grouped per next hop as (queue id, size): a delivery
        job's batch takes one next hop's messages (common/jobqueue.py)."""
        out: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for env, size in sized:
            for hop in self.hops(env):
                out[hop].append((env.id, size))
        return out
