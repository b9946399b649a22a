"""What delivery events and the suppression list cost on the paths they touch (issue 19), against a
real redis-server configured as production (AOF, appendfsync always), on a unix socket as `mtaq run`:

- the ingress group commit (``Spool.commit``) of B messages with and without their reception
  events (one XADD per recipient in the same MULTI/EXEC);
- the worker's outcome write (``Store.set_status_list``) with and without the event the Lua script
  appends;
- the RCPT suppression check: the ingress's copy in memory (``SuppressionCache.check``) beside what a
  lookup in Redis per RCPT would cost (one ZSCORE round trip).

Rounds alternate (with, without, with, ...) so a slower moment of the shared machine hits both
sides. Reported per side: the median wall time of one write, and the CPU it cost (this process's
and redis-server's, from INFO, averaged over the rounds): the fsync of ``appendfsync always`` makes
wall times vary far more than events change them, CPU shows what events add. Bounded:
``--rounds`` (default 300) per case.

    .venv/bin/python -m bench.events_cost [--rounds N] [--appendfsync always|everysec]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from common.envelope import Envelope, RcptState, Recipient, RecipientStatus, new_queue_id
from common.events import message_id_of, outcome_event, receptions
from common.jobqueue import DeliveryQueue
from common.routing import Router
from common.spool import Spool
from common.store import Message, Store
from common.suppression import SuppressionCache, SuppressionList
from mtaq.runtime.embedded import RedisProcess

BODY = b"From: <a@client.test>\r\nTo: <b@a.test>\r\nMessage-ID: <x@client.test>\r\nSubject: bench\r\n\r\n" + (
    b"x" * 1000 + b"\r\n"
)


def _spool(r: redis.Redis, events: bool) -> Spool:
    return Spool(Store(r, events_max=1_000_000 if events else 0), DeliveryQueue(r, "bench"), Router())


def _batch(n: int) -> list[Message]:
    return [Message(Envelope(new_queue_id(), "a@client.test", [Recipient("b@a.test")]), BODY) for _ in range(n)]


def _median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def _redis_cpu(r: redis.Redis) -> float:
    info: Any = r.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


@dataclass
class Side:
    wall: list[float] = field(default_factory=list)
    cpu: float = 0.0  # seconds, this process
    redis_cpu: float = 0.0  # seconds, redis-server

    def row(self, per: int) -> tuple[float, float, float]:
        """(median wall µs, client CPU µs per write, Redis CPU µs per write)"""
        n = max(1, len(self.wall))
        return _median_us(self.wall), self.cpu / n * 1e6, self.redis_cpu / n * 1e6


def _alternate(r: redis.Redis, rounds: int, prepare: Callable[[bool], Callable[[], object]]) -> dict[bool, Side]:
    """Run ``prepare(on)()`` 2 x rounds times, alternating; time and account each run."""
    sides = {False: Side(), True: Side()}
    for n in range(rounds * 2):
        on = n % 2 == 1
        run = prepare(on)
        rc = _redis_cpu(r)
        c = time.process_time()
        t = time.perf_counter()
        run()
        sides[on].wall.append(time.perf_counter() - t)
        sides[on].cpu += time.process_time() - c
        sides[on].redis_cpu += _redis_cpu(r) - rc
    r.flushall()
    return sides


def commit_cost(r: redis.Redis, batch: int, rounds: int) -> dict[bool, Side]:
    """One group commit of ``batch`` messages, without and with their reception events."""
    spools = {False: _spool(r, False), True: _spool(r, True)}

    def prepare(on: bool) -> Callable[[], object]:
        msgs = _batch(batch)
        if not on:
            return lambda: spools[on].commit(msgs)
        # as the ingress does it: the events built in the committing thread
        return lambda: spools[on].commit(msgs, events=receptions(((m.envelope, m.body) for m in msgs), time.time()))

    return _alternate(r, rounds, prepare)


def outcome_cost(r: redis.Redis, batch: int, rounds: int) -> dict[bool, Side]:
    """One outcome write of ``batch`` final recipients, without and with their events."""
    st = RecipientStatus(RcptState.DELIVERED, 1, "2.0.0", "250 2.0.0 Ok: queued", "mx[127.0.0.2]:25", updated=1.0)

    def prepare(on: bool) -> Callable[[], object]:
        store = Store(r, events_max=1_000_000 if on else 0)
        msgs = _batch(batch)
        store.commit(msgs)
        entries = [(m.envelope.id, 0, st) for m in msgs]

        def run() -> object:  # as worker/feedback.py does it: events built beside the write
            events = [outcome_event(m.envelope, 0, st, message_id_of(m.body)) for m in msgs] if on else []
            return store.set_status_list(entries, events=events)

        return run

    return _alternate(r, rounds, prepare)


def rcpt_cost(r: redis.Redis, listed: int, rounds: int) -> tuple[float, float]:
    """Median µs of one RCPT lookup: (the ingress's copy in memory, a ZSCORE round trip)."""
    SuppressionList(r).add((f"user{i}@a.test" for i in range(listed)), 86400.0)
    cache = SuppressionCache(r)
    cache.refresh()
    assert len(cache) == listed
    local: list[float] = []
    remote: list[float] = []
    probe: Callable[[int], str] = lambda i: f"user{(i * 7919) % (listed * 2)}@a.test"  # noqa: E731
    for i in range(rounds):
        addr = probe(i)
        t = time.perf_counter()
        cache.check(addr)
        local.append(time.perf_counter() - t)
        t = time.perf_counter()
        r.zscore("mtaq:suppressed", addr)
        remote.append(time.perf_counter() - t)
    r.flushall()
    return _median_us(local), _median_us(remote)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=300, help="samples per case and side (default 300)")
    ap.add_argument("--appendfsync", choices=("always", "everysec"), default="always")
    args = ap.parse_args(argv)
    rounds = max(3, min(args.rounds, 10_000))
    with tempfile.TemporaryDirectory(prefix="mtaq-bench-events-") as d:
        rp = RedisProcess(d, unixsocket=str(Path(d) / "redis.sock"), appendfsync=args.appendfsync)
        rp.start()
        try:
            r = rp.client()
            print(f"redis-server, appendfsync {args.appendfsync}, unix socket; {rounds} rounds per case and side")
            print(f"{'':<38} {'median wall µs':>17} {'client CPU µs':>17} {'Redis CPU µs':>17}")
            print(f"{'per write':<38} {'without':>8} {'with':>8} {'without':>8} {'with':>8} {'without':>8} {'with':>8}")
            cases = [(f"ingress group commit, {b} msg(s)", commit_cost, b) for b in (1, 20, 100)]
            cases += [(f"worker outcome write, {b} rcpt(s)", outcome_cost, b) for b in (1, 20)]
            for label, fn, b in cases:
                sides = fn(r, b, rounds)
                (w0, c0, r0), (w1, c1, r1) = sides[False].row(b), sides[True].row(b)
                print(f"{label:<38} {w0:>8.0f} {w1:>8.0f} {c0:>8.0f} {c1:>8.0f} {r0:>8.0f} {r1:>8.0f}")
            local, remote = rcpt_cost(r, 10_000, rounds)
            print(f"RCPT lookup, 10,000 listed: the ingress's copy {local:.2f} µs, a ZSCORE round trip {remote:.0f} µs")
        finally:
            rp.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
