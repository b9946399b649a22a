"""Finishing messages whose every recipient is final: the delivery status notification their
senders asked for and the delete, in one transaction (common/spool.py ``commit``: the DSN is queued
like mail and the message removed together, or neither).

One Finisher serves the three who finish mail: a delivery job when its batch is done
(worker/service.py), the sweep for messages left behind (worker/sweep.py), and `mtaq queue bounce`.
It needs storage, the report maker, our hostname, the DKIM signer of our reports (worker/signing.py)
and a clock; none of the delivery machinery."""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Collection, Sequence

from common.dkimkeys import KeyTable
from common.envelope import RecipientStatus
from common.leasebook import LeaseBook
from common.settings import Settings
from common.spool import Spool
from common.store import Message
from worker.dsn import make_dsn
from worker.signing import ReportSigner

__all__ = ["FINISH_CLAIM", "DsnMaker", "Finished", "Finisher", "ReportSign"]

log = logging.getLogger("mtaq.worker")

# How long a finisher's claim on a message lasts: another finisher (a job for another destination, a
# sweep) that saw the same message complete stays away meanwhile, so exactly one DSN is built. Short:
# a finisher that died has its message finished by the next look, within a minute.
FINISH_CLAIM = 30.0

# the RFC 3464 report for a finished message (worker.dsn.make_dsn), or None
DsnMaker = Callable[[Message, dict[int, RecipientStatus], str, float], Message | None]
# a message with its recipients' states, every one of them final
Finished = tuple[Message, dict[int, RecipientStatus]]
# a report as it is queued: DKIM-signed when a key covers our hostname's domain (worker/signing.py)
ReportSign = Callable[[Message, float], Message]


class Finisher:
    def __init__(
        self,
        spool: Spool,
        hostname: str,
        *,
        dsn: DsnMaker = make_dsn,
        sign: ReportSign = lambda report, now: report,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spool = spool
        self.hostname = hostname
        self.dsn = dsn
        self.sign = sign
        self.clock = clock
        self.leases = LeaseBook(spool.store.redis)

    @classmethod
    def from_settings(cls, settings: Settings, spool: Spool) -> Finisher:
        """KeyTableError from a bad dkim_keys: one line and exit 78 (mtaq/cli.py)."""
        return cls(
            spool, settings.hostname, sign=ReportSigner(KeyTable(settings.dkim_keys) if settings.dkim_keys else None)
        )

    def finish(
        self, done: Sequence[Finished], destination: str | None = None, leased: Collection[str] = ()
    ) -> set[str]:
        """DSNs and deletes of finished messages, in one transaction; returns the ids deleted.

        A message with a DSN due is claimed first (FINISH_CLAIM): two finishers that saw it
        complete at once build one report between them. One without a DSN is not: its recipients'
        states are final and cannot change, so every finisher finds no report due, and deleting a
        message twice is deleting it once (a round trip and a write fewer per message).

        ``destination``: the job's, whose leases ``leased`` (queue ids) are given back in the same
        transaction; a message another finisher has claimed is looked at again by a job for that
        destination once the claim has lapsed. Without one (the sweep, the command line) such a
        message is left to the next sweep."""
        if not done:
            return set()
        queue = self.spool.queue
        now = self.clock()
        reports = {m.envelope.id: self.dsn(m, st, self.hostname, now) for m, st in done}
        due = [q for q, r in reports.items() if r is not None]
        claimed = set(self.leases.claim(due, "finish", uuid.uuid4().hex, FINISH_CLAIM)) if due else set()
        others = [q for q in due if q not in claimed]
        if others and destination is not None:
            # another finisher has it, or had it and died: look again once its claim has lapsed
            queue.schedule(destination, others, FINISH_CLAIM + random.uniform(1.0, 5.0))
        done = [d for d in done if reports[d[0].envelope.id] is None or d[0].envelope.id in claimed]
        dsns: list[Message] = []
        for msg, _ in done:
            dsn = reports[msg.envelope.id]
            if dsn is not None:
                dsns.append(self.sign(dsn, now))
                log.info("%s: sender delivery status notification: %s", msg.envelope.id, dsn.envelope.id)
            log.info("%s: removed", msg.envelope.id)
        ids = [m.envelope.id for m, _ in done]
        unlease = [(q, destination) for q in ids if q in leased] if destination is not None else []
        self.spool.commit(dsns, delete=ids, unlease=unlease)
        return set(ids)
