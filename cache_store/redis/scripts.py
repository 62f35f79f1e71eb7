"""The Lua scripts that make a partition's checkpoint one atomic, fenced step in Redis.

Every key a script touches is declared in KEYS, and all of them carry the partition's hash
tag, so in Redis Cluster they share one slot and EVALSHA goes to the node that holds it.
The client names the blocks a commit or a delete drops: it reads the stream's block set in
the round trip that already checks which blocks Redis lacks. The script refuses ('stale')
if that set changed since, and the client reads it again.
"""

from __future__ import annotations

# KEYS: 1 epoch, 2 next offset, 3 outbox.
# Returns {epoch after the INCR, next offset or nil, the outbox entries}.
CLAIM = """
local epoch = redis.call('INCR', KEYS[1])
return {epoch, redis.call('GET', KEYS[2]), redis.call('LRANGE', KEYS[3], 0, -1)}
"""

# KEYS: 1 epoch, 2 next offset, 3 outbox, 4 the partition's stream set, then per stream: its
#       manifest, its block set, its n block keys, then the d block keys it drops.
# ARGV: 1 expected epoch ('' = unfenced), 2 next offset ('' = unchanged), 3 idle TTL in
#       seconds (0 = none), 4 stream count, then per stream: id, manifest, n, d, the n block
#       ids, the d dropped block ids; then outbox entries to append.
# Returns {'ok', freed blocks}, {'fenced', current epoch}, {'missing', block key...} or
# {'stale', stream id...}. Nothing is written unless it returns 'ok'.
COMMIT = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {'fenced', redis.call('GET', KEYS[1]) or ''}
end
local ttl = tonumber(ARGV[3])
local streams = tonumber(ARGV[4])
local missing, stale = {}, {}
local a, k = 5, 5
for s = 1, streams do
  local n, d = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  for i = 1, n do
    if redis.call('EXISTS', KEYS[k + 1 + i]) == 0 then missing[#missing + 1] = KEYS[k + 1 + i] end
  end
  local named = {}
  for i = 1, n + d do named[ARGV[a + 3 + i]] = true end
  for _, old in ipairs(redis.call('SMEMBERS', KEYS[k + 1])) do
    if not named[old] then
      stale[#stale + 1] = ARGV[a]
      break
    end
  end
  a, k = a + 4 + n + d, k + 2 + n + d
end
if #missing > 0 then return {'missing', unpack(missing)} end
if #stale > 0 then return {'stale', unpack(stale)} end
local freed = 0
a, k = 5, 5
for s = 1, streams do
  local stream, manifest = ARGV[a], ARGV[a + 1]
  local n, d = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  for i = 1, d do freed = freed + redis.call('DEL', KEYS[k + 1 + n + i]) end
  redis.call('DEL', KEYS[k + 1])
  for i = 1, n do
    redis.call('SADD', KEYS[k + 1], ARGV[a + 3 + i])
    if ttl > 0 then redis.call('EXPIRE', KEYS[k + 1 + i], ttl)
    else redis.call('PERSIST', KEYS[k + 1 + i]) end
  end
  redis.call('SET', KEYS[k], manifest)
  if ttl > 0 then
    redis.call('EXPIRE', KEYS[k], ttl)
    redis.call('EXPIRE', KEYS[k + 1], ttl)
  end
  redis.call('SADD', KEYS[4], stream)
  a, k = a + 4 + n + d, k + 2 + n + d
end
if ARGV[2] ~= '' then redis.call('SET', KEYS[2], ARGV[2]) end
for i = a, #ARGV do redis.call('RPUSH', KEYS[3], ARGV[i]) end
return {'ok', freed}
"""

# KEYS: 1 epoch, 2 outbox. ARGV: 1 expected epoch, 2 entries to drop from the head.
TRIM_OUTBOX = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {'fenced', redis.call('GET', KEYS[1]) or ''}
end
redis.call('LTRIM', KEYS[2], tonumber(ARGV[2]), -1)
return {'ok', 0}
"""

# KEYS: 1 manifest, 2 block set, 3 the partition's stream set, then the stream's block keys.
# ARGV: 1 stream id, then the ids of those blocks. Returns 1 if the stream had a state, 0 if
# not, -1 (nothing deleted) if its block set names a block not given.
DELETE_STREAM = """
local given = {}
for i = 2, #ARGV do given[ARGV[i]] = true end
for _, bid in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if not given[bid] then return -1 end
end
for i = 4, #KEYS do redis.call('DEL', KEYS[i]) end
redis.call('SREM', KEYS[3], ARGV[1])
return redis.call('DEL', KEYS[1], KEYS[2]) > 0 and 1 or 0
"""
