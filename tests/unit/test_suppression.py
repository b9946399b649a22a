"""The suppression list (common/suppression.py) and its copy in each ingress, on fakeredis with Lua;
the RCPT gate's reply and event (ingress/suppression.py)."""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest

from common.events import Event, EventType
from common.store import SUPPRESSED, SUPPRESSED_CHANGES, SUPPRESSED_SINCE
from common.suppression import SuppressionCache, SuppressionList, stage_add
from ingress.suppression import SuppressionGate, suppressed_reply

DAY = 86400.0


class Clock:
    def __init__(self, t: float = 1_765_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def test_add_list_remove_and_expiry(r: fakeredis.FakeRedis) -> None:
    clock = Clock()
    sl = SuppressionList(r, clock)
    assert sl.add(["Bob@Example.COM", "<amy@x.test>"], 10 * DAY) == 2
    assert [e.address for e in sl.entries()] == ["amy@x.test", "bob@example.com"]
    found = sl.lookup("BOB@example.com")
    assert found is not None and found.since == clock.t and found.until == clock.t + 10 * DAY
    assert sl.remove(["bob@example.com", "nobody@x.test"]) == 1
    assert sl.remove(["bob@example.com"]) == 0
    clock.t += 11 * DAY
    assert sl.entries() == [] and sl.lookup("amy@x.test") is None
    sl.add(["new@x.test"], DAY)  # any change prunes what has expired
    assert r.zcard(SUPPRESSED) == 1 and r.hlen(SUPPRESSED_SINCE) == 1


def test_stage_add_goes_in_the_callers_pipeline(r: fakeredis.FakeRedis) -> None:
    pipe = r.pipeline(transaction=False)
    pipe.ping()
    stage_add(pipe, ["a@x.test"], 100.0, 50.0)
    stage_add(pipe, ["b@x.test"], 100.0, 0.0)  # ttl 0: suppression off
    pipe.execute()
    assert r.zrange(SUPPRESSED, 0, -1, withscores=True) == [(b"a@x.test", 150.0)]


def test_cache_follows_changes_without_reloading(r: fakeredis.FakeRedis) -> None:
    clock = Clock()
    sl = SuppressionList(r, clock)
    sl.add(["a@x.test"], DAY)
    cache = SuppressionCache(r, clock)
    cache.refresh()  # the first: a whole load
    assert cache.check("A@x.test") is not None and cache.check("b@x.test") is None
    sl.add(["b@x.test"], DAY)
    sl.remove(["a@x.test"])
    r.delete(SUPPRESSED)  # were it to reload, it would find nothing: it must apply the changes instead
    cache.refresh()
    assert cache.check("a@x.test") is None and cache.check("b@x.test") is not None
    clock.t += 2 * DAY
    assert cache.check("b@x.test") is None  # expired in the copy without a word from Redis


def test_a_current_cache_asks_redis_one_command_a_refresh(
    r: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    sl = SuppressionList(r, clock)
    sl.add(["a@x.test"], DAY)
    cache = SuppressionCache(r, clock)
    cache.refresh()
    sent: list[object] = []
    send: Any = r.execute_command

    def counted(*args: Any, **kw: Any) -> Any:
        sent.append(args[0])
        return send(*args, **kw)

    monkeypatch.setattr(r, "execute_command", counted)
    cache.refresh()
    sl.add(["b@x.test"], DAY)
    n = len(sent)
    cache.refresh()
    assert sent[:1] == ["XRANGE"] and sent[n:] == ["XRANGE"] and cache.check("b@x.test") is not None


def test_cache_reloads_when_the_changes_it_needs_were_trimmed(r: fakeredis.FakeRedis) -> None:
    clock = Clock()
    sl = SuppressionList(r, clock)
    sl.add(["a@x.test"], DAY)
    cache = SuppressionCache(r, clock)
    cache.refresh()
    sl.add(["b@x.test"], DAY)
    sl.add(["c@x.test"], DAY)
    changes: Any = r.xrange(SUPPRESSED_CHANGES)
    first = changes[-1][0]
    r.xtrim(SUPPRESSED_CHANGES, minid=first)  # the changes after a@ are partly gone
    cache.refresh()
    assert {a for a in ("a@x.test", "b@x.test", "c@x.test") if cache.check(a)} == {"a@x.test", "b@x.test", "c@x.test"}


def test_gate_refuses_with_the_date_and_reports_an_event(r: fakeredis.FakeRedis) -> None:
    clock = Clock(1_765_000_000.0)  # 2025-12-06
    SuppressionList(r, clock).add(["gone@x.test"], DAY)
    cache = SuppressionCache(r, clock)
    cache.refresh()
    seen: list[Event] = []
    gate = SuppressionGate(cache, seen.append, clock)
    assert gate.check("app@client.test", "ok@x.test") is None
    reply = gate.check("app@client.test", "Gone@x.test")
    assert reply is not None and (reply.code, reply.enhanced) == (550, "5.1.1")
    assert reply.text == "<Gone@x.test>: recipient suppressed after a hard bounce on 2025-12-06"
    [ev] = seen
    assert ev.type is EventType.SUPPRESSED and ev.recipient == "Gone@x.test" and ev.sender == "app@client.test"
    assert ev.reply.startswith("550 5.1.1 <Gone@x.test>")


def test_a_non_ascii_address_is_not_echoed() -> None:
    assert suppressed_reply("jörg@x.test", 0.0).text.startswith("recipient: ")
