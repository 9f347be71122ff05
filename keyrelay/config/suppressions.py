"""The schema's ``suppressions:`` section: where the suppression list lives when there is no
Redis (docs/suppressions.md). keyrelay/config/__init__.py says what a field's metadata
holds."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SuppressionsConfig:
    path: str = field(
        default="/var/lib/keyrelay/suppressions.db",
        metadata={"doc": "The SQLite file of the suppression list with counters.backend "
                  "memory (one node): written by `keyrelay suppression` and keyrelay-events, "
                  "read by keyrelay-policyd (its folder writable by the daemons' user). With "
                  "counters.backend redis the list is in Redis and this file is not used.",
                  "absolute_path": True},
    )
