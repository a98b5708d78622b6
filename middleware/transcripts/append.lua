-- Append one turn's records to a session's transcript stream, fenced, all or nothing.
--
-- Kleppmann's rule: the storage checks the fencing token. A writer whose fence
-- is older than the session's newest (the fence counter acquire.lua keeps) lost
-- its lane: nothing is written and the newest fence is returned. Redis runs a
-- script alone, so no write can slip between the check and the XADDs, however
-- long the caller stalled before sending it. Redis checks memory before a
-- writing script starts (no half-run on OOM), and the AOF keeps the script's
-- writes as one MULTI/EXEC block, so a crash leaves all of them or none.
-- A retried call (its first reply lost) finds its first record id indexed and
-- writes nothing again.
--
-- KEYS[1] transcript stream   KEYS[2] index hash ("field:value" -> stream id)
-- KEYS[3] fence counter key
-- ARGV[1] the caller's fence ("" for an unfenced append)
-- then per record: its JSON, the number n of its index entries, n entries
-- (the first is always "id:<record id>").
-- Returns 0 (written), -1 (already appended: nothing written) or, when the
-- fence is too old, the newest fence (nothing written).
if ARGV[1] ~= '' then
  local newest = redis.call('GET', KEYS[3])
  if newest and tonumber(ARGV[1]) < tonumber(newest) then
    return tonumber(newest)
  end
end
if redis.call('HEXISTS', KEYS[2], ARGV[4]) == 1 then
  return -1
end
local i = 2
while i <= #ARGV do
  local stream_id = redis.call('XADD', KEYS[1], '*', 'r', ARGV[i])
  local entries = tonumber(ARGV[i + 1])
  for j = i + 2, i + 1 + entries do
    redis.call('HSETNX', KEYS[2], ARGV[j], stream_id)
  end
  i = i + 2 + entries
end
return 0
