"""The shared test fixtures, a pytest plugin (tests/conftest.py names it in ``pytest_plugins``): a
real redis-server, a real DNS server on loopback, aiosmtpd sinks on 127.0.0.x as remote MX hosts,
and mtaq's own ingress and worker as real processes. Tests import the helpers from here, never
from a conftest."""

from __future__ import annotations

import os
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from common.jobqueue import DeliveryQueue
from common.store import Store
from mtaq.runtime.supervise import stop_processes
from tests.dnsserver import ZoneServer
from tests.integration.eventually import GENEROUS
from tests.redisserver import RedisServer
from tests.sinks import SinkServer, free_port

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


def wait_port(host: str, port: int, timeout: float = GENEROUS) -> None:
    """Wait for a listener (a process starting on a loaded machine can take long; only failure waits it all)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port}")


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

    def start_worker(self, n: int = 1) -> None:
        for i in range(n):
            self._spawn(f"worker{i}", "worker")

    def stop(self, name: str) -> None:
        p = self.procs.pop(name, None)
        if p is not None:
            stop_processes([p], 15)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

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
    for m in made:
        m.stop_all()


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z"


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
