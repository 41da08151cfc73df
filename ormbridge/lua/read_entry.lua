-- KEYS: the entry, then ARGV[4] stats hashes, then the entry's token keys.
-- ARGV: nonce, token ttl (0 = none), the server's run id, number of stats hashes.
-- Ensures the tokens (a missing one is created as nonce.i; an existing one has its
-- ttl refreshed); the entry is a hit when it starts with their stamp (run id and
-- tokens). Counts the hit or miss. Returns {1, pickle} on a hit, {0, stamp} on a
-- miss: the stamp to store the loaded value under.
local ttl = tonumber(ARGV[2])
local stats = tonumber(ARGV[4])
local parts = {ARGV[3]}
for i = 2 + stats, #KEYS do
  local k = KEYS[i]
  local v
  if ttl > 0 then
    v = redis.call('GETEX', k, 'EX', ttl)
  else
    v = redis.call('GET', k)
  end
  if not v then
    v = ARGV[1] .. '.' .. i
    if ttl > 0 then
      redis.call('SET', k, v, 'EX', ttl)
    else
      redis.call('SET', k, v)
    end
  end
  parts[#parts + 1] = v
end
local stamp = table.concat(parts, ' ') .. '\n'
local entry = redis.call('GET', KEYS[1])
local hit = entry and string.sub(entry, 1, #stamp) == stamp
for i = 2, 1 + stats do
  redis.call('HINCRBY', KEYS[i], hit and 'hits' or 'misses', 1)
end
if hit then
  return {1, string.sub(entry, #stamp + 1)}
end
return {0, stamp}
