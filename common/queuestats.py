"""Queue counters and indexes kept as the queue changes (issue 16), so that metrics, `mtaq queue
stats` and filtered listings cost the same at any queue length.

What is kept (key names in common/store.py, "Queue monitoring"):

- a message summary, field ``q`` of its message hash: its destinations (``h``), which destination
  each recipient goes to (``i``, left out when there is one), its open recipients per destination
  (``o``), pending (``p``) and deferred (``d``) open recipients, and its arrival (``t``, a string:
  Lua numbers would round it);
- counters (hash): ``bytes``; messages ``m:deferred`` and ``m:held``; open recipients
  ``r:active``, ``r:deferred``, ``r:held``. Messages in all are the ZCARD of the queue index, active
  ones what is neither deferred nor held;
- indexes (sorted sets, queue id -> arrival): one per destination with an open recipient there,
  one of messages with a deferred recipient; and the set of destinations that have such an index.

A message is held when it is in the hold set, else deferred when it has a deferred open recipient,
else active (mtaq/ops/queueview.MessageView.state: the walk's words).

Every change goes through the round trip that makes it: the commit adds plain commands to its
MULTI/EXEC (``commit_plan``), a recipient's new state, a hold, a release and a deletion run Lua that
reads the summary and applies the difference of the message's contribution before and after
(``qs_account`` below), atomically with the change itself. A message without a summary (queued by
an older mtaq) counts nowhere until the sweep repairs it (``REPAIR``).

This module is pure: Lua text and functions from envelopes to commands' arguments; common/store.py
runs them, mtaq/ops/queueindex.py reads what they keep, common/queuerecount.py recounts."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from common.envelope import Envelope

__all__ = [
    "COMMIT",
    "COUNTER_FIELDS",
    "DELETE",
    "DROP_EMPTY",
    "HOLD",
    "LIB",
    "REPAIR",
    "STATUS_ACCOUNT",
    "CommitPlan",
    "commit_plan",
    "static_summary",
    "summary",
]

SUMMARY_FIELD = "q"
COUNTER_FIELDS = ("bytes", "m:deferred", "m:held", "r:active", "r:deferred", "r:held")


def _layout(envelope: Envelope, hop: Callable[[str], str]) -> dict[str, object]:
    hops = [hop(r.address) for r in envelope.recipients]
    names = list(dict.fromkeys(hops))
    out: dict[str, object] = {"h": names, "t": repr(envelope.received_at), "n": len(hops)}
    if len(names) > 1:
        out["i"] = [names.index(h) for h in hops]
    return out


def summary(envelope: Envelope, hop: Callable[[str], str], size: int | None = None, *, keeps_hold: bool = True) -> str:
    """The summary of a message as committed: every recipient pending; ``size``, the body's octets,
    when known (the removal then takes it from here, not from an HSTRLEN of the body);
    ``keeps_hold``: it keeps its hold flag (``k``: qs_is_held), which an older mtaq's hold
    command would not keep (the layout gate, common/store.py LAYOUT_KEY, says when it may)."""
    return _summary(envelope, [hop(r.address) for r in envelope.recipients], size, keeps_hold)


def _summary(envelope: Envelope, hops: list[str], size: int | None = None, keeps_hold: bool = True) -> str:
    # on every commit: the usual message, one destination, without json.dumps of a dict
    n, t = len(hops), repr(envelope.received_at)
    b = "" if size is None else f',"b":{int(size)}'
    k = ',"k":1' if keeps_hold else ""
    if n and hops.count(hops[0]) == n:
        return f'{{"h":[{json.dumps(hops[0])}],"t":"{t}","n":{n},"o":[{n}],"p":{n},"d":0{b}{k}}}'
    names = list(dict.fromkeys(hops))
    idx = [names.index(h) for h in hops]
    doc: dict[str, object] = {
        "h": names,
        "t": t,
        "n": n,
        "i": idx,
        "o": [idx.count(j) for j in range(len(names))],
        "p": n,
        "d": 0,
    }
    if size is not None:
        doc["b"] = int(size)
    if keeps_hold:
        doc["k"] = 1
    return json.dumps(doc, separators=(",", ":"))


def static_summary(envelope: Envelope, hop: Callable[[str], str]) -> str:
    """What the sweep's repair is told of a message (destinations, arrival); it counts the rest."""
    return json.dumps(_layout(envelope, hop), separators=(",", ":"))


