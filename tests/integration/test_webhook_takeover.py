"""The webhook sender as its own role (`mtaq events`), two of them against one real redis-server:
one sends (the lease), and when it is killed the other takes over within the lease's time and
sends what came since; every event arrives, signed, in stream order."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from common.events import Event, EventType
from common.store import EVENTS_SENDER_LOCK, Store
from mtaq.runtime.supervise import stop_processes
from tests.fixtures import ROOT
from tests.integration.test_events_live import SECRET, Receiver
from tests.ports import free_port
from tests.redisserver import RedisServer
from tests.sinks import wait_for
from worker.webhook import LEASE_TTL


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver(free_port(["127.0.0.1"]))
    rec.start()
    yield rec
    rec.stop()


def _write(r: redis.Redis, ids: list[str]) -> None:
    store = Store(r, events_max=1000)
    pipe = r.pipeline()
    store.stage_events(pipe, [Event(id=i, type=EventType.DELIVERY, time=1.0, recipient=f"{i}@x.test") for i in ids])
    pipe.execute()


def test_a_second_sender_takes_over_when_the_first_dies(
    redis_server: RedisServer, receiver: Receiver, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    env = dict(
        os.environ,
        MTAQ_REDIS_URL=redis_server.url,
        MTAQ_EVENTS_WEBHOOK=f"http://127.0.0.1:{receiver.port}/hook",
        MTAQ_EVENTS_WEBHOOK_SECRET_FILE=str(secret),
        MTAQ_EVENTS_BATCH="5",
    )
    r = redis.Redis.from_url(redis_server.url)
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
        p = subprocess.Popen([sys.executable, "-m", "mtaq", "events"], env=env, cwd=ROOT, stdout=log, stderr=log)
        procs.append(p)
        return p

    def logs() -> str:
        return "\n".join(f.read_text() for f in sorted(tmp_path.glob("*.log")))

    try:
        first = start("first")
        _write(r, [f"a{i}" for i in range(12)])
        assert wait_for(lambda: len(receiver.events()) == 12, 20), logs()
        holder = r.get(EVENTS_SENDER_LOCK)
        start("second")
        assert wait_for(lambda: "held elsewhere" in logs(), 20), logs()
        assert r.get(EVENTS_SENDER_LOCK) == holder  # the first still sends
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        _write(r, [f"b{i}" for i in range(7)])
        # the dead holder's lease lapses (LEASE_TTL), the second takes it and sends what waited
        assert wait_for(lambda: len(receiver.events()) >= 19, LEASE_TTL + 20), logs()
        assert r.get(EVENTS_SENDER_LOCK) not in (None, holder)
        assert "taken over by this process" in (tmp_path / "second.log").read_text()
        ids = [e["id"] for e in receiver.events()]
        assert ids == [f"a{i}" for i in range(12)] + [f"b{i}" for i in range(7)]
        assert all(ok for _, ok in receiver.posts)
        assert max(len(json.loads(b)) for b, _ in receiver.posts) <= 5  # events_batch
    finally:
        stop_processes(procs, 10)
