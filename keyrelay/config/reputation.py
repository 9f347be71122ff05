"""The schema's ``reputation:`` section: the reputation guard, which pauses a principal whose
bounce rate runs away (docs/reputation.md). keyrelay/config/__init__.py says what a field's
metadata holds."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import Duration


@dataclass(frozen=True, slots=True)
class ReputationConfig:
    enabled: bool = field(
        default=True,
        metadata={"doc": "Count every principal's delivered and bounced recipients "
                  "(keyrelay-events) and pause one whose bounce rate passes max_bounce_rate "
                  "(keyrelay-policyd answers its messages 451 4.7.1 until `keyrelay subuser "
                  "resume`). false: nothing counted, nothing paused, nothing checked."},
    )
    window: Duration = field(
        default=Duration(86400.0),
        metadata={"doc": "The rolling window the bounce rate is taken over (kept in 144 "
                  "slices: an event counts for between 143/144 of it and all of it).",
                  "min": 600, "max": 30 * 86400},
    )
    min_volume: int = field(
        default=200,
        metadata={"doc": "Delivered plus bounced recipients a principal needs in the window "
                  "before its rate is judged at all.", "min": 1, "max": 100_000_000},
    )
    max_bounce_rate: float = field(
        default=0.05,
        metadata={"doc": "Bounces / (delivered + bounces) above which the principal is "
                  "paused (0.05: 5 %; exactly this rate is not paused). A bounce of either "
                  "type counts; deferrals do not.", "min": 0.0, "max": 1.0},
    )
    monitor: bool = field(
        default=False,
        metadata={"doc": "Only log, count and send a would_pause webhook event for a "
                  "principal that would be paused; its mail goes on (an account in monitor "
                  "mode is treated so too)."},
    )
    path: str = field(
        default="",
        metadata={"doc": "The SQLite file of the counts and pauses with counters.backend "
                  "memory (one node): written by keyrelay-events and `keyrelay subuser "
                  "resume`, read by keyrelay-policyd (its folder writable by the daemons' "
                  "user). Empty: reputation.db in the folder of suppressions.path "
                  "(/var/lib/keyrelay/reputation.db by default). With counters.backend redis "
                  "the counts and pauses are in Redis and this file is not used.",
                  "absolute_path": True, "allow_empty": True},
    )
    refresh: Duration = field(
        default=Duration(5.0),
        metadata={"doc": "keyrelay-policyd keeps the paused principals in memory and reads "
                  "them again at most this often: a pause or a resume takes effect within "
                  "this time.", "min": 0.1, "max": 300},
    )
