"""`mtaq queue stats` from the counters and `mtaq queue list` filtered through the indexes (issue
16), against a real redis-server: the same answers as a walk of the queue (`stats --exact`, and
the full listing filtered here), for a queue with every state and ages from minutes to days."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import redis

from common.envelope import Envelope, RcptState, Recipient, RecipientStatus
from common.settings import Settings
from common.spool import Spool
from common.store import Message
from tests.fixtures import ROOT
from tests.redisserver import RedisServer


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MTAQ_REDIS_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "mtaq", "queue", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def fill(url: str) -> None:
    """60 messages over 4 domains, 1-3 recipients each, aged 0 s to ~3 days; some deferred, some
    partly delivered, some held."""
    r = redis.Redis.from_url(url)
    spool = Spool.from_settings(Settings().replace(redis_url=url), r)
    now = time.time()
    msgs = []
    for i in range(60):
        rcpts = [Recipient(f"u{i}.{j}@d{(i + j) % 4}.test") for j in range(i % 3 + 1)]
        env = Envelope(id=f"M{i:03d}", sender="s@x.test", recipients=rcpts, received_at=now - (i**2) * 70)
        msgs.append(Message(env, b"Subject: x\r\n\r\n" + b"y" * (100 * i) + b"\r\n"))
    spool.commit(msgs)
    later = RecipientStatus(state=RcptState.DEFERRED, attempts=1, reply="451 4.3.0 busy, try later")
    sent = RecipientStatus(state=RcptState.DELIVERED, attempts=1, reply="250 ok")
    spool.store.set_statuses({f"M{i:03d}": {0: later} for i in range(0, 60, 4)})
    spool.store.set_statuses({f"M{i:03d}": {1: sent} for i in range(2, 60, 6)})
    spool.store.hold([f"M{i:03d}" for i in range(0, 60, 7)])
    r.close()


def listing(url: str, *args: str) -> list[dict[str, Any]]:
    r = cli(url, "list", "--json", *args)
    assert r.returncode == 0, r.stderr
    out: list[dict[str, Any]] = json.loads(r.stdout)
    return out


def test_stats_and_filtered_listings_agree_with_a_walk(redis_server: RedisServer) -> None:
    url = redis_server.url
    fill(url)
    counted = json.loads(cli(url, "stats", "--json").stdout)
    walked = json.loads(cli(url, "stats", "--json", "--exact").stdout)
    for key in ("messages", "bytes", "by_state", "recipients_by_state", "destinations", "deferred_destinations"):
        assert counted[key] == walked[key], key
    assert counted["by_state"] == {"active": 39, "deferred": 12, "held": 9}
    assert abs(counted["oldest_age_seconds"] - walked["oldest_age_seconds"]) < 5
    text = cli(url, "stats").stdout
    assert "messages in queue: 60" in text and "d0.test" in text and "451 4.3.0 busy, try later" in text

    everything = listing(url)
    assert [m["id"] for m in everything] == [f"M{i:03d}" for i in range(59, -1, -1)]  # by arrival

    def ids(pred: Any) -> list[str]:
        return [m["id"] for m in everything if pred(m)]

    def open_at(m: dict[str, Any], d: str) -> bool:
        return any(r["address"].endswith("@" + d) and r["state"] in ("pending", "deferred") for r in m["recipients"])

    def deferred(m: dict[str, Any]) -> bool:
        return any(r["state"] == "deferred" for r in m["recipients"])

    for d in ("d0.test", "d1.test", "d2.test", "d3.test"):
        assert [m["id"] for m in listing(url, "--domain", d)] == ids(lambda m, d=d: open_at(m, d)), d
    assert [m["id"] for m in listing(url, "--deferred")] == ids(deferred)
    assert [m["id"] for m in listing(url, "--hold")] == ids(lambda m: m["held"])
    assert [m["id"] for m in listing(url, "--older-than", "1h")] == ids(lambda m: m["age_seconds"] > 3600)
    both = listing(url, "--deferred", "--domain", "d0.test", "--older-than", "30m")
    assert [m["id"] for m in both] == ids(lambda m: deferred(m) and open_at(m, "d0.test") and m["age_seconds"] > 1800)
    assert both  # the combination is not empty by accident
    r = cli(url, "list", "--domain", "nowhere.test")
    assert (r.returncode, r.stdout) == (0, "no message matches\n")
    plain = cli(url, "list").stdout.splitlines()
    assert (
        plain[0].startswith("-Queue ID-")
        and plain[-1] == f"-- {sum(m['size'] for m in everything) // 1024} Kbytes in 60 Requests."
    )
