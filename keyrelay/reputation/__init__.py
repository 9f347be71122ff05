"""The reputation guard: per principal, a rolling bounce rate from keyrelay-events' delivery
events; a principal past the threshold is paused, and keyrelay-policyd answers its mail
``451 4.7.1`` until an admin resumes it (docs/reputation.md).

- model.py: the pause record, the window's buckets, the decision (``tripped``), the texts,
  the ``ReputationStore`` interface;
- sqlitestore.py, redisstore.py: the two stores (a SQLite file of one node; Redis beside the
  counters), and policyd's asyncio read ``RedisPauses``;
- open.py: the store a configuration names;
- guard.py: what keyrelay-events runs each round: count, check, pause;
- pauses.py: keyrelay-policyd's in-memory copy of the pauses.
"""

from .guard import Guard, event_of, log_line
from .model import (
    Pause,
    ReputationStore,
    ReputationUnavailable,
    bucket_of,
    bucket_size,
    describe,
    oldest_bucket,
    percent,
    principal_of,
    resume_command,
    span,
    tripped,
)
from .open import open_reputation, reputation_path
from .pauses import PauseCache
from .redisstore import RedisPauses, RedisReputation
from .sqlitestore import SqliteReputation

__all__ = [
    "Guard",
    "Pause",
    "PauseCache",
    "RedisPauses",
    "RedisReputation",
    "ReputationStore",
    "ReputationUnavailable",
    "SqliteReputation",
    "bucket_of",
    "bucket_size",
    "describe",
    "event_of",
    "log_line",
    "oldest_bucket",
    "open_reputation",
    "percent",
    "principal_of",
    "reputation_path",
    "resume_command",
    "span",
    "tripped",
]
