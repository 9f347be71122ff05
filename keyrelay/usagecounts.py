"""How much of its rate limits and quotas a principal has used: the counts of the engine's
windows (``keyrelay.decisions.windows_for``) in whichever counter store ``counters.backend``
names (docs/cli.md, "Limits"):

- ``redis``: read from Redis itself, the counts every relay node shares;
- ``memory``: each keyrelay-policyd counts in its own memory, so the running daemon on this
  node is asked through its control socket (``policyd.control_listen``, the ``PEEK`` request of
  keyrelay/control.py): this node's counts only.

Either way the store's own ``peek`` answers (nothing added), with the windows the CLI names
(``keyrelay.limits.store_window``), so ``keyrelay usage`` and the check of ``keyrelay limits
set`` (a limit below what is already used is refused) read the same numbers the same way.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal
from zoneinfo import ZoneInfo

from . import control
from .config import Config
from .counters import (
    CountersUnavailable,
    RedisCounters,
    RedisTarget,
    Usage,
    Window,
    redis_target,
)
from .decisions import RateWindow
from .errors import KeyrelayError
from .limits import store_window


class UsageUnreadable(KeyrelayError):
    """The counts cannot be read now: Redis away, keyrelay-policyd not running or without a
    control socket. The message is one line saying why and what to do."""


@dataclass(frozen=True, slots=True)
class Counted:
    """One window and its count now."""

    window: RateWindow
    used: int  # rounded up, as the policy service compares it (a sliding count is estimated)
    resets_in: float  # seconds: a calendar window's end; a sliding one's until one more fits


@dataclass(frozen=True, slots=True)
class Counts:
    """The windows asked, each with its count, and where the counts came from."""

    windows: tuple[Counted, ...]
    origin: Literal["redis", "policyd"]
    # for people: "Redis at 127.0.0.1:6379, shared by every relay node", "keyrelay-policyd's
    # memory, this node's mail only"
    where: str


def read_counts(config: Config, config_path: str, windows: Sequence[RateWindow]) -> Counts:
    """The count of each of ``windows`` (in order) in the configured counter store; raises
    UsageUnreadable with one line."""
    asked = tuple(store_window(window) for window in windows)
    counters = config.counters
    if counters.backend == "redis":
        try:
            target = redis_target(counters.redis)
            found = asyncio.run(_peek_redis(target, ZoneInfo(counters.time_zone), asked))
        except CountersUnavailable as exc:
            raise UsageUnreadable(str(exc)) from None
        origin: Literal["redis", "policyd"] = "redis"
        where = f"Redis at {target.where}, shared by every relay node"
    else:
        try:
            path = control.socket_path(config.policyd.control_listen, config_path)
            found = control.peek(path, asked) if asked else []
        except control.ControlError as exc:
            raise UsageUnreadable(
                f"counters.backend is memory, so the counts live in keyrelay-policyd: {exc}"
            ) from None
        origin = "policyd"
        where = "keyrelay-policyd's memory, this node's mail only"
    return Counts(tuple(Counted(window, math.ceil(usage.count), usage.resets_in)
                        for window, usage in zip(windows, found, strict=True)), origin, where)


async def _peek_redis(target: RedisTarget, zone: ZoneInfo,
                      windows: tuple[Window, ...]) -> list[Usage]:
    if not windows:
        return []
    store = RedisCounters(target, zone=zone)
    try:
        return await store.peek(windows)
    finally:
        await store.close()
