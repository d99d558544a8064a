-- One quota decision, atomically: count a request in a window's counter unless it is full.
--
-- KEYS[1]  the counter of one key in one window
-- ARGV[1]  the limit
-- ARGV[2]  when the counter expires: the window's end plus a grace, ms since the epoch
-- returns  the count before this request (admitted when it is below the limit)
local limit = tonumber(ARGV[1])
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used < limit then
  if redis.call('INCR', KEYS[1]) == 1 then
    redis.call('PEXPIREAT', KEYS[1], ARGV[2])
  end
end
return used
