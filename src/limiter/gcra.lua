-- One GCRA decision, atomically, on Redis' clock (so every gateway agrees on "now").
-- The same comparison as `decide` in gcra.rs; the gateway derives the headers from what this
-- returns by running that function on the same inputs.
--
-- KEYS[1]  the key's TAT: µs since the epoch, as an integer string
-- ARGV[1]  T, the emission interval, µs
-- ARGV[2]  τ, the tolerance (T × burst), µs
-- returns  { now µs, the TAT before this request or -1, 1 admitted | 0 refused }
--
-- Times stay below 2^53 µs, so Lua's doubles hold them exactly.
if redis.replicate_commands then
  -- Redis < 5 must be told that a script calling TIME replicates its effects, not itself.
  pcall(redis.replicate_commands)
end
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local stored = redis.call('GET', KEYS[1])
local before = -1
local tat = now
if stored then
  before = tonumber(stored)
  if before > tat then tat = before end
end
if tat - now <= tolerance then
  local after = tat + interval
  -- The key expires when its bucket is full again: forgetting it then changes nothing.
  redis.call('SET', KEYS[1], string.format('%.0f', after), 'PX', math.ceil((after - now) / 1000))
  return { now, before, 1 }
end
return { now, before, 0 }
