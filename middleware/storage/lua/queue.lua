-- A session's FIFO of waiting tickets (lane.mode = queue), shared by every instance.
--
-- The queue is a sorted set of ticket ids scored by arrival; each live waiter
-- keeps a heartbeat key "<ticket prefix><id>" with a time to live. Walking the
-- queue from the head drops tickets whose heartbeat key is gone (dead waiters),
-- then answers the ticket's position. An absent ticket is added at the tail
-- when fewer than ARGV[3] live tickets wait.
--
-- KEYS[1] queue key   ARGV[1] ticket id   ARGV[2] ticket key prefix
-- ARGV[3] cap         ARGV[4] heartbeat time to live (ms)
-- Returns the 0-based position, or -1 when the ticket is absent and was not added.
local position = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if id == ARGV[1] then
    return position
  end
  if redis.call('EXISTS', ARGV[2] .. id) == 1 then
    position = position + 1
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
if position >= tonumber(ARGV[3]) then
  return -1
end
local now = redis.call('TIME')
local arrival = tonumber(now[1]) * 1000000 + tonumber(now[2])
local tail = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if tail[2] then
  arrival = math.max(arrival, tonumber(tail[2]) + 1)
end
redis.call('ZADD', KEYS[1], arrival, ARGV[1])
redis.call('SET', ARGV[2] .. ARGV[1], '1', 'PX', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return position
