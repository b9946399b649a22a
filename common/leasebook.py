"""Leases, a job at a time: one job at a time works on a (message, destination). The keys are
common/store.py's (``mtaq:leases:<destination>``, ``mtaq:holder:<token>``); worker/leases.py holds a
process's. Also the finisher's claims (``claim``): a key a message that lapses by itself, so that a
finisher that saw the message before another deleted it finds the claim taken for FINISH_CLAIM
after the delete and builds no second report."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import redis

from common.store import HOLDER_PREFIX, claim_key, holder_key, leases_key
from common.storeio import reply_text

__all__ = ["HASH_TTL", "PRUNE_LEASES", "LeaseBook"]

HASH_TTL = 86400.0  # seconds a destination's leases outlive its last take (jobs end within job_timeout)

# Leases, a job at a time (issue 15): a job's leases on its messages for a destination are fields
# of the destination's hash, each naming the job's token, and they count while the job's holder key
# lives. Taking a job's leases is one HMGET and one HSET, pushing them on one PEXPIRE of the holder
# key, ending them one HMGET and one HDEL, however many messages the job has; a lease a key a
# message was a SET a message, 1 of the 19 Redis commands a delivered message cost on the ceiling
# load. A dead job's fields outlive it until taken over (its holder key gone: free) or pruned by
# the sweep (PRUNE_LEASES, at the destinations with open mail), and a destination's hash goes a
# day (HASH_TTL) after its last job took a lease there. The holder keys are built in the script
# from ARGV's prefix: only the holders of fields already taken are looked at, and mtaq runs on one
# Redis, not a cluster.
# KEYS: the destination's leases, this job's holder key; ARGV: token, ms, holder prefix, the hash's
# ms (HASH_TTL), queue ids. Returns the ids taken.
# Lua's unpack() is bounded by its stack (8000 values): long lists go to Redis 1000 at a time.
_CHUNKED = """
local function chunked(cmd, key, list)
  local out = {}
  for i = 1, #list, 1000 do
    local got = redis.call(cmd, key, unpack(list, i, math.min(#list, i + 999)))
    if type(got) == 'table' then
      for _, v in ipairs(got) do out[#out + 1] = v end
    end
  end
  return out
end
-- the ids ARGV holds from ``first`` on, and the token the destination's hash names for each
local function named(first)
  local ids = {}
  for i = first, #ARGV do ids[#ids + 1] = ARGV[i] end
  return ids, chunked('HMGET', KEYS[1], ids)
end
"""
_TAKE_LEASES = (
    _CHUNKED
    + """
local ids, cur = named(5)
local alive, set, got = {}, {}, {}
for i, q in ipairs(ids) do
  local h = cur[i]
  local free = not h
  if h then
    if alive[h] == nil then alive[h] = redis.call('EXISTS', ARGV[3] .. h) == 1 end
    free = not alive[h]
  end
  if free then
    set[#set + 1] = q
    set[#set + 1] = ARGV[1]
    got[#got + 1] = q
  end
end
if #got > 0 then
  chunked('HSET', KEYS[1], set)
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
end
return got
"""
)

# KEYS: the destination's leases, the job's holder key, then keys the job is done with (its drawn
# list: LeaseBook.end ``done``); ARGV: token, queue ids. Ends those still the job's (one another
# job took over after this one's holder key lapsed is left alone).
_END_LEASES = (
    _CHUNKED
    + """
local ids, cur = named(2)
local mine = {}
for i = 1, #cur do
  if cur[i] == ARGV[1] then mine[#mine + 1] = ids[i] end
end
chunked('HDEL', KEYS[1], mine)
redis.call('DEL', unpack(KEYS, 2))
return #mine
"""
)

# KEYS: a destination's leases; ARGV: holder prefix. Drops the fields whose holder is gone (the
# sweep's: a dead job's leases on messages nobody leased again). Returns how many.
PRUNE_LEASES = (
    _CHUNKED
    + """
local all = redis.call('HGETALL', KEYS[1])
local alive, dead = {}, {}
for i = 1, #all, 2 do
  local h = all[i + 1]
  if alive[h] == nil then alive[h] = redis.call('EXISTS', ARGV[1] .. h) == 1 end
  if not alive[h] then dead[#dead + 1] = all[i] end
end
chunked('HDEL', KEYS[1], dead)
return #dead
"""
)


class LeaseBook:
    """The lease operations on one Redis, each one round trip."""

    def __init__(self, r: redis.Redis) -> None:
        self.redis = r
        self._take = r.register_script(_TAKE_LEASES)
        self._end = r.register_script(_END_LEASES)
        self._prune = r.register_script(PRUNE_LEASES)

    def take(self, qids: Sequence[str], destination: str, token: str, seconds: float) -> list[str]:
        """Take the lease of each message for this destination for the job ``token``; returns those
        taken. A lease held by another live job (a duplicate chain, a flush, a sweep) means that job
        is on it now. One round trip (``_TAKE_LEASES``)."""
        if not qids:
            return []
        ms = max(1000, int(seconds * 1000))
        keys = [leases_key(destination), holder_key(token)]
        args: list[str | int] = [token, ms, HOLDER_PREFIX, int(HASH_TTL * 1000), *qids]
        return [reply_text(x) for x in self._take(keys=keys, args=args)]

    def claim(self, qids: Sequence[str], what: str, token: str, seconds: float) -> list[str]:
        """Claim each message for ``what`` (the finisher's "finish") for ``seconds``, whatever
        happens to it meanwhile; returns those claimed. A key a message (SET NX PX): claims are
        few (a report's), and one outlives the message it claims."""
        pipe = self.redis.pipeline(transaction=False)
        for qid in qids:
            pipe.set(claim_key(qid, what), token, nx=True, px=max(1000, int(seconds * 1000)))
        return [qid for qid, ok in zip(qids, pipe.execute(), strict=True) if ok]

    def holder(self, qid: str, destination: str) -> str | None:
        """The token of the live job holding this message's lease for this destination, or None."""
        token = self.redis.hget(leases_key(destination), qid)
        if token is None or not self.redis.exists(holder_key(reply_text(token))):
            return None
        return reply_text(token)

    def left(self, qids: Sequence[str], destination: str) -> float:
        """Seconds until the last of these leases lapses (0 when none is held any more)."""
        if not qids:
            return 0.0
        holders = {reply_text(t) for t in self.redis.hmget(leases_key(destination), list(qids)) if t}
        if not holders:
            return 0.0
        pipe = self.redis.pipeline(transaction=False)
        for token in holders:
            pipe.pttl(holder_key(token))
        return max(0, *(int(ms) for ms in pipe.execute())) / 1000

    def end(self, qids: Sequence[str], destination: str, token: str, done: Sequence[str] = ()) -> None:
        """End the leases job ``token`` took with take() (only those still its own), and delete the
        keys ``done`` names in the same call (a drain job's drawn list: its last write and fsync
        were a round trip of their own, one of the seven a job made on issue 15's ceiling load)."""
        if qids:
            self._end(keys=[leases_key(destination), holder_key(token), *done], args=[token, *qids])
        elif done:
            self.redis.delete(*done)

    def end_in(self, pipe: Any, qids: Sequence[str], destination: str, token: str, done: Sequence[str] = ()) -> None:
        """``end`` queued in ``pipe``, a pipeline of another write (a job's success, worker/rqbook.py
        ``succeeded``: one writing round trip a job fewer). By EVAL, not EVALSHA: a Redis that lost
        its scripts (a restart, a failover) answers NOSCRIPT to the pipeline's other writes' round
        trip, and redis-py's pipeline would check the scripts first, a round trip of its own."""
        if qids:
            keys = [leases_key(destination), holder_key(token), *done]
            pipe.eval(_END_LEASES, len(keys), *keys, token, *qids)
        elif done:
            pipe.delete(*done)

    def renew(self, tokens: Sequence[str], seconds: float) -> None:
        """Push on the leases of these jobs for another ``seconds``: one PEXPIRE of each job's
        holder key, in one round trip. A job whose holder key lapsed meanwhile has lost its leases
        (another job may have taken them over): nothing brings them back."""
        if not tokens:
            return
        pipe = self.redis.pipeline(transaction=False)
        for token in tokens:
            pipe.pexpire(holder_key(token), max(1000, int(seconds * 1000)))
        pipe.execute()

    def prune(self, destinations: Iterable[str]) -> int:
        """Drop the leases of dead jobs at these destinations (the sweep's); returns how many."""
        return sum(int(self._prune(keys=[leases_key(d)], args=[HOLDER_PREFIX])) for d in destinations)
