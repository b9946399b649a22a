"""The suppression list: addresses that hard-bounced (``InvalidRecipient``) and are refused at RCPT
until their time is up, shared by every ingress through Redis.

Redis holds it as a sorted set (address -> until), a hash (address -> since) and a capped stream of
changes. Writers (the worker's outcome writes, `mtaq suppress`) change all three at once (one Lua
script); each ingress keeps a ``SuppressionCache`` in memory, loaded once and brought up to date by
reading the changes stream about once a second, so a RCPT costs no Redis round trip: a lookup is a
dict access. A change reaches every ingress within that second.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from common.store import SUPPRESSED, SUPPRESSED_CHANGES, SUPPRESSED_SINCE
from common.storeio import reply_text

__all__ = [
    "CHANGES_MAX",
    "Entry",
    "SuppressionCache",
    "SuppressionList",
    "normalize",
    "stage_add",
]

CHANGES_MAX = 100_000  # changes kept for caches that catch up; one further behind reloads the list
PRUNE_BATCH = 1000  # expired entries dropped per change (each change prunes some: no sweeper needed)
_CHUNK = 10_000  # changes a cache's refresh reads at a time

# KEYS: zset, since hash, changes stream; ARGV: now, changes max, then triples (address, since,
# until) where until 0 means remove. Expired entries go as a side effect, PRUNE_BATCH at a time.
_CHANGE = """
local unpack = unpack or table.unpack
local now = tonumber(ARGV[1])
for i = 3, #ARGV, 3 do
  local addr = ARGV[i]
  if tonumber(ARGV[i + 2]) > 0 then
    redis.call('ZADD', KEYS[1], ARGV[i + 2], addr)
    redis.call('HSET', KEYS[2], addr, ARGV[i + 1])
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'a', addr, 'u', ARGV[i + 2], 's', ARGV[i + 1])
  elseif redis.call('ZREM', KEYS[1], addr) == 1 then
    redis.call('HDEL', KEYS[2], addr)
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'a', addr, 'u', '0', 's', '0')
  end
end
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1000)
if #gone > 0 then
  redis.call('ZREM', KEYS[1], unpack(gone))
  redis.call('HDEL', KEYS[2], unpack(gone))
