-- Give a lease back, only while it still carries the caller's token: a holder
-- that lost its lease (expired, reclaimed) must not delete its successor's.
--
-- KEYS[1] lease key   ARGV[1] token
-- Returns 1 if deleted, 0 if the lease was no longer the caller's.
local current = redis.call('GET', KEYS[1])
if current and string.sub(current, 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then
  return redis.call('DEL', KEYS[1])
end
return 0
