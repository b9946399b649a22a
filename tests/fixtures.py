"""The shared test fixtures, a pytest plugin (tests/conftest.py names it in ``pytest_plugins``): a
real redis-server, a real DNS server on loopback, aiosmtpd sinks on 127.0.0.x as remote MX hosts,
and mtaq's own ingress and worker as real processes. Tests import the helpers from here, never
from a conftest."""

from __future__ import annotations

import os
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Worker

from common.jobqueue import DeliveryQueue
from common.store import Store
from mtaq.runtime.supervise import stop_processes
from tests.dnsserver import ZoneServer
from tests.integration.eventually import GENEROUS
from tests.ports import free_port, wait_port
from tests.redisserver import RedisServer
from tests.sinks import SinkServer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def dns() -> Iterator[ZoneServer]:
    with ZoneServer() as server:
        yield server


@pytest.fixture
def sender_zone(dns: ZoneServer) -> ZoneServer:
    """The DNS server with the sender's domain, client.test, whose MX (127.0.0.9) receives the reports."""
    route(dns, "client.test", "127.0.0.9")
    return dns


@pytest.fixture
def zone(sender_zone: ZoneServer) -> ZoneServer:
    """The zone most delivery tests share: ``sender_zone`` and a.test, whose MX is at 127.0.0.2."""
    route(sender_zone, "a.test", "127.0.0.2")
    return sender_zone


@pytest.fixture
def mx_port() -> int:
    """One port for every sink: the worker delivers to one smtp_port, on many 127.0.0.x hosts."""
    return free_port()


@pytest.fixture
def sinks(mx_port: int) -> Iterator[Callable[..., SinkServer]]:
    started: list[SinkServer] = []

    def make(host: str, **kw: Any) -> SinkServer:
        s = SinkServer(host, mx_port, **kw)
        s.start()
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


