"""The webhook outbox: keyrelay-events sends each account's events to its webhook
(docs/webhooks.md, "Delivery"; docs/events.md, "The daemon").

The events wait in the state file (store.py) with a delivery state. ``Sender`` runs in a thread
of its own with its own connection to the file and, each round:

- reads the account's webhook from the directory (``Account.webhook``, shared by every node);
  an account without one gets nothing sent: its events are marked ``no_webhook`` (counted
  ``webhook_no_webhook``) and kept until ``events.keep``;
- sends an account's events in order, in batches of at most ``webhooks.batch_size``; a batch
  smaller than that waits until its oldest event is ``webhooks.batch_interval`` old, so a
  burst goes in one request;
- on success marks them ``delivered``; on a retryable failure keeps them for
  ``next_attempt`` (backoff, jitter) and holds the account's later events behind them; once
  ``webhooks.retry_for`` has passed since the first failure, or on a failure that retrying
  cannot mend (a 4xx, a redirect, a URL the policy now refuses), marks them ``given_up``,
  counts them (``webhook_given_up``) and logs one warning with the reason. Nothing is dropped
  silently, and the state survives a restart: it is the file.

Our own faults (the directory cannot be read) change no event: the round is tried again.

Before sending, each round also suppresses the hard bounces queued with their events
(docs/suppressions.md, "Hard bounces") and runs the reputation guard over the events written
since its last round (keyrelay/reputation/guard.py, docs/reputation.md): a principal it
pauses gets a ``paused`` (or, in monitor mode, ``would_pause``) event in its account's outbox,
sent like any other. With Redis and ``counters.on_unavailable: local`` it also refreshes this
node's copy of the suppression lists (``replicate``, keyrelay/suppressions/replica.py).
"""

from __future__ import annotations

import logging
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ..config import Config
from ..directory import open_directory
from ..directory.model import Directory, Webhook
from ..errors import DirectoryUnavailable
from ..reputation import Guard, ReputationUnavailable, event_of, open_reputation
from ..suppressions import (
    RedisSuppressions,
    SuppressionsUnavailable,
    open_suppressions,
    suppress_hard_bounce,
)
from ..suppressions.bounce import hard_bounce
from ..suppressions.model import SuppressionStore
from ..suppressions.replica import add_to_replica, write_replica
from ..webhooks.delivery import Result, deliver, next_attempt, tls_context
from .store import EventStore, Pending

log = logging.getLogger("keyrelay.events.webhooks")

DUE_LIMIT = 10000  # events read per round at most
IDLE = 1.0  # seconds between rounds with nothing due (at most)


