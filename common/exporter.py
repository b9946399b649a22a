"""The monitoring listener (``metrics_listen``): Prometheus metrics at ``/metrics``, the status page
at ``/``, and ``/healthz``. ``mtaq run``, each ``mtaq ingress`` and ``mtaq exporter`` serve it.

Every number comes from Redis at scrape time (counters from the stats hash, see common/metrics.py;
gauges from the queue itself), so every listener of a deployment shows the same totals: scrape one
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
from rq import Queue, Worker
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from common import metrics as m
from common.address import parse_hostport
from common.queueview import QUEUE_STATES, QueueShape, load_views, shape
from common.statuspage import Sample, WorkerInfo, render, sample_from_json
from common.store import INDEX, SAMPLE_LOCK, SAMPLES, STATS, dest_key

__all__ = ["Monitor", "MonitorServer", "serve_in_thread"]

log = logging.getLogger("mtaq.exporter")

# a worker whose heartbeat is older than this is not counted alive (RQ's worker_ttl is 60 s)
HEARTBEAT_FRESH = 90.0
SAMPLE_INTERVAL = 60.0
SAMPLES_KEPT = 2 * 3600.0
TOP_DESTINATIONS = 20


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass
class Monitor:
    """Reads what the metrics, the status page and ``mtaq health`` show, from one Redis."""

    redis: redis.Redis
    queue_name: str = "mtaq"
    relayhost: str = ""
    hostname: str = ""
    clock: Callable[[], float] = time.time
    shape_cache: float = 10.0  # seconds a queue walk is reused (a scrape every 15 s walks once)

    def __post_init__(self) -> None:
        self._shape: QueueShape | None = None
        self._shape_at = 0.0
        self._lock = threading.Lock()

    # -- reading ------------------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, v in self.redis.hgetall(STATS).items():
            out[_text(k)] = float(v)
        return out

    def shape(self) -> QueueShape:
        with self._lock:
            now = self.clock()
            if self._shape is None or now - self._shape_at >= self.shape_cache or now < self._shape_at:
                self._shape = shape(load_views(self.redis, self.relayhost), now)
                self._shape_at = now
            return self._shape

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
        """Deliveries running now per destination: the engine's connection slots where its keys
        exist (``mtaq:dest:<d>:slots``, token -> lease expiry), else the running delivery jobs (a
        job is one destination's batch)."""
        now = self.clock()
        pattern = dest_key("*", "slots")
        prefix, suffix = pattern.split("*")
        keys = [_text(k) for k in self.redis.scan_iter(match=pattern, count=500)]
        if keys:
            pipe = self.redis.pipeline(transaction=False)
            for k in keys:
                pipe.zcount(k, now, "+inf")
            slots = Counter(
                {k[len(prefix) : len(k) - len(suffix)]: int(n) for k, n in zip(keys, pipe.execute(), strict=True)}
            )
            return +slots
        q = Queue(self.queue_name, connection=self.redis, serializer=JSONSerializer)
        ids = StartedJobRegistry(queue=q).get_job_ids(cleanup=False)
        out: Counter[str] = Counter()
        for job in Job.fetch_many(ids, connection=self.redis, serializer=JSONSerializer) if ids else []:
            if job is not None and job.args:
                out[str(job.args[0])] += 1
        return out

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
        # the chart ends with the queue as it is now, between two samples
        live = Sample(sh.now, sh.messages, stats.get("delivered", 0) + stats.get("bounced", 0))
        samples = [*self.samples(sh.now - 3600 - 120), live]
        return render(sh, workers, samples, hostname=self.hostname, stats=stats, problems=problems)


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
            sh = mon.shape()
            workers = mon.workers()
            conc = mon.concurrency()
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
        rej = CounterMetricFamily(
            "mtaq_messages_rejected", "Commands refused by the ingress, by reply code", labels=["code"]
        )
        for k, v in sorted(st.items()):
            if k.startswith(m.REJECTED_PREFIX):
                rej.add_metric([k[len(m.REJECTED_PREFIX) :]], v)
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
        for k, v in sorted(st.items()):
            if k.startswith(m.FAILURE_PREFIX):
                status, _, klass = k[len(m.FAILURE_PREFIX) :].partition(":")
                failed.add_metric([status, klass], v)
        yield failed
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
        yield _labeled(
            "mtaq_queue_messages",
            "Messages in the queue by state",
            "state",
            [(state, sh.by_state.get(state, 0)) for state in QUEUE_STATES],
        )
        yield _gauge("mtaq_queue_bytes", "Octets of the messages in the queue", sh.size)
        yield _gauge(
            "mtaq_oldest_message_age_seconds",
            "Age of the oldest message in the queue",
            0.0 if sh.oldest is None else max(0.0, sh.now - sh.oldest),
        )
        yield _gauge("mtaq_workers_alive", "Delivery workers with a fresh heartbeat, on all hosts", len(workers))
        yield _labeled(
            "mtaq_destination_concurrency",
            f"Deliveries running now per destination (the {TOP_DESTINATIONS} busiest)",
            "destination",
            conc.most_common(TOP_DESTINATIONS),
        )
        yield _labeled(
            "mtaq_destination_queue_messages",
            f"Messages queued per destination (the {TOP_DESTINATIONS} largest)",
            "destination",
            [(dest, sum(row)) for dest, row in sh.top_destinations(TOP_DESTINATIONS)],
        )


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