class MTA:
    """mtaq's ingress and worker(s) as subprocesses, configured through MTAQ_* variables."""

    def __init__(self, redis_url: str, dns_port: int, mx_port: int, log_dir: Path, **settings: Any) -> None:
        self.port = free_port()
        self.env = dict(os.environ)
        base = {
            "listen": f"127.0.0.1:{self.port}",
            "hostname": "mtaq.test",
            "redis_url": redis_url,
            "dns_servers": f"127.0.0.1:{dns_port}",
            "smtp_port": str(mx_port),
            "processes": "1",
            "connect_timeout": "2",
            "smtp_timeout": "10",
            "log_level": "DEBUG",
            # many tests queue mail with no worker running: mail input flow control would hold
            # each MAIL in_flow_delay there (tests/integration/test_ingress_live_flow.py turns it on)
            "in_flow_delay": "0",
            # the workers' outcome journals (worker/journal.py) in this test's directory, not the
            # checkout's var/ that every test's workers would share
            "data_dir": str(log_dir / "var"),
        }
        base.update({k: str(v) for k, v in settings.items()})
        for k, v in base.items():
            self.env[f"MTAQ_{k.upper()}"] = v
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.redis = redis.Redis.from_url(redis_url)
        self.store = Store(self.redis)
        self.queue = DeliveryQueue(self.redis)

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
        p = subprocess.Popen(
            [sys.executable, "-m", "mtaq", *args], env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        self.procs[name] = p
        return p

    def start_ingress(self) -> None:
        self._spawn("ingress", "ingress")
        wait_port("127.0.0.1", self.port)

    def start_worker(self, n: int = 1, *, ready: bool = True) -> None:
        """Start ``n`` workers and (``ready``) wait until each has registered with RQ on our queue:
        past its imports and Redis connection, about to take jobs. A test's own waits then measure
        delivery, never a cold start on a loaded machine."""
        started = [self._spawn(f"worker{i}", "worker") for i in range(n)]
        if not ready:
            return
        deadline = time.monotonic() + GENEROUS
        while not {p.pid for p in started} <= self.worker_pids():
            for p in started:
                assert p.poll() is None, f"worker pid {p.pid} exited with {p.returncode}:\n{self.logs()}"
            assert time.monotonic() < deadline, f"workers not registered within {GENEROUS:.0f} s:\n{self.logs()}"
            time.sleep(0.05)

    def worker_pids(self) -> set[int]:
        """The pids of the RQ workers registered on this MTA's queue."""
        return {w.pid for w in Worker.all(connection=self.redis, queue=self.queue.rq) if w.pid is not None}

    def stop(self, name: str) -> None:
        p = self.procs.pop(name, None)
        if p is not None:
            stop_processes([p], 15)

    def stop_all(self) -> None:
        """SIGTERM to every process at once and wait for all together: an idle worker sees a stop
        request only when its dequeue wait ends (seconds), so stopping them one by one added those up."""
        procs = list(self.procs.values())
        self.procs.clear()
        stop_processes(procs, 15)

    def logs(self) -> str:
        return "\n".join(f"== {f.name}\n{f.read_text(errors='replace')}" for f in sorted(self.log_dir.glob("*.log")))

    def smtp(self) -> smtplib.SMTP:
        s = smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test", timeout=GENEROUS)
        return s

    def send(self, sender: str, rcpts: list[str], body: bytes | str) -> str:
        """Send one message; returns the queue id from the 250 reply."""
        with self.smtp() as s:
            s.ehlo()
            code, resp = s.mail(sender)
            assert code == 250, (code, resp)
            for r in rcpts:
                code, resp = s.rcpt(r)
                assert code == 250, (r, code, resp)
            code, resp = s.data(body)
            assert code == 250, (code, resp)
            return resp.decode().rsplit(" ", 1)[-1]


@pytest.fixture
def mta_factory(
    redis_server: RedisServer, dns: ZoneServer, mx_port: int, tmp_path: Path
) -> Iterator[Callable[..., MTA]]:
    made: list[MTA] = []

    def make(**settings: Any) -> MTA:
        d = tmp_path / f"mta{len(made)}"
        d.mkdir()
        m = MTA(redis_server.url, dns.port, mx_port, d, **settings)
        made.append(m)
        return m

    yield make
    stop_mtas(made)


# Teardown stops run on in threads of their own while the next test starts: an idle worker ends
# only when its dequeue wait does (seconds), and no test needs to wait for that. The session's end
# joins them all, so no process outlives the run.
_stopping: list[threading.Thread] = []


def stop_mtas(mtas: list[MTA]) -> None:
    """Stop every process of every MTA, all at once (see MTA.stop_all), in the background."""
    procs = [p for m in mtas for p in m.procs.values()]
    for m in mtas:
        m.procs.clear()
    if procs:
        t = threading.Thread(target=stop_processes, args=(procs, 15), name="mta-teardown", daemon=True)
        t.start()
        _stopping.append(t)


@pytest.fixture(scope="session", autouse=True)
def _join_teardown_stops() -> Iterator[None]:
    yield
    for t in _stopping:
        t.join()


def route(zone: ZoneServer, domain: str, ip: str) -> None:
    """``domain`` has one MX, ``mx.<domain>``, at ``ip``."""
    zone.add(f"{domain}.", "MX", f"10 mx.{domain}.")
    zone.add(f"mx.{domain}.", "A", ip)


def message(
    subject: str = "test", body: str = "hello\r\n", sender: str = "alice@client.test", to: str = "bob@a.test"
) -> bytes:
    return (
        f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nMessage-ID: <{subject}@client.test>\r\n\r\n{body}"
    ).encode()


# -- one MTA for a whole module, where its tests share the settings --------------------------------


@pytest.fixture(scope="module")
def module_mta_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., MTA]]:
    """``mta_factory`` for a module: its own redis-server and DNS server, MTAs that live until the
    module's last test. A test using one starts from an empty Redis through ``fresh``."""
    base = tmp_path_factory.mktemp("module-mta")
    made: list[MTA] = []
    with RedisServer(base / "redis") as redis_server, ZoneServer() as zone:
        mx_port = free_port()

        def make(**settings: Any) -> MTA:
            d = base / f"mta{len(made)}"
            d.mkdir()
            m = MTA(redis_server.url, zone.port, mx_port, d, **settings)
            made.append(m)
            return m

        try:
            yield make
        finally:
            stop_mtas(made)


def fresh(mta: MTA) -> MTA:
    """A module's shared MTA with an empty Redis (queue, counters), for the next test."""
    mta.redis.flushdb()
    return mta
