"""The Lua scripts of the Redis counter store: each operation is one script, so one atomic
round trip (docs/cluster.md, "Counters: what is shared, how").

Times and numbers that the store keeps are passed in as strings (Python's ``repr`` of a float
reads back exactly) and written as given: Redis turns a Lua number into text with 14
significant digits only. A script deletes failure records it evicts by name (built from the
prefix): fine on one server or a Sentinel-managed primary, not on Redis Cluster (unsupported).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())  # noqa: S324 - Redis names scripts by SHA-1


# KEYS: per window, a sliding one's current and previous bucket, or a calendar period's key.
# ARGV: amount, then one string of four words per window: "s" or "c", limit, fraction of the
# bucket gone by, TTL in ms (one argument: the client packs less). Answers {0} (taken) or
# {i, current, previous} of the first window that refused.
TAKE = Script("take", """
local amount = tonumber(ARGV[1])
local spec = {}
for word in string.gmatch(ARGV[2], '%S+') do spec[#spec + 1] = word end
local counts = redis.call('MGET', unpack(KEYS))
local k = 1
for a = 1, #spec, 4 do
  local current = tonumber(counts[k] or '0')
  local previous = 0
  if spec[a] == 's' then
    previous = tonumber(counts[k + 1] or '0')
    k = k + 2
  else
    k = k + 1
  end
  if math.ceil(current + previous * (1.0 - tonumber(spec[a + 2]))) + amount
      > tonumber(spec[a + 1]) then
    return {(a + 3) / 4, current, previous}
  end
end
k = 1
for a = 1, #spec, 4 do
  -- a new key gets its TTL; one that exists has had it since it was made, long enough
  if redis.call('INCRBY', KEYS[k], amount) == amount then
    redis.call('PEXPIRE', KEYS[k], spec[a + 3])
  end
  if spec[a] == 's' then k = k + 2 else k = k + 1 end
end
return {0}
""")

# KEYS as for TAKE; ARGV: the kinds ("s" or "c"), one per window. Answers current, previous
# for each window (previous 0 for a calendar window).
PEEK = Script("peek", """
local out = {}
local k = 1
for i = 1, #ARGV do
  out[#out + 1] = tonumber(redis.call('GET', KEYS[k]) or '0')
  if ARGV[i] == 's' then
    out[#out + 1] = tonumber(redis.call('GET', KEYS[k + 1]) or '0')
    k = k + 2
  else
    out[#out + 1] = 0
    k = k + 1
  end
end
return out
""")

# KEYS: the failure record (hash), the kind's tracked set (member: key, score: last failure),
# the kind's lock-out set (score: until). ARGV: now, max_failures, window, lockout, until if
# locked now, max_tracked, key, prefix of failure records of this kind. As MemoryCounters.fail
# (memory.py), with its bounds: at most max_tracked records per kind, the least
# recently failed evicted first. Answers 1 when this failure starts a lock-out.
FAIL = Script("fail", """
local now, maxf = tonumber(ARGV[1]), tonumber(ARGV[2])
local window, lockout = tonumber(ARGV[3]), tonumber(ARGV[4])
local max_tracked, member, records = tonumber(ARGV[6]), ARGV[7], ARGV[8]
local e = redis.call('HMGET', KEYS[1], 'first', 'count', 'until', 'since', 'struck')
local first, until_, since, struck = e[1], e[3] or '0', e[4] or '0', tonumber(e[5] or '0')
local count = tonumber(e[2] or '0')
if first == false or (now - tonumber(first) > window and tonumber(until_) <= now) then
  first, count, until_, since, struck = ARGV[1], 0, '0', '0', 0
end
count = count + 1
local started = 0
if tonumber(until_) > now then
  struck = struck + 1
elseif count >= maxf then
  until_, since, struck, first, count, started = ARGV[5], ARGV[1], count, ARGV[1], 0, 1
  redis.call('ZADD', KEYS[3], until_, member)
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[1])
  local ttl = math.ceil(lockout * 1000)
  if redis.call('PTTL', KEYS[3]) < ttl then redis.call('PEXPIRE', KEYS[3], ttl) end
end
redis.call('HSET', KEYS[1], 'first', first, 'count', count, 'until', until_, 'since', since,
           'struck', struck)
local keep = math.max(tonumber(first) + window, tonumber(until_)) - now
redis.call('PEXPIRE', KEYS[1], math.max(1, math.ceil(keep * 1000)))
local horizon = math.max(window, lockout)
redis.call('ZADD', KEYS[2], ARGV[1], member)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. tostring(now - horizon))
local extra = redis.call('ZCARD', KEYS[2]) - max_tracked
if extra > 0 then
  for _, old in ipairs(redis.call('ZRANGE', KEYS[2], 0, extra - 1)) do
    redis.call('DEL', records .. old)
    redis.call('ZREM', KEYS[3], old)
  end
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, extra - 1)
end
local ttl = math.ceil(horizon * 1000)
if redis.call('PTTL', KEYS[2]) < ttl then redis.call('PEXPIRE', KEYS[2], ttl) end
return started
""")

# KEYS: each kind's lock-out set; ARGV: now, then each kind's name and record prefix. Answers
# kind, key, since, until, failures for each lock-out in force.
LOCKED = Script("locked", """
local now = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS do
  local kind, records = ARGV[2 * i], ARGV[2 * i + 1]
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[1])
  for _, member in ipairs(redis.call('ZRANGE', KEYS[i], 0, -1)) do
    local e = redis.call('HMGET', records .. member, 'since', 'until', 'struck')
    if e[2] and tonumber(e[2]) > now then
      out[#out + 1] = kind
      out[#out + 1] = member
      out[#out + 1] = e[1]
      out[#out + 1] = e[2]
      out[#out + 1] = e[3]
    end
  end
end
return out
""")

# KEYS: the record, the tracked set, the lock-out set; ARGV: now, key. Answers 1 when the key
# was locked out.
CLEAR = Script("clear", """
local until_ = redis.call('HGET', KEYS[1], 'until')
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[2])
if until_ and tonumber(until_) > tonumber(ARGV[1]) then return 1 end
return 0
""")

# KEYS: per kind its tracked set and its lock-out set; ARGV: now, then per kind its record
# prefix. Answers how many lock-outs were in force.
CLEAR_ALL = Script("clear_all", """
local now = tonumber(ARGV[1])
local lifted = 0
for i = 1, #KEYS / 2 do
  local records = ARGV[i + 1]
  for _, set in ipairs({KEYS[2 * i - 1], KEYS[2 * i]}) do
    for _, member in ipairs(redis.call('ZRANGE', set, 0, -1)) do
      local until_ = redis.call('HGET', records .. member, 'until')
      if until_ and tonumber(until_) > now then lifted = lifted + 1 end
      redis.call('DEL', records .. member)
    end
    redis.call('DEL', set)
  end
end
return lifted
""")

# KEYS: the key id's recent clients (member: client, score: last login); ARGV: now, client,
# per_key, keep in seconds. At most per_key clients, the least recently seen dropped first.
SUCCEEDED = Script("succeeded", """
local keep = tonumber(ARGV[4])
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. tostring(tonumber(ARGV[1]) - keep))
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[3]) + 1))
local ttl = math.max(1, math.ceil(keep * 1000))
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 0
""")

# KEYS: one key in the namespace; what `check_counters` runs: a write, a read, a delete.
CHECK = Script("check", """
redis.call('SET', KEYS[1], '1', 'PX', 10000)
local found = redis.call('GET', KEYS[1])
redis.call('DEL', KEYS[1])
return found
""")

ALL = (TAKE, PEEK, FAIL, LOCKED, CLEAR, CLEAR_ALL, SUCCEEDED, CHECK)

# What the ACL user of counters.redis must be allowed (docs/cluster.md, "Redis ACL"): the
# commands above, those the store sends itself, and those of the client's connection set-up.
ACL_COMMANDS = (
    "ping", "select", "evalsha", "eval", "hget", "zscore", "zcount", "get", "mget",
    "set", "incrby", "pexpire", "pttl", "hmget", "hset", "del", "zadd", "zrem", "zcard",
    "zrange", "zremrangebyscore", "zremrangebyrank",
    "hdel", "hscan",  # the suppression list (keyrelay/suppressions/redisstore.py)
    "hincrby", "hgetall", "hkeys",  # the reputation guard (keyrelay/reputation/redisstore.py)
)


def acl_rules(prefix: str) -> str:
    """The ``ACL SETUSER`` rules (after ``on >password``) for a user of ``prefix``."""
    return f"~{prefix}* resetchannels -@all " + " ".join(f"+{c}" for c in ACL_COMMANDS)
