"""The monitoring listener (``metrics_listen``): Prometheus metrics at ``/metrics``, the status page
at ``/``, and ``/healthz``. ``mtaq run``, each ``mtaq ingress`` and ``mtaq exporter`` serve it.

Every number comes from Redis at scrape time (counters from the stats hash, see common/metrics.py;
gauges from the queue's counters and indexes, mtaq/ops/queueindex.py: a scrape costs the same at any
queue length), so every listener of a deployment shows the same totals: scrape one
of them (the exporter) per deployment, not all of them, or a PromQL ``sum`` counts them twice.

A sampler writes the queue depth and the delivered count into ``mtaq:samples`` once a minute (one
sampler per deployment at a time, by a lock) for the status page's chart of the last hour."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import redis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from rq import Worker
from rq.serializers import JSONSerializer

from common import metrics as m
from common.jobqueue import DeliveryQueue
from common.replication import ReplicationView, primary_address, read_replication
from common.smtp.hostport import parse_hostport
from common.store import INDEX, QDESTS, SAMPLE_LOCK, SAMPLES, STATS, dest_key
from common.storeio import reply_text
from mtaq.ops.queueindex import QueueCounts, counted_shape, read_counts
from mtaq.ops.queueview import AGE_BUCKETS, QUEUE_STATES, QueueShape
from mtaq.ops.statuspage import Sample, WorkerInfo, render, sample_from_json

__all__ = ["Monitor", "MonitorServer", "serve_in_thread"]

log = logging.getLogger("mtaq.exporter")

# a worker whose heartbeat is older than this is not counted alive (RQ's worker_ttl is 60 s)
HEARTBEAT_FRESH = 90.0
SAMPLE_INTERVAL = 60.0
SAMPLES_KEPT = 2 * 3600.0
TOP_DESTINATIONS = 20


@dataclass
class Monitor:
    """Reads what the metrics, the status page and ``mtaq health`` show, from one Redis."""

    redis: redis.Redis
    queue_name: str = "mtaq"
    relayhost: str = ""
    hostname: str = ""
    clock: Callable[[], float] = time.time
    shape_cache: float = 10.0  # seconds the status page's shape is reused

    def __post_init__(self) -> None:
        self._shape: QueueShape | None = None
        self._shape_at = 0.0
        self._lock = threading.Lock()

    # -- reading ------------------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, v in self.redis.hgetall(STATS).items():
            out[reply_text(k)] = float(v)
        return out

    def shape(self) -> QueueShape:
        with self._lock:
            now = self.clock()
            if self._shape is None or now - self._shape_at >= self.shape_cache or now < self._shape_at:
                self._shape = counted_shape(self.redis, self.relayhost, now)
                self._shape_at = now
            return self._shape

    def counts(self) -> QueueCounts:
        return read_counts(self.redis, self.clock(), top=TOP_DESTINATIONS)

    def redis_memory(self) -> tuple[int, int] | None:
        """Redis ``used_memory`` and ``maxmemory`` (0: no limit), in bytes; None where INFO is
        refused (a managed Redis may rename it)."""
        try:
            info = self.redis.info("memory")
        except redis.ResponseError:
            return None
        return int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))

    def workers(self) -> list[WorkerInfo]:
        """Workers whose heartbeat is fresh, on any host."""
        now = self.clock()
        out = []
        for w in Worker.all(connection=self.redis, serializer=JSONSerializer):
            hb = w.last_heartbeat
            age: float | None = None
            if hb is not None:
                if hb.tzinfo is None:
                    hb = hb.replace(tzinfo=datetime.UTC)
                age = max(0.0, now - hb.timestamp())
            if age is None or age > HEARTBEAT_FRESH:
                continue
            out.append(WorkerInfo(w.name, w.hostname or "", w.pid, str(w.get_state()), age))
        return sorted(out, key=lambda w: (w.hostname, w.name))

    def concurrency(self) -> Counter[str]:
        """Deliveries running now per destination: the connection slots the workers hold
        (worker/limits.py, ``mtaq:dest:<d>:slots``, token -> lease expiry) at the destinations with
        queued mail (no SCAN of a keyspace that grows with the queue); while none is held, the
        running delivery jobs (a job is one destination's batch)."""
        now = self.clock()
        pattern = dest_key("*", "slots")
        prefix, suffix = pattern.split("*")
        keys = [dest_key(reply_text(d), "slots") for d in self.redis.smembers(QDESTS)]
        if keys:
            pipe = self.redis.pipeline(transaction=False)
            for k in keys:
                pipe.zcount(k, now, "+inf")
            slots = Counter(
                {k[len(prefix) : len(k) - len(suffix)]: int(n) for k, n in zip(keys, pipe.execute(), strict=True)}
            )
            if +slots:
                return +slots
        return DeliveryQueue(self.redis, self.queue_name).running_destinations()

    def replication(self) -> ReplicationView | None:
        """The primary, its replicas and failovers; None where INFO is refused (a Redis that
        forbids it to our user, or a stand-in without it): the rest of a scrape still stands."""
        try:
            return read_replication(self.redis, primary_address(self.redis), self.clock())
        except redis.ResponseError as e:
            log.debug("replication unknown: %s", e)
            return None

    def samples(self, since: float) -> list[Sample]:
        return [
            sample_from_json(raw)
            for raw in self.redis.zrangebyscore(SAMPLES, since, "+inf")
            if isinstance(raw, str | bytes)
        ]

    # -- the sampler ------------------------------------------------------------------------------------
    def sample(self, interval: float = SAMPLE_INTERVAL) -> bool:
        """Write one sample unless another process wrote one less than ``interval`` ago."""
        now = self.clock()
        if not self.redis.set(SAMPLE_LOCK, "1", nx=True, px=max(1, int(interval * 900))):
            return False
        st = self.stats()
        s = Sample(now, int(self.redis.zcard(INDEX)), int(st.get("delivered", 0) + st.get("bounced", 0)))
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(SAMPLES, {s.to_json(): now})
        pipe.zremrangebyscore(SAMPLES, "-inf", now - SAMPLES_KEPT)
        pipe.execute()
        return True

    # -- the page -------------------------------------------------------------------------------------
    def status_page(self) -> str:
        sh = self.shape()
        workers = self.workers()
        stats = {k: int(v) for k, v in self.stats().items()}
        problems = [] if workers else ["no worker heartbeat: start `mtaq worker`"]
        rep = self.replication()
        # the chart ends with the queue as it is now, between two samples
        live = Sample(sh.now, sh.messages, stats.get("delivered", 0) + stats.get("bounced", 0))
        samples = [*self.samples(sh.now - 3600 - 120), live]
        redis_lines = rep.lines() if rep is not None else []
        return render(
            sh, workers, samples, hostname=self.hostname, stats=stats, problems=problems, redis_lines=redis_lines
        )


def _prefixed(stats: dict[str, float], prefix: str) -> Iterator[tuple[str, float]]:
    """The counters of the stats hash named ``prefix...``, by the rest of their name, in order."""
    for k, v in sorted(stats.items()):
        if k.startswith(prefix):
            yield k[len(prefix) :], v


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


def _labeled(name: str, doc: str, label: str, values: Iterable[tuple[str, float]]) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=[label])
    for key, value in values:
        g.add_metric([key], value)
    return g


