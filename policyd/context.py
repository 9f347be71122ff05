"""What every policyd service shares: configuration, engine settings, the directory, the counter
store, the clock, and the last-used times of keys waiting to be written back.

Built once in ``main()`` from a validated ``Config`` and rebuilt on SIGHUP; nothing here is a
module-level global (docs/ARCHITECTURE.md, "Configuration").
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from keyrelay.config import Config
from keyrelay.counters import CounterStore, RedisCounters, Resilient, open_counters
from keyrelay.decisions import EngineSettings
from keyrelay.directory import Directory, DirectoryBackend
from keyrelay.errors import DirectoryUnavailable, KeyrelayError
from keyrelay.logs import DecisionLog
from keyrelay.reputation import PauseCache, RedisPauses, SqliteReputation, reputation_path
from keyrelay.suppressions import RedisLookup, SqliteSuppressions
from keyrelay.suppressions.replica import SuppressionReplica

log = logging.getLogger("keyrelay.policyd")


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class ServiceContext:
    config: Config
    directory: DirectoryBackend
    settings: EngineSettings = field(init=False)
    decisions: DecisionLog = field(init=False)
    decision_log: DecisionLog | None = None  # default: every line flushed to stderr
    # rates and quotas, failed logins, lock-outs and recent logins (keyrelay/counters):
    # ``store``; opened once per daemon
    # (policyd/main.py) and handed to the context a SIGHUP builds. ``counters`` None: open
    # the store ``counters:`` names.
    counters: CounterStore | None = None
    store: CounterStore = field(init=False)
    # the suppression list, beside the counters (docs/suppressions.md): Redis through the
    # counter store's connection, else the SQLite file suppressions.path (read only)
    suppressions: SqliteSuppressions | RedisLookup = field(init=False)
    # with Redis and counters.on_unavailable local: this node's copy of the lists, asked
    # while Redis is away (keyrelay/suppressions/replica.py); None otherwise
    replica: SuppressionReplica | None = field(init=False)
    # the reputation guard's pauses, kept in memory (docs/reputation.md): from Redis through
    # the counter store's connection, else the SQLite file reputation.path (read only);
    # None: reputation.enabled is false
    pauses: PauseCache | None = field(init=False)
    clock: Callable[[], datetime] = utcnow
    used_keys: dict[str, datetime] = field(default_factory=dict)
    _frozen: Directory | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.settings = EngineSettings.from_config(self.config)
        self.decisions = self.decision_log or DecisionLog(self.config.logging)
        self.store = self.counters if self.counters is not None else open_counters(
            self.config, max_tracked=self.config.policyd.bruteforce.max_tracked)
        shared = self.store.shared if isinstance(self.store, Resilient) else self.store
        self.suppressions = (RedisLookup(shared) if isinstance(shared, RedisCounters)
                             else SqliteSuppressions(self.config.suppressions.path,
                                                     create=False))
        self.replica = (SuppressionReplica(self.config.suppressions.replica)
                        if isinstance(shared, RedisCounters) and self.config.suppressions.replica
                        and self.config.counters.on_unavailable == "local" else None)
        cfg = self.config.reputation
        self.pauses = None if not cfg.enabled else PauseCache(
            RedisPauses(shared) if isinstance(shared, RedisCounters)
            else SqliteReputation(reputation_path(self.config), create=False), cfg.refresh)
        if self.pauses is not None and isinstance(shared, RedisCounters):
            # read once before serving, so every worker has a copy should Redis go away
            # (the SQLite file is read at the first request: after the daemon stopped
            # being root, so that no WAL index it makes belongs to root)
            self.pauses.prime(shared.target)

    def snapshot(self) -> Directory:
        """The current directory snapshot; raises ``DirectoryUnavailable``."""
        snapshot = self.directory.snapshot()
        if snapshot is not self._frozen:
            # A snapshot lives until the file changes and holds an object per record: keep it
            # out of the cyclic garbage collector, whose full passes over 10,000 keys paused
            # every request for 10-20 ms. (Its objects are acyclic: reference counting still
            # frees them when the snapshot is replaced.)
            gc.freeze()
            self._frozen = snapshot
        return snapshot

    def key_used(self, key_id: str, when: datetime) -> None:
        # Kept in memory and written every keys.last_used_flush_interval: a login must never
        # cost a file write (issue 2, API keys).
        self.used_keys[key_id] = when

    def take_key_use(self) -> dict[str, datetime]:
        """Hand over the collected last-used times (on the event loop's thread)."""
        pending, self.used_keys = self.used_keys, {}
        return pending

    def keep_key_use(self, pending: dict[str, datetime]) -> None:
        """Put back times that could not be written, for the next try."""
        for key_id, when in pending.items():
            if key_id not in self.used_keys or self.used_keys[key_id] < when:
                self.used_keys[key_id] = when

    def write_key_use(self, pending: dict[str, datetime],
                      give_up: Callable[[], bool] | None = None) -> bool:
        """Write last-used times to the directory (in a worker thread); False on failure.

        Last-used is bookkeeping: a failure is logged and never affects mail. ``give_up``
        turns true when a stopping daemon's time is up; what is left then is dropped.
        """
        try:
            left = self.directory.record_key_use(pending, give_up)
        except (OSError, KeyrelayError) as exc:
            log.warning("could not record keys' last-used times: %s", exc)
            return False
        except Exception as exc:  # noqa: BLE001 - bookkeeping must not stop the flush loop
            log.warning("could not record keys' last-used times: internal error %r", exc)
            return False
        if left:
            log.warning("stopping: last-used times of %d of %d keys not recorded (no time "
                        "left within policyd.shutdown_grace)", len(left), len(pending))
        return True


class KeyLookup:
    """A key id to look up in the directory before a login (policyd/auth.py) or a message of a
    session (policyd/policy.py) can be decided.

    Only for a backend whose copy may lag (LDAP): an "unknown key" from a stale copy would be
    a permanent 535 for a valid key, counted as a guess; and a message whose login another
    worker process decided (after reading the key through into its own copy) would wait for
    this process's next refresh. ``run`` blocks (one bounded LDAP
    search, and a refresh when the key exists) and never raises: a fault is kept in ``fault``.
    """

    __slots__ = ("context", "fault", "key_id")

    def __init__(self, context: ServiceContext, key_id: str) -> None:
        self.context = context
        self.key_id = key_id
        self.fault: DirectoryUnavailable | None = None

    def __repr__(self) -> str:
        return f"KeyLookup({self.key_id!r})"

    def run(self) -> None:
        try:
            self.context.directory.fresh_for_key(self.key_id)
        except DirectoryUnavailable as exc:
            self.fault = exc
        except Exception as exc:
            log.exception("internal error looking up API key %s", self.key_id)
            self.fault = DirectoryUnavailable(f"internal error: {exc!r}")
