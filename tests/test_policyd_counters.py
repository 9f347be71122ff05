"""The in-process counter store's login failures and recent logins (``MemoryCounters``,
keyrelay/counters/memory.py), as keyrelay-policyd's auth service uses them: each call at the
time the test gives, so every test states its clock explicitly. (What every store shares,
Redis too, is tests/test_counters_contract.py's; the rates' sliding windows are there too.)"""

from __future__ import annotations

import pytest

from keyrelay.counters import MemoryCounters
from policyd.policy import run_now

KEEP = 1e9  # recent logins kept longer than any test runs (policyd.bruteforce.trusted_for)


class FailureTracker:
    """``MemoryCounters``' failures of one kind, each call at the time it is given."""

    def __init__(self, max_failures: int, window: float, lockout: float,
                 max_tracked: int) -> None:
        self.now = 0.0
        self.limits = (max_failures, window, lockout)
        self.store = MemoryCounters(max_tracked=max_tracked, clock=lambda: self.now)

    def fail(self, key: str, now: float) -> bool:
        self.now = now
        return run_now(self.store.fail("address", key, *self.limits))

    def locked_for(self, key: str, now: float) -> float:
        self.now = now
        return run_now(self.store.locked_for("address", key))

    def __len__(self) -> int:
        return len(self.store)


class RecentLogins:
    """``MemoryCounters``' recent logins, each call at the time it is given."""

    def __init__(self, max_tracked: int, per_key: int = 8) -> None:
        self.now = 0.0
        self.store = MemoryCounters(max_tracked=max_tracked, per_key=per_key,
                                    clock=lambda: self.now)

    def succeeded(self, key_id: str, client: str, now: float) -> None:
        self.now = now
        run_now(self.store.succeeded(key_id, client, KEEP))

    def since(self, key_id: str, client: str, now: float) -> float | None:
        self.now = now
        return run_now(self.store.since(key_id, client))

    def clients(self, key_id: str, now: float, within: float) -> int:
        self.now = now
        return run_now(self.store.clients(key_id, within))

    def __len__(self) -> int:
        return len(self.store)


# -- FailureTracker -----------------------------------------------------------------------------
def tracker(max_failures: int = 3, window: float = 60.0, lockout: float = 300.0,
            max_tracked: int = 1000) -> FailureTracker:
    return FailureTracker(max_failures, window, lockout, max_tracked)


def test_nth_failure_within_the_window_starts_a_lockout() -> None:
    failures = tracker()
    assert [failures.fail("192.0.2.7", t) for t in (0.0, 10.0, 20.0)] == [False, False, True]
    assert failures.locked_for("192.0.2.7", 20.0) == 300.0
    assert failures.locked_for("192.0.2.7", 120.0) == 200.0


def test_fewer_failures_than_the_limit_do_not_lock() -> None:
    failures = tracker()
    failures.fail("192.0.2.7", 0.0)
    failures.fail("192.0.2.7", 1.0)
    assert failures.locked_for("192.0.2.7", 1.0) == 0


def test_failures_spread_over_more_than_the_window_never_lock() -> None:
    failures = tracker(max_failures=3, window=60.0)
    # any three consecutive failures span 62 s: never three within one window
    for i in range(50):
        assert failures.fail("192.0.2.7", i * 31.0) is False
    assert failures.locked_for("192.0.2.7", 50 * 31.0) == 0


def test_lockout_expires_and_counting_starts_afresh() -> None:
    failures = tracker(max_failures=3, window=60.0, lockout=300.0)
    for t in (0.0, 1.0, 2.0):
        failures.fail("192.0.2.7", t)
    assert failures.locked_for("192.0.2.7", 301.9) > 0
    assert failures.locked_for("192.0.2.7", 302.0) == 0
    assert failures.fail("192.0.2.7", 400.0) is False  # one failure, not the fourth
    assert failures.fail("192.0.2.7", 401.0) is False
    assert failures.fail("192.0.2.7", 402.0) is True


def test_failures_during_a_lockout_do_not_extend_it() -> None:
    failures = tracker(max_failures=2, window=60.0, lockout=300.0)
    failures.fail("k", 0.0)
    assert failures.fail("k", 1.0) is True
    for t in range(2, 200, 10):
        assert failures.fail("k", float(t)) is False
    assert failures.locked_for("k", 300.0) == pytest.approx(1.0)


