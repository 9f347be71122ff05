"""keyrelay-policyd's copy of the paused principals (docs/reputation.md, "The refusal").

The pauses are few and change rarely, so each worker keeps them all in memory and reads them
again at most every ``reputation.refresh`` seconds: a message costs one dict look-up, and the
store one read per ``refresh`` (the SQLite file: one query; Redis: one ``HGETALL`` on the
counters' connection). A pause or a resume is therefore seen within ``refresh``. A read that
fails leaves the copy stale: the service then answers ``451 4.3.0`` (never an unchecked
accept) and reads again at the next message. A copy read within the last
``STALE_FACTOR * refresh`` seconds is used meanwhile: the pauses live in the store that cannot
be read, so nobody can pause or resume while it is away, and a short outage (a Redis restart)
adds no temporary answers of its own; an older copy, or none (a worker started during the
outage), gives ``451 4.3.0``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from ..counters import RedisTarget
from .model import Pause, ReputationUnavailable
from .redisstore import RedisPauses, RedisReputation
from .sqlitestore import SqliteReputation

STALE_FACTOR = 10  # a copy this many refresh periods old is still used while the store is away


class PauseCache:
    def __init__(self, source: SqliteReputation | RedisPauses, refresh: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self.refresh = refresh
        self.clock = clock
        self.pauses: dict[str, Pause] = {}
        self.read_at: float | None = None  # clock() of the last good read
        self._reading: asyncio.Future[None] | None = None

    @property
    def remote(self) -> bool:
        """True: reading needs the event loop (``read_async``)."""
        return isinstance(self.source, RedisPauses)

    def fresh(self) -> bool:
        return self.read_at is not None and self.clock() - self.read_at < self.refresh

    def usable(self) -> bool:
        """The copy may answer while the store cannot be read (``STALE_FACTOR``)."""
        return (self.read_at is not None
                and self.clock() - self.read_at < self.refresh * STALE_FACTOR)

    def prime(self, target: RedisTarget) -> None:
        """The first read from Redis at ``target``, before the worker serves (blocking, at
        start and at a SIGHUP: at most the store's timeout), through a client of its own.
        A failure leaves no copy: the requests read again."""
        try:
            store = RedisReputation(target)
            try:
                self.pauses = store.paused()
                self.read_at = self.clock()
            finally:
                store.close()
        except ReputationUnavailable:
            pass

    def read(self) -> None:
        """Read the SQLite file now; raises ReputationUnavailable."""
        assert isinstance(self.source, SqliteReputation)
        self.pauses = self.source.paused()
        self.read_at = self.clock()

    async def read_async(self) -> None:
        """Read Redis now, once for every request waiting meanwhile; raises
        ReputationUnavailable."""
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read_remote())
        reading = self._reading
        try:
            await asyncio.shield(reading)
        finally:
            if reading.done() and self._reading is reading:
                self._reading = None

    async def _read_remote(self) -> None:
        assert isinstance(self.source, RedisPauses)
        self.pauses = await self.source.paused()
        self.read_at = self.clock()

    def get(self, principal: str) -> Pause | None:
        return self.pauses.get(principal)


__all__ = ["PauseCache", "ReputationUnavailable"]
