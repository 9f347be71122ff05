"""The reputation store a configuration names: Redis with ``counters.backend: redis``, else
the SQLite file ``reputation.path`` (docs/reputation.md)."""

from __future__ import annotations

from ..config import Config
from ..counters import CountersUnavailable, redis_target
from .model import ReputationStore, ReputationUnavailable
from .redisstore import RedisReputation
from .sqlitestore import SqliteReputation


def open_reputation(config: Config, *, create: bool = True) -> ReputationStore:
    """The store of this configuration (no connection yet). ``create``: a writer creates
    the SQLite file; a reader finds no file empty."""
    if config.counters.backend == "redis":
        try:
            return RedisReputation(redis_target(config.counters.redis))
        except CountersUnavailable as exc:
            raise ReputationUnavailable(str(exc)) from None
    return SqliteReputation(config.reputation.path, create=create)
