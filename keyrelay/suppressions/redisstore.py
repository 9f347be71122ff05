"""Suppressions in Redis (``counters.backend: redis``): shared by every node, beside the
counters, on the same server, database, user and prefix (docs/cluster.md; the keys and the
ACL: docs/suppressions.md).

Per account two keys, without a TTL (a suppression holds until it is removed):
``<prefix>supp:<account>``, a hash of address -> compact JSON record, and
``<prefix>suppidx:<account>``, a sorted set of the same addresses (score 0) for paging in
address order (``ZRANGE ... BYLEX``). Each write is one Lua script, so both keys change
together.

``RedisSuppressions`` (blocking, the ``redis`` client's own connection) is for the CLI and the
events daemon; keyrelay-policyd asks ``RedisLookup.get``, which goes through the counter
store's asyncio connection (``RedisCounters.run``): the policy connection waits for it, the
event loop serves everyone else meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import redis
from redis import exceptions as redis_errors
from redis.sentinel import Sentinel

from ..counters import CountersUnavailable, RedisCounters, RedisTarget
from ..counters.redisstore import describe
from ..counters.scripts import Script
from .model import Suppression, SuppressionsUnavailable

# KEYS: hash, index. ARGV: replace (1/0), then address, JSON value, reason, status for each.
# Answers how many addresses were new. An address already there keeps its created and source.
ADD = Script("suppress", """
local replace = ARGV[1] == '1'
local added = 0
for i = 2, #ARGV, 4 do
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  if not old then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    redis.call('ZADD', KEYS[2], 0, ARGV[i])
    added = added + 1
  elseif replace then
    local record = cjson.decode(old)
    record['reason'] = ARGV[i + 2]
    record['status'] = ARGV[i + 3]
    redis.call('HSET', KEYS[1], ARGV[i], cjson.encode(record))
  end
end
return added
""")
# KEYS: hash, index. ARGV: address. Answers 1 when it was there.
REMOVE = Script("unsuppress", """
redis.call('ZREM', KEYS[2], ARGV[1])
return redis.call('HDEL', KEYS[1], ARGV[1])
""")
# KEYS: hash, index. ARGV: lex start ('-' or '(address'), limit. Answers address, value...
LIST = Script("suppressions", """
local found = redis.call('ZRANGE', KEYS[2], ARGV[1], '+', 'BYLEX', 'LIMIT', 0,
                         tonumber(ARGV[2]))
