"""The reputation store a configuration names: Redis with ``counters.backend: redis``, else
the SQLite file ``reputation.path``, by default beside the suppression list's
(docs/reputation.md)."""

from __future__ import annotations

import os

from ..config import Config
from ..counters import CountersUnavailable, redis_target
from .model import ReputationStore, ReputationUnavailable
from .redisstore import RedisReputation
from .sqlitestore import SqliteReputation


def reputation_path(config: Config) -> str:
    """``reputation.path``, or reputation.db beside the suppression list's file."""
    if config.reputation.path:
        return config.reputation.path
    return os.path.join(os.path.dirname(config.suppressions.path), "reputation.db")


def open_reputation(config: Config, *, create: bool = True) -> ReputationStore:
    """The store of this configuration (no connection yet). ``create``: a writer creates
    the SQLite file; a reader finds no file empty."""
    if config.counters.backend == "redis":
        try:
            return RedisReputation(redis_target(config.counters.redis))
        except CountersUnavailable as exc:
            raise ReputationUnavailable(str(exc)) from None
    return SqliteReputation(reputation_path(config), create=create)
