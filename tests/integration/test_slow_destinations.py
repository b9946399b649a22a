"""Slow remote servers: many conversations per worker, and per-destination limits shared by every
worker process. Real `mtaq run` / `mtaq worker` processes, a real DNS server, aiosmtpd sinks that
wait before answering DATA, and real SMTP over TCP on 127.0.0.x."""

from __future__ import annotations

import smtplib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.dnsserver import ZoneServer
from tests.fixtures import MTA, message, route
from tests.integration.eventually import GENEROUS, eventually
from tests.mtaqrun import start_run, stop
from tests.ports import free_port
from tests.sinks import SinkServer, wait_for

SINK_HOSTS = [f"127.0.0.{i}" for i in range(20, 30)]


def send_all(port: int, rcpts: list[str], sessions: int = 20) -> list[str]:
    """Send one message to each recipient over ``sessions`` parallel SMTP sessions."""
    accepted: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(mine: list[str]) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
                for rcpt in mine:
                    s.sendmail("alice@client.test", [rcpt], message(rcpt, ("x" * 78 + "\r\n") * 25, to=rcpt))
                    with lock:
                        accepted.append(rcpt)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=client, args=(rcpts[n::sessions],)) for n in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    return accepted


class Gauge:
    """Samples the connections open at all the sinks together."""

    def __init__(self, sinks: list[SinkServer]) -> None:
        self.sinks = sinks
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, sum(s.open_connections for s in self.sinks))

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)


@pytest.mark.slow
def test_slow_destinations_with_mtaq_run_defaults(
    dns: ZoneServer, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    """10 destinations whose MX waits 1 s before answering DATA, 1,000 messages from 20 sessions:
    one conversation per worker would need over 8 minutes. `mtaq run` as it comes holds 50 and more
    conversations at once (the proof, a count), so all arrive long before that; the rate is reported,
    not asserted (a loaded machine slows it, the count it cannot fake)."""
    mx_port = free_port(SINK_HOSTS)
    sinks = [SinkServer(host, mx_port).start() for host in SINK_HOSTS]
    for n, host in enumerate(SINK_HOSTS):
        route(dns, f"d{n}.test", host)
        sinks[n].data_delay = 1.0
    port = free_port(["127.0.0.1"])
    log = tmp_path / "run.log"
    p = start_run(tmp_path / "var", port, dns, mx_port, log, workers=2)
    gauge = Gauge(sinks)
    try:
        rcpts = [f"u{i}@d{i % 10}.test" for i in range(1000)]
        started = time.monotonic()
        assert len(send_all(port, rcpts)) == 1000
        # a failure bound a quarter of the serial 8 minutes: only a design without concurrency reaches it
        arrived = wait_for(lambda: sum(len(s.messages) for s in sinks) >= 1000, 2 * GENEROUS, interval=0.1)
        took = time.monotonic() - started
        gauge.stop()
        assert arrived, log.read_text()[-3000:]
        assert gauge.peak >= 50, f"at most {gauge.peak} connections at once"
        record_property("messages_per_second", round(1000 / took, 1))
        print(f"slow destinations: 1,000 messages in {took:.1f} s, {1000 / took:.0f}/s, peak {gauge.peak} conn")
        got = sorted(r for s in sinks for r in s.recipients())
        assert got == sorted(rcpts)  # each once
    finally:
        gauge.stop()
        stop(p, log)
        for s in sinks:
            s.stop()


@pytest.mark.slow
def test_destination_concurrency_is_shared_by_every_worker(
    dns: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA]
) -> None:
    """Two worker processes, destination_concurrency=5, a sink that waits 0.3 s per DATA: the sink
    never sees more than 5 connections at once, does see 4 or 5, and connections are reused."""
    route(dns, "slow.test", "127.0.0.2")
    box = sinks("127.0.0.2")
    box.data_delay = 0.3
    mta = mta_factory(destination_concurrency=5, job_max_messages=5, log_level="INFO")
    mta.start_ingress()
    mta.start_worker(2)
    rcpts = [f"u{i}@slow.test" for i in range(120)]
    assert len(send_all(mta.port, rcpts, sessions=10)) == 120
    assert wait_for(lambda: len(box.messages) >= 120, 120, interval=0.1), mta.logs()[-3000:]
    assert sorted(box.recipients()) == sorted(rcpts)
    assert box.max_open <= 5, box.max_open
    assert box.max_open >= 4, box.max_open
    assert box.connections < len(rcpts) / 2, box.connections


@pytest.mark.slow
def test_slow_start_grows_as_connections_are_greeted_not_as_messages_get_through(
    dns: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA]
) -> None:
    """A destination that takes 3 s over each message: more than the first 5 connections (the
    initial window) are open before any message is through. Slow start counted deliveries only,
    and such a server held the window at 5 until its first answers (worker/limits.py)."""
    route(dns, "slowstart.test", "127.0.0.2")
    box = sinks("127.0.0.2")
    box.data_delay = 3.0
    mta = mta_factory(destination_concurrency=20, log_level="INFO")
    mta.start_ingress()
    mta.start_worker(1)
    rcpts = [f"u{i}@slowstart.test" for i in range(40)]
    assert len(send_all(mta.port, rcpts, sessions=10)) == 40
    # True only while nothing has arrived: once a message is through, it can never become so
    assert wait_for(lambda: box.max_open >= 10 and not box.messages, GENEROUS, interval=0.02), (
        f"{box.max_open} connections at most, {len(box.messages)} messages through\n" + mta.logs()[-3000:]
    )
    assert wait_for(lambda: len(box.messages) >= 40, 2 * GENEROUS, interval=0.1), mta.logs()[-3000:]
    assert sorted(box.recipients()) == sorted(rcpts)
    assert box.max_open <= 20


def test_a_dead_destination_is_suspended_not_hammered(
    dns: ZoneServer, mta_factory: Callable[..., MTA], mx_port: int
) -> None:
    """Nothing listens at the MX: after destination_failure_limit failed connections the destination
    is marked down and its jobs wait in RQ's scheduler; the log says so."""
    route(dns, "dead.test", "127.0.0.3")  # no sink there: connection refused
    mta = mta_factory(destination_failure_limit=3, destination_retry_time=600, job_max_messages=1)
    mta.start_ingress()
    mta.start_worker(2)
    for i in range(6):
        mta.send("alice@client.test", [f"u{i}@dead.test"], message(f"dead{i}"))
    assert wait_for(lambda: "3 connection failures in a row: delivery suspended for 600s" in mta.logs(), GENEROUS), (
        mta.logs()[-3000:]
    )
    assert mta.redis.exists("mtaq:dest:dead.test:down")
    # the first wave's jobs have all ended (tried, or put off to the scheduler): no guessed sleep
    eventually(lambda: (c := mta.queue.counts()).waiting == 0 and c.running == 0, "the first wave's jobs ended")
    tried = mta.logs().count("INFO connect to mx.dead.test[127.0.0.3]")
    for i in range(6, 12):
        mta.send("alice@client.test", [f"u{i}@dead.test"], message(f"dead{i}"))
    assert wait_for(lambda: mta.logs().count("delivery temporarily suspended") >= 6, GENEROUS), mta.logs()[-3000:]
    assert mta.logs().count("INFO connect to mx.dead.test[127.0.0.3]") == tried  # the second wave was not tried