if #found == 0 then return {} end
local values = redis.call('HMGET', KEYS[1], unpack(found))
local answer = {}
for i = 1, #found do
  answer[#answer + 1] = found[i]
  answer[#answer + 1] = values[i] or ''
end
return answer
""")
GET = Script("suppressed", "return redis.call('HGET', KEYS[1], ARGV[1])")
# the Redis commands these scripts run, beyond the counters' (keyrelay/counters/scripts.py
# ACL_COMMANDS holds them all)
ACL_COMMANDS = ("hget", "hset", "hdel", "hmget", "zadd", "zrem", "zrange", "zcard", "hscan")
_SCAN_COUNT = 1000  # addresses per HSCAN round trip of ``entries``
_CHUNK = 500  # addresses per script call of add_many


def keys(prefix: str, account: str) -> list[str]:
    return [f"{prefix}supp:{account}", f"{prefix}suppidx:{account}"]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def sync_client(target: RedisTarget) -> Any:
    """A blocking ``redis`` client for ``target`` (host and port, socket, TLS, Sentinel)."""
    common: dict[str, Any] = {
        "db": target.db, "username": target.username or None,
        "password": target.password or None, "socket_timeout": target.timeout,
        "socket_connect_timeout": target.timeout,
    }
    tls: dict[str, Any] = {}
    if target.tls:
        tls = {"ssl": True, "ssl_ca_certs": target.ca_file or None,
               "ssl_certfile": target.cert_file or None,
               "ssl_keyfile": target.key_file or None, "ssl_cert_reqs": "required",
               "ssl_check_hostname": True}
    if target.sentinels:
        sentinel = cast(Any, Sentinel)(list(target.sentinels),
                                       sentinel_kwargs={"socket_timeout": target.timeout},
                                       **tls, **common)
        return sentinel.master_for(target.service_name)
    if target.socket:
        return redis.Redis(unix_socket_path=target.socket, **common)
    return redis.Redis(host=target.host, port=target.port, **tls, **common)


class RedisSuppressions:
    """``model.SuppressionStore`` in Redis (blocking)."""

    def __init__(self, target: RedisTarget) -> None:
        self.target = target
        self.prefix = target.prefix
        self._client: Any = None

    def __repr__(self) -> str:
        return f"RedisSuppressions({self.target.where}, prefix {self.prefix!r})"

    def _run(self, script: Script, account: str, args: list[Any]) -> Any:
        if self._client is None:
            self._client = sync_client(self.target)
        names = keys(self.prefix, account)
        try:
            try:
                return self._client.evalsha(script.sha, len(names), *names, *args)
            except redis_errors.NoScriptError:
                return self._client.eval(script.source, len(names), *names, *args)
        except (redis_errors.RedisError, OSError) as exc:
            raise SuppressionsUnavailable(
                f"counters.redis: {describe(exc, self.target)}") from None

    def get(self, account: str, address: str) -> Suppression | None:
        value = self._run(GET, account, [address])
        return None if value is None else Suppression.from_value(address, _text(value))

    def add(self, account: str, suppression: Suppression, *, replace: bool = True) -> bool:
        return int(self._run(ADD, account, ["1" if replace else "0", *_args(suppression)])) == 1

    def add_many(self, account: str, suppressions: list[Suppression]) -> int:
        added = 0
        for start in range(0, len(suppressions), _CHUNK):
            args: list[Any] = ["1"]
            for each in suppressions[start:start + _CHUNK]:
                args += _args(each)
            added += int(self._run(ADD, account, args))
        return added

    def remove(self, account: str, address: str) -> bool:
        return int(self._run(REMOVE, account, [address])) == 1

    def list(self, account: str, after: str = "", limit: int = 1000) -> list[Suppression]:
        if limit <= 0:
            return []
        found = [_text(item) for item in self._run(
            LIST, account, [f"({after}" if after else "-", limit])]
        return [Suppression.from_value(found[i], found[i + 1])
                for i in range(0, len(found), 2)]

    def entries(self, account: str) -> Iterator[tuple[str, str]]:
        """Every (address, stored value) of ``account``'s list, in no order (HSCAN: Redis
        is never blocked for long; an address added or removed meanwhile may be missed)."""
        if self._client is None:
            self._client = sync_client(self.target)
        try:
            for address, value in self._client.hscan_iter(keys(self.prefix, account)[0],
                                                          count=_SCAN_COUNT):
                yield _text(address), _text(value)
        except (redis_errors.RedisError, OSError) as exc:
            raise SuppressionsUnavailable(
                f"counters.redis: {describe(exc, self.target)}") from None

    def count(self, account: str) -> int:
        if self._client is None:
            self._client = sync_client(self.target)
        try:
            return int(self._client.zcard(keys(self.prefix, account)[1]))
        except (redis_errors.RedisError, OSError) as exc:
            raise SuppressionsUnavailable(
                f"counters.redis: {describe(exc, self.target)}") from None

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()


def _args(suppression: Suppression) -> list[str]:
    return [suppression.address, suppression.value(), suppression.reason, suppression.status]


class RedisLookup:
    """keyrelay-policyd's look-up of one recipient, on the counter store's asyncio
    connection to Redis (its batching, its timeout)."""

    def __init__(self, counters: RedisCounters) -> None:
        self.counters = counters
        self.prefix = counters.prefix

    async def get(self, account: str, address: str) -> Suppression | None:
        try:
            value = await self.counters.run(GET, keys(self.prefix, account)[:1], [address])
        except CountersUnavailable as exc:
            raise SuppressionsUnavailable(str(exc)) from None
        return None if value is None else Suppression.from_value(address, _text(value))

    async def close(self) -> None:
        await self.counters.close()