class MtaqCollector(Collector):
    """Prometheus collector: reads Redis at every scrape (nothing is kept in this process)."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Any]:
        mon = self.monitor
        try:
            st = mon.stats()
            qc = mon.counts()
            workers = mon.workers()
            conc = mon.concurrency()
            memory = mon.redis_memory()
            rep = mon.replication()
        except (redis.RedisError, OSError) as e:
            log.warning("metrics: Redis unreachable: %s", e)
            yield _gauge("mtaq_redis_up", "1 when this exporter could read Redis", 0)
            return
        yield _gauge("mtaq_redis_up", "1 when this exporter could read Redis", 1)

        def counter(name: str, doc: str, field: str) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc)
            c.add_metric([], st.get(field, 0.0))
            return c

        yield counter("mtaq_messages_accepted", "Messages accepted by the ingress (250 after DATA)", m.ACCEPTED)
        yield counter("mtaq_connections", "SMTP connections to the ingress, refused ones included", m.CONNECTIONS)
        yield counter("mtaq_received_bytes", "Octets of message data accepted by the ingress", m.RECEIVED_BYTES)
        yield counter("mtaq_retries", "Delivery attempts of a recipient tried before (retries)", m.RETRIES)
        yield counter(
            "mtaq_outcome_write_stalls",
            "Outcome writes that outlasted their stall limit (50 ms, more for a Redis far away): meanwhile "
            "the worker's conversations wait before their next transaction (Redis slow or away)",
            m.OUTCOME_STALLS,
        )
        rej = CounterMetricFamily(
            "mtaq_messages_rejected", "Commands refused by the ingress, by reply code", labels=["code"]
        )
        for code, v in _prefixed(st, m.REJECTED_PREFIX):
            rej.add_metric([code], v)
        yield rej
        dlv = CounterMetricFamily(
            "mtaq_deliveries", "Recipient delivery attempts by outcome (sent, bounced, deferred)", labels=["status"]
        )
        for status, field in (("sent", "delivered"), ("bounced", "bounced"), ("deferred", "deferred")):
            dlv.add_metric([status], st.get(field, 0.0))
        yield dlv
        failed = CounterMetricFamily(  # issue 19: the bounce class of every failed attempt
            "mtaq_delivery_failures",
            "Failed recipient delivery attempts by outcome (deferred, bounced) and bounce class",
            labels=["status", "classification"],
        )
        for rest, v in _prefixed(st, m.FAILURE_PREFIX):
            status, _, klass = rest.partition(":")
            failed.add_metric([status, klass], v)
        yield failed
        tls = CounterMetricFamily(
            "mtaq_deliveries_tls",
            "Recipient delivery attempts by the session's TLS (none, opportunistic, verified(policy)) and outcome",
            labels=["tls", "status"],
        )
        for rest, v in _prefixed(st, m.TLS_PREFIX):
            level, _, status = rest.rpartition(":")
            tls.add_metric([level, status], v)
        yield tls
        buckets: list[tuple[str, float]] = []
        cumulative = 0.0
        for b in m.LATENCY_BUCKETS:
            cumulative += st.get(f"{m.LATENCY_BUCKET_PREFIX}{b:g}", 0.0)
            buckets.append((f"{b:g}", cumulative))
        cumulative += st.get(m.LATENCY_BUCKET_PREFIX + "+Inf", 0.0)
        buckets.append(("+Inf", cumulative))
        lat = HistogramMetricFamily(
            "mtaq_delivery_latency_seconds", "Seconds from arrival to a recipient's final state (sent or bounced)"
        )
        lat.add_metric([], buckets, sum_value=st.get(m.LATENCY_SUM_MS, 0.0) / 1000.0)
        yield lat
        yield from _queue_metrics(qc)
        if memory is not None:
            yield _gauge("mtaq_redis_memory_used_bytes", "Redis used_memory", memory[0])
            yield _gauge("mtaq_redis_maxmemory_bytes", "Redis maxmemory (0: no limit)", memory[1])
        if rep is not None:
            yield _gauge("mtaq_redis_replicas", "Replicas of the Redis primary that are online", rep.online)
            failovers = CounterMetricFamily(
                "mtaq_redis_failovers", "Failovers of the Redis primary seen via the Sentinels"
            )
            failovers.add_metric([], rep.failovers)
            yield failovers
        yield _gauge("mtaq_workers_alive", "Delivery workers with a fresh heartbeat, on all hosts", len(workers))
        yield _labeled(
            "mtaq_destination_concurrency",
            f"Deliveries running now per destination (the {TOP_DESTINATIONS} busiest)",
            "destination",
            conc.most_common(TOP_DESTINATIONS),
        )


def _queue_metrics(qc: QueueCounts) -> Iterator[Any]:
    """The queue's gauges, from its counters and indexes."""
    yield _labeled(
        "mtaq_queue_messages", "Messages in the queue by state", "state", [(s, qc.by_state[s]) for s in QUEUE_STATES]
    )
    yield _labeled(
        "mtaq_queue_recipients",
        "Recipients not yet final in the queue, by their message's state",
        "state",
        [(s, qc.recipients[s]) for s in QUEUE_STATES],
    )
    yield _gauge("mtaq_queue_bytes", "Octets of the messages in the queue", qc.size)
    yield _gauge(
        "mtaq_oldest_message_age_seconds",
        "Age of the oldest message in the queue",
        0.0 if qc.oldest is None else max(0.0, qc.now - qc.oldest),
    )
    top = qc.top(TOP_DESTINATIONS)
    yield _labeled(
        "mtaq_destination_queue_messages",
        f"Messages queued per destination (the {TOP_DESTINATIONS} largest)",
        "destination",
        [(dest, sum(row)) for dest, row in top],
    )
    yield _labeled(
        "mtaq_destination_oldest_age_seconds",
        f"Age of the oldest message queued per destination (the {TOP_DESTINATIONS} largest)",
        "destination",
        [(dest, max(0.0, qc.now - qc.destination_oldest.get(dest, qc.now))) for dest, _ in top],
    )
    ages = GaugeMetricFamily(
        "mtaq_destination_queue_age_messages",
        f"Messages queued per destination and age, qshape's buckets (the {TOP_DESTINATIONS} largest)",
        labels=["destination", "age"],
    )
    for dest, row in top:
        for (name, _), n in zip(AGE_BUCKETS, row, strict=True):
            ages.add_metric([dest, name], n)
    yield ages


class MonitorServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, listen: str, monitor: Monitor, *, health: Callable[[], dict[str, Any]] | None = None) -> None:
        host, port = parse_hostport(listen, 9125)
        self.monitor = monitor
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MtaqCollector(monitor))
        self.health = health
        super().__init__((host, port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: MonitorServer
    server_version = "mtaq-exporter"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                self._reply(200, CONTENT_TYPE_LATEST, generate_latest(self.server.registry))
            elif path == "/":
                page = self.server.monitor.status_page()
                self._reply(200, "text/html; charset=utf-8", page.encode())
            elif path == "/healthz":
                report = self.server.health() if self.server.health else {"ok": True}
                body = json.dumps(report, indent=1).encode()
                self._reply(200 if report.get("ok") else 503, "application/json", body)
            else:
                self._reply(404, "text/plain", b"not found: try / or /metrics\n")
        except (redis.RedisError, OSError) as e:
            self._reply(503, "text/plain; charset=utf-8", f"Redis unreachable: {e}\n".encode())

    def _reply(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s %s", self.address_string(), format % args)


def _sample_loop(monitor: Monitor, interval: float, stop: threading.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(redis.RedisError, OSError):
            monitor.sample(interval)
        stop.wait(interval)


def serve_in_thread(
    listen: str,
    monitor: Monitor,
    *,
    health: Callable[[], dict[str, Any]] | None = None,
    sample_interval: float = SAMPLE_INTERVAL,
) -> tuple[MonitorServer, threading.Event]:
    """Start the listener and the sampler as daemon threads; set the returned event to stop sampling."""
    server = MonitorServer(listen, monitor, health=health)
    threading.Thread(target=server.serve_forever, name="mtaq-http", daemon=True).start()
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_loop, args=(monitor, sample_interval, stop), name="mtaq-sampler")
    sampler.daemon = True
    sampler.start()
    log.info("metrics and status page on http://%s:%d/", *server.server_address[:2])
    return server, stop
