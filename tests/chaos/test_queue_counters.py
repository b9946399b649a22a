"""Chaos for the queue's counters and indexes (issue 16): mail to destinations that accept, defer,
refuse and are down, with short retries and a short queue lifetime (expiry), while workers are
SIGKILLed, Redis is SIGKILLed once, and an operator holds, releases, deletes and bounces messages.
Then, everything stopped, the counters and every index must equal a full walk of the queue, before
any recount; and `mtaq queue sweep` must find nothing off. (Checked: it fails when a recipient's
bounce is left out of the counters.)"""

from __future__ import annotations

import os
import random
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest

from common.envelope import domain_of
from mtaq.ops.queueindex import exact_counts, read_counts, selected_ids
from mtaq.ops.queueview import load_views
from tests.dnsserver import ZoneServer
from tests.fixtures import MTA, ROOT, route
from tests.redisserver import RedisServer
from tests.sinks import SinkServer

MESSAGES = 300
DOMAINS = ["ok.test", "later.test", "never.test", "down.test"]


@pytest.mark.slow
def test_counters_equal_a_walk_after_crashes_retries_holds_deletes_bounces_and_expiry(
    dns: ZoneServer,
    redis_server: RedisServer,
    sinks: Callable[..., SinkServer],
    mta_factory: Callable[..., MTA],
) -> None:
    route(dns, "ok.test", "127.0.0.2")
    route(dns, "later.test", "127.0.0.3")
    route(dns, "never.test", "127.0.0.4")
    route(dns, "down.test", "127.0.0.5")  # nothing listens: connection refused
    sinks("127.0.0.2").data_delay = 0.02
    sinks("127.0.0.3").rcpt_default = "451 4.3.0 try again later"
    sinks("127.0.0.4").rcpt_default = "550 5.1.1 no such user"
    mta = mta_factory(
        log_level="INFO",
        min_backoff=1,
        max_backoff=2,
        queue_lifetime=15,  # the first deferred recipients expire (bounce) during the run, later ones stay
        destination_retry_time=2,
        # no periodic sweep: its recount would correct what the round trips got wrong, and this
        # test is about them; `mtaq queue sweep` runs at the end and must find nothing to correct
        maintenance_interval=3600,
        connect_timeout=1,
    )
    mta.start_ingress()
    workers = 3
    mta.start_worker(workers)
    rng = random.Random(16)
    stop = threading.Event()

    def client() -> None:
        crng = random.Random(1)
        n = 0
        while n < MESSAGES and not stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", mta.port, timeout=15) as s:
                    while n < MESSAGES and not stop.is_set():
                        rcpts = [f"u{n}.{j}@{crng.choice(DOMAINS)}" for j in range(crng.randint(1, 3))]
                        s.sendmail("a@client.test", rcpts, f"Subject: {n}\r\n\r\nchaos\r\n")
                        n += 1
                        time.sleep(0.1)  # mail all through the chaos: the last of it still queued at the end
            except (smtplib.SMTPException, OSError):
                time.sleep(0.2)  # Redis down: that one again

    acted: dict[str, int] = {"hold": 0, "release": 0, "delete": 0, "bounce": 0}

    def operator() -> None:
        while not stop.wait(0.3):
            try:
                ids = mta.store.queue_ids()
                if not ids:
                    continue
                pick = rng.sample(ids, min(3, len(ids)))
                what = rng.choice(["hold", "hold", "release", "delete", "bounce"])
                if what == "hold":
                    acted[what] += len(mta.store.hold(pick))
                elif what == "release":
                    acted[what] += len(mta.store.unhold(mta.store.held_ids()[:3]))
                elif what == "delete":
                    mta.store.delete(pick[0])
                    acted[what] += 1
                else:
                    r = subprocess.run(
                        [sys.executable, "-m", "mtaq", "queue", "bounce", pick[0]],
                        env=mta.env,
                        cwd=ROOT,
                        capture_output=True,
                        timeout=60,
                    )
                    acted[what] += r.returncode == 0
            except Exception:  # Redis down for a moment: the next turn
                time.sleep(0.2)

    threads = [threading.Thread(target=client, daemon=True), threading.Thread(target=operator, daemon=True)]
    for t in threads:
        t.start()
    started = time.monotonic()
    second = 0
    while time.monotonic() - started < 30:
        time.sleep(max(0.0, started + second + 1.5 - time.monotonic()))
        second += 1
        name = rng.choice(sorted(n for n in mta.procs if n.startswith("worker")))
        p = mta.procs.pop(name)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        mta._spawn(f"worker{workers}", "worker")
        workers += 1
        if second == 6:
            redis_server.kill()
            time.sleep(0.5)
            redis_server.start()
    time.sleep(8)  # the retries, expiries and finishing of what the last kill interrupted
    stop.set()
    for t in threads:
        t.join(60)
    mta.stop_all()

    now = time.time()
    r = mta.redis
    views = list(load_views(r))
    walked = exact_counts(views, now)
    assert walked.messages > 20 and walked.by_state["held"] > 0 and walked.by_state["deferred"] > 0, walked
    assert acted["delete"] and acted["bounce"], acted
    # what exercises the per-recipient accounting: messages with a final recipient beside open ones
    mixed = Counter(rc.state.value for v in views if v.open for rc in v.recipients if rc.status.final)
    print(f"\nqueue counters chaos: {walked.by_state}, final recipients beside open ones {dict(mixed)}, {acted}")
    assert mixed["bounced"] and mixed["delivered"], mixed
    assert read_counts(r, now) == walked
    # every index lists exactly what the walk finds
    for d in DOMAINS:
        want = [v.qid for v in views if any(domain_of(rc.address) == d for rc in v.open)]
        assert selected_ids(r, now, domain=d) == want, d
    assert selected_ids(r, now, deferred=True) == [
        v.qid for v in views if any(rc.state.value == "deferred" for rc in v.open)
    ]
    assert selected_ids(r, now, hold=True) == [v.qid for v in views if v.held]
    swept = subprocess.run(
        [sys.executable, "-m", "mtaq", "queue", "sweep"],
        env=mta.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert swept.returncode == 0, swept.stderr
    assert "0 message(s) repaired, 0 stray index entries; none off (corrected)" in swept.stdout, swept.stdout
    assert read_counts(r, time.time()).by_state == exact_counts(load_views(r), time.time()).by_state
