"""Chaos: 2,000 messages to 5 slow sinks while workers, Redis and the ingress are killed.

A random worker is SIGKILLed (and a new one started) every second while mail comes in (30 s at
least); Redis is SIGKILLed twice and SIGSTOPped for 5 s once; the ingress is SIGKILLed once. Every
message the ingress said 250 to must arrive (at least once), the queue must end empty, and once the
killing stops everything must be out within 60 s. Duplicates (the price of at-least-once) are counted and
reported."""

from __future__ import annotations

import os
import random
import re
import signal
import smtplib
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest

from tests.dnsserver import ZoneServer
from tests.fixtures import MTA, route
from tests.queuediag import describe_stuck
from tests.redisserver import RedisServer
from tests.sinks import SinkServer, tagged, taken_on_dropped, wait_for

MESSAGES = 2000
# Seconds of killing at least (past the Redis and ingress events, and on until every message has
# been accepted). Then nothing is killed and everything must be out within 60 s: killing on until
# all had arrived made that check empty, and a run under load last minutes.
KILLING = 30
SINKS = [f"127.0.0.{i}" for i in range(2, 7)]
DATA_DELAY = 0.05  # each sink waits this long after the end of DATA before it takes the message
_TAG = re.compile(rb"X-Chaos: (c\d+)")
_SENT = re.compile(r"([0-9A-F]+): to=<(u\d+)@c\d\.test>.* status=sent ")


