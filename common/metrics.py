"""Counters every process adds to, kept in Redis so that they add up across processes and hosts.

Why Redis and not prometheus-client's multiprocess mode: mtaq's processes are many and short-lived
(RQ workers restarted by a supervisor, ingress children, containers scaled up and down, on several
hosts). Multiprocess mode sums files in one directory on one host, and a counter of a container
that is gone is gone with it, so a restart looks like a reset and ``--scale`` changes the totals.
Counted into the queue's own Redis (the same hash as the store's ``mtaq:stats``, which the store's
Lua script already increments with each recipient's state change), a total is one number for the
whole deployment: any exporter serves it, no scrape sees half of it, and it survives restarts
with Redis's AOF.

The hot paths (a connection, a reply, an accepted message, a delivery attempt) must not wait for
Redis, so increments are summed in memory and one background thread writes them with one pipeline
per second (HINCRBY is atomic, so writers on many hosts never lose each other's counts). A process
killed hard loses at most its last second of counts; one that exits normally writes them at exit.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections import Counter
from collections.abc import Iterable

import redis

from common.store import STATS

__all__ = [
    "LATENCY_BUCKETS",
    "Counters",
    "accepted",
    "attach",
    "connection",
    "counters",
    "delivery_attempt",
    "delivery_failure",
    "delivery_tls",
    "outcome_stall",
    "replies_sent",
]

log = logging.getLogger("mtaq.metrics")

# seconds from arrival to a final state: from a direct hand-off to a 5-day deferral
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0, 432000.0)

# field names in the stats hash (the store's own: received, delivered, bounced, deferred, attempts, dsn)
ACCEPTED = "accepted"
CONNECTIONS = "connections"
RECEIVED_BYTES = "received_bytes"
RETRIES = "retries"
IN_FLOW_HELD = "in_flow_held"
OUTCOME_STALLS = "outcome_write_stalls"
REJECTED_PREFIX = "rejected:"
LATENCY_BUCKET_PREFIX = "latency_le:"  # one field per bucket, not cumulative; "+Inf" last
LATENCY_SUM_MS = "latency_sum_ms"  # milliseconds: every field of the hash stays an integer
LATENCY_COUNT = "latency_count"
FAILURE_PREFIX = "failed:"  # failed:<state>:<bounce class> (issue 19): deferred and bounced attempts by class
TLS_PREFIX = "tls:"  # tls:<level>:<status>, level none|opportunistic|verified(<policy>) (issue 21)


def latency_bucket(seconds: float) -> str:
    for b in LATENCY_BUCKETS:
        if seconds <= b:
            return f"{LATENCY_BUCKET_PREFIX}{b:g}"
    return LATENCY_BUCKET_PREFIX + "+Inf"


# Seconds between writes of a process's counters: within a Prometheus scrape interval (15 s by
# default), and each write is a HINCRBY a changed field: at 1 s, on issue 15's ceiling load (36
# messages a second over 4 workers) those were half a Redis command a message.
FLUSH_EVERY = 5.0


class Counters:
    """Increments summed in memory, written to Redis by a daemon thread every ``interval`` seconds
    (and at exit)."""

    def __init__(self, interval: float = FLUSH_EVERY) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._ints: Counter[str] = Counter()
        self._redis: redis.Redis | None = None
        self._pid = os.getpid()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()

    def attach(self, r: redis.Redis) -> None:
        """Write to this Redis from now on (the command line attaches each role's process)."""
        with self._lock:
            self._redis = r
        atexit.register(self.flush)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._after_fork()
            self._ints[name] += n
            self._start()

    def pending(self) -> dict[str, int]:
        with self._lock:
            return dict(self._ints)

    def _after_fork(self) -> None:
        # a forked ingress child inherits the parent's counts (written by the parent) and no thread
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._ints.clear()
            self._thread = None

    def _start(self) -> None:
        if self._thread is None and self._redis is not None:
            self._thread = threading.Thread(target=self._run, name="mtaq-metrics", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            self.flush()

    def flush(self) -> bool:
        """Write what was counted; on a Redis error keep it for the next round. True when written."""
        with self._lock:
            r = self._redis
            if r is None or os.getpid() != self._pid or not self._ints:
                return True
            ints, self._ints = self._ints, Counter()
        try:
            pipe = r.pipeline(transaction=False)
            for k, v in ints.items():
                pipe.hincrby(STATS, k, v)
            pipe.execute()
            return True
        except (redis.RedisError, OSError) as e:
            log.debug("metrics not written yet: %s", e)
            with self._lock:
                self._ints.update(ints)
            return False


counters = Counters()


def attach(r: redis.Redis) -> None:
    counters.attach(r)


# -- the hooks the roles call (one line each at the point where the event happens) -----------------
def connection() -> None:
    """ingress: a client connected (refused ones included)."""
    counters.add(CONNECTIONS)


def replies_sent(data: bytes) -> None:
    """ingress: replies written to a client; each 4xx/5xx refuses a command, counted by its code."""
    if data[:1] not in (b"4", b"5") and b"\n4" not in data and b"\n5" not in data:
        return  # no line starts with 4 or 5: nothing refused (~0.1 us, not a split and a scan)
    for code in _refusals(data.split(b"\r\n")):
        counters.add(REJECTED_PREFIX + code)


def _refusals(lines: Iterable[bytes]) -> Iterable[str]:
    for line in lines:
        # the last line of a reply has a space (or nothing) after the code; a multi-line reply counts once
        if len(line) >= 3 and line[:1] in (b"4", b"5") and line[:3].isdigit() and line[3:4] in (b" ", b""):
            yield line[:3].decode()


def accepted(size: int) -> None:
    """ingress: a message is in the queue (its 250 is on the way)."""
    counters.add(ACCEPTED)
    counters.add(RECEIVED_BYTES, size)


def flow_held() -> None:
    """ingress: a MAIL waited for delivery to catch up (mail input flow control, ingress/flow.py)."""
    counters.add(IN_FLOW_HELD)


def outcome_stall() -> None:
    """worker: an outcome write outlasted its stall limit (worker/outcomes.py WRITE_STALL): the
    process's conversations that reached a transaction meanwhile waited for it. Redis slow or away."""
    counters.add(OUTCOME_STALLS)


def delivery_failure(state: str, klass: str) -> None:
    """worker: a failed attempt (``state`` deferred or bounced) of bounce class ``klass``."""
    counters.add(f"{FAILURE_PREFIX}{state}:{klass}")


def delivery_attempt(final: bool, seconds_in_queue: float, earlier_attempts: int) -> None:
    """worker: one recipient's attempt; a final one (delivered, bounced) adds its time from arrival
    to the latency histogram; one after an earlier attempt is a retry."""
    if earlier_attempts:
        counters.add(RETRIES)
    if final:
        counters.add(latency_bucket(seconds_in_queue))
        counters.add(LATENCY_COUNT)
        counters.add(LATENCY_SUM_MS, round(max(0.0, seconds_in_queue) * 1000))


def delivery_tls(tls: str, status: str) -> None:
    """worker: one recipient's attempt, by the TLS its session had (the first word of the log line's
    ``tls=``: none, opportunistic, verified(mta-sts|dane|pkix)) and its status (sent, bounced,
    deferred)."""
    level = tls.split(" ", 1)[0] if tls else "none"
    counters.add(f"{TLS_PREFIX}{level}:{status}")
