"""Running a worker: an RQ worker that runs up to ``worker_concurrency`` jobs at once in threads
(worker/pool.py; no fork per job, so SMTP connections and the DNS cache live across jobs), with
RQ's scheduler, which carries our retries."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from redis import Redis
from rq.serializers import JSONSerializer

from common.heap import settle
from common.logging import setup_logging
from common.redisconn import connect
from common.settings import Settings
from common.spool import Spool
from worker.jobs import install, make_service
from worker.journal import journal_at
from worker.pool import RECOVERY_INTERVAL, ConcurrentWorker
from worker.service import DeliveryService
from worker.sweep import start_sweeper
from worker.tlsrpt import send_daily
from worker.webhook import start_webhook_sender

__all__ = ["main"]

log = logging.getLogger("mtaq.worker")

# RQ blocks on BLPOP for worker_ttl - 15 s; the socket timeout must outlast that, and stays bounded
# so that a Redis that hangs does not hang the worker for ever.
WORKER_TTL = 60


def daily_reports(service: DeliveryService, settings: Settings) -> Callable[[], None] | None:
    """Yesterday's TLS-RPT reports (RFC 8460), queued once cluster-wide, where policies are on."""
    gate = service.tls
    if gate is None:
        return None

    def send() -> None:
        send_daily(
            gate.redis,
            gate.resolver,
            settings.hostname,
            time.time(),
            queue=service.spool.commit,
            context=gate.anchors.context(),
        )

    return send


def main(settings: Settings, *, burst: bool = False) -> int:
    setup_logging("worker", settings.log_level, settings.log_format)
    r = connect(settings, timeout=WORKER_TTL + 30, connect_timeout=10)
    spool = Spool.from_settings(settings, r, strict_replicas=False)
    with journal_at(settings.journal_dir or os.path.join(settings.data_dir, "journal")) as journal:
        service = make_service(settings, spool, journal=journal)
        service.writer.start()  # a dead worker's journal on this host is recorded before any job
        try:
            return _work(settings, r, spool, service, burst)
        finally:
            service.writer.close()  # the journal kept if outcomes still wait in it


def _work(settings: Settings, r: Redis, spool: Spool, service: DeliveryService, burst: bool) -> int:
    install(service)
    start_sweeper(
        spool,
        service.finisher,
        settings.job_timeout,
        settings.maintenance_interval,
        daily=daily_reports(service, settings),
    )
    w = ConcurrentWorker(
        [spool.queue.rq],
        connection=r,
        serializer=JSONSerializer,
        worker_ttl=WORKER_TTL,
        maintenance_interval=RECOVERY_INTERVAL,
        service=service,
    )
    log.info(
        "worker on queue %s, %d conversations, smtp port %d, dns %s",
        settings.queue_name,
        settings.worker_concurrency,
        settings.smtp_port,
        settings.dns_servers or "system",
    )
    # RQ reconfigures its loggers in work(): keep its per-job lines out of INFO, where our own
    # delivery line says more, once
    rq_level = settings.log_level.upper() if settings.log_level.upper() in ("DEBUG", "ERROR") else "WARNING"
    # the webhook sender (issue 19): every worker tries, the lease holder sends
    stop_webhook = threading.Event()
    start_webhook_sender(settings, r, stop_webhook)
    settle()  # start-up's objects out of the collector's way (common/heap.py)
    try:
        w.work(burst=burst, with_scheduler=True, logging_level=rq_level)
    finally:
        stop_webhook.set()
    return 0
