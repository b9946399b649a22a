"""What an operator sees of Redis replication: the primary, its replicas and their lag (from INFO
replication, parsed by a pure function), and the failovers seen so far.

A failover is counted when a reader (the exporter's scrape, `mtaq health`, `mtaq queue stats`) finds
the Sentinels naming another primary than the one recorded in Redis; the record and the count change
in one script, so two readers that notice the same failover count it once. The record lives in the
data itself, so the promoted replica carries the old primary's name and the comparison holds across
the failover. (Two failovers between two readings, A -> B -> A, are seen as none.)"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from common.redisconn import NoReplicasError
from common.store import FAILOVER_TIME, FAILOVERS, PRIMARY_SEEN

__all__ = [
    "Replica",
    "ReplicationView",
    "note_primary",
    "online_replicas",
    "parse_replication",
    "primary_address",
    "read_replication",
]


@dataclass(frozen=True, slots=True)
class Replica:
    address: str
    state: str
    lag_bytes: int  # how far its acknowledged offset trails the primary's
    lag_seconds: int  # seconds since its last acknowledgement (INFO's lag)


@dataclass(frozen=True, slots=True)
class ReplicationView:
    role: str
    primary: str  # host:port as the Sentinels name it, or "" without Sentinels
    replicas: tuple[Replica, ...] = field(default=())
    failovers: int = 0
    last_failover: float | None = None
    # the primary refuses writes: fewer replicas in sync than its min-replicas-to-write (the ha
    # set-up's fence, docs/high-availability.md); seen when recording the primary was refused
    fenced: bool = False

    @property
    def online(self) -> int:
        return sum(1 for r in self.replicas if r.state == "online")

    def lines(self) -> list[str]:
        """The operator's lines (``mtaq queue stats``, ``mtaq health``)."""
        who = self.primary or "this Redis"
        out = [f"redis: {who} is {self.role} with {self.online} replica(s) online"]
        if self.fenced:
            out[0] += "; it takes no writes: fewer replicas in sync than its min-replicas-to-write"
        for r in self.replicas:
            out.append(f"  replica {r.address} {r.state}, {r.lag_bytes} bytes behind, last ack {r.lag_seconds} s ago")
        if self.failovers:
            out.append(f"  failovers seen: {self.failovers}, the last at {_when(self.last_failover)}")
        return out


def _when(t: float | None) -> str:
    return "unknown" if t is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def parse_replication(info: Mapping[str, Any]) -> tuple[str, tuple[Replica, ...]]:
    """Role and replicas from ``INFO replication`` as redis-py parses it (``slaveN`` entries are
    dicts with ip, port, state, offset, lag)."""
    role = str(info.get("role", "unknown"))
    top = int(info.get("master_repl_offset", 0) or 0)
    replicas = []
    for key in sorted((k for k in info if k.startswith("slave") and k[5:].isdigit()), key=lambda k: int(k[5:])):
        entry = info[key]
        if not isinstance(entry, Mapping):
            continue
        replicas.append(
            Replica(
                f"{entry.get('ip', '?')}:{entry.get('port', '?')}",
                str(entry.get("state", "unknown")),
                max(0, top - int(entry.get("offset", 0) or 0)),
                int(entry.get("lag", 0) or 0),
            )
        )
    return role, tuple(replicas)


# KEYS: the recorded primary, the failover counter, the last failover's time; ARGV: primary, now.
# Returns the count of failovers seen.
_NOTE_PRIMARY = """
local seen = redis.call('GET', KEYS[1])
if seen == ARGV[1] then return tonumber(redis.call('GET', KEYS[2]) or '0') end
redis.call('SET', KEYS[1], ARGV[1])
if not seen then return tonumber(redis.call('GET', KEYS[2]) or '0') end
redis.call('SET', KEYS[3], ARGV[2])
return redis.call('INCR', KEYS[2])
"""


def note_primary(r: redis.Redis, primary: str, now: float) -> int:
    """Record ``primary`` as the current one; count a failover when another was recorded."""
    return int(r.eval(_NOTE_PRIMARY, 3, PRIMARY_SEEN, FAILOVERS, FAILOVER_TIME, primary, repr(now)))


def read_replication(r: redis.Redis, primary: str, now: float) -> ReplicationView:
    """The view, from the primary ``r`` connects to; ``primary`` is its address as the Sentinels
    name it ("" without Sentinels: nothing to compare, no failover counted)."""
    role, replicas = parse_replication(r.info("replication"))
    fenced = False
    try:
        failovers = note_primary(r, primary, now) if primary else int(r.get(FAILOVERS) or 0)
    except NoReplicasError:
        # the failover is counted by the next reader that may write: the view still stands
        failovers, fenced = int(r.get(FAILOVERS) or 0), True
    raw = r.get(FAILOVER_TIME)
    last = float(raw) if isinstance(raw, bytes | str) else None
    return ReplicationView(role, primary, replicas, failovers, last, fenced)


def online_replicas(r: redis.Redis) -> int:
    """Replicas the primary ``r`` connects to has online and in sync now (one INFO round trip).
    With min-replicas-to-write set, INFO also counts the replicas whose last acknowledgement is
    recent enough for it (``min_slaves_good_slaves``): a replica that stalled stays "online" in
    the list for a while, but the primary already refuses writes for want of it."""
    info = r.info("replication")
    online = sum(1 for x in parse_replication(info)[1] if x.state == "online")
    good = info.get("min_slaves_good_slaves")
    return online if good is None else min(online, int(good))


def primary_address(r: redis.Redis) -> str:
    """host:port of the primary a Sentinel-managed client talks to; "" for any other client."""
    pool = r.connection_pool
    get = getattr(pool, "get_master_address", None)
    if get is None:
        return ""
    host, port = get()
    return f"{host}:{port}"
