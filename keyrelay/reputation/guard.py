"""The reputation guard, as keyrelay-events runs it (docs/reputation.md, "The guard").

Each round of the events daemon's outbox thread (keyrelay/events/outbox.py):

1. the events of this node's state file after the node's mark (the last ``seq`` counted,
   kept in the reputation store itself) are counted: per principal and bucket, a
   ``delivered`` as delivered, a ``bounce`` of either type as bounced; the increments and the
   new mark go to the store in ONE atomic write, which adds nothing when the mark is already
   there. So a crash between the count and anything after it never counts an event twice,
   and an event is never skipped (the mark moves only with its counts);
2. the principals that moved (and those whose check failed before) are checked: at least
   ``min_volume`` delivered+bounced in the window and a bounce rate above
   ``max_bounce_rate`` pauses them, unless they are paused already;
3. what was paused now comes back to the caller, which logs it and puts the webhook event
   into the outbox.

The store away (Redis down, the file unreadable) loses nothing: the mark stays, the
principals to check are kept, the fault is logged once and the round is tried again.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..config.reputation import ReputationConfig
from .model import (
    Increments,
    Pause,
    ReputationStore,
    ReputationUnavailable,
    bucket_of,
    counted,
    describe,
    oldest_bucket,
    principal_of,
    resume_command,
    tripped,
)

log = logging.getLogger("keyrelay.events.reputation")

ROUND_LIMIT = 10000  # events counted per round at most


class Guard:
    def __init__(self, settings: ReputationConfig, store: ReputationStore, node: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self.node = node
        self.clock = clock
        self.recheck: set[str] = set()  # moved principals not checked yet (a fault)
        self.away = False  # the store's outage was logged

    def count(self, items: Iterable[tuple[int, dict[str, Any]]]) -> set[str]:
        """Count one round's events (``(seq, event)`` in seq order); the principals that
        moved (also when the store had counted this round already, before a crash: they
        are checked again, which changes nothing when they were)."""
        window = self.settings.window
        oldest = oldest_bucket(self.clock(), window)
        increments: Increments = {}
        upto = 0
        for seq, event in items:
            upto = max(upto, seq)
            adds = counted(event)
            principal = principal_of(event)
            if adds is None or principal is None:
                continue
            bucket = bucket_of(float(event.get("timestamp") or self.clock()), window)
            if bucket < oldest:
                continue  # already outside the window
            slot = increments.setdefault((principal, bucket), [0, 0])
            slot[0] += adds[0]
            slot[1] += adds[1]
        if not upto:
            return set()
        self.store.record(self.node, upto, increments, oldest, window)
        return {principal for principal, _ in increments}

    def check(self, principals: Iterable[str],
              monitored: Callable[[str], bool]) -> list[Pause]:
        """Pause the principals past the threshold; the pauses written now."""
        wanted = sorted(principals)
        if not wanted:
            return []
        cfg = self.settings
        now = self.clock()
        written: list[Pause] = []
        for principal, (delivered, bounced) in self.store.counts(
                wanted, oldest_bucket(now, cfg.window)).items():
            rate = tripped(delivered, bounced, cfg.min_volume, cfg.max_bounce_rate)
            if rate is None:
                continue
            pause = Pause(principal, now, rate, delivered, bounced, cfg.window,
                          cfg.max_bounce_rate, "guard", cfg.monitor or monitored(principal))
            if self.store.pause(pause):
                written.append(pause)
        return written

    def round(self, events: Callable[[int], Iterator[tuple[int, dict[str, Any]]]],
              monitored: Callable[[str], bool]) -> list[Pause]:
        """Count what is new (``events(after)``), check what moved; the new pauses. The
        store away: logged once, nothing lost, tried again next round."""
        try:
            mark = self.store.mark(self.node)
            moved = self.count(itertools.islice(events(mark), ROUND_LIMIT))
            self.recheck |= moved
            written = self.check(self.recheck, monitored)
            self.recheck.clear()
        except ReputationUnavailable as exc:
            if not self.away:
                log.error("reputation store unavailable: %s; bounce rates are counted and "
                          "checked when it answers again", exc)
                self.away = True
            return []
        if self.away:
            log.warning("reputation store answers again; bounce rates are counted again")
            self.away = False
        for pause in written:
            log.warning("%s", log_line(pause))
        return written


def log_line(pause: Pause) -> str:
    """``reputation: paused acme/news: bounce rate 12.5 % (250 of 2000) over 24h is above
    5 %; resume with keyrelay subuser resume acme/news``."""
    if pause.monitor:
        return (f"reputation: would pause {pause.principal}: {describe(pause)} (monitor "
                "mode: its mail goes on)")
    return (f"reputation: paused {pause.principal}: {describe(pause)}; resume with "
            f"{resume_command(pause.principal)}")


def event_of(pause: Pause) -> dict[str, Any]:
    """The webhook event of a pause (``paused``, or ``would_pause`` in monitor mode); its
    ``event_id`` is stable: the principal and the pause's time."""
    account, _, subuser = pause.principal.partition("/")
    raw = f"reputation:{pause.principal}:{pause.since!r}".encode()
    return {
        "event": "would_pause" if pause.monitor else "paused",
        "timestamp": int(pause.since),
        "event_id": hashlib.blake2b(raw, digest_size=12).hexdigest(),
        "account": account,
        "subuser": subuser or None,
        "reason": describe(pause),
        "bounce_rate": round(pause.rate, 4),
        "delivered": pause.delivered,
        "bounced": pause.bounced,
        "window": int(pause.window),
        "max_bounce_rate": pause.threshold,
        "resume": resume_command(pause.principal),
    }
