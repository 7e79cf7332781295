"""The Lua scripts the shared tier runs on Redis: each is one atomic step of agentkv's protocol
(shared.py explains it)."""

__all__ = ["CLAIM", "PUBLISH", "DROP", "RELEASE"]

# KEYS: manifest, lease. ARGV: this turn's lease token, this worker's token prefix, lease ms.
# A lease held by another worker: {0, holder, gen, rec}; else take it: {1, holder, gen, rec}.
CLAIM = """
local holder = redis.call('GET', KEYS[2])
local m = redis.pcall('HMGET', KEYS[1], 'gen', 'rec')
if type(m) ~= 'table' or m.err then m = {false, false} end
if holder and string.sub(holder, 1, string.len(ARGV[2])) ~= ARGV[2] then
  return {0, holder, m[1], m[2]}
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
return {1, ARGV[1], m[1], m[2]}
"""

# KEYS: manifest, lease. ARGV: gen, record bytes, ttl s (0: none), lease token.
# Accepted over an older (or unreadable) generation: {1, gen}; else refused: {0, held gen}.
# Either way, this turn's lease is released.
PUBLISH = """
if redis.call('GET', KEYS[2]) == ARGV[4] then redis.call('DEL', KEYS[2]) end
local cur = redis.pcall('HGET', KEYS[1], 'gen')
if type(cur) == 'table' then cur = false end
if cur and tonumber(cur) and tonumber(cur) >= tonumber(ARGV[1]) then
  return {0, cur}
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'gen', ARGV[1], 'rec', ARGV[2])
if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return {1, ARGV[1]}
"""

# KEYS: manifest. ARGV: the record bytes found damaged: deleted unless replaced meanwhile.
DROP = """
if redis.call('HGET', KEYS[1], 'rec') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
