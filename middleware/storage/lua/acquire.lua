-- Take one session lease (lane or transcript write lock) in one atomic step.
--
-- The lease is free, or still holds exactly the value the caller saw and judged
-- reclaimable (a dead holder on the caller's host): then it becomes
-- "<token> <holder record>" with a time to live of staleMs; the record is
-- encode_holder's (storage/base.py), JSON ending in the fence's digits and "}".
-- A lane grant also issues the session's next fencing token here, so no grant
-- exists without one.
-- Fences only grow: each is the larger of last + 1 and the Redis server clock in
-- microseconds, so they stay ahead of every earlier grant even after a restart
-- that lost the counter.
--
-- KEYS[1] lease key          KEYS[2] fence counter key
-- ARGV[1] token              ARGV[2] holder record up to its fence's digits (holder_head)
-- ARGV[3] time to live (ms)  ARGV[4] reclaimable value to replace ("" for none)
-- ARGV[5] "1" to issue a fencing token, "0" for none
-- Returns the fence (0 without one), or, when someone else holds the lease, its
-- current value (a string), so the caller can judge that holder without a GET.
local current = redis.call('GET', KEYS[1])
if current then
  if string.sub(current, 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then
    -- already ours: a retried call whose first reply was lost
    return tonumber(string.match(current, '(%d+)}$'))
  end
  if current ~= ARGV[4] then
    return current
  end
end
local fence = 0
if ARGV[5] == '1' then
  local now = redis.call('TIME')
  local clock_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
  local last = tonumber(redis.call('GET', KEYS[2]) or '0')
  fence = math.max(last + 1, clock_us)
  redis.call('SET', KEYS[2], string.format('%d', fence))
end
local value = ARGV[1] .. ' ' .. ARGV[2] .. string.format('%d', fence) .. '}'
redis.call('SET', KEYS[1], value, 'PX', ARGV[3])
return fence