@pytest.mark.slow
def test_chaos_loses_nothing_and_recovers_within_a_minute(
    dns: ZoneServer,
    redis_server: RedisServer,
    sinks: Callable[..., SinkServer],
    mta_factory: Callable[..., MTA],
) -> None:
    boxes = []
    for n, host in enumerate(SINKS):
        route(dns, f"c{n}.test", host)
        box = sinks(host)
        box.data_delay = DATA_DELAY
        boxes.append(box)
    mta = mta_factory(log_level="INFO", connect_timeout=2, smtp_timeout=10)
    mta.start_ingress()
    workers = 3
    mta.start_worker(workers)
    accepted: set[str] = set()
    lock = threading.Lock()
    sending = threading.Event()
    sending.set()
    rng = random.Random(8)

    def client(me: int) -> None:
        n = me
        while n < MESSAGES:
            try:
                with smtplib.SMTP("127.0.0.1", mta.port, timeout=15) as s:
                    while n < MESSAGES:
                        tag = f"c{n}"
                        body = f"From: <a@client.test>\r\nSubject: {tag}\r\nX-Chaos: {tag}\r\n\r\nchaos\r\n"
                        s.sendmail("a@client.test", [f"u{n}@c{n % len(SINKS)}.test"], body)
                        with lock:
                            accepted.add(tag)
                        n += 10
            except (smtplib.SMTPException, OSError):
                time.sleep(0.2)  # refused, 4xx while Redis is down, ingress gone: try that one again

    clients = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(10)]
    for t in clients:
        t.start()

    def arrived() -> Counter[str]:
        return tagged(boxes, _TAG)

    kills: list[float] = []

    def kill_worker() -> None:
        name = rng.choice(sorted(n for n in mta.procs if n.startswith("worker")))
        p = mta.procs.pop(name)
        kills.append(time.monotonic())
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        nonlocal workers
        mta._spawn(f"worker{workers}", "worker")
        workers += 1

    started = time.monotonic()
    events = {5: "redis-kill", 9: "ingress-kill", 13: "redis-stop", 20: "redis-kill"}
    second = 0
    deadline = started + 240
    while time.monotonic() < deadline:
        time.sleep(max(0.0, started + second + 1 - time.monotonic()))
        second += 1
        kill_worker()
        what = events.get(second)
        if what == "redis-kill":
            redis_server.kill()
            time.sleep(0.5)
            redis_server.start()
        elif what == "redis-stop":
            assert redis_server.pid is not None
            os.kill(redis_server.pid, signal.SIGSTOP)
            time.sleep(5)
            os.kill(redis_server.pid, signal.SIGCONT)
        elif what == "ingress-kill":
            p = mta.procs.pop("ingress")
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
            mta.start_ingress()
        done_sending = not any(t.is_alive() for t in clients)
        if second >= KILLING and done_sending:
            break
    kills_stopped = time.monotonic()
    arrived_by_kills_end = arrived()
    for t in clients:
        t.join(30)
    assert len(accepted) == MESSAGES
    out = wait_for(lambda: set(arrived()) >= accepted and mta.store.queue_size() == 0, 60, interval=0.2)
    recovered = time.monotonic() - kills_stopped
    seen = arrived()
    missing = sorted(accepted - set(seen))
    duplicates = sum(c - 1 for c in seen.values() if c > 1)
    # Where each duplicate came from: a copy we logged as sent (the remote's 250 read, the record of
    # it lost with the worker: our window), one we never logged (the worker died before it read the
    # 250 the remote gave: every MTA sends that one again), or a message the ingress stored twice
    # (two queue ids: its client sent it again after a 451 for a commit Redis had stored, which the
    # ingress now settles, ingress/commit.py SETTLE_WAIT_ALONE)
    by_rcpt: dict[str, Counter[str]] = {}
    for m in _SENT.finditer(mta.logs()):
        by_rcpt.setdefault(m.group(2), Counter())[m.group(1)] += 1
    dropped = taken_on_dropped(boxes, _TAG)
    ours = stored_twice = window = 0
    for tag, c in seen.items():
        if c < 2:
            continue
        queued = by_rcpt.get(f"u{tag[1:]}", Counter())
        extra = c - 1
        stored_t = min(extra, max(0, len(queued) - 1))
        ours_t = min(extra - stored_t, sum(n - 1 for n in queued.values()))
        # Of those we never logged as sent: a copy that was the last transaction of its connection,
        # which then ended with no command after it (no MAIL, RSET or QUIT: the 250 never read), and
        # was sent again later (tests/sinks.py taken_on_dropped): the worker killed after its dot.
        # aiosmtpd drops a transaction whose client it has seen go, so these are the ones it took
        # before it saw the close: the remote's window (RFC 1047), which only the remote can shut
        window_t = min(extra - stored_t - ours_t, dropped[tag])
        stored_twice += stored_t
        ours += ours_t
        window += window_t
    other = duplicates - ours - stored_twice - window
    print(
        f"\nchaos: {len(accepted)} accepted, {len(seen)} arrived, {len(missing)} missing, {duplicates} duplicates "
        f"({100 * duplicates / len(accepted):.2f} %; {duplicates / max(1, second):.2f} a worker killed), "
        f"{second} s of killing, {recovered:.1f} s after it to empty queue, {workers} workers started, "
        f"{len(set(arrived_by_kills_end))} arrived by the end of the killing; duplicates after a 250 we had "
        f"read: {ours}; the last of a connection its worker dropped after the dot, its 250 unread (the "
        f"remote's window): {window}; stored twice by the ingress (a client sent it again): {stored_twice}; "
        f"other: {other}; {sum(len(b.dropped_sessions) for b in boxes)} connections ended without QUIT"
    )
    if missing:
        logs = mta.logs().splitlines()
        about = [ln for tag in missing[:3] for ln in logs if f"<u{tag[1:]}@" in ln]
        raise AssertionError(f"{len(missing)} missing: {missing[:10]}\n" + "\n".join(about[-30:]))
    assert out, f"queue not empty 60 s after the kills stopped: {mta.store.queue_size()} left\n" + describe_stuck(
        mta.redis, mta.logs()
    )
    # Issue 15 asks for <= 0.5 % (target 0.2 %), naming the window between the remote's 250 and our
    # record of it (the outcome writer's batching): the duplicates we had logged as sent. They were
    # the deliveries of a killed worker whose outcomes it had not yet written (1-16 a run; in one
    # timeline run all 9 were taken in the 10 ms before the kill). Since the outcome journal
    # (worker/journal.py) another worker records those: 0-7 a run (0 in 10 of 14), the 7 killed
    # between the log line and the journal's write, which now comes first (0 since). What is left
    # here is a journal not adopted before the dead worker's job ran again.
    assert ours <= len(accepted) * 0.005, f"{ours} sent again after we had read the remote's 250"
    # The remote's window is not bounded here: how many conversations a kill catches between their
    # dot and the remote's 250 is the scenario's (10 a worker, the sinks' 50 ms) and the sinks' lag
    # in seeing the close (CI's 2 CPUs: 48 in one run). Anything else sent twice is a regression:
    # a message sent again that nothing here explains (0 in the runs since sessions were tracked).
    assert other <= len(accepted) * 0.005, f"{other} duplicates neither ours, the remote's window nor stored twice"
