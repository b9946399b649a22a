"""The recipient-state script (issue 15: one call for a writer's turn): what records a recipient's
outcome, counts it, keeps the queue's counters (common/queuestats.py) and, for a message's last
open recipient with no report due, removes the message. common/store.py runs it
(``Store.set_status_list``) and names every key it is given."""

from __future__ import annotations

from common import queuestats
from common.events import ENTRY_COUNT_FIELD, ENTRY_FIELD

__all__ = ["LAYOUT_FIELD", "LAYOUT_INLINE", "REMOVED", "SET_STATUSES", "STATUSES_PER_CALL"]

# KEYS: rcpt hash, left counter (both only for a message an older mtaq queued: see LAYOUT), stats
# hash, message hash, counts, hold set, deferred index, destinations set, events stream, queue
# index, the queue index again (once a lease: common/leasebook.py); ARGV: recipient index, new
# status JSON, final (1/0, or 2: final, and the message goes with it if this was its last open
# recipient: no report is due, the caller knows), stat name, new state, queue id, destination
# index prefix, then optionally the event as JSON (common/events.py event_json), kept for the
# call's one stream entry exactly when the state is written: a re-run job reports nothing twice.
# Returns the recipients left when the status became final, -1 when it already was final (a re-run
# job: nothing changes), -2 when the message is gone, -3 after a non-final update, -4 when the
# message was finished and removed here (issue 15: the outcome and the delete in one script, where
# they were two round trips, the second reading again what the first had just read).
#
# LAYOUT: a message committed by this mtaq keeps its recipients' states in its own hash (field
# ``r<index>``, absent while pending) and says so in field ``v``; its open recipients are its
# summary's pending plus deferred (``q``). One key a message instead of three: two commands fewer at
# the commit, one at the load, one per outcome (issue 15). A message an older mtaq queued has them
# in ``mtaq:rcpt:<id>`` with its counter in ``mtaq:left:<id>``, and is finished that way. An older
# worker cannot read this layout: it is written only once every worker reads it (the layout gate,
# common/store.py LAYOUT_KEY).
REMOVED = -4  # what SET_STATUS_BODY returns when the outcome finished its message and removed it
LAYOUT_FIELD = "v"
LAYOUT_INLINE = "2"
SET_STATUS_BODY = (
    """
local got = redis.call('HMGET', KEYS[4], '"""
    + LAYOUT_FIELD
    + """', 'r' .. ARGV[1], 'q')
local inline = got[1] == '"""
    + LAYOUT_INLINE
    + """'
local old = got[2]
if not inline then
  old = redis.call('HGET', KEYS[1], ARGV[1])
  if not old then return -2 end  -- gone (or never there)
end
local q = got[3] and cjson.decode(got[3])
if not old then  -- pending, if the message has such a recipient
  local n = q and q.n or #cjson.decode(redis.call('HGET', KEYS[4], 'env'))['rcpt']
  if tonumber(ARGV[1]) >= n then return -2 end
end
local state = old and cjson.decode(old)['s'] or 'pending'
if state == 'delivered' or state == 'bounced' then return -1 end
if ARGV[8] then events[#events + 1] = ARGV[8] end  -- XADD once a call, at its end
counted[KEYS[3]] = counted[KEYS[3]] or {}
counted[KEYS[3]][ARGV[4]] = (counted[KEYS[3]][ARGV[4]] or 0) + 1  -- HINCRBY once a call, at its end
local K = {counts = KEYS[5], deferred = KEYS[7], dests = KEYS[8], prefix = ARGV[7], acc = qs_acc}
if ARGV[3] == '2' and q and q.p + q.d == 1 then
  -- the last open recipient: removed as queuestats.DELETE removes
  qs_remove(K, ARGV[6], KEYS[4], KEYS[1], KEYS[2], KEYS[10], KEYS[6], q)
  return """
    + str(REMOVED)
    + """
end
local after = q
if q and ARGV[5] ~= state then
  after = qs_status(K, ARGV[6], q, state, ARGV[5], tonumber(ARGV[1]), qs_is_held(KEYS[6], ARGV[6], q))
end
if not inline then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  if after ~= q then redis.call('HSET', KEYS[4], 'q', cjson.encode(after)) end
  if ARGV[3] ~= '0' then return redis.call('DECR', KEYS[2]) end
  return -3
end
if after ~= q then
  redis.call('HSET', KEYS[4], 'r' .. ARGV[1], ARGV[2], 'q', cjson.encode(after))
else
  redis.call('HSET', KEYS[4], 'r' .. ARGV[1], ARGV[2])
end
if ARGV[3] == '0' then return -3 end
if after then return math.max(0, after.p + after.d) end  -- a drifted summary: the finisher looks
-- no summary (nothing this mtaq writes lacks one; the sweep's repair writes it): count the states
local open = 0
for k = 0, #cjson.decode(redis.call('HGET', KEYS[4], 'env'))['rcpt'] - 1 do
  local st = redis.call('HGET', KEYS[4], 'r' .. k)
  local s = st and cjson.decode(st)['s'] or 'pending'
  if s ~= 'delivered' and s ~= 'bounced' then open = open + 1 end
end
return open
"""
)
# Many outcomes in one script call (issue 15: an EVALSHA per recipient was one command a message
# of its own): the script above as a function of its own KEYS and ARGV (the parameters shadow the
# globals), run per entry in order; the stats it counts, and the queue counters' sums
# (queuestats.qs_flush), are added once a call, at the end (a script that fails midway leaves its
# earlier entries uncounted there: counters, not the queue; the sweep recounts them, `mtaq queue sweep`).
# What every entry shares is given once, not per entry (fewer words to pack and for Redis to read).
# KEYS: stats hash, counts, hold set, deferred index, destinations set, events stream, queue index;
# then 4 per entry: its rcpt hash, left counter, message hash, the queue index again. ARGV:
# the number of entries, the destination index prefix, the events' MAXLEN; then per entry the
# number of its arguments and the arguments: field, new status JSON, final, stat name, state, queue
# id, then the event's JSON when it has one. Returns each entry's answer.
SET_STATUSES = (
    queuestats.LIB
    + queuestats.STATUS_ACCOUNT
    + "local counted, qs_acc, events = {}, {}, {}\nlocal function one(KEYS, ARGV)\n"
    + SET_STATUS_BODY
    + """
end
local unpack = unpack or table.unpack
-- the call's events in one entry (common/events.py ENTRY_FIELD, ENTRY_COUNT_FIELD), after the
-- states it reports; ARGV[3] is the stream's length in entries (common/store.py)
local function flush_events()
  if #events == 0 then return end
  local batch = '[' .. table.concat(events, ',') .. ']'
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[3], '*', '"""
    + ENTRY_FIELD
    + """', batch, '"""
    + ENTRY_COUNT_FIELD
    + """', #events)
  events = {}
end
local out, k, a = {}, 7, 4
for e = 1, tonumber(ARGV[1]) do
  local n = tonumber(ARGV[a])
  local K = {KEYS[k + 1], KEYS[k + 2], KEYS[1], KEYS[k + 3], KEYS[2], KEYS[3], KEYS[4], KEYS[5],
             KEYS[6], KEYS[7], KEYS[k + 4]}
  local A = {unpack(ARGV, a + 1, a + 6)}
  A[7] = ARGV[2]
  if n > 6 then A[8] = ARGV[a + 7] end  -- the event, when the entry has one
  local ok, got = pcall(one, K, A)
  if not ok then
    flush_events()  -- the entries before it are written, and their events with them
    error(got)
  end
  out[e] = got
  k = k + 4
  a = a + n + 1
end
flush_events()
for key, fields in pairs(counted) do
  for field, by in pairs(fields) do redis.call('HINCRBY', key, field, by) end
end
qs_flush(KEYS[2], qs_acc)
return out
"""
)
# entries per call of SET_STATUSES: a script blocks Redis while it runs (`mtaq queue bounce`
# may hand over thousands)
STATUSES_PER_CALL = 200
