"""The recipient-state script (issue 15: one call for a writer's turn): what records a recipient's
outcome, counts it, keeps the queue's counters (common/queuestats.py) and, for a message's last
open recipient with no report due, removes the message. common/store.py runs it
(``Store.set_status_list``) and names every key it is given."""

from __future__ import annotations

from common import queuestats

__all__ = ["REMOVED", "SET_STATUSES", "STATUSES_PER_CALL"]

# KEYS: rcpt hash, left counter, stats hash, the queue counters' (queuestats.STATUS_ACCOUNT: 4..8),
# events stream, queue index, the (message, destination) lease; ARGV: field, new status JSON, final
# (1/0, or 2: final, and the message goes with it if this was its last open recipient: no report
# is due, the caller knows), stat name, the queue counters' (5..7), then optionally the events'
# MAXLEN and the event's field/value pairs (the event is written exactly when the state is: a
# re-run job reports nothing twice).
# Returns the recipients left when the status became final, -1 when it already was final (a re-run
# job: nothing changes), -2 when the message is gone, -3 after a non-final update, -4 when the
# message was finished and removed here (issue 15: the outcome and the delete in one script, where
# they were two round trips, the second reading again what the first had just read).
REMOVED = -4  # what SET_STATUS_BODY returns when the outcome finished its message and removed it
SET_STATUS_BODY = (
    """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return -2 end
local state = cjson.decode(old)['s']
if state == 'delivered' or state == 'bounced' then return -1 end
if #ARGV > 7 then  -- first: should it fail, the script fails having written nothing
  local unpack = unpack or table.unpack
  redis.call('XADD', KEYS[9], 'MAXLEN', '~', ARGV[8], '*', unpack(ARGV, 9))
end
counted[KEYS[3]] = counted[KEYS[3]] or {}
counted[KEYS[3]][ARGV[4]] = (counted[KEYS[3]][ARGV[4]] or 0) + 1  -- HINCRBY once a call, at its end
if ARGV[3] == '2' then
  local raw = redis.call('HGET', KEYS[4], 'q')
  local q = raw and cjson.decode(raw)
  if q and q.p + q.d == 1 then  -- the last open recipient: removed as queuestats.DELETE removes
    local K = {counts = KEYS[5], deferred = KEYS[7], dests = KEYS[8], prefix = ARGV[7], acc = qs_acc}
    qs_remove(K, ARGV[6], KEYS[4], KEYS[1], KEYS[2], KEYS[10], KEYS[6], q)
    redis.call('DEL', KEYS[11])  -- the job's lease on it
    return """
    + str(REMOVED)
    + """
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
"""
    + queuestats.STATUS_ACCOUNT
    + """
if ARGV[3] ~= '0' then return redis.call('DECR', KEYS[2]) end
return -3
"""
)
# Many outcomes in one script call (issue 15: an EVALSHA per recipient was one command a message
# of its own): the script above as a function of its own KEYS and ARGV (the parameters shadow the
# globals), run per entry in order; the stats it counts, and the queue counters' sums
# (queuestats.qs_flush), are added once a call, at the end (a script that fails midway leaves its
# earlier entries uncounted there: counters, not the queue; the sweep recounts them, `mtaq queue sweep`).
# What every entry shares is given once, not per entry (fewer words to pack and for Redis to read).
# KEYS: stats hash, counts, hold set, deferred index, destinations set, events stream, queue index;
# then 4 per entry: its rcpt hash, left counter, message hash, lease (or the index again). ARGV:
# the number of entries, the destination index prefix, the events' MAXLEN; then per entry the
# number of its arguments and the arguments: field, new status JSON, final, stat name, state, queue
# id, then the event's field/value pairs when it has one. Returns each entry's answer.
SET_STATUSES = (
    queuestats.LIB
    + "local counted, qs_acc = {}, {}\nlocal function one(KEYS, ARGV)\n"
    + SET_STATUS_BODY
    + """
end
local unpack = unpack or table.unpack
local out, k, a = {}, 7, 4
for e = 1, tonumber(ARGV[1]) do
  local n = tonumber(ARGV[a])
  local K = {KEYS[k + 1], KEYS[k + 2], KEYS[1], KEYS[k + 3], KEYS[2], KEYS[3], KEYS[4], KEYS[5],
             KEYS[6], KEYS[7], KEYS[k + 4]}
  local A = {unpack(ARGV, a + 1, a + 6)}
  A[7] = ARGV[2]
  if n > 6 then
    A[8] = ARGV[3]
    for i = a + 7, a + n do A[#A + 1] = ARGV[i] end
  end
  out[e] = one(K, A)
  k = k + 4
  a = a + n + 1
end
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
