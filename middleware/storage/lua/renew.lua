-- Heartbeat of a lease: refresh its holder record and time to live, only while
-- the lease still carries the caller's token (never revive someone else's).
--
-- KEYS[1] lease key   ARGV[1] token   ARGV[2] new value   ARGV[3] time to live (ms)
-- Returns 1 if renewed, 0 if the lease is no longer the caller's.
local current = redis.call('GET', KEYS[1])
if current and string.sub(current, 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
