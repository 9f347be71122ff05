"""The suppression store a configuration names: Redis with ``counters.backend: redis``,
else the SQLite file ``suppressions.path`` (docs/suppressions.md)."""

from __future__ import annotations

from ..config import Config
from ..counters import CountersUnavailable, redis_target
from .model import SuppressionStore, SuppressionsUnavailable
from .redisstore import RedisSuppressions
from .sqlitestore import SqliteSuppressions


def open_suppressions(config: Config, *, create: bool = True) -> SuppressionStore:
    """The store of this configuration (no connection yet). ``create``: a writer (the CLI,
    the events daemon) creates the SQLite file; a reader (policyd) finds no file empty."""
    if config.counters.backend == "redis":
        try:
            return RedisSuppressions(redis_target(config.counters.redis))
        except CountersUnavailable as exc:
            raise SuppressionsUnavailable(str(exc)) from None
    return SqliteSuppressions(config.suppressions.path, create=create)
