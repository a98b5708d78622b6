-- Operator break of a dead or stale lease: delete it only if it still holds
-- exactly the value that was judged (a renewal in between changes the value,
-- so a holder that came back to life keeps its lease).
--
-- KEYS[1] lease key   ARGV[1] the value judged dead or stale
-- Returns 1 if deleted, 0 otherwise.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
