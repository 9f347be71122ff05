"""The in-process counter store: one node's rates, quotas, failures and recent logins, behind
the async interface of ``model.CounterStore`` (``counters.backend: memory``, and the fallback
of ``fallback.Resilient`` while Redis is away).

Nothing here awaits, so each operation is atomic within the event loop. Bounds: a rate or
quota window holds one entry per subject, dropped once its period is over (swept at most once
per ``sweep_every`` seconds); failures keep at most ``max_tracked`` keys per kind, the least
recently failed forgotten first; recent logins keep at most ``per_key`` clients for each of at
most ``max_tracked`` key ids.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast
from zoneinfo import ZoneInfo

from .model import (
    KINDS,
    Kind,
    Locked,
    Sliding,
    Usage,
    Window,
    check_windows,
    over,
)


@dataclass(slots=True)
class _Failures:
    first: float
    count: int
    locked_until: float = 0.0
    locked_since: float = 0.0
    struck: int = 0  # failures that started the lock-out, and those counted during it


class MemoryCounters:
    """``model.CounterStore`` in this process (``counters.backend: memory``)."""

    def __init__(self, *, max_tracked: int = 100_000, per_key: int = 8,
                 zone: ZoneInfo | None = None, clock: Callable[[], float] = time.time,
                 sweep_every: float = 60.0) -> None:
        self.max_tracked = max_tracked
        self.per_key = per_key
        self.zone = zone or ZoneInfo("UTC")
        self.clock = clock
        self.sweep_every = sweep_every
        self._swept = clock()
        # (subject, seconds) -> (bucket number, current, previous)
        self._sliding: dict[tuple[str, int], tuple[int, int, int]] = {}
        # (subject, unit) -> (period label, count, end of the period)
        self._calendar: dict[tuple[str, str], tuple[str, int, float]] = {}
        self._failures: dict[Kind, OrderedDict[str, _Failures]] = {
            kind: OrderedDict() for kind in KINDS}
        self._logins: OrderedDict[str, OrderedDict[str, tuple[float, float]]] = OrderedDict()

    # -- rates and quotas ----------------------------------------------------------------

    def _sliding_state(self, window: Sliding, now: float) -> tuple[int, int, int, float]:
        number, elapsed = window.bucket(now)
        found = self._sliding.get((window.subject, window.seconds))
        if found is None or found[0] < number - 1:
            return number, 0, 0, elapsed
        seen, current, previous = found
        if seen == number:
            return number, current, previous, elapsed
        return number, 0, current, elapsed  # seen == number - 1

    def _usage(self, window: Window, now: float, amount: int) -> Usage:
        if isinstance(window, Sliding):
            _, current, previous, elapsed = self._sliding_state(window, now)
            return Usage(window, window.estimate(current, previous, elapsed), window.limit,
                         window.resets_in(current, previous, elapsed, amount))
        label, ends_in = window.period(now, self.zone)
        found = self._calendar.get((window.subject, window.unit))
        count = found[1] if found is not None and found[0] == label else 0
        return Usage(window, float(count), window.limit, ends_in)

    async def take(self, windows: tuple[Window, ...], amount: int = 1) -> Usage | None:
        check_windows(windows, amount)
        now = self.clock()
        self._sweep(now)
        # one pass to check every window, keeping each one's state for the second pass that
        # adds: a message's windows are looked up once (the policy path's hot step with the
        # memory store, docs/policyd-path.md)
        states: list[tuple[int, int, int] | tuple[str, int, float]] = []
        for window in windows:
            if isinstance(window, Sliding):
                number, current, previous, elapsed = self._sliding_state(window, now)
                if over(window.estimate(current, previous, elapsed), amount, window.limit):
                    return self._usage(window, now, amount)
                states.append((number, current, previous))
            else:
                label, ends_in = window.period(now, self.zone)
                found = self._calendar.get((window.subject, window.unit))
                count = found[1] if found is not None and found[0] == label else 0
                if over(count, amount, window.limit):
                    return Usage(window, float(count), window.limit, ends_in)
                states.append((label, count, now + ends_in))
        for window, state in zip(windows, states, strict=True):
            if isinstance(window, Sliding):
                number, current, previous = cast(tuple[int, int, int], state)
                self._sliding[window.subject, window.seconds] = (
                    number, current + amount, previous)
            else:
                label, count, end = cast(tuple[str, int, float], state)
                self._calendar[window.subject, window.unit] = (label, count + amount, end)
        return None

    async def peek(self, windows: tuple[Window, ...]) -> list[Usage]:
        check_windows(windows, 1)
        now = self.clock()
        return [self._usage(window, now, 1) for window in windows]

    def _sweep(self, now: float) -> None:
        """Forget windows whose last count no longer matters (at most every sweep_every)."""
        if now - self._swept < self.sweep_every:
            return
        self._swept = now
        self._sliding = {key: state for key, state in self._sliding.items()
                         if state[0] >= int(now // key[1]) - 1}
        self._calendar = {key: state for key, state in self._calendar.items()
                          if state[2] > now}

    # -- failed logins and lock-outs -----------------------------------------------------

    async def fail(self, kind: Kind, key: str, max_failures: int, window: float,
                   lockout: float) -> bool:
        now = self.clock()
        entries = self._failures[kind]
        entry = entries.get(key)
        if entry is None or (now - entry.first > window and entry.locked_until <= now):
            entry = _Failures(first=now, count=0)
        entries[key] = entry
        entries.move_to_end(key)
        while len(entries) > self.max_tracked:
            entries.popitem(last=False)
        entry.count += 1
        if entry.locked_until > now:
            entry.struck += 1
        elif entry.count >= max_failures:
            entry.locked_until = now + lockout
            entry.locked_since, entry.struck = now, entry.count
            entry.first, entry.count = now, 0
            return True
        return False

    async def locked_for(self, kind: Kind, key: str) -> float:
        now = self.clock()
        entry = self._failures[kind].get(key)
        if entry is None or entry.locked_until <= now:
            return 0.0
        return entry.locked_until - now

    async def locked(self, kind: Kind | None = None) -> list[Locked]:
        now = self.clock()
        found = [Locked(each, key, entry.locked_since, entry.locked_until, entry.struck)
                 for each in (KINDS if kind is None else (kind,))
                 for key, entry in self._failures[each].items() if entry.locked_until > now]
        return sorted(found, key=lambda lock: (lock.since, lock.kind, lock.subject))

    async def clear(self, kind: Kind, key: str) -> bool:
        entry = self._failures[kind].pop(key, None)
        return entry is not None and entry.locked_until > self.clock()

    async def clear_all(self) -> int:
        now = self.clock()
        lifted = sum(1 for entries in self._failures.values() for entry in entries.values()
                     if entry.locked_until > now)
        for entries in self._failures.values():
            entries.clear()
        return lifted

    # -- recent logins -------------------------------------------------------------------

    async def succeeded(self, key_id: str, client: str, keep: float) -> None:
        now = self.clock()
        clients = self._logins.get(key_id)
        if clients is None:
            clients = self._logins[key_id] = OrderedDict()
            while len(self._logins) > self.max_tracked:
                self._logins.popitem(last=False)
        else:
            self._logins.move_to_end(key_id)
        clients[client] = (now, now + keep)
        clients.move_to_end(client)
        while len(clients) > self.per_key:
            clients.popitem(last=False)

    def _last(self, key_id: str, client: str, now: float) -> float | None:
        clients = self._logins.get(key_id)
        found = clients.get(client) if clients is not None else None
        return None if found is None or found[1] < now else found[0]

    async def since(self, key_id: str, client: str) -> float | None:
        now = self.clock()
        last = self._last(key_id, client, now)
        return None if last is None else now - last

    async def clients(self, key_id: str, within: float) -> int:
        now = self.clock()
        clients = self._logins.get(key_id)
        if clients is None:
            return 0
        return sum(1 for last, until in clients.values() if now - last <= within
                   and until >= now)

    async def close(self) -> None:
        return None

    def __len__(self) -> int:
        """Entries held, all kinds together (for tests of the bounds)."""
        return (len(self._sliding) + len(self._calendar) + len(self._logins)
                + sum(len(entries) for entries in self._failures.values()))
