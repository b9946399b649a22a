"""The RQ job functions, a thin adapter over the delivery service (worker/service.py).

RQ imports ``worker.jobs.deliver`` by name and calls it with the job's arguments; the service it
hands them to is built by whoever runs the jobs (``mtaq worker``: worker/process.py; tests: their
own) from explicit settings, storage, resolver, limits and clock, and installed with ``install``.
Nothing here reads the environment."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from common.dkimkeys import KeyTable
from common.mx import MXResolver, local_addresses, make_resolver
from common.settings import Settings
from common.spool import Spool
from worker.dane import enable_dnssec
from worker.dsn import make_dsn
from worker.journal import OutcomeJournal
from worker.limits import DestinationLimits
from worker.service import DeliveryService
from worker.signing import DeliverySigner, ReportSigner
from worker.tlsgate import TLSGate

__all__ = ["deliver", "drain", "install", "make_dsn", "make_service"]

_service: DeliveryService | None = None


def install(service: DeliveryService | None) -> None:
    """The service the jobs of this process run on (None: none)."""
    global _service
    _service = service


def make_service(
    settings: Settings,
    spool: Spool,
    *,
    clock: Callable[[], float] = time.time,
    journal: OutcomeJournal | None = None,
) -> DeliveryService:
    """A delivery service from settings: the resolver (with the addresses we listen on, for loop
    detection), the shared destination limits on the store's Redis, ``clock``, and the process's
    outcome ``journal`` (worker/journal.py)."""
    dns = make_resolver(settings.dns_server_list)
    if settings.dane:
        enable_dnssec(dns)  # DO and AD on every question: the MX answers' AD bit counts too
    resolver = MXResolver(
        dns,
        local_names=[settings.hostname],
        local_ips=local_addresses(settings.listen),
        max_addresses=settings.max_mx_addresses,
    )
    limits = DestinationLimits(
        spool.store.redis,
        concurrency=settings.destination_concurrency,
        rate=settings.destination_rate,
        failure_limit=settings.destination_failure_limit,
        retry_time=settings.destination_retry_time,
        clock=clock,
    )
    # KeyTableError from a bad key table: one line and exit 78 (mtaq/cli.py)
    keys = KeyTable(settings.dkim_keys) if settings.dkim_keys else None
    # one resolver for MX, TLSA and the MTA-STS policy host (issue 21)
    tls = TLSGate(dns, spool.store.redis, ca_file=settings.tls_ca_file, mta_sts=settings.mta_sts, dane=settings.dane)
    return DeliveryService(
        settings,
        spool,
        resolver,
        limits,
        dsn=make_dsn,
        sign=ReportSigner(keys),
        dkim=DeliverySigner(keys),
        clock=clock,
        tls=tls,
        journal=journal,
    )


def deliver(destination: str, ids: Sequence[str], force: bool = False) -> None:
    """RQ job: deliver the due recipients of these messages that go to ``destination``."""
    if _service is None:
        raise RuntimeError("no delivery service in this process: delivery jobs run in `mtaq worker`")
    _service.deliver(destination, ids, force)


def drain(destination: str, job_id: str) -> None:
    """RQ job: take a share of ``destination``'s pending list and deliver it (common/jobqueue.py:
    ``job_id`` is this job's own id, which names the list of what it took)."""
    if _service is None:
        raise RuntimeError("no delivery service in this process: delivery jobs run in `mtaq worker`")
    _service.drain(destination, job_id)
