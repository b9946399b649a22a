"""Per-destination delivery limits shared by every worker on every host, kept in Redis.

In Postfix's queue manager's spirit (qmgr: destination concurrency, slow start, dead destinations):

- **Connection slots.** A conversation with a destination holds a slot: a member of the sorted set
  ``mtaq:dest:<d>:slots`` scored by its lease expiry. Taking one is one Lua call that first drops
  expired members, so a slot held by a dead process lapses after ``SLOT_TTL`` seconds; the
  holder's heartbeat (every few seconds) pushes the expiry on.
- **Slow start.** The slots on offer are ``window``, not ``destination_concurrency``: a destination
  starts at ``INITIAL_WINDOW`` connections and the window grows by one for each connection the
  destination greets and each message delivered, up to ``destination_concurrency``; a failed
  connection takes one off (docs/architecture.md says why a greeting counts).
- **Dead destinations.** ``destination_failure_limit`` connection failures in a row mark the
  destination down (``mtaq:dest:<d>:down`` with a TTL of ``destination_retry_time``): jobs for it
  are handed back to RQ's scheduler until then instead of every worker trying it again.
- **Rate.** ``destination_rate`` messages per second: each transaction reserves the next moment in
  ``mtaq:dest:<d>:rate`` (a virtual schedule, as GCRA) and waits until then.

RQ 3's ``RateLimit`` limits how many *jobs* with a key are queued or running. We need to limit
*connections* (a job opens several, idle cached ones count too), start low and grow, stop trying a
dead destination, and pace messages: none of which it does, so the slots are ours, beside RQ.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import redis

from common.store import PREFIX, dest_key
from worker.claimwatch import ClaimWatch

__all__ = ["INITIAL_WINDOW", "SLOT_TTL", "DestinationLimits", "Down", "DownLook", "Slot", "free_slots"]

log = logging.getLogger("mtaq.limits")

_T = TypeVar("_T")

INITIAL_WINDOW = 5  # Postfix initial_destination_concurrency
SLOT_TTL = 15.0  # seconds a slot outlives its holder's last heartbeat
# Seconds a full window's successes go unrecorded in a process (a failure still counts at once, and
# ends its quiet: its next success is recorded, resetting the failures). Only a recorded success
# resets the failure count every process shares, so a longer quiet lets failures of processes that
# never succeed (a host the remote refuses) add up for longer while the others deliver: at 30 s, 5
# of them in 30 s marked the destination down for everyone (a helper's review), for 0.2 of the 16
# Redis commands a message on issue 15's ceiling load.
FULL_QUIET = 5.0
# Seconds a destination counts as holding this process back (``limited``) after its window refused
# it a slot: a success then grows the window at once, and the lane starts another conversation;
# otherwise the news rides the next outcome write (``news``).
LIMITED_FOR = 5.0
YIELD_GAP = 0.25  # seconds between two slots one process gives up for another's waiting jobs
# a refused process keeps its claim on the next free slot this long (it asks again every STAFF_PAUSE
# while refused); a process that no longer needs one held others off that long (1 s: bench.slowdest's
# last messages of a destination went over fewer connections than it allowed)
WANT_MS = 500
# Which destinations have a claim (``want``) anywhere: a sorted set, destination -> the claim's
# expiry in ms, that the acquire script keeps beside the claims. A process reads it at most every
# WANTS_LOOK seconds for all its conversations (a claim waits that much longer to be seen: 0.5 s
# slowed bench.slowdest's hand-overs, 0.2 s did not), and asks a destination's ``want`` only when it is
# listed, and then one GET of it a WANTS_LOOK for all of them: each conversation asking its own
# destination's every second (worker/crew.py WANT_LOOK, then 1 s) was 0.58 Redis commands and round
# trips a delivered message on bench.ceiling (4 workers of 10 conversations, 10 destinations
# answering DATA after 1 s), nearly always to find no claim. Shared, the look can be frequent.
WANTS_KEY = f"{PREFIX}dest:wants"  # beside the destinations' keys, which all end in :<what>
WANTS_LOOK = 0.2
# A listing outlives its claim by this long (ms), and is pruned only this long after: the score is
# the claiming process's clock and the readers compare it with theirs, so hosts whose clocks differ
# by less than this still see every live claim. A listing that outlives its claim costs a reader
# one GET of a ``want`` that is gone, which is what every look cost before.
WANTS_SLACK_MS = 2000
STATE_TTL = 86400  # an idle destination's window and failure count are forgotten after a day
# A failure's time is kept this long for the rides staged before it (``ride``'s answer must not start
# a full window's quiet after it): far longer than a write can take (WRITE_PATIENCE, 30 s).
FAILED_KEPT = 600.0

# Every script below writes state that needs no durability: connection slots and claims that lapse
# in seconds, a slow-start window and failure count, a destination's down flag and pace, all of
# which a restarted or failed-over Redis may forget (windows start again at INITIAL_WINDOW, no slot
# is held, no destination is down). So they are kept out of the append-only file and off replicas
# (effects replication with REPL_NONE): a script that appends nothing makes Redis neither write
# nor fsync for its round trip. Issue 15: a writing round trip cost Redis 65-70 us of CPU with
# `appendfsync always` on this machine, 19-20 us without the append (/tmp micro-benchmark, 3,000
# ZADD and ZREM each way), and the destination limits were about one writing round trip a
# delivered message on the ceiling load. (An AOF rewrite snapshots memory and so may still carry
# them: lapsed slots are dropped by score, the rest expires.) fakeredis has no set_repl: there the
# scripts replicate as any other.
NOT_DURABLE = (
    "if redis.set_repl and redis.REPL_NONE then redis.replicate_commands() redis.set_repl(redis.REPL_NONE) end\n"
)

# KEYS: slots, state, want, wants (WANTS_KEY); ARGV: now, expiry, limit, initial window, this
# process's id, want ms, slots this process holds for the destination, the destination,
# WANTS_SLACK_MS, then one token per slot asked for. Returns how many were taken (the first tokens).
# Asking for several at once (a lane short of several conversations) is one round trip and one
# write for all of them (issue 15: an acquire a connection was a third of what the destination
# limits cost Redis on the ceiling load, and connections to slow servers carry one message or two).
# Lapsed slots (a dead holder's) are dropped only when the window looks full: a write fewer per
# connection while there is room.
# Fairness between processes: a process refused a slot names itself in ``want`` ("id:slots it
# holds"), unless a process holding fewer already does; while it does, no other process takes
# the last free slot, so the next slot freed goes to it (and busy processes give one up:
# DestinationLimits.should_yield). Without this, the processes that held the slots took each freed
# one back at once (their lanes never empty under a burst) and a job in another process waited
# SLOT_WAIT for a slot, then was handed back: its messages went 5-7 s late (drain jobs,
# smtp-source to one destination, 2 workers). The neediest claims it: a busy process wanting
# more must not keep a starved one out.
_ACQUIRE = (
    NOT_DURABLE
    + """
