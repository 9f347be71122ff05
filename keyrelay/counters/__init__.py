"""Counters of rates, quotas, failed logins, lock-outs and recent logins: in this process
(``MemoryCounters``) or in Redis, shared by several relay nodes (``RedisCounters``, with the
in-process fallback ``Resilient`` while Redis is away). docs/cluster.md, "Counters: what is
shared, how".

- model.py: the windows (``Sliding``, ``Calendar``), the answers (``Usage``, ``Locked``), the
  interface ``CounterStore`` and its one error ``CountersUnavailable``;
- memory.py: the in-process store (the semantics every store shares, bounded);
- scripts.py, redisstore.py: the Redis store, one Lua script per operation;
- fallback.py: Redis away;
- open.py: the store a configuration names, and ``check_counters`` for ``--check-config``.

``keyrelay`` rather than ``policyd``: the CLI (``keyrelay usage``, lock-out listings) reads
the same counters, and ``keyrelay`` may not import ``policyd`` (docs/ARCHITECTURE.md,
"Import rules").
"""

from .fallback import Resilient
from .memory import MemoryCounters
from .model import (
    KINDS,
    Calendar,
    CounterStore,
    CountersUnavailable,
    Kind,
    Locked,
    Sliding,
    Usage,
    Window,
)
from .open import check_counters, check_redis, open_counters, read_password, redis_target
from .redisstore import RedisCounters, RedisTarget

__all__ = [
    "KINDS",
    "Calendar",
    "CounterStore",
    "CountersUnavailable",
    "Kind",
    "Locked",
    "MemoryCounters",
    "RedisCounters",
    "RedisTarget",
    "Resilient",
    "Sliding",
    "Usage",
    "Window",
    "check_counters",
    "check_redis",
    "open_counters",
    "read_password",
    "redis_target",
]
