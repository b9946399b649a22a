"""The webhook sender (worker/webhook.py) on fakeredis with a recording poster and a fake clock:
order, signature, acknowledgement after 2xx only, backoff, the lease and its take-over."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from common.events import Event, EventType, signature_ok
from common.settings import Settings
from common.store import EVENTS, EVENTS_GROUP, EVENTS_SENDER_LOCK, Store
from worker.webhook import MAX_BACKOFF, SecretError, WebhookSender, check_settings, read_secret

KEY = b"s3cret"


class Receiver:
    def __init__(self) -> None:
        self.status = 200
        self.down = False
        self.bodies: list[bytes] = []
        self.ids: list[str] = []

    def __call__(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        if self.down:
            raise ConnectionRefusedError(111, "Connection refused")
        assert signature_ok(KEY, body, headers["X-Mtaq-Signature"])
        assert headers["Content-Type"] == "application/json"
        self.bodies.append(body)
        if 200 <= self.status < 300:
            self.ids += [e["id"] for e in json.loads(body)]
        return self.status


class Clock:
    t = 100.0

    def __call__(self) -> float:
        return self.t


def write(r: fakeredis.FakeRedis, n: int, start: int = 0) -> list[str]:
    store = Store(r, events_max=1000)
    pipe = r.pipeline()
    evs = [
        Event(id=f"e{i}", type=EventType.DELIVERY, time=float(i), recipient=f"r{i}@x.test")
        for i in range(start, start + n)
    ]
    for ev in evs:
        store.stage_events(pipe, [ev])  # an entry each (a write of several is one entry: below)
    pipe.execute()
    return [e.id for e in evs]


def sender(r: fakeredis.FakeRedis, rec: Receiver, clock: Clock, batch: int = 3, token: str = "a") -> WebhookSender:
    return WebhookSender(r, "http://127.0.0.1:1/hook", KEY, batch=batch, post=rec, clock=clock, token=token)


def test_batches_in_order_signed_and_acknowledged() -> None:
    r, rec, clock = fakeredis.FakeRedis(), Receiver(), Clock()
    ids = write(r, 7)
    s = sender(r, rec, clock)
    while s.step(block=None):
        pass
    assert rec.ids == ids and [len(json.loads(b)) for b in rec.bodies] == [3, 3, 1]
    pending: Any = r.xpending(EVENTS, EVENTS_GROUP)
    assert pending["pending"] == 0
    assert not s.step(block=None)  # nothing new: nothing sent
    assert len(rec.bodies) == 3


def test_a_receiver_down_or_failing_gets_the_same_batch_later_with_backoff() -> None:
    r, rec, clock = fakeredis.FakeRedis(), Receiver(), Clock()
    ids = write(r, 4)
    s = sender(r, rec, clock)
    rec.down = True
    assert not s.step(block=None)
    assert s.backoff == 1.0 and not s.step(block=None)  # within the backoff: not even tried
    clock.t += 1.0
    rec.down = False
    rec.status = 503
    assert not s.step(block=None)
    assert s.backoff == 2.0
    clock.t += 2.0
    write(r, 2, start=4)  # newer events wait behind the pending ones
    rec.status = 204
    while s.step(block=None):
        pass
    assert rec.ids == [*ids, "e4", "e5"]
    assert s.backoff == 0.0


def test_backoff_is_capped() -> None:
    r, rec, clock = fakeredis.FakeRedis(), Receiver(), Clock()
    write(r, 1)
    s = sender(r, rec, clock)
    rec.down = True
    for _ in range(12):
        s.step(block=None)
        clock.t += s.backoff
    assert s.backoff == MAX_BACKOFF


def test_one_holder_and_a_take_over_that_resends_what_was_not_acknowledged() -> None:
    r, rec, clock = fakeredis.FakeRedis(), Receiver(), Clock()
    ids = write(r, 3)
    a, b = sender(r, rec, clock, token="a"), sender(r, rec, clock, token="b")
    assert a.hold() and not b.hold() and a.hold()
    rec.status = 500
    a.step(block=None)  # read, posted, refused: pending in the group
    r.delete(EVENTS_SENDER_LOCK)  # a dies: its lease lapses
    assert b.hold()
    rec.status = 200
    assert b.step(block=None)
    assert rec.ids == ids
    b.release()
    assert r.get(EVENTS_SENDER_LOCK) is None


def test_an_entry_of_many_events_goes_in_posts_of_batch_events_and_is_acknowledged_once() -> None:
    r, rec, clock = fakeredis.FakeRedis(), Receiver(), Clock()
    store = Store(r, events_max=1000)
    evs = [Event(id=f"e{i}", type=EventType.RECEPTION, time=1.0, recipient=f"r{i}@x.test") for i in range(7)]
    with r.pipeline() as pipe:
        store.stage_events(pipe, evs)  # one group commit's receptions: one entry
        pipe.execute()
    assert r.xlen(EVENTS) == 1
    s = sender(r, rec, clock)
    rec.status = 500
    assert not s.step(block=None)  # the first POST fails: nothing acknowledged
    rec.status = 200
    clock.t += s.backoff
    assert s.step(block=None)
    assert rec.ids == [e.id for e in evs] and [len(json.loads(b)) for b in rec.bodies[1:]] == [3, 3, 1]
    pending: Any = r.xpending(EVENTS, EVENTS_GROUP)
    assert pending["pending"] == 0


def test_a_round_that_loses_the_lease_between_posts_stops_and_acknowledges_nothing() -> None:
    r, clock = fakeredis.FakeRedis(), Clock()
    store = Store(r, events_max=1000)
    evs = [Event(id=f"e{i}", type=EventType.RECEPTION, time=1.0, recipient=f"r{i}@x.test") for i in range(7)]
    with r.pipeline() as pipe:
        store.stage_events(pipe, evs)
        pipe.execute()

    class Slow(Receiver):
        def __call__(self, url: str, body: bytes, headers: dict[str, str]) -> int:
            status = super().__call__(url, body, headers)
            r.set(EVENTS_SENDER_LOCK, "another-sender")  # this POST took longer than the lease
            return status

    rec = Slow()
    s = sender(r, rec, clock)
    assert s.hold()
    assert not s.step(block=None)
    assert rec.ids == ["e0", "e1", "e2"]  # one POST, then it saw the lease gone
    pending: Any = r.xpending(EVENTS, EVENTS_GROUP)
    assert pending["pending"] == 1  # the new holder sends the entry (again: the ids tell)


def test_trimmed_pending_entries_are_acknowledged_and_skipped() -> None:
    r, rec, clock = fakeredis.FakeRedis(), Receiver(), Clock()
    write(r, 2)
    s = sender(r, rec, clock)
    rec.status = 500
    s.step(block=None)
    first = s.read(None)[0][0]
    r.xdel(EVENTS, first)  # gone from the stream (MAXLEN) while pending
    rec.status = 200
    clock.t += s.backoff
    assert s.step(block=None)
    assert rec.ids == ["e1"]


def test_secret_file(tmp_path: Path) -> None:
    f = tmp_path / "secret"
    f.write_bytes(b"  k3y\n")
    assert read_secret(str(f)) == b"k3y"
    f.write_bytes(b"\n")
    with pytest.raises(SecretError, match="is empty"):
        read_secret(str(f))
    with pytest.raises(SecretError, match="No such file"):
        read_secret(str(tmp_path / "none"))


def test_a_webhook_without_a_readable_secret_is_one_line_at_start(tmp_path: Path) -> None:
    check_settings(Settings())  # no webhook: nothing to check
    with pytest.raises(SecretError, match="needs events_webhook_secret_file"):
        check_settings(Settings(events_webhook="http://127.0.0.1:9/"))
    with pytest.raises(SecretError, match="No such file"):
        check_settings(Settings(events_webhook="http://127.0.0.1:9/", events_webhook_secret_file=str(tmp_path / "x")))
    with pytest.raises(ValueError, match="http"):
        Settings(events_webhook="ftp://example.test/")
