"""The reputation guard's counts and pauses in Redis (``counters.backend: redis``), shared by
every node: the same server, database, user and prefix as the counters (docs/reputation.md,
"Redis keys").

- ``<prefix>rep:<principal>``: a hash, fields ``d:<bucket>`` and ``b:<bucket>`` (delivered and
  bounced recipients per bucket of the window); TTL: the window, renewed at each write;
  buckets older than the window are deleted when the principal is counted again;
- ``<prefix>repmark:<node>``: the last event ``seq`` of that node's state file counted (a
  round counted twice after a crash adds nothing); TTL 30 days;
- ``<prefix>reppause``: a hash, principal -> the pause's compact JSON, no TTL.

Each write is one Lua script. ``RedisReputation`` (blocking) is keyrelay-events' and the
CLI's; keyrelay-policyd reads the pauses with ``RedisPauses`` on the counters' asyncio
connection.
"""

from __future__ import annotations

from typing import Any

from redis import exceptions as redis_errors

from ..counters import CountersUnavailable, RedisCounters, RedisTarget
from ..counters.redisstore import describe
from ..counters.scripts import Script
from ..suppressions.redisstore import sync_client
from .model import Increments, Pause, ReputationUnavailable

MARK_TTL_MS = 30 * 86400 * 1000

# KEYS: the node's mark, then one hash per principal. ARGV: upto, TTL in ms, oldest bucket,
# then per hash one string "bucket delivered bounced bucket delivered bounced ...".
RECORD = Script("reputation_record", """
local upto = tonumber(ARGV[1])
local mark = tonumber(redis.call('GET', KEYS[1]) or '0')
if mark >= upto then return 0 end
local oldest = tonumber(ARGV[3])
for k = 2, #KEYS do
  local words = {}
  for word in string.gmatch(ARGV[k + 2], '%S+') do words[#words + 1] = word end
  for i = 1, #words, 3 do
    if words[i + 1] ~= '0' then
      redis.call('HINCRBY', KEYS[k], 'd:' .. words[i], tonumber(words[i + 1]))
    end
    if words[i + 2] ~= '0' then
      redis.call('HINCRBY', KEYS[k], 'b:' .. words[i], tonumber(words[i + 2]))
    end
  end
  local fields = redis.call('HKEYS', KEYS[k])
  for _, field in ipairs(fields) do
    if tonumber(string.sub(field, 3)) < oldest then redis.call('HDEL', KEYS[k], field) end
  end
  redis.call('PEXPIRE', KEYS[k], ARGV[2])
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', %d)
return 1
""".replace("%d", str(MARK_TTL_MS)))
# KEYS: one hash per principal. ARGV: oldest bucket. Answers delivered, bounced per hash.
COUNTS = Script("reputation_counts", """
local oldest = tonumber(ARGV[1])
local out = {}
for k = 1, #KEYS do
  local all = redis.call('HGETALL', KEYS[k])
  local d, b = 0, 0
  for i = 1, #all, 2 do
    if tonumber(string.sub(all[i], 3)) >= oldest then
      if string.sub(all[i], 1, 1) == 'd' then d = d + tonumber(all[i + 1])
      else b = b + tonumber(all[i + 1]) end
    end
  end
  out[#out + 1] = d
  out[#out + 1] = b
end
return out
""")
# KEYS: the pauses' hash. ARGV: principal, value, monitor ('1'/'0'). Answers 1 when written:
# the principal was not paused, or only by a monitor-only record and this one is real.
PAUSE = Script("reputation_pause", """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  if ARGV[3] == '1' or not cjson.decode(old)['monitor'] then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
""")
# KEYS: the pauses' hash, the principal's counts. ARGV: principal. Answers the ended pause.
RESUME = Script("reputation_resume", """
local old = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return old
""")
PAUSED = Script("reputation_paused", "return redis.call('HGETALL', KEYS[1])")
GET = Script("reputation_get", "return redis.call('HGET', KEYS[1], ARGV[1])")
# the Redis commands these scripts run beyond the counters' and the suppressions'
# (keyrelay/counters/scripts.py ACL_COMMANDS holds them all)
ACL_COMMANDS = ("hincrby", "hgetall", "hkeys")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def pauses_from(flat: list[Any]) -> dict[str, Pause]:
    items = [_text(v) for v in flat]
    return {items[i]: Pause.from_value(items[i], items[i + 1]) for i in range(0, len(items), 2)}


class RedisReputation:
    """``model.ReputationStore`` in Redis (blocking)."""

    def __init__(self, target: RedisTarget) -> None:
        self.target = target
        self.prefix = target.prefix
        self._client: Any = None

    def __repr__(self) -> str:
        return f"RedisReputation({self.target.where}, prefix {self.prefix!r})"

    def _run(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        if self._client is None:
            self._client = sync_client(self.target)
        try:
            try:
                return self._client.evalsha(script.sha, len(keys), *keys, *args)
            except redis_errors.NoScriptError:
                return self._client.eval(script.source, len(keys), *keys, *args)
        except (redis_errors.RedisError, OSError) as exc:
            raise ReputationUnavailable(
                f"counters.redis: {describe(exc, self.target)}") from None

    def _counts_key(self, principal: str) -> str:
        return f"{self.prefix}rep:{principal}"

    def mark(self, node: str) -> int:
        value = self._run(GET_MARK, [f"{self.prefix}repmark:{node}"], [])
        return 0 if value is None else int(_text(value))

    def record(self, node: str, upto: int, increments: Increments, oldest: int,
               window: float) -> bool:
        per: dict[str, list[str]] = {}
        for (principal, bucket), (delivered, bounced) in increments.items():
            per.setdefault(principal, []).append(f"{bucket} {delivered} {bounced}")
        keys = [f"{self.prefix}repmark:{node}", *(self._counts_key(p) for p in per)]
        args: list[Any] = [upto, int(window * 1000), oldest, *(" ".join(w) for w in per.values())]
        return int(self._run(RECORD, keys, args)) == 1

    def counts(self, principals: list[str], oldest: int) -> dict[str, tuple[int, int]]:
        if not principals:
            return {}
        flat = self._run(COUNTS, [self._counts_key(p) for p in principals], [oldest])
        return {p: (int(flat[2 * i]), int(flat[2 * i + 1])) for i, p in enumerate(principals)}

    def pause(self, pause: Pause) -> bool:
        return int(self._run(PAUSE, [f"{self.prefix}reppause"], [
            pause.principal, pause.value(), "1" if pause.monitor else "0"])) == 1

    def paused(self) -> dict[str, Pause]:
        return pauses_from(self._run(PAUSED, [f"{self.prefix}reppause"], []))

    def get(self, principal: str) -> Pause | None:
        value = self._run(GET, [f"{self.prefix}reppause"], [principal])
        return None if value is None else Pause.from_value(principal, _text(value))

    def resume(self, principal: str) -> Pause | None:
        value = self._run(RESUME, [f"{self.prefix}reppause", self._counts_key(principal)],
                          [principal])
        return None if value is None else Pause.from_value(principal, _text(value))

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()


GET_MARK = Script("reputation_mark", "return redis.call('GET', KEYS[1])")


class RedisPauses:
    """keyrelay-policyd's read of every pause, on the counter store's asyncio connection."""

    def __init__(self, counters: RedisCounters) -> None:
        self.counters = counters
        self.prefix = counters.prefix

    async def paused(self) -> dict[str, Pause]:
        try:
            flat = await self.counters.run(PAUSED, [f"{self.prefix}reppause"], [])
        except CountersUnavailable as exc:
            raise ReputationUnavailable(str(exc)) from None
        return pauses_from(flat)