@dataclass
class CommitPlan:
    """What a commit adds to its MULTI/EXEC for the counters and indexes of new messages."""

    summaries: dict[str, str] = field(default_factory=dict)  # queue id -> summary JSON
    by_destination: dict[str, dict[str, float]] = field(default_factory=dict)  # dest -> {qid: arrival}
    size: int = 0
    recipients: int = 0

    def args(
        self, prefix: str, generation: str = "", token: str = "", known: Collection[str] = ()
    ) -> list[str | int | float]:
        """ARGV of ``COMMIT``: ``known`` are destinations this writer saw in the set under
        ``generation`` (``token``: the generation to start when there is none)."""
        out: list[str | int | float] = [prefix, self.size, self.recipients, generation, token]
        for dest, members in self.by_destination.items():
            out += [dest, 1 if dest in known else 0, len(members)]
            for qid, arrival in members.items():
                out += [qid, repr(arrival)]
        return out


def commit_plan(
    messages: Sequence[tuple[Envelope, int]], hop: Callable[[str], str], *, keeps_hold: bool = True
) -> CommitPlan:
    """(envelope, body size) of new messages -> their summaries, index entries and counter increments."""
    plan = CommitPlan()
    dests: dict[str, dict[str, float]] = defaultdict(dict)
    for env, size in messages:
        hops = [hop(r.address) for r in env.recipients]
        plan.summaries[env.id] = _summary(env, hops, size, keeps_hold)
        for h in hops:
            dests[h][env.id] = env.received_at
        plan.size += size
        plan.recipients += len(hops)
    plan.by_destination = dict(dests)
    return plan


# The commit's counters and indexes in one command of its MULTI/EXEC. KEYS: counts hash,
# destinations set, the set's generation. ARGV: index prefix, octets,
# recipients, the generation the writer knows, a new one (when the set has none), then per
# destination: name, known (1/0), n, and n (queue id, arrival). Returns the set's generation.
# A destination stays in the set while its index has an entry: only the sweep takes one out, and
# then it starts a new generation (DROP_EMPTY). So a writer that added d under generation g and
# finds g still current knows d is there, and adds it no more: one GET a commit, where an SADD a
# destination a commit was 0.5 of the 17 Redis commands a message cost on issue 15's ceiling load
# (commits of 20 messages for ten destinations).
COMMIT = """
redis.call('HINCRBY', KEYS[1], 'bytes', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'r:active', ARGV[3])
local gen = redis.call('GET', KEYS[3])
if not gen then
  gen = ARGV[5]
  redis.call('SET', KEYS[3], gen)
end
local current = gen == ARGV[4]
local a = 6
while a <= #ARGV do
  local d, known, n = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  for first = 0, n - 1, 1000 do -- unpack() is bounded by Lua's stack (8000 values)
    local z = {}
    for k = first, math.min(n, first + 1000) - 1 do
      z[#z + 1] = ARGV[a + 4 + 2 * k]
      z[#z + 1] = ARGV[a + 3 + 2 * k]
    end
    redis.call('ZADD', ARGV[1] .. d, unpack(z))
  end
  if not (current and known == '1') then redis.call('SADD', KEYS[2], d) end
  a = a + 3 + 2 * n
end
return gen
"""

# KEYS: destinations set, its generation; ARGV: index prefix, a new generation. Destinations whose
# index is gone taken out of the set, and a new generation started if any was (see COMMIT), in one
# script: a commit between the look and the removal would otherwise leave its index unlisted.
DROP_EMPTY = """
local gone = 0
for _, d in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. d) == 0 then
    redis.call('SREM', KEYS[1], d)
    gone = gone + 1
  end
end
if gone > 0 then redis.call('SET', KEYS[2], ARGV[2]) end
return gone
"""


