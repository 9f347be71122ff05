"""Redis away: answer from this process's memory where that is allowed, and go back to Redis
when it answers again, without a restart (docs/cluster.md, "Redis away").

- Failed logins, lock-outs and recent logins always fall back to local counting: an outage
  must neither lock everyone out nor let guesses through unchecked.
- Rates and quotas fall back only with ``on_unavailable: local``; with ``tempfail`` (the
  default) ``take`` and ``peek`` raise ``CountersUnavailable`` and the front end answers
  temporarily: mail waits, nothing is accepted unchecked.

While Redis is away it is not asked at every request (each would wait up to the timeout):
it is tried again after a back-off that doubles from ``retry_first`` up to ``retry_most``.
The first fault of an outage is logged once, its end once; ``outages`` and ``local_answers``
count them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

from .memory import MemoryCounters
from .model import CountersUnavailable, Kind, Locked, Usage, Window
from .redisstore import RedisCounters

log = logging.getLogger("keyrelay.counters")

T = TypeVar("T")


class Resilient:
    """``model.CounterStore`` over a ``RedisCounters``, with ``MemoryCounters`` beside it for
    the time Redis is away."""

    def __init__(self, shared: RedisCounters, local: MemoryCounters,
                 on_unavailable: Literal["tempfail", "local"] = "tempfail", *,
                 retry_first: float = 0.5, retry_most: float = 30.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.shared = shared
        self.local = local
        self.on_unavailable = on_unavailable
        self.retry_first = retry_first
        self.retry_most = retry_most
        self.monotonic = monotonic
        self.away: str | None = None  # why Redis is away, while it is
        self.outages = 0
        self.local_answers = 0
        self._backoff = retry_first
        self._next_try = 0.0

    def __repr__(self) -> str:
        return f"Resilient({self.shared!r}, on_unavailable={self.on_unavailable})"

    async def _shared(self, call: Callable[[RedisCounters], Awaitable[T]]) -> T:
        """``call`` on Redis, or CountersUnavailable (at once while backing off)."""
        started = self.monotonic()
        if self.away is not None and started < self._next_try:
            raise CountersUnavailable(self.away)
        try:
            result = await call(self.shared)
        except CountersUnavailable as exc:
            if self.away is None:
                self.outages += 1
                log.warning("%s; %s until it answers again", exc,
                            "limits and quotas answer temporarily (on_unavailable: tempfail), "
                            "failed logins are counted in this process"
                            if self.on_unavailable == "tempfail"
                            else "counting in this process (on_unavailable: local)")
                self._backoff = self.retry_first
            elif started >= self._next_try:
                # a retry after the back-off failed; calls that were already waiting when
                # the outage began do not lengthen it
                self._backoff = min(self._backoff * 2, self.retry_most)
            self.away = str(exc)
            self._next_try = self.monotonic() + self._backoff
            raise
        if self.away is not None:
            log.warning("counters.redis: %s answers again; counting there again (%d answers "
                        "from this process's memory so far)", self.shared.target.where,
                        self.local_answers)
            self.away = None
        return result

    async def _either(self, call: Callable[[RedisCounters], Awaitable[T]],
                      local: Callable[[MemoryCounters], Awaitable[T]]) -> T:
        try:
            return await self._shared(call)
        except CountersUnavailable:
            self.local_answers += 1
            return await local(self.local)

    async def _limits(self, call: Callable[[RedisCounters], Awaitable[T]],
                      local: Callable[[MemoryCounters], Awaitable[T]]) -> T:
        if self.on_unavailable == "local":
            return await self._either(call, local)
        return await self._shared(call)

    async def take(self, windows: tuple[Window, ...], amount: int = 1) -> Usage | None:
        return await self._limits(lambda s: s.take(windows, amount),
                                  lambda m: m.take(windows, amount))

    async def peek(self, windows: tuple[Window, ...]) -> list[Usage]:
        return await self._limits(lambda s: s.peek(windows), lambda m: m.peek(windows))

    async def fail(self, kind: Kind, key: str, max_failures: int, window: float,
                   lockout: float) -> bool:
        return await self._either(lambda s: s.fail(kind, key, max_failures, window, lockout),
                                  lambda m: m.fail(kind, key, max_failures, window, lockout))

    # A lock-out counted in this process while Redis was away holds after it is back.

    async def locked_for(self, kind: Kind, key: str) -> float:
        here = await self.local.locked_for(kind, key)
        try:
            return max(await self._shared(lambda s: s.locked_for(kind, key)), here)
        except CountersUnavailable:
            self.local_answers += 1
            return here

    async def locked(self, kind: Kind | None = None) -> list[Locked]:
        here = await self.local.locked(kind)
        try:
            found = await self._shared(lambda s: s.locked(kind)) + here
        except CountersUnavailable:
            self.local_answers += 1
            return here
        return sorted(found, key=lambda lock: (lock.since, lock.kind, lock.subject))

    async def clear(self, kind: Kind, key: str) -> bool:
        # both: a lock-out counted here while Redis was away is lifted too
        local = await self.local.clear(kind, key)
        return await self._either(lambda s: s.clear(kind, key), lambda m: m.clear(kind, key)) \
            or local

    async def clear_all(self) -> int:
        local = await self.local.clear_all()
        return await self._either(lambda s: s.clear_all(), lambda m: m.clear_all()) + local

    async def succeeded(self, key_id: str, client: str, keep: float) -> None:
        await self._either(lambda s: s.succeeded(key_id, client, keep),
                           lambda m: m.succeeded(key_id, client, keep))

    async def since(self, key_id: str, client: str) -> float | None:
        return await self._either(lambda s: s.since(key_id, client),
                                  lambda m: m.since(key_id, client))

    async def clients(self, key_id: str, within: float) -> int:
        return await self._either(lambda s: s.clients(key_id, within),
                                  lambda m: m.clients(key_id, within))

    async def close(self) -> None:
        await self.shared.close()
