"""The schema's ``suppressions:`` section: where the suppression list lives when there is no
Redis (docs/suppressions.md). keyrelay/config/__init__.py says what a field's metadata
holds."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import Duration, InvalidField


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
    replica: str = field(
        default="/var/lib/keyrelay/suppressions-replica.db",
        metadata={"doc": "With counters.backend redis and counters.on_unavailable local: "
                  "this node's copy of the lists in Redis, written by keyrelay-events every "
                  "replica_interval; while Redis is away keyrelay-policyd checks recipients "
                  "against it (docs/suppressions.md, \"The replica\"). Empty: no copy (451 "
                  "4.3.0 while Redis is away).",
                  "absolute_path": True, "allow_empty": True},
    )
    replica_interval: Duration = field(
        default=Duration(60.0),
        metadata={"doc": "How often keyrelay-events copies the lists.", "min": 5,
                  "max": 86400},
    )
    replica_max_age: Duration = field(
        default=Duration(3600.0),
        metadata={"doc": "A copy older than this is not used: recipients get 451 4.3.0 "
                  "while Redis is away, as without a copy.", "min": 60},
    )

    def __post_init__(self) -> None:
        if self.replica and self.replica_max_age < 2 * self.replica_interval:
            raise InvalidField("replica_max_age", f"{self.replica_max_age:g}s is less than "
                               f"twice replica_interval ({self.replica_interval:g}s): a copy "
                               "would be too old before the next one is written")