# K: counts hash, deferred index, destinations set, destination index prefix. A state is
# {q = summary, held = bool, size = octets} or nil (the message is not there).
LIB = """
local QS_FIELDS = {'bytes', 'm:deferred', 'm:held', 'r:active', 'r:deferred', 'r:held'}
local function qs_contrib(st)
  local c = {0, 0, 0, 0, 0, 0}
  if st == nil then return c end
  local q = st.q
  c[1] = st.size
  if st.held then
    c[3] = 1; c[6] = q.p + q.d
  else
    c[4] = q.p; c[5] = q.d
    if q.d > 0 then c[2] = 1 end
  end
  return c
end
local function qs_account(K, qid, before, after)
  local cb, ca = qs_contrib(before), qs_contrib(after)
  for n = 1, 6 do
    if ca[n] ~= cb[n] then
      if K.acc then K.acc[n] = (K.acc[n] or 0) + ca[n] - cb[n]  -- added once, by qs_flush
      else redis.call('HINCRBY', K.counts, QS_FIELDS[n], ca[n] - cb[n]) end
    end
  end
  local q = (after or before).q
  local wasdef = before ~= nil and before.q.d > 0
  local isdef = after ~= nil and after.q.d > 0
  if isdef and not wasdef then redis.call('ZADD', K.deferred, q.t, qid)
  elseif wasdef and not isdef then redis.call('ZREM', K.deferred, qid) end
  for j, d in ipairs(q.h) do
    local was = before ~= nil and before.q.o[j] > 0
    local is = after ~= nil and after.q.o[j] > 0
    if is and not was then
      redis.call('ZADD', K.prefix .. d, q.t, qid)
      redis.call('SADD', K.dests, d)
    elseif was and not is then
      -- an emptied destination stays in the set (readers skip it, the sweep drops it): one call less
      redis.call('ZREM', K.prefix .. d, qid)
    end
  end
end
-- A script that accounts for many messages (common/statusscript.py) gives K.acc, a table, and adds
-- the sums once at its end: two HINCRBY a delivered message were a sixth of its Redis commands.
local function qs_flush(counts, acc)
  for n = 1, 6 do
    if acc[n] and acc[n] ~= 0 then redis.call('HINCRBY', counts, QS_FIELDS[n], acc[n]) end
  end
end
-- Whether queue id ``qid`` is in the hold set. A summary with ``k`` says so itself (``g`` = 1 while
-- held: the hold script keeps it with the set, issue 15: no Redis command for it); one without (an
-- older mtaq's) is asked about: one SCARD a script call first, and no question per message while
-- nothing is held. The scripts that use it only ever take messages out of the set.
local qs_holds = nil
local function qs_is_held(hold, qid, q)
  if q and q.k then return q.g == 1 end
  if qs_holds == nil then qs_holds = redis.call('SCARD', hold) > 0 end
  return qs_holds and redis.call('SISMEMBER', hold, qid) == 1
end
local function qs_copy(q)
  local o = {}
  for j, v in ipairs(q.o) do o[j] = v end
  return {h = q.h, i = q.i, n = q.n, o = o, p = q.p, d = q.d, t = q.t, b = q.b, k = q.k, g = q.g}
end
-- A message removed: its share of the counters and indexes taken out as its summary ``q`` has it
-- (none when q is nil: counted nowhere), then its message hash, recipients hash and left counter,
-- its queue index entry and its hold. The deletion (DELETE) and an outcome that finishes its
-- message (common/statusscript.py) both remove through this.
local function qs_remove(K, qid, msg, rcpt, left, index, hold, q)
  local held = nil
  if q then
    held = qs_is_held(hold, qid, q)
    -- the body's octets as committed (``b``; a summary of an older mtaq has none: the body's)
    qs_account(K, qid, {q = q, held = held, size = q.b or redis.call('HSTRLEN', msg, 'body')}, nil)
  end
  redis.call('DEL', msg, rcpt, left)
  redis.call('ZREM', index, qid)
  if held ~= false then redis.call('SREM', hold, qid) end
end
"""

# A recipient's state changed from ``state`` to ``new`` (the recipient-state script,
# common/statusscript.py): its message's summary ``q`` (decoded) after the change, with the
# difference accounted (K as qs_account's, K.acc given); the caller writes it. ``j`` is the
# recipient's index in the envelope (0-based), ``held`` whether the message is held.
STATUS_ACCOUNT = """
local function qs_status(K, qid, q, state, new, j, held)
  local d = (q.i and q.i[j + 1] or 0) + 1
  local after = qs_copy(q)
  if state == 'pending' then after.p = after.p - 1 else after.d = after.d - 1 end
  if new == 'pending' then after.p = after.p + 1
  elseif new == 'deferred' then after.d = after.d + 1
  else after.o[d] = after.o[d] - 1 end
  qs_account(K, qid, {q = q, held = held, size = 0}, {q = after, held = held, size = 0})
  return after
end
"""

# KEYS: hold set, message hash, counts, deferred index, destinations set, queue index;
# ARGV: queue id, destination index prefix, '1' to hold / '0' to release. 1 when it changed.
HOLD = (
    LIB
    + """
if ARGV[3] == '1' then
  if not redis.call('ZSCORE', KEYS[6], ARGV[1]) then return 0 end
  if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
elseif redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return 0 end
local raw = redis.call('HGET', KEYS[2], 'q')
if raw then
  local q = cjson.decode(raw)
  local h = ARGV[3] == '1'
  local K = {counts = KEYS[3], deferred = KEYS[4], dests = KEYS[5], prefix = ARGV[2]}
  qs_account(K, ARGV[1], {q = q, held = not h, size = 0}, {q = q, held = h, size = 0})
  if q.k then  -- the summary keeps the flag (qs_is_held)
    q.g = h and 1 or nil
    redis.call('HSET', KEYS[2], 'q', cjson.encode(q))
  end
end
return 1
"""
)

