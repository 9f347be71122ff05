"""Suppression lists: per account, the recipients keyrelay refuses at RCPT (550 5.7.1,
reason ``suppressed``) because they hard-bounced or an admin listed them
(docs/suppressions.md).

- model.py: ``Suppression``, the ``SuppressionStore`` interface, the cleaning of hostile text;
- sqlitestore.py: the SQLite file (``counters.backend: memory``, one node);
- redisstore.py: Redis beside the counters (``counters.backend: redis``), and policyd's
  asyncio look-up ``RedisLookup``;
- open.py: the store a configuration names;
- csvfile.py: import and export in the layout of SendGrid's bounce list;
- bounce.py: ``suppress_hard_bounce``, what keyrelay-events calls for a hard bounce.
"""

from .bounce import suppress_hard_bounce
from .model import (
    MAX_REASON,
    SOURCES,
    Suppression,
    SuppressionStore,
    SuppressionsUnavailable,
    address,
    clean_status,
    clean_text,
    make,
)
from .open import open_suppressions
from .redisstore import RedisLookup, RedisSuppressions
from .sqlitestore import SqliteSuppressions

__all__ = [
    "MAX_REASON",
    "SOURCES",
    "RedisLookup",
    "RedisSuppressions",
    "SqliteSuppressions",
    "Suppression",
    "SuppressionStore",
    "SuppressionsUnavailable",
    "address",
    "clean_status",
    "clean_text",
    "make",
    "open_suppressions",
    "suppress_hard_bounce",
]