class Sender:
    def __init__(self, config: Config, store: EventStore,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.settings = config.webhooks
        self.store = store
        self.directory = open_directory(config)
        self.clock = clock
        self._context: ssl.SSLContext | None = None
        self._context_failed = False
        self._suppressions: SuppressionStore | None = None
        self._suppress_failed: set[int] = set()  # queued hard bounces whose failure was logged
        self._suppressions_away = False
        self._guard: Guard | None = None
        self._reputation_away = False
        self._replica_due = 0.0  # time.monotonic() of the next copy of the suppression lists
        self._replica_failed = False
        self._replica_done = False
        self._in_replica: set[int] = set()  # queued hard bounces the replica holds already

    def context(self) -> ssl.SSLContext | None:
        """The TLS context, made once; None lets ``deliver`` say why it cannot be made."""
        if self._context is None and not self._context_failed:
            try:
                self._context = tls_context(self.settings)
            except (OSError, ssl.SSLError):
                self._context_failed = True
        return self._context

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            wait = self.round()
            stop.wait(wait)

    def suppress(self) -> None:
        """Hard bounces queued with their events (store.py): each recipient suppressed for
        its account (keyrelay/suppressions/bounce.py), then taken off the queue. A store
        that cannot answer leaves them queued for the next round (logged once)."""
        queued = self.store.suppress_due(DUE_LIMIT)
        if not queued:
            return
        done: list[int] = []
        try:
            if self._suppressions is None:
                self._suppressions = open_suppressions(self.config)
            now = datetime.now(UTC)
            for seq, event in queued:
                try:
                    added = suppress_hard_bounce(self._suppressions, event, now)
                except SuppressionsUnavailable:
                    raise
                except Exception:  # a bug of ours: this one stays queued, the others go on
                    if seq not in self._suppress_failed:
                        self._suppress_failed.add(seq)
                        log.exception("suppressing the hard bounce of event %s failed; it "
                                      "stays queued", event.get("event_id"))
                    continue
                if added:
                    log.info("suppressed %s for account %s after a hard bounce (%s)",
                             event.get("email"), event.get("account"), event.get("status"))
                done.append(seq)
            if self._suppressions_away:
                log.info("suppression list answers again; queued hard bounces suppressed")
                self._suppressions_away = False
        except SuppressionsUnavailable as exc:
            if not self._suppressions_away:
                log.error("suppression list unavailable: %s; hard bounces stay queued until it "
                          "answers", exc)
                self._suppressions_away = True
            self.bounces_to_replica([item for item in queued if item[0] not in done])
        finally:
            self.store.suppress_done(done)

    def bounces_to_replica(self, queued: list[tuple[int, dict[str, Any]]]) -> None:
        """Redis away with ``counters.on_unavailable: local``: the hard bounces waiting for
        it go into this node's replica meanwhile (a new copy: the current one plus them), so
        that keyrelay-policyd, which asks the replica, holds their recipients back too."""
        if not self._replicating():
            return
        new = [(seq, event) for seq, event in queued if seq not in self._in_replica]
        if not new:
            return
        now = datetime.now(UTC)
        found = [hard_bounce(event, now) for _, event in new]
        try:
            added = add_to_replica(self.config.suppressions.replica,
                                   [item for item in found if item is not None])
        except Exception:  # a bug of ours or the disk: the bounces stay queued for Redis
            log.exception("adding %d hard bounce(s) to the suppression replica failed",
                          len(new))
            return
        self._in_replica.update(seq for seq, _ in new)
        if added:
            log.info("suppression replica %s: %d hard bounce(s) added while Redis is away",
                     self.config.suppressions.replica, added)

    def reputation(self) -> None:
        """The reputation guard's round: count the new events, pause who passed the
        threshold, and put each pause's event into its account's outbox (one transaction
        with the counter ``reputation_paused`` or ``reputation_would_pause``, and
        ``event_paused`` or ``event_would_pause``, store.py)."""
        if not self.config.reputation.enabled:
            return
        if self._guard is None:
            try:
                store = open_reputation(self.config)
            except ReputationUnavailable as exc:
                if not self._reputation_away:
                    log.error("reputation store unavailable: %s; bounce rates are counted "
                              "when it answers", exc)
                    self._reputation_away = True
                return
            self._guard = Guard(self.config.reputation, store, self.store.node(), self.clock)
        found: list[Directory] = []

        def monitored(principal: str) -> bool:
            """The account (or the directory, or the configuration) in monitor mode."""
            if self.config.monitor_mode:
                return True
            if not found:
                try:
                    found.append(self.directory.snapshot())
                except DirectoryUnavailable as exc:
                    raise ReputationUnavailable(f"directory unavailable: {exc}") from None
            snapshot = found[0]
            account = snapshot.accounts.get(principal.partition("/")[0])
            return bool(snapshot.monitor or (account is not None and account.monitor))

        for pause in self._guard.round(self.store.events, monitored):
            counter = "reputation_would_pause" if pause.monitor else "reputation_paused"
            self.store.commit([event_of(pause)], None, [], {counter: 1}, self.clock())

    def _replicating(self) -> bool:
        cfg = self.config
        return bool(cfg.counters.backend == "redis" and cfg.counters.on_unavailable == "local"
                    and cfg.suppressions.replica)

    def replicate(self) -> None:
        """With Redis and ``counters.on_unavailable: local``: every
        ``suppressions.replica_interval``, this node's copy of the accounts' suppression
        lists, which keyrelay-policyd asks while Redis is away
        (keyrelay/suppressions/replica.py). A copy that cannot be made leaves the previous
        one (policyd stops using it once it is ``replica_max_age`` old); logged once."""
        cfg = self.config
        if not self._replicating():
            return
        now = time.monotonic()
        if now < self._replica_due:
            return
        self._replica_due = now + cfg.suppressions.replica_interval
        try:
            if self._suppressions is None:
                self._suppressions = open_suppressions(cfg)
            store = self._suppressions
            if not isinstance(store, RedisSuppressions):
                raise TypeError(f"the suppression store is {store!r}, not Redis")
            accounts = sorted(self.directory.snapshot().accounts)
            copied = write_replica(cfg.suppressions.replica, store, accounts)
        except Exception as exc:  # a bug of ours (an odd value) too: the webhooks and the
            # rest go on, the previous copy stays
            if not self._replica_failed:
                expected = isinstance(exc, (SuppressionsUnavailable, DirectoryUnavailable,
                                            OSError, sqlite3.Error))
                log.error("suppression replica %s not refreshed: %s; the previous copy "
                          "stays until suppressions.replica_max_age", cfg.suppressions.replica,
                          getattr(exc, "strerror", None) or exc, exc_info=not expected)
                self._replica_failed = True
            return
        level = logging.INFO if self._replica_failed or not self._replica_done else logging.DEBUG
        log.log(level, "suppression replica %s: %d suppression(s) of %d account(s) copied",
                cfg.suppressions.replica, copied, len(accounts))
        self._replica_failed = False
        self._replica_done = True
        self._in_replica.clear()  # a copy of Redis, which holds what was suppressed since

    def round(self) -> float:
        """Suppress the hard bounces, run the reputation guard, refresh the suppression
        replica when due, send what is due; the seconds until the next round."""
        self.suppress()
        self.reputation()
        self.replicate()
        now = self.clock()
        pending = self.store.due(now, DUE_LIMIT)
        if not pending:
            upcoming = self.store.next_due(now)
            return IDLE if upcoming is None else max(0.05, min(IDLE, upcoming - now))
        try:
            snapshot = self.directory.snapshot()
        except DirectoryUnavailable as exc:
            log.error("webhooks: directory unavailable, nothing sent this round: %s", exc)
            return IDLE
        by_account: dict[str, list[Pending]] = {}
        for item in pending:
            by_account.setdefault(item.account, []).append(item)
        wait = IDLE
        for account, items in by_account.items():
            found = snapshot.accounts.get(account)
            webhook = found.webhook if found is not None else None
            if webhook is None:
                self.store.settle([i.seq for i in items], "no_webhook", "webhook_no_webhook")
                continue
            batch = items[:self.settings.batch_size]
            oldest = min(i.created for i in batch)
            if (len(batch) < self.settings.batch_size and batch[0].attempts == 0
                    and now - oldest < self.settings.batch_interval):
                wait = min(wait, max(0.05, oldest + self.settings.batch_interval - now))
                continue
            self.send(account, webhook, batch)
            if len(items) > len(batch):
                wait = 0.0  # more of this account is due: go on at once
        return wait

    def send(self, account: str, webhook: Webhook, batch: list[Pending]) -> None:
        seqs = [i.seq for i in batch]
        started = datetime.now(UTC)
        outcome = deliver(webhook, [i.event for i in batch], self.settings, started,
                          context=self.context())
        if outcome.delivered:
            self.store.settle(seqs, "delivered", "webhook_delivered")
            log.info("webhook: %d event(s) of %s delivered (HTTP %s)", len(batch), account,
                     outcome.status)
            return
        now = datetime.now(UTC)
        first_seen = min((i.first_failure for i in batch if i.first_failure), default=0.0)
        first = datetime.fromtimestamp(first_seen, UTC) if first_seen else now
        attempts = max(i.attempts for i in batch) + 1
        later = (next_attempt(attempts, first, now, self.settings)
                 if outcome.result is Result.RETRY else None)
        if later is None:
            self.store.settle(seqs, "given_up", "webhook_given_up")
            why = ("not retried" if outcome.result is Result.GIVE_UP
                   else f"webhooks.retry_for ({self.settings.retry_for:g} s) has passed")
            log.warning("webhook: %d event(s) of %s given up after %d attempt(s), %s: %s",
                        len(batch), account, attempts, why, outcome.reason)
            return
        self.store.retry(seqs, attempts, first.timestamp(), later.timestamp(), account)
        log.warning("webhook: %d event(s) of %s not delivered (attempt %d), next try at %s: %s",
                    len(batch), account, attempts, later.strftime("%H:%M:%S"), outcome.reason)
