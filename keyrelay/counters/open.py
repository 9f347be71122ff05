"""The counter store a configuration names (``open_counters``), and the check that
``--check-config`` runs (``check_counters``): connect, authenticate, write and read one key,
or one line saying what is wrong (docs/cluster.md)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from zoneinfo import ZoneInfo

from ..config import Config, CountersConfig, RedisConfig
from .fallback import Resilient
from .memory import MemoryCounters
from .model import CounterStore, CountersUnavailable
from .redisstore import RedisCounters, RedisTarget


def read_password(cfg: RedisConfig) -> str:
    """The password in ``password_file`` ("" without one); CountersUnavailable naming the
    setting when the file cannot be read."""
    if not cfg.password_file:
        return ""
    try:
        with open(cfg.password_file, encoding="utf-8") as handle:
            password = handle.read().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise CountersUnavailable(
            f"counters.redis.password_file: cannot read {cfg.password_file}: {reason}"
        ) from None
    if not password:
        raise CountersUnavailable(
            f"counters.redis.password_file: {cfg.password_file} is empty")
    return password


def redis_target(cfg: RedisConfig) -> RedisTarget:
    """Where ``cfg`` says to connect, with the password read from its file."""
    sentinels = []
    for entry in cfg.sentinels:
        host, port = entry.rsplit(":", 1)
        sentinels.append((host.strip("[]"), int(port)))
    return RedisTarget(
        host=cfg.host, port=cfg.port, socket=cfg.socket, db=cfg.db, username=cfg.username,
        password=read_password(cfg), tls=cfg.tls.enabled, ca_file=cfg.tls.ca_file,
        cert_file=cfg.tls.cert_file, key_file=cfg.tls.key_file, timeout=cfg.timeout,
        prefix=cfg.prefix, sentinels=tuple(sentinels), service_name=cfg.service_name)


def open_counters(config: Config | CountersConfig, *, max_tracked: int = 100_000,
                  per_key: int = 8, clock: Callable[[], float] = time.time) -> CounterStore:
    """The store of ``counters:``: ``MemoryCounters``, or Redis with the in-process
    fallback (``Resilient``). No connection is made yet; CountersUnavailable when the
    password file cannot be read."""
    cfg = config.counters if isinstance(config, Config) else config
    zone = ZoneInfo(cfg.time_zone)
    local = MemoryCounters(max_tracked=max_tracked, per_key=per_key, zone=zone, clock=clock)
    if cfg.backend == "memory":
        return local
    shared = RedisCounters(redis_target(cfg.redis), max_tracked=max_tracked, per_key=per_key,
                           zone=zone, clock=clock)
    return Resilient(shared, local, cfg.on_unavailable)


async def check_redis(cfg: RedisConfig) -> None:
    """Connect to Redis as ``cfg`` says and run the check script; CountersUnavailable with
    one line naming the setting and what failed (never the password)."""
    store = RedisCounters(redis_target(cfg))
    try:
        await store.check()
    finally:
        try:
            await store.close()
        except Exception:  # noqa: BLE001, S110 - closing a connection that failed anyway
            pass


def check_counters(config: Config | CountersConfig) -> None:
    """What ``--check-config`` asks of ``counters:``: nothing for the memory backend; for
    Redis a real connection, login and write. Raises CountersUnavailable with one line, e.g.
    ``counters.redis: cannot connect to redis at 127.0.0.1:6390: Connection refused``."""
    cfg = config.counters if isinstance(config, Config) else config
    if cfg.backend == "redis":
        asyncio.run(check_redis(cfg.redis))
