"""What delivery events and the suppression list cost on the paths they touch (issue 19), against a
real redis-server configured as production (AOF, appendfsync always), on a unix socket as `mtaq run`:

- the ingress group commit (``Spool.commit``) of B messages with and without their reception
  events (one XADD per recipient in the same MULTI/EXEC);
- the worker's outcome write (``Store.set_status_list``) with and without the event the Lua script
  appends;
- the RCPT suppression check: the ingress's copy in memory (``SuppressionCache.check``) beside what a
  lookup in Redis per RCPT would cost (one ZSCORE round trip).

Rounds alternate (with, without, with, ...) so a slower moment of the shared machine hits both
sides; medians are reported. Bounded: ``--rounds`` (default 300) per case.

    .venv/bin/python -m bench.events_cost [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

from common.embedded import RedisProcess
from common.envelope import Envelope, RcptState, Recipient, RecipientStatus, new_queue_id
from common.events import message_id_of, outcome_event, receptions
from common.jobqueue import DeliveryQueue
from common.routing import Router
from common.spool import Spool
from common.store import Message, Store
from common.suppression import SuppressionCache, SuppressionList

BODY = b"From: <a@client.test>\r\nTo: <b@a.test>\r\nMessage-ID: <x@client.test>\r\nSubject: bench\r\n\r\n" + (
    b"x" * 1000 + b"\r\n"
)


def _spool(r: redis.Redis, events: bool) -> Spool:
    return Spool(Store(r, events_max=1_000_000 if events else 0), DeliveryQueue(r, "bench"), Router())


def _batch(n: int) -> list[Message]:
    return [Message(Envelope(new_queue_id(), "a@client.test", [Recipient("b@a.test")]), BODY) for _ in range(n)]


def _median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def commit_cost(r: redis.Redis, batch: int, rounds: int) -> tuple[float, float]:
    """Median µs per group commit of ``batch`` messages: (without events, with events)."""
    spools = {False: _spool(r, False), True: _spool(r, True)}
    times: dict[bool, list[float]] = {False: [], True: []}
    for n in range(rounds * 2):
        on = n % 2 == 1
        msgs = _batch(batch)
        t = time.perf_counter()
        if on:  # as the ingress does it: the events built in the committing thread
            spools[on].commit(msgs, events=receptions(((m.envelope, m.body) for m in msgs), time.time()))
        else:
            spools[on].commit(msgs)
        times[on].append(time.perf_counter() - t)
    r.flushall()
    return _median_us(times[False]), _median_us(times[True])


def outcome_cost(r: redis.Redis, batch: int, rounds: int) -> tuple[float, float]:
    """Median µs per outcome write of ``batch`` final recipients: (without events, with events)."""
    times: dict[bool, list[float]] = {False: [], True: []}
    for n in range(rounds * 2):
        on = n % 2 == 1
        store = Store(r, events_max=1_000_000 if on else 0)
        msgs = _batch(batch)
        store.commit(msgs)
        st = RecipientStatus(RcptState.DELIVERED, 1, "2.0.0", "250 2.0.0 Ok: queued", "mx[127.0.0.2]:25", updated=1.0)
        entries = [(m.envelope.id, 0, st) for m in msgs]
        events = [outcome_event(m.envelope, 0, st, message_id_of(m.body)) for m in msgs] if on else []
        t = time.perf_counter()
        store.set_status_list(entries, events=events)
        times[on].append(time.perf_counter() - t)
    r.flushall()
    return _median_us(times[False]), _median_us(times[True])


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
    args = ap.parse_args(argv)
    rounds = max(3, min(args.rounds, 10_000))
    with tempfile.TemporaryDirectory(prefix="mtaq-bench-events-") as d:
        rp = RedisProcess(d, unixsocket=str(Path(d) / "redis.sock"))
        rp.start()
        try:
            r = rp.client()
            print(f"redis-server, appendfsync always, unix socket; {rounds} rounds per case, medians")
            print(f"{'path':<44} {'without':>10} {'with':>10} {'cost':>8}")
            for batch in (1, 20, 100):
                off, on = commit_cost(r, batch, rounds)
                print(f"{f'ingress group commit, {batch} msg(s)':<44} {off:>8.0f}µs {on:>8.0f}µs {on / off - 1:>7.1%}")
            for batch in (1, 20):
                off, on = outcome_cost(r, batch, rounds)
                print(f"{f'worker outcome write, {batch} rcpt(s)':<44} {off:>8.0f}µs {on:>8.0f}µs {on / off - 1:>7.1%}")
            local, remote = rcpt_cost(r, 10_000, rounds)
            print(f"{'RCPT lookup, 10,000 listed: copy / ZSCORE':<44} {local:>8.2f}µs {remote:>8.0f}µs")
        finally:
            rp.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