local limit = tonumber(ARGV[3])
local asked = #ARGV - 9
local window = tonumber(redis.call('HGET', KEYS[2], 'window') or ARGV[4])
if window > limit then window = limit end
if window < 1 then window = 1 end
local held = redis.call('ZCARD', KEYS[1])
if held + asked > window then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
  held = redis.call('ZCARD', KEYS[1])
end
local want = redis.call('GET', KEYS[3])
local wp, wm
if want then wp, wm = string.match(want, '^(.*):(%d+)$') end
local room = window - held
if wp and wp ~= ARGV[5] then room = room - 1 end  -- the last free slot waits for the claimant
if room > asked then room = asked end
if room < asked then
  local mine = tonumber(ARGV[7]) + math.max(room, 0)  -- what it holds once this call is done
  if not wp or wp == ARGV[5] or mine < tonumber(wm) then
    redis.call('SET', KEYS[3], ARGV[5] .. ':' .. mine, 'PX', ARGV[6])
    local now_ms = math.floor(tonumber(ARGV[1]) * 1000)
    local listed = now_ms + tonumber(ARGV[6]) + tonumber(ARGV[9])
    redis.call('ZADD', KEYS[4], listed, ARGV[8])
    redis.call('PUBLISH', KEYS[4], ARGV[8] .. '\t' .. string.format('%d', listed))  -- worker/claimwatch.py
    redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now_ms - tonumber(ARGV[9]))
    redis.call('PEXPIRE', KEYS[4], tonumber(ARGV[6]) + 2 * tonumber(ARGV[9]))
  end
  if room <= 0 then return 0 end
