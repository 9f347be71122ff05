"""The reputation guard's model: a pause record, the counts of a window, the decision, and
the interface both stores implement (docs/reputation.md).

Everything here is pure: no I/O, the clock passed in.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from ..durations import format_duration
from ..errors import KeyrelayError

SLICES = 144  # the window is kept in this many buckets (10 minutes of 24 hours)
BY = ("guard", "admin")


class ReputationUnavailable(KeyrelayError):
    """The reputation store cannot answer (Redis away, the SQLite file unreadable): one line
    for the log; the caller answers temporarily or tries again."""


@dataclass(frozen=True, slots=True)
class Pause:
    """A principal paused: since when, the rate and counts that tripped it, by whom.
    ``monitor``: only what would have been paused (reputation.monitor, or the account in
    monitor mode): keyrelay-policyd lets its mail pass."""

    principal: str
    since: float  # Unix seconds
    rate: float  # bounces / (delivered + bounces) when it tripped
    delivered: int
    bounced: int
    window: float  # seconds
    threshold: float  # reputation.max_bounce_rate then
    by: str = "guard"
    monitor: bool = False

    def value(self) -> str:
        data = asdict(self)
        del data["principal"]
        return json.dumps(data, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_value(cls, principal: str, value: str) -> Pause:
        data: dict[str, Any] = json.loads(value)
        return cls(principal, float(data.get("since", 0)), float(data.get("rate", 0)),
                   int(data.get("delivered", 0)), int(data.get("bounced", 0)),
                   float(data.get("window", 0)), float(data.get("threshold", 0)),
                   str(data.get("by", "guard")), bool(data.get("monitor", False)))


def bucket_size(window: float) -> int:
    """Seconds per bucket: the window in ``SLICES`` slices, whole seconds."""
    return max(1, math.ceil(window / SLICES))


def bucket_of(timestamp: float, window: float) -> int:
    return int(timestamp // bucket_size(window))


def oldest_bucket(now: float, window: float) -> int:
    """The oldest bucket still inside the window at ``now``: each event counts for at least
    ``window - bucket_size`` and less than ``window`` seconds."""
    return int((now - window) // bucket_size(window)) + 1


def tripped(delivered: int, bounced: int, min_volume: int, max_rate: float) -> float | None:
    """The bounce rate when it is above ``max_rate`` with at least ``min_volume`` delivered
    and bounced recipients; None otherwise (below the volume nothing is judged; exactly the
    threshold is not above it)."""
    total = delivered + bounced
    if total < min_volume or total == 0:
        return None
    rate = bounced / total
    return rate if rate > max_rate else None


def percent(rate: float) -> str:
    """``0.125`` -> ``12.5 %``; ``0.05`` -> ``5 %``."""
    shown = f"{rate * 100:.1f}".removesuffix(".0")
    return f"{shown} %"


def resume_command(principal: str) -> str:
    if "/" in principal:
        return f"keyrelay subuser resume {principal}"
    return f"keyrelay account resume {principal}"


def span(window: float) -> str:
    """``86400`` -> ``24h``: whole hours in hours, anything else as the config writes it."""
    if window >= 3600 and window % 3600 == 0:
        return f"{int(window // 3600)}h"
    return format_duration(window)


def describe(pause: Pause) -> str:
    """``bounce rate 12.5 % (250 of 2000) over 24h is above 5 %``."""
    total = pause.delivered + pause.bounced
    return (f"bounce rate {percent(pause.rate)} ({pause.bounced} of {total}) over "
            f"{span(pause.window)} is above {percent(pause.threshold)}")


def principal_of(event: dict[str, Any]) -> str | None:
    """The principal that sent the message of a delivery event: ``account/subuser``, or the
    account; None for an event keyrelay did not attribute."""
    account = event.get("account")
    if not isinstance(account, str) or not account:
        return None
    subuser = event.get("subuser")
    return f"{account}/{subuser}" if isinstance(subuser, str) and subuser else account


def counted(event: dict[str, Any]) -> tuple[int, int] | None:
    """(delivered, bounced) that an event adds: a ``delivered`` is (1, 0), a ``bounce`` of
    either type (0, 1); anything else (deferred, dropped, processed...) counts nothing."""
    kind = event.get("event")
    if kind == "delivered":
        return 1, 0
    if kind == "bounce":
        return 0, 1
    return None


# (principal, bucket) -> [delivered, bounced]
Increments = dict[tuple[str, int], list[int]]


class ReputationStore(Protocol):
    """The counts and pauses, shared by every node: Redis, or the SQLite file of one node."""

    def mark(self, node: str) -> int:
        """The last event ``seq`` of this node's state file already counted (0: none)."""
        ...

    def record(self, node: str, upto: int, increments: Increments, oldest: int,
               window: float) -> bool:
        """Add ``increments`` and set the node's mark to ``upto``, atomically; nothing when
        the mark is already there (a round counted before a crash). Buckets older than
        ``oldest`` of the principals touched are dropped. True when counted now."""
        ...

    def counts(self, principals: list[str], oldest: int) -> dict[str, tuple[int, int]]:
        """(delivered, bounced) of each principal over the buckets from ``oldest`` on."""
        ...

    def pause(self, pause: Pause) -> bool:
        """Record ``pause`` unless the principal is paused already (a monitor-only record
        gives way to a real pause); True when written."""
        ...

    def paused(self) -> dict[str, Pause]:
        ...

    def get(self, principal: str) -> Pause | None:
        ...

    def resume(self, principal: str) -> Pause | None:
        """End the pause and drop the principal's counts (its window starts afresh); the
        pause that was ended, or None."""
        ...

    def close(self) -> None:
        ...