def test_keys_lock_independently() -> None:
    failures = tracker(max_failures=2)
    failures.fail("192.0.2.7", 0.0)
    failures.fail("192.0.2.7", 1.0)
    failures.fail("192.0.2.8", 1.0)
    assert failures.locked_for("192.0.2.7", 2.0) > 0
    assert failures.locked_for("192.0.2.8", 2.0) == 0


def test_max_tracked_forgets_the_least_recently_failed_key_first() -> None:
    failures = tracker(max_failures=2, max_tracked=3)
    failures.fail("a", 0.0)
    failures.fail("a", 1.0)  # "a" locked out
    failures.fail("b", 2.0)
    failures.fail("c", 3.0)
    failures.fail("b", 4.0)  # "b" locked; order by last failure now: a, c, b
    failures.fail("d", 5.0)  # a fourth key: "a" (least recently failed) goes
    assert len(failures) == 3
    assert failures.locked_for("a", 6.0) == 0  # forgotten, lockout included
    assert failures.locked_for("b", 6.0) > 0
    failures.fail("e", 7.0)  # then "c"
    failures.fail("c", 8.0)  # "c" starts again from one failure
    assert failures.locked_for("c", 8.0) == 0
    assert len(failures) == 3


def test_memory_stays_bounded_when_fed_a_hundred_thousand_distinct_keys() -> None:
    failures = tracker(max_failures=5, max_tracked=1000)
    for i in range(100_000):
        failures.fail(f"2001:db8::{i:x}", float(i) / 100)
        assert len(failures) <= 1000
    assert len(failures) == 1000
    assert failures.locked_for("2001:db8::1", 1000.0) == 0


def test_locked_for_an_unknown_key_is_zero() -> None:
    assert tracker().locked_for("never-failed", 0.0) == 0


# -- RecentLogins -------------------------------------------------------------------------------
def test_recent_logins_tell_how_long_ago_a_key_logged_in_from_a_client() -> None:
    logins = RecentLogins(max_tracked=100)
    logins.succeeded("key1", "192.0.2.7", 10.0)
    logins.succeeded("key1", "192.0.2.7", 50.0)  # the latest login counts
    logins.succeeded("key2", "192.0.2.8", 20.0)
    assert logins.since("key1", "192.0.2.7", 80.0) == 30.0
    assert logins.since("key1", "192.0.2.8", 80.0) is None  # key2's client, not key1's
    assert logins.since("key3", "192.0.2.7", 80.0) is None
    assert logins.clients("key1", 80.0, within=60.0) == 1
    assert logins.clients("key1", 80.0, within=10.0) == 0


def test_recent_logins_keep_the_latest_clients_of_a_key_only() -> None:
    logins = RecentLogins(max_tracked=100, per_key=3)
    for i, client in enumerate(("a", "b", "c", "a", "d")):
        logins.succeeded("key", client, float(i))
    # "b" was the least recently seen when "d" came: a, c, d remain
    assert [logins.since("key", c, 10.0) for c in "abcd"] == [7.0, None, 8.0, 6.0]
    assert logins.clients("key", 10.0, within=100.0) == 3


def test_recent_logins_forget_the_least_recently_logged_in_key_first() -> None:
    logins = RecentLogins(max_tracked=2)
    logins.succeeded("k1", "a", 0.0)
    logins.succeeded("k2", "a", 1.0)
    logins.succeeded("k1", "b", 2.0)  # k1 used again: k2 is now the oldest
    logins.succeeded("k3", "a", 3.0)
    assert len(logins) == 2
    assert logins.since("k2", "a", 4.0) is None
    assert logins.since("k1", "a", 4.0) == 4.0 and logins.since("k3", "a", 4.0) == 1.0


def test_recent_logins_memory_stays_bounded() -> None:
    logins = RecentLogins(max_tracked=1000, per_key=8)
    for i in range(20_000):
        logins.succeeded(f"key{i % 3000}", f"198.51.100.{i % 50}", float(i))
        assert len(logins) <= 1000
    assert len(logins) == 1000
