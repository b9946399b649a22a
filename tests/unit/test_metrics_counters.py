"""Counters summed in memory and written to Redis: they add up across writers, survive a Redis
error, and render as Prometheus metrics."""

from __future__ import annotations

from typing import Any

import fakeredis
import redis

from common import metrics
from common.metrics import Counters, latency_bucket
from common.store import STATS
from mtaq.ops.exporter import Monitor, MtaqCollector


def test_two_processes_worth_of_counters_add_up() -> None:
    r = fakeredis.FakeRedis()
    a, b = Counters(), Counters()
    a.attach(r)
    b.attach(r)
    for c in (a, b):
        c.add(metrics.ACCEPTED)
        c.add(metrics.RECEIVED_BYTES, 100)
    a.add(metrics.ACCEPTED)
    assert a.flush() and b.flush()
    assert r.hget(STATS, metrics.ACCEPTED) == b"3"
    assert r.hget(STATS, metrics.RECEIVED_BYTES) == b"200"
    assert a.pending() == {} and b.pending() == {}


def test_counts_are_kept_while_redis_is_down() -> None:
    class Down(fakeredis.FakeRedis):
        def pipeline(self, *a: Any, **kw: Any) -> Any:
            raise redis.ConnectionError("down")

    c = Counters()
    c.attach(Down())
    c.add(metrics.CONNECTIONS, 2)
    assert not c.flush()
    assert c.pending() == {metrics.CONNECTIONS: 2}
    up = fakeredis.FakeRedis()
    c.attach(up)
    c.add(metrics.CONNECTIONS)
    assert c.flush()
    assert up.hget(STATS, metrics.CONNECTIONS) == b"3"


def test_refusals_count_each_reply_once_by_code() -> None:
    got = list(metrics._refusals(b"250-x\r\n250 ok\r\n550-a\r\n550 5.1.1 no\r\n421 4.4.2 bye\r\n".split(b"\r\n")))
    assert got == ["550", "421"]


def test_replies_sent_counts_refusals_behind_positive_replies_too(monkeypatch: Any) -> None:
    counted: list[str] = []
    monkeypatch.setattr(metrics.counters, "add", lambda key, n=1: counted.append(key))
    metrics.replies_sent(b"250-x\r\n250 ok\r\n")
    metrics.replies_sent(b"354 go on\r\n")
    assert counted == []
    metrics.replies_sent(b"250 ok\r\n550 5.1.1 no\r\n")  # Sends joined into one write
    metrics.replies_sent(b"421 4.4.2 bye\r\n")
    assert counted == [metrics.REJECTED_PREFIX + "550", metrics.REJECTED_PREFIX + "421"]


def test_latency_buckets() -> None:
    assert latency_bucket(0.05) == "latency_le:0.1"
    assert latency_bucket(0.1) == "latency_le:0.1"
    assert latency_bucket(7) == "latency_le:10"
    assert latency_bucket(10**7) == "latency_le:+Inf"


def test_collector_renders_the_redis_counts() -> None:
    r = fakeredis.FakeRedis()
    r.hset(
        STATS,
        mapping={
            "accepted": 4,
            "delivered": 3,
            "bounced": 1,
            "deferred": 2,
            "rejected:550": 5,
            "latency_le:0.5": 2,
            "latency_le:60": 1,
            "latency_le:+Inf": 1,
            "latency_count": 4,
            "latency_sum_ms": 90500,
        },
    )
    fams = {f.name: f for f in MtaqCollector(Monitor(r)).collect()}
    assert fams["mtaq_messages_accepted"].samples[0].value == 4
    rej = fams["mtaq_messages_rejected"].samples
    assert [(s.labels, s.value) for s in rej] == [({"code": "550"}, 5)]
    sent = {s.labels["status"]: s.value for s in fams["mtaq_deliveries"].samples}
    assert sent == {"sent": 3, "bounced": 1, "deferred": 2}
    hist = {
        s.labels.get("le"): s.value for s in fams["mtaq_delivery_latency_seconds"].samples if s.name.endswith("_bucket")
    }
    assert hist["0.25"] == 0 and hist["0.5"] == 2 and hist["30"] == 2 and hist["60"] == 3 and hist["+Inf"] == 4
    total = [s.value for s in fams["mtaq_delivery_latency_seconds"].samples if s.name.endswith("_sum")]
    assert total == [90.5]
    assert fams["mtaq_workers_alive"].samples[0].value == 0


def test_deliveries_by_tls_level_and_status() -> None:
    r = fakeredis.FakeRedis()
    r.hset(STATS, mapping={"tls:verified(mta-sts):sent": 2, "tls:none:deferred": 1, "tls:opportunistic:sent": 5})
    fams = {f.name: f for f in MtaqCollector(Monitor(r)).collect()}
    got = {(s.labels["tls"], s.labels["status"]): s.value for s in fams["mtaq_deliveries_tls"].samples}
    assert got == {("verified(mta-sts)", "sent"): 2, ("none", "deferred"): 1, ("opportunistic", "sent"): 5}