# KEYS: queue index, hold set, counts, deferred index, destinations set, then per message its
# message hash, recipients hash and left counter; ARGV: destination index prefix, then the queue
# ids. Deletes whatever is there.
DELETE = (
    LIB
    + """
local K = {counts = KEYS[3], deferred = KEYS[4], dests = KEYS[5], prefix = ARGV[1]}
for n = 2, #ARGV do
  local qid, m = ARGV[n], 6 + 3 * (n - 2)
  local raw = redis.call('HGET', KEYS[m], 'q')
  qs_remove(K, qid, KEYS[m], KEYS[m + 1], KEYS[m + 2], KEYS[1], KEYS[2], raw and cjson.decode(raw))
end
return 1
"""
)

# The sweep's recount of one message, from its recipient states. KEYS: message hash, recipients
# hash, hold set, counts, deferred index, destinations set, queue index; ARGV: queue id,
# destination index prefix, static summary (static_summary), the inline layout's mark
# (common/statusscript.py LAYOUT), '1' when the summary may keep the hold flag (the layout gate).
# Returns false when the message is gone, else {changed (0/1), size, held (0/1), pending, deferred}.
REPAIR = (
    LIB
    + """
if redis.call('EXISTS', KEYS[1]) == 0 or not redis.call('ZSCORE', KEYS[7], ARGV[1]) then return false end
local s = cjson.decode(ARGV[3])
local q = {h = s.h, i = s.i, n = s.n, t = s.t, p = 0, d = 0, o = {}}
for j = 1, #s.h do q.o[j] = 0 end
local states = {}
-- the states in the message hash (``r<n>``, ARGV[4] its layout's mark) or, queued by an older
-- mtaq, in the recipients hash (``<n>``)
local inline = redis.call('HGET', KEYS[1], 'v') == ARGV[4]
for first = 0, s.n - 1, 1000 do -- unpack() is bounded by Lua's stack
  local fields = {}
  for k = first, math.min(s.n, first + 1000) - 1 do
    fields[#fields + 1] = inline and ('r' .. k) or tostring(k)
  end
  local got = redis.call('HMGET', inline and KEYS[1] or KEYS[2], unpack(fields))
  for k = 1, #fields do states[first + k] = got[k] end
end
for k = 0, s.n - 1 do
  local st = 'pending'
  if states[k + 1] then st = cjson.decode(states[k + 1])['s'] end
  if st == 'pending' or st == 'deferred' then
    if st == 'pending' then q.p = q.p + 1 else q.d = q.d + 1 end
    local j = (q.i and q.i[k + 1] or 0) + 1
    q.o[j] = q.o[j] + 1
  end
end
local held = redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1
local size = redis.call('HSTRLEN', KEYS[1], 'body')
q.b = size
if ARGV[5] == '1' then  -- the hold flag kept here from now on, as the set says (the gate is open)
  q.k = 1
  if held then q.g = 1 end
end
local raw = redis.call('HGET', KEYS[1], 'q')
local changed = 1
local write = true
if raw then
  local old = cjson.decode(raw)
  local oldheld = held  -- what the counters were kept with: the summary's flag, where it has one
  if old.k then oldheld = old.g == 1 end
  changed = 0
  if old.p ~= q.p or old.d ~= q.d or #old.h ~= #q.h or oldheld ~= held then changed = 1 end
  for j = 1, #q.h do
    if changed == 0 and (old.h[j] ~= q.h[j] or old.o[j] ~= q.o[j]) then changed = 1 end
  end
  if changed == 1 then
    local K = {counts = KEYS[4], deferred = KEYS[5], dests = KEYS[6], prefix = ARGV[2]}
    qs_account(K, ARGV[1], {q = old, held = oldheld, size = size}, nil)
  end
  write = changed == 1 or (q.k and not old.k)  -- an older summary gets the flag, counted as it was
end
if changed == 1 then
  local K = {counts = KEYS[4], deferred = KEYS[5], dests = KEYS[6], prefix = ARGV[2]}
  qs_account(K, ARGV[1], nil, {q = q, held = held, size = size})
end
if write then redis.call('HSET', KEYS[1], 'q', cjson.encode(q)) end
-- the indexes as the summary says, whatever else has touched them
for j, d in ipairs(q.h) do
  if q.o[j] > 0 then
    if redis.call('ZADD', ARGV[2] .. d, q.t, ARGV[1]) == 1 then changed = 1 end
    redis.call('SADD', KEYS[6], d)
  elseif redis.call('ZREM', ARGV[2] .. d, ARGV[1]) == 1 then changed = 1 end
end
if q.d > 0 then
  if redis.call('ZADD', KEYS[5], q.t, ARGV[1]) == 1 then changed = 1 end
elseif redis.call('ZREM', KEYS[5], ARGV[1]) == 1 then changed = 1 end
local h = 0
if held then h = 1 end
return {changed, size, h, q.p, q.d}
"""
)
