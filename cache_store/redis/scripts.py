"""The Lua scripts that make a partition's checkpoint one atomic, fenced step in Redis.

Every key a script touches carries the partition's hash tag, so in Redis Cluster they share
one slot. Block keys of blocks a manifest no longer names are built inside the script from
the stream's block-key prefix (same tag, same slot): the client does not know them without
an extra round trip.
"""

from __future__ import annotations

# KEYS: 1 epoch, 2 next offset, 3 outbox, 4 the partition's stream set, then per stream: its
#       manifest, its block set, then its block keys.
# ARGV: 1 expected epoch ('' = unfenced), 2 next offset ('' = unchanged), 3 idle TTL in
#       seconds (0 = none), 4 stream count, then per stream: id, block-key prefix, manifest,
#       block count, block ids; then outbox entries to append.
# Returns {'ok', freed blocks}, {'fenced', current epoch} or {'missing', block key...}.
COMMIT = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {'fenced', redis.call('GET', KEYS[1]) or ''}
end
local ttl = tonumber(ARGV[3])
local streams = tonumber(ARGV[4])
local missing = {}
local a, k = 5, 5
for s = 1, streams do
  local n = tonumber(ARGV[a + 3])
  for i = 1, n do
    if redis.call('EXISTS', KEYS[k + 1 + i]) == 0 then missing[#missing + 1] = KEYS[k + 1 + i] end
  end
  a, k = a + 4 + n, k + 2 + n
end
if #missing > 0 then return {'missing', unpack(missing)} end
local freed = 0
a, k = 5, 5
for s = 1, streams do
  local stream, prefix, manifest, n = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])
  local keep = {}
  for i = 1, n do keep[ARGV[a + 3 + i]] = true end
  for _, old in ipairs(redis.call('SMEMBERS', KEYS[k + 1])) do
    if not keep[old] then
      redis.call('DEL', prefix .. old)
      freed = freed + 1
    end
  end
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
  a, k = a + 4 + n, k + 2 + n
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

# KEYS: 1 manifest, 2 block set, 3 the partition's stream set. ARGV: 1 stream id,
# 2 block-key prefix. Returns 1 if the stream had a state, else 0.
DELETE_STREAM = """
for _, bid in ipairs(redis.call('SMEMBERS', KEYS[2])) do redis.call('DEL', ARGV[2] .. bid) end
redis.call('SREM', KEYS[3], ARGV[1])
return redis.call('DEL', KEYS[1], KEYS[2]) > 0 and 1 or 0
"""
