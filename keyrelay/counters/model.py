"""What every counter store shares: the windows a ``take`` checks, its answers, the lock-outs,
the one error of a store that cannot answer, and the interface ``CounterStore``
(docs/cluster.md, "Counters: what is shared, how").

Time is the store's clock: wall-clock seconds since the epoch (``time.time``), injectable for
tests. Several relay nodes share one store, so their clocks must agree (NTP); a monotonic
clock means nothing on another host.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, Protocol
from zoneinfo import ZoneInfo

from ..errors import DirectoryUnavailable

Kind = Literal["address", "key"]
KINDS: tuple[Kind, ...] = ("address", "key")


class CountersUnavailable(DirectoryUnavailable):
    """The counter store cannot answer now (Redis away, hung, refusing us): every operation
    of a store raises this and only this, within the store's timeout.

    A subclass of ``DirectoryUnavailable``: wherever a front end answers temporarily because
    of our own fault, it answers temporarily for this too (docs/ARCHITECTURE.md, "Failures").
    The message never holds a password.
    """


@dataclass(frozen=True, slots=True)
class Sliding:
    """A sliding window of ``seconds``: at most ``limit`` units within any ``seconds``.

    The two-bucket sliding-window counter: the count of the current fixed bucket plus the
    previous bucket's, weighted by how much of it still overlaps the window. Exact when events
    are evenly spread, never off by more than the previous bucket's count. ``subject`` names
    what is counted (a principal such as ``acme/app``; no ``:``)."""

    subject: str
    seconds: int
    limit: int

    @property
    def name(self) -> str:
        return f"{self.subject}:{self.seconds}s"

    def bucket(self, now: float) -> tuple[int, float]:
        """The current bucket's number and the fraction of it gone by at ``now``."""
        number = int(now // self.seconds)
        return number, now / self.seconds - number

    def estimate(self, current: int, previous: int, elapsed: float) -> float:
        return current + previous * (1.0 - elapsed)

    def resets_in(self, current: int, previous: int, elapsed: float, amount: int) -> float:
        """Seconds until ``amount`` more would fit (the count only falls as time passes);
        two windows when ``amount`` is above the limit itself."""
        room = self.limit - amount
        if room < 0:
            return 2.0 * self.seconds
        if not over(self.estimate(current, previous, elapsed), amount, self.limit):
            return 0.0
        if current <= room:  # within this bucket: previous * (1 - f) <= room - current
            needed = 1.0 - (room - current) / previous
            return max(0.0, (needed - elapsed) * self.seconds)
        # only in the next bucket, where the current count becomes the weighted previous one
        needed = 1.0 - room / current
        return (1.0 - elapsed + needed) * self.seconds


@dataclass(frozen=True, slots=True)
class Calendar:
    """A calendar window: at most ``limit`` units per day or per month, counted from
    midnight (of the first day) in the store's time zone. ``subject`` as for ``Sliding``."""

    subject: str
    unit: Literal["day", "month"]
    limit: int

    @property
    def name(self) -> str:
        return f"{self.subject}:{self.unit}"

    def period(self, now: float, zone: ZoneInfo) -> tuple[str, float]:
        """The period's label (``2026-12-04`` or ``2026-12``) and the seconds until it ends."""
        label, end = _period(self.unit, math.floor(now), zone)
        return label, max(end - now, 0.0)


@functools.lru_cache(maxsize=64)
def _period(unit: str, second: int, zone: ZoneInfo) -> tuple[str, float]:
    """The label and end (epoch seconds) of the day or month holding ``second``; cached, as
    every request of the same second asks for the same."""
    local = datetime.fromtimestamp(second, zone)
    if unit == "day":
        label = f"{local.year:04d}-{local.month:02d}-{local.day:02d}"
        end = datetime(local.year, local.month, local.day) + timedelta(days=1)
    else:
        label = f"{local.year:04d}-{local.month:02d}"
        end = (datetime(local.year + 1, 1, 1) if local.month == 12
               else datetime(local.year, local.month + 1, 1))
    return label, end.replace(tzinfo=zone).timestamp()


Window = Sliding | Calendar


def over(count: float, amount: int, limit: int) -> bool:
    """Would ``amount`` more put ``count`` over ``limit``? An estimated count is rounded up
    (19.2 counts as 20), as the policy service always did."""
    return math.ceil(count) + amount > limit


@dataclass(frozen=True, slots=True)
class Usage:
    """One window's count at a moment: for a refusal, the window that refused."""

    window: Window
    count: float  # a sliding window's is an estimate; a calendar window's is exact
    limit: int
    resets_in: float  # seconds until the count allows the amount asked (a period's end)


@dataclass(frozen=True, slots=True)
class Locked:
    """One lock-out in force, of one kind: who (an address, its IPv6 /64, or a key id), since
    and until when on the store's clock, and the failures that led to it and came during
    it."""

    kind: Kind
    subject: str
    since: float
    until: float
    failures: int


class CounterStore(Protocol):
    """Rates and quotas, failed logins and lock-outs, recent logins: in memory
    (``MemoryCounters``) or shared by several nodes (``RedisCounters``). Every method raises
    only ``CountersUnavailable`` for a fault of the store; ``ValueError`` for a bad argument.
    """

    async def take(self, windows: tuple[Window, ...], amount: int = 1) -> Usage | None:
        """Add ``amount`` to every window at once, unless that would put one over its limit:
        then add nothing and answer the first such window. None: taken."""

    async def peek(self, windows: tuple[Window, ...]) -> list[Usage]:
        """Each window's count now, nothing added (``resets_in`` for one more unit)."""

    async def fail(self, kind: Kind, key: str, max_failures: int, window: float,
                   lockout: float) -> bool:
        """Count one failure of ``key``; True when this one starts a lock-out."""

    async def locked_for(self, kind: Kind, key: str) -> float:
        """Seconds ``key`` stays locked out; 0 when it is not."""

    async def locked(self, kind: Kind | None = None) -> list[Locked]:
        """The lock-outs in force (of one kind, or both), the earliest first."""

    async def clear(self, kind: Kind, key: str) -> bool:
        """Forget ``key``'s failures and lift its lock-out; True when it was locked out."""

    async def clear_all(self) -> int:
        """Forget every failure and lift every lock-out; how many were in force."""

    async def succeeded(self, key_id: str, client: str, keep: float) -> None:
        """Remember one successful login of ``key_id`` from ``client`` for at least ``keep``
        seconds (``policyd.bruteforce.trusted_for``)."""

    async def since(self, key_id: str, client: str) -> float | None:
        """Seconds since ``key_id`` last logged in from ``client``; None if not remembered."""

    async def clients(self, key_id: str, within: float) -> int:
        """How many clients ``key_id`` logged in from within the last ``within`` seconds."""

    async def close(self) -> None:
        """Let go of connections; the store is not used afterwards."""


def check_windows(windows: tuple[Window, ...], amount: int) -> None:
    """Refuse arguments no caller should pass (``ValueError``)."""
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
        raise ValueError(f"amount must be an integer of at least 0, got {amount!r}")
    for window in windows:
        if ":" in window.subject or not window.subject:
            raise ValueError(f"a window's subject must be a name without ':', got "
                             f"{window.subject!r}")
        if window.limit < 0:
            raise ValueError(f"{window.name}: limit must be at least 0, got {window.limit}")
        if isinstance(window, Sliding) and window.seconds < 1:
            raise ValueError(f"{window.name}: a sliding window is at least 1 second")