end
return #gone
"""


def normalize(address: str) -> str:
    """The form an address is listed under: mailbox providers treat local parts without regard to
    case, and so does the list (one bounce of Bob@ suppresses bob@)."""
    return address.strip().strip("<>").lower()


@dataclass(frozen=True, slots=True)
class Entry:
    address: str
    since: float
    until: float


def _args(now: float, changes: Iterable[tuple[str, float, float]]) -> list[Any]:
    out: list[Any] = [repr(now), CHANGES_MAX]
    for addr, since, until in changes:
        out += [normalize(addr), repr(since), repr(until)]
    return out


def stage_add(pipe: Any, addresses: Sequence[str], now: float, ttl: float) -> None:
    """Suppress addresses for ``ttl`` seconds from ``now``, as commands added to ``pipe`` (the
    worker's outcome write: no round trip of its own)."""
    if addresses and ttl > 0:
        args = _args(now, ((a, now, now + ttl) for a in addresses))
        pipe.eval(_CHANGE, 3, SUPPRESSED, SUPPRESSED_SINCE, SUPPRESSED_CHANGES, *args)


class SuppressionList:
    """The list in Redis, as `mtaq suppress` and tests see it."""

    def __init__(self, r: redis.Redis, clock: Callable[[], float] = time.time) -> None:
        self.redis = r
        self.clock = clock

    def add(self, addresses: Iterable[str], ttl: float, since: float | None = None) -> int:
        now = self.clock()
        addrs = [normalize(a) for a in addresses if normalize(a)]
        for start in range(0, len(addrs), 1000):
            chunk = addrs[start : start + 1000]
            args = _args(now, ((a, now if since is None else since, now + ttl) for a in chunk))
            self.redis.eval(_CHANGE, 3, SUPPRESSED, SUPPRESSED_SINCE, SUPPRESSED_CHANGES, *args)
        return len(addrs)

    def remove(self, addresses: Iterable[str]) -> int:
        """Returns how many were listed."""
        addrs = [normalize(a) for a in addresses]
        listed = [a for a, s in zip(addrs, self.redis.zmscore(SUPPRESSED, addrs), strict=True) if s] if addrs else []
        if listed:
            self.redis.eval(
                _CHANGE,
                3,
                SUPPRESSED,
                SUPPRESSED_SINCE,
                SUPPRESSED_CHANGES,
                *_args(self.clock(), ((a, 0.0, 0.0) for a in listed)),
            )
        return len(listed)

    def entries(self) -> list[Entry]:
        """Every address suppressed now, in address order."""
        now = self.clock()
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrangebyscore(SUPPRESSED, f"({now!r}", "+inf", withscores=True)
        pipe.hgetall(SUPPRESSED_SINCE)
        listed, since = pipe.execute()
        since_of = {reply_text(k): float(v) for k, v in since.items()}
        out = [Entry(reply_text(a), since_of.get(reply_text(a), 0.0), float(u)) for a, u in listed]
        return sorted(out, key=lambda e: e.address)

    def lookup(self, address: str) -> Entry | None:
        a = normalize(address)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zscore(SUPPRESSED, a)
        pipe.hget(SUPPRESSED_SINCE, a)
        until, since = pipe.execute()
        if until is None or float(until) <= self.clock():
            return None
        return Entry(a, float(since or 0.0), float(until))


class SuppressionCache:
    """One ingress process's copy of the list. ``check`` is a dict lookup (the RCPT path);
    ``refresh`` (a thread, about once a second) reads the changes since the last one, one round trip
    that carries nothing when nothing changed, and reloads the whole list only at the start or when
    it fell further behind than the changes stream keeps."""

    def __init__(self, r: redis.Redis, clock: Callable[[], float] = time.time) -> None:
        self.redis = r
        self.clock = clock
        self._entries: dict[str, tuple[float, float]] = {}  # address -> (since, until)
        self._last: str | None = None  # the last change applied (a stream id); None: not loaded

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, address: str) -> Entry | None:
        """The entry that suppresses ``address`` now, or None."""
        found = self._entries.get(normalize(address))
        if found is None or found[1] <= self.clock():
            return None
        return Entry(normalize(address), found[0], found[1])

    def refresh(self) -> None:
        """Bring the copy up to date (raises redis errors: the caller keeps the copy it has)."""
        if self._last is None:
            self._reload()
            return
        # One XRANGE from the last change applied, that change included: the stream is only ever
        # trimmed from its head, so while the copy is current the reply starts with it, and a reply
        # that does not was trimmed past it (changes lost to the copy). It was an XRANGE of the
        # head and another of what follows: twice the commands, once a second per ingress process.
        seen = self._last != "0-0"
        changes: Any = self.redis.xrange(SUPPRESSED_CHANGES, self._last if seen else "-", "+", count=_CHUNK + seen)
        if seen:
            if not changes or reply_text(changes[0][0]) != self._last:
                self._reload()
                return
            changes = changes[1:]
        for sid, fields in changes:
            self._apply(fields)
            self._last = reply_text(sid)
        if len(changes) == _CHUNK:
            self.refresh()

    def _apply(self, fields: Any) -> None:
        d = {reply_text(k): reply_text(v) for k, v in fields.items()}
        until = float(d.get("u", "0"))
        if until > 0:
            self._entries[d["a"]] = (float(d.get("s", "0")), until)
        else:
            self._entries.pop(d["a"], None)

    def _reload(self) -> None:
        pipe = self.redis.pipeline(transaction=True)  # the list and the last change, as of one moment
        pipe.zrangebyscore(SUPPRESSED, f"({self.clock()!r}", "+inf", withscores=True)
        pipe.hgetall(SUPPRESSED_SINCE)
        pipe.xrevrange(SUPPRESSED_CHANGES, "+", "-", count=1)
        listed, since, last = pipe.execute()
        since_of = {reply_text(k): float(v) for k, v in since.items()}
        self._entries = {reply_text(a): (since_of.get(reply_text(a), 0.0), float(u)) for a, u in listed}
        self._last = reply_text(last[0][0]) if last else "0-0"
