"""The spool: message storage, its delivery queue and routing together, for the one operation that
needs all three: a commit stores messages and their delivery jobs in one MULTI/EXEC."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import redis

from common.events import Event
from common.jobqueue import DeliveryQueue
from common.routing import Router
from common.settings import Settings
from common.store import Message, Store, StoreError

__all__ = ["Spool"]


@dataclass(frozen=True, slots=True)
class Spool:
    store: Store
    queue: DeliveryQueue
    router: Router

    @classmethod
    def from_settings(cls, settings: Settings, r: redis.Redis, *, strict_replicas: bool = True) -> Spool:
        """``strict_replicas``: see Store (the ingress refuses mail that too few replicas have; a
        worker logs it)."""
        store = Store(
            r,
            replicas=settings.redis_min_replicas,
            replica_timeout=settings.redis_replica_timeout,
            strict_replicas=strict_replicas,
            events_max=settings.events_max,
            inline=False,
        )
        # one key a message once every worker reads it (common/store.py LAYOUT_KEY); Redis down now
        # leaves it closed until the process asks again (the ingress each second, the workers each
        # heartbeat)
        with contextlib.suppress(StoreError):
            store.refresh_layout()
        return cls(store, DeliveryQueue.from_settings(settings, r), Router.from_settings(settings))

    def commit(
        self,
        messages: Sequence[Message],
        *,
        delete: Iterable[str] = (),
        unlease: Iterable[tuple[str, str]] = (),
        mark: str = "",
        events: Sequence[Event] = (),
    ) -> int:
        """Store messages with one delivery job per next hop (per job limits), and delete finished
        ones (with the leases ``unlease`` names, (queue id, destination)), in one MULTI/EXEC: all of
        it or nothing (``events`` go to the events stream in it). Returns how many delivery jobs
        were stored (mail input flow control turns unfinished jobs into messages with it). ``mark``:
        see Store.commit. Raises StoreUnavailable / StoreFull."""
        by_hop = self.router.by_hop((m.envelope, len(m.body)) for m in messages)
        staged: list[int] = []
        self.store.commit(
            messages,
            delete=delete,
            unlease=unlease,
            also=lambda pipe: staged.append(self.queue.stage(pipe, by_hop)),
            hop=self.router.hop,
            mark=mark,
            events=events,
        )
        return sum(staged)
