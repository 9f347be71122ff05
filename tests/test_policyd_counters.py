"""In-memory counters of keyrelay-policyd: message rates (SlidingWindow) and login failures
(FailureTracker) and where each key id recently logged in (RecentLogins). Time is passed in, so
every test states its clock explicitly."""

from __future__ import annotations

import pytest

from policyd.counters import FailureTracker, RecentLogins, SlidingWindow

# -- SlidingWindow ------------------------------------------------------------------------------


def test_unknown_key_counts_zero() -> None:
    assert SlidingWindow(60.0).count("nobody", 1234.5) == 0


def test_count_is_exact_within_one_window() -> None:
    window = SlidingWindow(60.0)
    for i in range(10):
        window.add("acme", 600.0 + i * 5)  # all in the fixed window [600, 660)
        assert window.count("acme", 600.0 + i * 5) == i + 1
    assert window.count("acme", 659.999) == 10


def test_keys_are_counted_separately() -> None:
    window = SlidingWindow(60.0)
    for _ in range(3):
        window.add("acme", 10.0)
    window.add("globex", 10.0)
    assert (window.count("acme", 20.0), window.count("globex", 20.0)) == (3, 1)


def test_previous_window_decays_linearly_across_the_next_one() -> None:
    window = SlidingWindow(60.0)
    for _ in range(10):
        window.add("acme", 0.0)
    assert window.count("acme", 60.0) == pytest.approx(10.0)  # all of it still overlaps
    assert window.count("acme", 90.0) == pytest.approx(5.0)  # half of it
    assert window.count("acme", 114.0) == pytest.approx(1.0)
    assert window.count("acme", 120.0) == 0  # two windows later: gone


def test_new_events_add_to_the_weighted_previous_window() -> None:
    window = SlidingWindow(60.0)
    for _ in range(6):
        window.add("acme", 30.0)
    window.add("acme", 75.0)
    window.add("acme", 75.0)
    # 2 in the current window + 6 weighted by the 45 s of the previous one still covered
    assert window.count("acme", 75.0) == pytest.approx(2 + 6 * 0.75)


def test_a_gap_of_more_than_one_window_starts_from_zero() -> None:
    window = SlidingWindow(60.0)
    for _ in range(5):
        window.add("acme", 0.0)
    window.add("acme", 125.0)
    assert window.count("acme", 125.0) == 1


def test_steady_rate_is_counted_close_to_the_true_count() -> None:
    window = SlidingWindow(60.0)
    for second in range(600):  # one event a second for ten minutes
        window.add("acme", float(second))
    assert window.count("acme", 599.5) == pytest.approx(60, abs=1.5)


def test_prune_forgets_keys_last_seen_two_windows_ago_and_keeps_recent_ones() -> None:
    window = SlidingWindow(60.0)
    window.add("old", 0.0)
    window.add("recent", 100.0)
    window.prune(119.0)  # "old" is in the previous window: still counted
    assert len(window) == 2 and window.count("old", 119.0) > 0
    window.prune(120.0)
    assert len(window) == 1 and window.count("recent", 120.0) > 0
    assert window.count("old", 120.0) == 0


def test_prune_keeps_memory_bounded_after_many_distinct_keys() -> None:
    window = SlidingWindow(60.0)
    for i in range(100_000):
        window.add(f"principal-{i}", 30.0)
    assert len(window) == 100_000
    window.prune(180.0)
    assert len(window) == 0


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
