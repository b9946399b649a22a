"""Settings the README promises, each through its MTAQ_* variable against real processes: a real
redis-server, mtaq's ingress and workers, DNS on loopback, aiosmtpd sinks as next hops.

Timing: only lower bounds on wall clock (a loaded machine can only make waits longer); everything
else waits for an event, bounded by GENEROUS.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from common.envelope import Envelope, Recipient
from common.store import Message, Store
from tests.dnsserver import ZoneServer
from tests.fixtures import MTA, ROOT, message
from tests.integration.eventually import GENEROUS, eventually
from tests.integration.smtpwire import Wire
from tests.mailparse import recipient_blocks
from tests.mtaqrun import start_run, stop
from tests.ports import free_port, wait_port
from tests.redisserver import RedisServer
from tests.sinks import SinkServer

SENDER = "alice@client.test"
# a lower bound measured with time.monotonic() may come out a hair short of a timer that asyncio or
# Redis rounded: 5% of slack, never more
EARLY = 0.95


def mtaq(mta: MTA, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mtaq", *args], env=mta.env, cwd=ROOT, capture_output=True, text=True, timeout=GENEROUS
    )


def old_message(store: Store, qid: str, rcpt: str, age: float) -> None:
    """A message in the store with no delivery job, as if its job was lost ``age`` seconds ago."""
    env = Envelope(id=qid, sender=SENDER, recipients=[Recipient(rcpt)])
    env.received_at = time.time() - age
    store.commit([Message(env, message(qid, to=rcpt))])


# -- the worker's settings --------------------------------------------------------------------------


def test_destination_rate_spaces_the_messages_to_one_destination(
    zone: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA]
) -> None:
    box = sinks("127.0.0.2")
    rate = 4.0  # messages per second: one every 0.25 s, all workers together
    mta = mta_factory(destination_rate=rate)
    mta.start_ingress()
    for i in range(6):  # queued before any worker runs, so nothing but the rate holds them back
        mta.send(SENDER, [f"u{i}@a.test"], message(f"r{i}"))
    mta.start_worker(2)
    eventually(lambda: len(box.deliveries) == 6, "six messages delivered")
    # The rate reserves each transaction's start; what the sink sees is that start plus a delay that
    # varies with the machine's load, so single gaps may come out shorter. The span of all six is
    # 5 / rate = 1.25 s paced and a few tens of ms unpaced: at least half of the paced span, a
    # separation by a factor, tells them apart without a guess at the jitter.
    times = sorted(box.mail_times)
    span = times[-1] - times[0]
    assert len(times) == 6 and span >= 0.5 * 5 / rate, times
    print(f"destination_rate={rate:g}/s: 6 MAIL FROMs over {span:.2f} s ({5 / span:.1f}/s)")


def test_worker_concurrency_bounds_the_conversations_of_one_worker(
    zone: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA]
) -> None:
    box = sinks("127.0.0.2")
    box.data_delay = 0.3  # each conversation lasts long enough for the others to start beside it
    mta = mta_factory(worker_concurrency=2, job_max_messages=1, destination_concurrency=20)
    mta.start_ingress()
    for i in range(8):  # eight jobs waiting: only the worker's own limit keeps them from running at once
        mta.send(SENDER, [f"u{i}@a.test"], message(f"c{i}"))
    mta.start_worker()
    eventually(lambda: len(box.deliveries) == 8, "eight messages delivered")
    assert box.max_open == 2, box.max_open  # two at once, never three


def test_destination_messages_per_connection_opens_a_new_connection(
    zone: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA]
) -> None:
    box = sinks("127.0.0.2")
    # one connection at a time, so each new one is the limit's doing, not parallelism
    mta = mta_factory(destination_messages_per_connection=2, destination_concurrency=1)
    mta.start_ingress()
    for i in range(6):
        mta.send(SENDER, [f"u{i}@a.test"], message(f"p{i}"))
    mta.start_worker()
    eventually(lambda: len(box.deliveries) == 6, "six messages delivered")
    per_connection = collections.Counter(d.peer_port for d in box.deliveries)
    assert max(per_connection.values()) == 2, per_connection  # up to the limit, never beyond it


def test_a_held_message_outlives_queue_lifetime_without_expiring_or_bouncing(
    zone: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA]
) -> None:
    box = sinks("127.0.0.2")
    box.rcpt_default = "451 4.3.0 try again later"
    home = sinks("127.0.0.9")  # the sender's MX: bounces land here
    mta = mta_factory(min_backoff=1, max_backoff=1, queue_lifetime=3)
    mta.start_ingress()
    held = mta.send(SENDER, ["held@a.test"], message("held"))
    control = mta.send(SENDER, ["control@a.test"], message("control"))
    assert mtaq(mta, "queue", "hold", held).returncode == 0
    mta.start_worker()
    # the control message, sent with it, expires and bounces: queue_lifetime has passed for both
    eventually(lambda: len(home.deliveries) == 1, "the control message's bounce")
    [block] = recipient_blocks(home.deliveries[0].data)
    assert block["final-recipient"] == "rfc822; control@a.test" and block["action"] == "failed"
    # the held one stays, untried and unreported
    assert mta.store.load(held) is not None and mta.store.load(control) is None
    assert "held@a.test" not in box.recipients() and f"{held}: to=<held@a.test>" not in mta.logs()
    # released, it is tried again now, and goes
    box.rcpt_default = None
    assert mtaq(mta, "queue", "release", held).returncode == 0
    eventually(lambda: "held@a.test" in box.recipients(), "the released message delivered")
    eventually(lambda: mta.store.load(held) is None, "the released message gone from the queue")
    assert len(home.deliveries) == 1  # and no bounce for it


def test_the_periodic_sweep_queues_mail_whose_job_was_lost(
    zone: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA]
) -> None:
    box = sinks("127.0.0.2")
    mta = mta_factory(maintenance_interval=1, job_timeout=5)
    # overdue by more than a job's lifetime (job_timeout + 120 s) and no job: only the sweep finds it
    old_message(mta.store, "AB12CD34EF56LOST", "lost@a.test", age=1000)
    assert mta.queue.counts().waiting == 0
    mta.start_worker()
    eventually(lambda: "lost@a.test" in box.recipients(), "the lost message delivered by the sweep")
    eventually(lambda: mta.store.queue_size() == 0, "an empty queue")


# -- `mtaq queue` ------------------------------------------------------------------------------------


def test_queue_sweep_and_retry_by_domain(
    zone: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA]
) -> None:
    zone.add("b.test.", "MX", "10 mx.b.test.")
    zone.add("mx.b.test.", "A", "127.0.0.3")
    a, b = sinks("127.0.0.2"), sinks("127.0.0.3")
    a.rcpt_default = b.rcpt_default = "451 4.3.0 try again later"
    mta = mta_factory(job_timeout=5)  # the default min_backoff: no retry comes by itself in this test
    mta.start_ingress()
    mta.start_worker()
    qa = mta.send(SENDER, ["x@a.test"], message("to a"))
    qb = mta.send(SENDER, ["y@b.test"], message("to b"))
    eventually(lambda: a.attempts >= 1 and b.attempts >= 1, "both tried once")
    eventually(lambda: f"{qa}: to=<x@a.test>" in mta.logs() and f"{qb}: to=<y@b.test>" in mta.logs(), "both deferred")
    a.rcpt_default = b.rcpt_default = None
    r = mtaq(mta, "queue", "retry", "--domain", "a.test")
    assert r.returncode == 0, r.stdout + r.stderr
    eventually(lambda: mta.store.load(qa) is None, "a.test's message delivered")
    assert a.recipients() == ["x@a.test"]
    assert mta.store.load(qb) is not None and b.recipients() == []  # b.test waits for its own retry

    # `mtaq queue sweep`: a message whose job was lost is queued again at once
    old_message(mta.store, "AB12CD34EF56SWPT", "z@a.test", age=1000)
    r = mtaq(mta, "queue", "sweep")
    assert r.returncode == 0, r.stdout + r.stderr
    eventually(lambda: "z@a.test" in a.recipients(), "the swept message delivered")


# -- the ingress's recipient verification ------------------------------------------------------------


@pytest.fixture
def silent_hop() -> Iterator[int]:
    """A next hop that accepts connections and never says a word; yields its port on 127.0.0.6."""
    listener = socket.socket()
    listener.bind(("127.0.0.6", free_port(["127.0.0.6"])))
    listener.listen(16)
    held: list[socket.socket] = []
    stop_event = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop_event.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop_event.set()
        t.join(GENEROUS)
        for s in held:
            s.close()
        listener.close()


def test_verify_timeout_against_a_next_hop_that_never_answers(mta_factory: Callable[..., MTA], silent_hop: int) -> None:
    timeout = 2.0
    mta = mta_factory(
        mynetworks="10.255.255.0/24",
        relay_domains="ours.test",
        relayhost=f"[127.0.0.6]:{silent_hop}",
        verify_relay_recipients="yes",
        verify_timeout=timeout,
    )
    mta.start_ingress()
    with Wire(mta.port, timeout=GENEROUS) as w:
        w.greet()
        assert w.cmd("MAIL FROM:<a@elsewhere.test>").status == (250, "2.1.0")
        t0 = time.monotonic()
        reply = w.cmd("RCPT TO:<bob@ours.test>")
        waited = time.monotonic() - t0
        assert str(reply) == "450 4.1.1 Recipient address rejected: unverified address, try again later"
        assert waited >= EARLY * timeout, waited  # it did wait for the silent hop, verify_timeout long
        assert w.cmd("NOOP").status == (250, "2.0.0")


def rcpt_until_asked_again(mta: MTA, hop: SinkServer, rcpt: str, expect: tuple[int, str]) -> float:
    """RCPT ``rcpt`` until the next hop is asked a second time; returns the seconds from the first
    RCPT's start to the second probe's end (a lower bound on how long the answer was cached)."""
    with Wire(mta.port, timeout=GENEROUS) as w:
        w.greet()
        assert w.cmd("MAIL FROM:<a@elsewhere.test>").status == (250, "2.1.0")
        before = hop.attempts
        first = time.monotonic()  # before the answer is cached: the TTL cannot start earlier
        assert w.cmd(f"RCPT TO:<{rcpt}>").status == expect
        assert hop.attempts == before + 1
        deadline = first + GENEROUS
        while hop.attempts == before + 1:  # answered from the cache until its TTL ends
            assert time.monotonic() < deadline, "the cached answer never expired"
            assert w.cmd(f"RCPT TO:<{rcpt}>").status == expect
            time.sleep(0.1)
        return time.monotonic() - first


def test_verify_cache_ttls_come_from_the_settings(
    mta_factory: Callable[..., MTA], sinks: Callable[..., SinkServer], mx_port: int
) -> None:
    hop = sinks("127.0.0.5")
    hop.rcpt_replies = {"gone@ours.test": "550 5.1.1 <gone@ours.test>: no such user"}
    positive, negative = 2.0, 3.0
    mta = mta_factory(
        mynetworks="10.255.255.0/24",
        relay_domains="ours.test",
        relayhost=f"[127.0.0.5]:{mx_port}",
        verify_relay_recipients="yes",
        verify_positive_ttl=positive,
        verify_negative_ttl=negative,
        max_recipients=1000,
        max_errors=1000,  # every refused RCPT below counts as a client error
    )
    mta.start_ingress()
    # each answer is remembered at least its TTL (not asked again sooner), and then asked again
    assert rcpt_until_asked_again(mta, hop, "bob@ours.test", (250, "2.1.5")) >= EARLY * positive
    assert rcpt_until_asked_again(mta, hop, "gone@ours.test", (550, "5.1.1")) >= EARLY * negative


# -- embedded Redis and the exporter -----------------------------------------------------------------


def test_redis_appendfsync_everysec_reaches_the_embedded_redis(
    dns: ZoneServer, mx_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir, log, port = tmp_path / "var", tmp_path / "run.log", free_port()
    monkeypatch.setenv("MTAQ_REDIS_APPENDFSYNC", "everysec")
    p = start_run(data_dir, port, dns, mx_port, log, workers=0)
    try:
        r = redis.Redis(unix_socket_path=str(data_dir / "redis.sock"))
        assert r.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert r.config_get("appendonly") == {"appendonly": "yes"}
        # rewritten rarely (AOF_REWRITE_MIN_SIZE: a rewrite under large mail was costly)
        assert r.config_get("auto-aof-rewrite-min-size") == {"auto-aof-rewrite-min-size": str(1 << 30)}
        # its timer runs twice a second (embedded.HZ: most of an idle Redis's CPU), where a Redis of
        # the operator's keeps Redis's default
        assert r.config_get("hz") == {"hz": "2"}
    finally:
        stop(p, log)


def test_mtaq_exporter_outside_docker(redis_server: RedisServer, tmp_path: Path) -> None:
    store = Store(redis_server.client())
    old_message(store, "AB12CD34EF56EXPO", "x@a.test", age=60)
    mport = free_port(["127.0.0.1"])
    env = dict(os.environ, MTAQ_REDIS_URL=redis_server.url, MTAQ_METRICS_LISTEN=f"127.0.0.1:{mport}")
    log = tmp_path / "exporter.log"
    with open(log, "ab") as out:
        p = subprocess.Popen(
            [sys.executable, "-m", "mtaq", "exporter"], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_port("127.0.0.1", mport, GENEROUS)
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=GENEROUS) as resp:
            text = resp.read().decode()
        assert "mtaq_redis_up 1.0" in text, text
        assert 'mtaq_queue_messages{state="active"} 1.0' in text, text
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/", timeout=GENEROUS) as resp:
            assert "<h1>mtaq on" in resp.read().decode()
    finally:
        p.terminate()
        assert p.wait(GENEROUS) in (0, -signal.SIGTERM), log.read_text()  # no handler: SIGTERM's default
