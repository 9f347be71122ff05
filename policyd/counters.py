"""In-memory counters: message rates per principal, login failures per address / key id, and
where each key id recently logged in.

All are bounded: rate counters hold two numbers per principal and window; failure trackers
keep at most ``max_tracked`` entries and forget the least recently failed first, so an attack
from many addresses cannot grow memory without limit; the recent logins keep at most
``per_key`` clients for each of at most ``max_tracked`` key ids (only a good key adds one).
(Several relay nodes sharing limits need a shared store such as Redis, a later step:
``LockoutStore`` is the interface of the failure trackers that such a store implements.)
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol


class SlidingWindow:
    """Approximate count of events in the last ``window`` seconds, per key.

    The sliding-window counter: the current fixed window's count plus the previous window's,
    weighted by how much of it still overlaps the sliding window. O(1) time and memory per
    key; exact when events are evenly spread, never off by more than the previous window.
    """

    __slots__ = ("_counts", "_window")

    def __init__(self, window: float) -> None:
        self._window = window
        self._counts: dict[str, tuple[int, int, int]] = {}  # key -> (window no, current, previous)

    def _state(self, key: str, now: float) -> tuple[int, int, int]:
        number = int(now // self._window)
        found = self._counts.get(key)
        if found is None:
            return number, 0, 0
        seen, current, _ = found
        if seen == number:
            return found
        if seen == number - 1:
            return number, 0, current
        return number, 0, 0

    def count(self, key: str, now: float) -> float:
        number, current, previous = self._state(key, now)
        elapsed = now / self._window - number  # fraction of the current window gone by
        return current + previous * (1.0 - elapsed)

    def add(self, key: str, now: float) -> None:
        number, current, previous = self._state(key, now)
        self._counts[key] = (number, current + 1, previous)

    def prune(self, now: float) -> None:
        """Forget keys whose last event is more than two windows old."""
        number = int(now // self._window)
        stale = [key for key, (seen, _, _) in self._counts.items() if seen < number - 1]
        for key in stale:
            del self._counts[key]

    def __len__(self) -> int:
        return len(self._counts)


@dataclass(frozen=True, slots=True)
class Locked:
    """One lock-out in force: who (an address, its IPv6 /64, or a key id), since and until
    when (on the tracker's clock), and the failures that led to it and came during it."""

    subject: str
    since: float
    until: float
    failures: int


class LockoutStore(Protocol):
    """What the auth service and the control socket ask of a failure tracker: in memory
    (``FailureTracker``) or, for several relay nodes, a shared store. ``now`` is the caller's
    clock, in seconds."""

    def locked_for(self, key: str, now: float) -> float: ...
    def fail(self, key: str, now: float) -> bool: ...
    def locked(self, now: float) -> list[Locked]: ...
    def clear(self, key: str, now: float) -> bool: ...
    def clear_all(self, now: float) -> int: ...


@dataclass(slots=True)
class _Failures:
    first: float
    count: int
    locked_until: float = 0.0
    locked_since: float = 0.0
    struck: int = 0  # failures that started the lock-out, and those counted during it


class FailureTracker:
    """Failures per key within a window; ``max_failures`` of them lock the key out."""

    def __init__(
        self, max_failures: int, window: float, lockout: float, max_tracked: int
    ) -> None:
        self._max_failures = max_failures
        self._window = window
        self._lockout = lockout
        self._max_tracked = max_tracked
        self._entries: OrderedDict[str, _Failures] = OrderedDict()

    def locked_for(self, key: str, now: float) -> float:
        """Seconds the key stays locked out; 0 when it is not."""
        entry = self._entries.get(key)
        if entry is None or entry.locked_until <= now:
            return 0.0
        return entry.locked_until - now

    def fail(self, key: str, now: float) -> bool:
        """Count one failure; True when this failure starts a lock-out."""
        entry = self._entries.get(key)
        if entry is None or (now - entry.first > self._window and entry.locked_until <= now):
            entry = _Failures(first=now, count=0)
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_tracked:
            self._entries.popitem(last=False)
        entry.count += 1
        if entry.locked_until > now:
            entry.struck += 1
        elif entry.count >= self._max_failures:
            entry.locked_until = now + self._lockout
            entry.locked_since, entry.struck = now, entry.count
            entry.first, entry.count = now, 0
            return True
        return False

    def locked(self, now: float) -> list[Locked]:
        """The lock-outs in force at ``now``, the earliest first."""
        found = [Locked(key, entry.locked_since, entry.locked_until, entry.struck)
                 for key, entry in self._entries.items() if entry.locked_until > now]
        return sorted(found, key=lambda lock: (lock.since, lock.subject))

    def clear(self, key: str, now: float) -> bool:
        """Forget ``key``'s failures and lift its lock-out; True when it was locked out."""
        entry = self._entries.pop(key, None)
        return entry is not None and entry.locked_until > now

    def clear_all(self, now: float) -> int:
        """Forget every failure and lift every lock-out; how many were in force."""
        lifted = sum(1 for entry in self._entries.values() if entry.locked_until > now)
        self._entries.clear()
        return lifted

    def __len__(self) -> int:
        return len(self._entries)


class RecentLogins:
    """Per key id, the clients (address or IPv6 /64) of its recent successful logins, with the
    time of the last one from each: what lets a key's owner through its key id's lock-out
    (keyrelay/decisions/login.py ``decide_lockout``).

    At most ``per_key`` clients per key id (the least recently seen forgotten first) and
    ``max_tracked`` key ids (the least recently logged in forgotten first).
    """

    def __init__(self, max_tracked: int, per_key: int = 8) -> None:
        self.max_tracked = max_tracked
        self._per_key = per_key
        self._entries: OrderedDict[str, OrderedDict[str, float]] = OrderedDict()

    def succeeded(self, key_id: str, client: str, now: float) -> None:
        """Remember one successful login of ``key_id`` from ``client``."""
        clients = self._entries.get(key_id)
        if clients is None:
            clients = self._entries[key_id] = OrderedDict()
            while len(self._entries) > self.max_tracked:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key_id)
        clients[client] = now
        clients.move_to_end(client)
        while len(clients) > self._per_key:
            clients.popitem(last=False)

    def since(self, key_id: str, client: str, now: float) -> float | None:
        """Seconds since ``key_id`` last logged in from ``client``; None if not remembered."""
        clients = self._entries.get(key_id)
        last = clients.get(client) if clients is not None else None
        return None if last is None else now - last

    def clients(self, key_id: str, now: float, within: float) -> int:
        """How many clients ``key_id`` logged in from within the last ``within`` seconds."""
        clients = self._entries.get(key_id)
        if clients is None:
            return 0
        return sum(1 for last in clients.values() if now - last <= within)

    def __len__(self) -> int:
        return len(self._entries)