elseif wp == ARGV[5] then
  redis.call('DEL', KEYS[3])
  redis.call('ZREM', KEYS[4], ARGV[8])
  redis.call('PUBLISH', KEYS[4], ARGV[8] .. '\t0')
end
local add = {}
for i = 1, room do
  add[#add + 1] = ARGV[2]
  add[#add + 1] = ARGV[9 + i]
end
redis.call('ZADD', KEYS[1], unpack(add))
redis.call('PEXPIREAT', KEYS[1], math.floor(tonumber(ARGV[2]) * 1000) + 1000)
return room
"""
)

# KEYS: slots; ARGV: expiry, token... Push the leases on (only those still held: XX adds none
# that lapsed meanwhile). One ZADD for all of them, where a ZSCORE and a ZADD each were 0.55 Redis
# commands a delivered message on issue 15's ceiling load (each process refreshes every slot it
# holds, cached idle ones too, at every heartbeat).
_REFRESH = (
    NOT_DURABLE
    + """
local add = {}
for i = 2, #ARGV do
  add[#add + 1] = ARGV[1]
  add[#add + 1] = ARGV[i]
end
local n = redis.call('ZADD', KEYS[1], 'XX', 'CH', unpack(add))
if n > 0 then redis.call('PEXPIREAT', KEYS[1], math.floor(tonumber(ARGV[1]) * 1000) + 1000) end
return n
"""
)

# KEYS: state, down; ARGV: successes (0: a failure), limit, initial, failure limit, down ms, reason,
# state ttl. Returns 1 when this failure marked the destination down, 2 when a success found the
# window full (0: it grew). Successes come several at once when their news waited for a ride
# (DestinationLimits.news): the window grows by one for each, as if each had come alone.
# A success sets the TTL only when it creates the state (one write fewer per message while the
# window grows): a destination busy all day starts its slow start again a day after it began. A
# success that changes nothing (the window full, no failure counted) writes nothing: a script that
# only reads is not appended to the AOF, so Redis neither writes nor fsyncs for it (each process
# reports one such success a destination every FULL_QUIET seconds: each one was a write and an
# fsync).
_FEEDBACK_BODY = """
local state = redis.call('HMGET', KEYS[1], 'window', 'failures')
local window = tonumber(state[1] or ARGV[3])
local limit = tonumber(ARGV[2])
local result = 0
if ARGV[1] ~= '0' then
  local grown = math.min(window + tonumber(ARGV[1]), limit)
  if grown >= limit then result = 2 end
  if state[1] and window == grown and (not state[2] or tonumber(state[2]) == 0) then return result end
  local created = redis.call('HSET', KEYS[1], 'window', grown, 'failures', 0)
  if created < 2 then return result end
else
  local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
  window = math.max(window - 1, 1)
  if failures >= tonumber(ARGV[4]) then
    if redis.call('SET', KEYS[2], ARGV[6], 'PX', ARGV[5], 'NX') then result = 1 end
    redis.call('HSET', KEYS[1], 'failures', 0)
    window = math.min(tonumber(ARGV[3]), limit)
  end
  redis.call('HSET', KEYS[1], 'window', window)
end
redis.call('EXPIRE', KEYS[1], ARGV[7])
return result
"""
_FEEDBACK = NOT_DURABLE + _FEEDBACK_BODY
# The same for a ride in another write's pipeline (DestinationLimits.ride): an error of its own (an
# OOM under noeviction, a key of another type) is -1, not an error reply, which would fail the
# write it rides after Redis had applied it (the outcomes, then sent again).
_FEEDBACK_RIDE = (
    NOT_DURABLE
    + "local ok, result = pcall(function()\n"
    + _FEEDBACK_BODY
    + "end)\nif ok then return result end\nreturn -1\n"
)

# KEYS: rate; ARGV: now, interval. Returns the seconds to wait before sending (a string: Lua floats).
_RATE = (
    NOT_DURABLE
    + """
local now = tonumber(ARGV[1])
local at = tonumber(redis.call('GET', KEYS[1]) or '0')
if at < now then at = now end
local nxt = at + tonumber(ARGV[2])
redis.call('SET', KEYS[1], tostring(nxt), 'PX', math.floor((nxt - now) * 1000) + 1000)
return tostring(at - now)
"""
)


# KEYS: slots; ARGV: tokens. Slots given back (a script only to keep it out of the AOF: above).
_RELEASE = (
    NOT_DURABLE
    + """
return redis.call('ZREM', KEYS[1], unpack(ARGV))
"""
)


class Slot:
    """A connection slot this process holds, freed exactly once: at the end of ``with slot:`` or by
    ``free()``. ``keep()`` hands it on (to an idle cached connection) as a new Slot, which the new
    holder frees; the old one then frees nothing."""

    __slots__ = ("_limits", "_owned", "destination", "token")

    def __init__(self, limits: DestinationLimits, destination: str, token: str) -> None:
        self._limits = limits
        self.destination = destination
        self.token = token
        self._owned = True

    def keep(self) -> Slot:
        if not self._owned:
            raise RuntimeError(f"slot for {self.destination} already freed or handed on")
        self._owned = False
        return Slot(self._limits, self.destination, self.token)

    def free(self) -> None:
        free_slots([self])

    def _give_up(self) -> bool:
        """Whether this holder still owned the slot (it does not now): free_slots frees it once."""
        owned, self._owned = self._owned, False
        return owned

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()

    def __repr__(self) -> str:
        return f"Slot({self.destination!r}, {self.token!r}, held={self._owned})"


def free_slots(slots: Sequence[Slot]) -> None:
    """Give slots back, each once whoever else frees it, those of one destination (and one
    process's limits) in one call."""
    by: dict[tuple[int, str], list[Slot]] = {}
    for slot in slots:
        if slot._give_up():
            by.setdefault((id(slot._limits), slot.destination), []).append(slot)
    failed: BaseException | None = None
    for group in by.values():
        try:
            group[0]._limits._free(group)
        except Exception as e:  # the other destinations' slots are still given back
            failed = failed or e
    if failed is not None:
        raise failed


@dataclass(frozen=True, slots=True)
class Down:
    reason: str
    seconds: float  # until the destination is tried again

    @classmethod
    def read(cls, pttl: Any, reason: Any) -> Down | None:
        """From the down key's PTTL and value; None when it is not there (or lapsed between)."""
        ttl = int(pttl)
        if ttl == -2 or reason is None:  # no such key
            return None
        text = reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)
        return cls(text, max(0.0, ttl / 1000.0))


@dataclass(slots=True)
class DownLook:
    """``DestinationLimits.down`` asked in another round trip: ``stage`` queues the reads in a
    pipeline (a job's load, common/store.py ``load_with_hold`` ``ride``), ``found`` is the answer
    once it has run. The look before each job was a round trip of its own (issue 15)."""

    key: str
    found: Down | None = None

    def stage(self, pipe: Any) -> Callable[[Sequence[Any]], None]:
        pipe.pttl(self.key)
        pipe.get(self.key)

        def take(answers: Sequence[Any]) -> None:
            self.found = Down.read(answers[0], answers[1])

        return take


class DestinationLimits:
    """The shared limits, and the slots this process holds (refreshed by ``heartbeat``)."""

    def __init__(
        self,
        r: redis.Redis,
        *,
        concurrency: int = 20,
        rate: float = 0.0,
        failure_limit: int = 5,
        retry_time: float = 60.0,
        clock: Callable[[], float],
    ) -> None:
        self.redis = r
        self.concurrency = max(1, concurrency)
        self.rate = rate
        self.failure_limit = max(1, failure_limit)
        self.retry_time = retry_time
        self.clock = clock
        self._acquire = r.register_script(_ACQUIRE)
        self._refresh = r.register_script(_REFRESH)
        self._feedback = r.register_script(_FEEDBACK)
        self._rate = r.register_script(_RATE)
        self._release = r.register_script(_RELEASE)
        self.process = uuid.uuid4().hex  # names this process in a destination's ``want``
        self._held: dict[str, Slot] = {}
        self._full_until: dict[str, float] = {}
        self._due: dict[str, int] = {}  # destination -> successes whose news rides the next outcome write
        self._refused_at: dict[str, float] = {}  # destination -> when its window last refused a slot here
        self._failed_at: dict[str, float] = {}  # destination -> when a connection to it last failed here
        self._yielded_at: dict[str, float] = {}  # destination -> when a connection last gave its slot up
        self._looks: dict[str, tuple[float, Any]] = {}  # Redis key -> (read again from then, what it said)
        self._watch = ClaimWatch(r, WANTS_KEY)  # the claims' listing, over pub/sub
        self._lock = threading.Lock()

    def acquire(self, destination: str) -> Slot | None:
        """A connection slot for ``destination``, or None when its window is full. The caller
        frees it (``with slot:``)."""
        got = self.acquire_many(destination, 1)
        return got[0] if got else None

    def acquire_many(self, destination: str, n: int) -> list[Slot]:
        """Up to ``n`` connection slots for ``destination`` in one round trip: as many as its
        window has free (none when it is full; fewer than asked make this process claim the next
        one freed, as a refusal does). Each is freed by its holder."""
        if n < 1:
            return []
        tokens = [uuid.uuid4().hex for _ in range(n)]
        now = self.clock()
        keys = [
            dest_key(destination, "slots"),
            dest_key(destination, "state"),
            dest_key(destination, "want"),
            WANTS_KEY,
        ]
        args: list[str | float] = [
            now,
            now + SLOT_TTL,
            self.concurrency,
            min(INITIAL_WINDOW, self.concurrency),
            self.process,
            WANT_MS,
            self._mine(destination),
            destination,
            WANTS_SLACK_MS,
            *tokens,
        ]
        taken = int(self._acquire(keys=keys, args=args))
        if taken < n:
            self._refused_at[destination] = now
            queued = self._take_news(destination)
            if queued:  # the window holds this process back now: the news it waited with counts
                with contextlib.suppress(redis.RedisError):  # lost: the next success brings its own
                    self._feed(destination, queued, "")
        slots = [Slot(self, destination, token) for token in tokens[:taken]]
        with self._lock:
            for slot in slots:
                self._held[slot.token] = slot
        return slots

    def _free(self, slots: Sequence[Slot]) -> None:
        """free_slots(): slots of one destination leave the heartbeat and the destination's set."""
        with self._lock:
            for slot in slots:
                self._held.pop(slot.token, None)
        destination = slots[0].destination
        try:
            self._release(keys=[dest_key(destination, "slots")], args=[slot.token for slot in slots])
        except redis.RedisError:
            log.warning(
                "could not free %d connection slot(s) for %s; they lapse in %.0fs", len(slots), destination, SLOT_TTL
            )

    def close(self) -> None:
        """The claims' subscription goes (the process stops)."""
        self._watch.close()

    def heartbeat(self, grew: Callable[[str], None] = lambda destination: None) -> int:
        """Push on the leases of every slot this process holds; returns how many are held. News
        still waiting for a ride (no outcome written since: a greeting, then a deferral) goes with
        it (``grew`` as in ``ride``). Also reads what was published on the claims' channel
        meanwhile (ClaimWatch.tick)."""
        self._watch.tick()
        self._forget(self.clock())
        with self._lock:
            by_dest: dict[str, list[str]] = {}
            for slot in self._held.values():
                by_dest.setdefault(slot.destination, []).append(slot.token)
        expiry = self.clock() + SLOT_TTL
        pipe = self.redis.pipeline(transaction=False)
        for dest, tokens in by_dest.items():
            self._refresh(keys=[dest_key(dest, "slots")], args=[expiry, *tokens], client=pipe)
        start = len(pipe)
        fed = self.ride(pipe, grew)
        if len(pipe):
            answers = pipe.execute()
            if fed is not None:
                fed(answers[start:])
        return sum(len(t) for t in by_dest.values())

    def _forget(self, now: float) -> None:
        """Drop what the per-destination tables say that no longer counts (a full window's quiet
        over, a refusal past LIMITED_FOR, a yield past YIELD_GAP, a failure past FAILED_KEPT): a
        worker that reaches new domains all day kept an entry for each of them until it stopped."""
        for table, until in (
            (self._full_until, now),
            (self._refused_at, now - LIMITED_FOR),
            (self._yielded_at, now - YIELD_GAP),
            (self._failed_at, now - FAILED_KEPT),
        ):
            for destination, at in list(table.items()):
                if at <= until:
                    table.pop(destination, None)

    def held(self) -> int:
        with self._lock:
            return len(self._held)

    def _mine(self, destination: str) -> int:
        with self._lock:
            return sum(1 for slot in self._held.values() if slot.destination == destination)

    def should_yield(self, destination: str) -> bool:
        """Whether one of this process's connections to ``destination`` should end after its
        transaction and free its slot: another process waits for one (``want``) holding at least
        two fewer than this one, and this one gave none up in the last YIELD_GAP seconds (one at
        a time: the slot goes to the waiting process, which asks again every STAFF_PAUSE). Busy
        conversations otherwise keep their slots for as long as their lanes have mail, and a job
        in another process waits SLOT_WAIT, then is handed back."""
        now = self.clock()
        with self._lock:
            if now < self._yielded_at.get(destination, -YIELD_GAP) + YIELD_GAP:
                return False
        mine = self._mine(destination)
        if mine < 2:
            return False
        theirs = self._claim_elsewhere(destination, now)
        if theirs is None or not theirs.isdigit() or mine < int(theirs) + 2:
            return False
        with self._lock:
            self._yielded_at[destination] = now
        return True

    def wanted_elsewhere(self, destination: str) -> bool:
        """Whether another process waits for one of ``destination``'s slots (its ``want``): an
        idle connection of this process then gives its slot up (worker/crew.py)."""
        return self._claim_elsewhere(destination, self.clock()) is not None

    def _claim_elsewhere(self, destination: str, now: float) -> str | None:
        """The slots another process claiming ``destination`` holds, as its ``want`` says them
        ("process:slots"); None when nobody claims or this process does."""
        if destination not in self._claimed(now):
            return None
        raw = self._claim(destination, now)
        if raw is None:
            return None
        who, _, theirs = (raw.decode() if isinstance(raw, bytes) else raw).rpartition(":")
        return None if who == self.process else theirs

    def _claimed(self, now: float) -> frozenset[str]:
        """The destinations some process has a claim on (WANTS_KEY): as the subscription has them
        (worker/claimwatch.py), or read from the set when it cannot say."""
        listed = self._watch.listed(now)
        if listed is not None:
            return listed
        return self._look(
            WANTS_KEY,
            now,
            lambda: frozenset(
                d.decode() if isinstance(d, bytes) else str(d)
                for d in self.redis.zrangebyscore(WANTS_KEY, int(now * 1000), "+inf")
            ),
            frozenset(),
        )

    def _claim(self, destination: str, now: float) -> bytes | str | None:
        """A listed destination's ``want`` ("process:slots it holds"); None when there is none."""
        key = dest_key(destination, "want")
        claim: bytes | str | None = self._look(key, now, lambda: self.redis.get(key), None)
        return claim

    def _look(self, key: str, now: float, read: Callable[[], _T], default: _T) -> _T:
        """What ``read`` says of Redis key ``key``, read at most every WANTS_LOOK seconds for all of
        this process's conversations: while one reads, the others take the last answer (``default``
        before the first, and when Redis fails). A clock stepped back more than a look's length
        reads again at once; a read that ends after a newer one does not overwrite it."""
        with self._lock:
            until, said = self._looks.get(key, (float("-inf"), default))
            if until - WANTS_LOOK <= now < until:
                return cast(_T, said)
            until = now + WANTS_LOOK
            self._looks[key] = (until, said)
        try:
            said = read()
        except redis.RedisError:
            said = default
        with self._lock:
            if self._looks.get(key, (None, None))[0] == until:
                self._looks[key] = (until, said)
            if len(self._looks) > 1000:  # destinations no longer listed: forget them
                self._looks = {k: v for k, v in self._looks.items() if v[0] > now}
        return said

    def succeeded(self, destination: str) -> bool:
        """A connection was greeted or a message got through: the window grows, the failure count
        starts again. Once the window is full and no failure was seen, the news is not written for
        a while (every write waits for Redis's fsync). True when the window grew and is not full
        yet: it has room it did not have."""
        now = self.clock()
        queued = self._take_news(destination)  # news queued for a ride goes with it (``news``)
        if self._full_until.get(destination, 0.0) > now:
            return False
        if self._feed(destination, 1 + queued, "") == "full":
            self._full_until[destination] = now + FULL_QUIET
            return False
        return True

    def limited(self, destination: str) -> bool:
        """Whether the window refused this process a slot for ``destination`` in the last
        LIMITED_FOR seconds: only then does a success that grows it now start another conversation."""
        return self.clock() - self._refused_at.get(destination, float("-inf")) < LIMITED_FOR

    def news(self, destination: str) -> None:
        """A success (a greeting, a delivery) as ``succeeded``, whose news rides the outcome writer's
        next round trip (``ride``) rather than taking one of its own: for a destination whose window
        holds nobody back here (``limited``), growing it at once starts nothing. Each success's
        news was a round trip of its own, 0.37 a delivered message on issue 15's ceiling load (4
        workers, 10 destinations answering after 1 s, 4 conversations each: a window of 5 never
        full), each waking Redis for one script."""
        if self._full_until.get(destination, 0.0) > self.clock():
            return
        with self._lock:
            self._due[destination] = self._due.get(destination, 0) + 1

    def ride(self, pipe: Any, grew: Callable[[str], None]) -> Callable[[Sequence[Any]], None] | None:
        """The successes' news (``news``) queued in ``pipe``, last, a destination's successes in one
        script call; the function returned takes their answers once the pipe has run: a window that
        grew is told to ``grew`` (the lane may start another conversation at its next look), a full
        one goes quiet as ``succeeded`` makes it. None: nothing to send."""
        with self._lock:
            due, self._due = self._due, {}
        now = self.clock()
        staged = [(d, n) for d, n in due.items() if self._full_until.get(d, 0.0) <= now]
        if not staged:
            return None
        for destination, n in staged:
            self._stage_news(pipe, destination, n)

        def fed(answers: Sequence[Any]) -> None:
            # on the thread that wrote (the outcome writer's, a job's, the heartbeat's), between
            # its write and what it wakes: never raises
            try:
                for (destination, _), answer in zip(staged, answers, strict=False):
                    result = int(answer)
                    if result == 2 and self._failed_at.get(destination, float("-inf")) < now:
                        self._full_until[destination] = self.clock() + FULL_QUIET
                    elif result == 0:
                        grew(destination)
            except Exception:
                log.exception("slow start: the successes' news was sent, but not taken in")

        return fed

    def failed(self, destination: str, reason: str) -> bool:
        """A connection failed; True when that marked the destination down. Successes whose news
        waits for a ride came before it: they go first, in the same round trip (sent after, they
        would reset its count)."""
        self._full_until.pop(destination, None)
        self._failed_at[destination] = self.clock()
        return self._feed(destination, 0, reason, before=self._take_news(destination)) == "down"

    def _take_news(self, destination: str) -> int:
        """The successes queued for a ride to ``destination`` (``news``), taken out of the queue."""
        with self._lock:
            return self._due.pop(destination, 0)

    def _stage_news(self, pipe: Any, destination: str, successes: int) -> None:
        """Queue ``successes``' news in ``pipe``, the script that answers -1 for its own errors."""
        keys, args = self._feed_call(destination, successes, "")
        # EVAL, not EVALSHA: a Redis that restarted or failed over has no script cached, and a
        # NOSCRIPT here would fail the write it rides (Store.set_status_list); a registered Script
        # in a pipeline asks SCRIPT EXISTS first, a round trip more
        pipe.eval(_FEEDBACK_RIDE, len(keys), *keys, *args)

    def _feed_call(self, destination: str, successes: int, reason: str) -> tuple[list[str], list[str | int]]:
        keys = [dest_key(destination, "state"), dest_key(destination, "down")]
        args: list[str | int] = [
            successes,
            self.concurrency,
            min(INITIAL_WINDOW, self.concurrency),
            self.failure_limit,
            int(self.retry_time * 1000),
            reason or "connection failures",
            STATE_TTL,
        ]
        return keys, args

    def _feed(self, destination: str, successes: int, reason: str, *, before: int = 0) -> str:
        """One feedback call (``successes``; 0: a failure), after ``before`` successes' own."""
        keys, args = self._feed_call(destination, successes, reason)
        if before:
            pipe = self.redis.pipeline(transaction=False)
            self._stage_news(pipe, destination, before)
            pipe.eval(_FEEDBACK, len(keys), *keys, *args)
            result = int(pipe.execute()[-1])
        else:
            result = int(self._feedback(keys=keys, args=args))
        if result == 1:
            log.warning(
                "%s: %d connection failures in a row: delivery suspended for %.0fs (%s)",
                destination,
                self.failure_limit,
                self.retry_time,
                reason,
            )
            return "down"
        return "full" if result == 2 else ""

    def down(self, destination: str) -> Down | None:
        """Why and for how long the destination is throttled, or None."""
        # one command while the destination is up (the usual answer), the reason only when it is
        # down; a job asks with its load instead (look_down)
        key = dest_key(destination, "down")
        ttl = int(self.redis.pttl(key))
        if ttl == -2:  # no such key
            return None
        return Down.read(ttl, self.redis.get(key))

    def look_down(self, destination: str) -> DownLook:
        """``down``, to be asked in another round trip (``DownLook.stage``): one on the Redis these
        limits live on (the delivery service's store's, worker/jobs.py ``make_service``)."""
        return DownLook(dest_key(destination, "down"))

    def window(self, destination: str) -> int:
        raw = self.redis.hget(dest_key(destination, "state"), "window")
        return int(raw) if raw is not None else min(INITIAL_WINDOW, self.concurrency)

    def pace(self, destination: str) -> float:
        """With ``destination_rate`` set: the seconds to wait before the next message goes."""
        if self.rate <= 0:
            return 0.0
        wait = float(self._rate(keys=[dest_key(destination, "rate")], args=[self.clock(), 1.0 / self.rate]))
        return max(0.0, wait)
