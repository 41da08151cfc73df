-- KEYS: the entry, then ARGV[6] token keys, then stats hashes.
-- ARGV: the stamp the value was loaded under, the stamp and the pickle, the
-- timeout (0 = none), the tokens' ttl (0 = none), the server's run id, the
-- number of token keys. Stores only if the tokens still make that stamp (no
-- invalidation since the read), and keeps them at least as long as the entry.
local tokens = tonumber(ARGV[6])
local parts = {ARGV[5]}
for i = 2, 1 + tokens do
  local v = redis.call('GET', KEYS[i])
  if not v then
    return 0
  end
  parts[#parts + 1] = v
end
if table.concat(parts, ' ') .. '\n' ~= ARGV[1] then
  return 0
end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
local ttl = tonumber(ARGV[4])
for i = 2, 1 + tokens do
  local left = redis.call('TTL', KEYS[i])
  if ttl == 0 then
    redis.call('PERSIST', KEYS[i])
  elseif left >= 0 and left < ttl then
    redis.call('EXPIRE', KEYS[i], ttl)
  end
end
for i = 2 + tokens, #KEYS do
  redis.call('HINCRBY', KEYS[i], 'stores', 1)
end
return 1
