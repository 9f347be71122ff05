"""One contract for every counter store: in memory and in Redis (a real redis-server,
testkit/redis.py) must answer the same (keyrelay/counters/, docs/cluster.md).

Each test runs once per backend (``store``), on the store's injectable clock: windows and
periods are crossed by setting the clock, never by sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import pytest

from keyrelay.config import parse_config
from keyrelay.counters import (
    Calendar,
    CounterStore,
    Locked,
    MemoryCounters,
    RedisCounters,
    Sliding,
    Usage,
)
from keyrelay.counters.open import redis_target
from testkit.redis import REDIS_SERVER, RedisServer

BACKENDS = ("memory", "redis")
T = TypeVar("T")
PARIS = ZoneInfo("Europe/Paris")
# 2026-12-04 10:00:00 UTC: a whole hour, so every sliding bucket of 60 s or 3600 s starts here
START = datetime(2026, 12, 4, 10, 0, tzinfo=ZoneInfo("UTC")).timestamp()


class Clock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Store:
    kind: str
    clock: Clock
    store: CounterStore
    server: RedisServer | None

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run(self._closing(work))

    async def _closing(self, work: Coroutine[Any, Any, T]) -> T:
        try:
            return await work
        finally:  # each asyncio.run has its own loop: connections do not outlive it
            await self.store.close()


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    if not REDIS_SERVER.exists():
        pytest.skip("redis-server is not installed (make test installs it)")
    with RedisServer() as found:
        yield found


def make_store(kind: str, clock: Clock, server: RedisServer | None, tmp_path: Path, *,
               zone: ZoneInfo | None = None, per_key: int = 8,
               max_tracked: int = 100_000) -> CounterStore:
    if kind == "memory":
        return MemoryCounters(clock=clock, zone=zone, per_key=per_key, max_tracked=max_tracked)
    assert server is not None
    config = parse_config({"counters": server.counters_settings()}, str(tmp_path / "k.yaml"))
    return RedisCounters(redis_target(config.counters.redis), clock=clock, zone=zone,
                         per_key=per_key, max_tracked=max_tracked)


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    server: RedisServer | None = None
    if request.param == "redis":
        server = request.getfixturevalue("server")
        server.flush()
    clock = Clock()
    yield Store(request.param, clock, make_store(request.param, clock, server, tmp_path),
                server)


def other(store: Store, tmp_path: Path, **options: Any) -> CounterStore:
    """Another store of the same backend and data, with other settings (time zone, bounds)."""
    return make_store(store.kind, store.clock, store.server, tmp_path, **options)


# -- take and peek ---------------------------------------------------------------------------


def test_take_admits_up_to_the_limit_then_names_the_window(store: Store) -> None:
    minute = Sliding("acme/app", 60, 3)

    async def work() -> tuple[list[Usage | None], list[Usage]]:
        answers = [await store.store.take((minute,)) for _ in range(4)]
        return answers, await store.store.peek((minute,))

    answers, (usage,) = store.run(work())
    assert answers[:3] == [None, None, None]
    refused = answers[3]
    assert refused is not None
    assert (refused.window, refused.count, refused.limit) == (minute, 3.0, 3)
    # the whole next bucket weighs the 3 in full at its start; a third of the way in, 3 * 2/3
    # = 2 leave room for one more
    assert refused.resets_in == pytest.approx(60 + 20)
    assert usage.count == 3.0


def test_a_refusal_adds_nothing_to_any_window(store: Store) -> None:
    subuser, account = Sliding("acme/app", 60, 10), Sliding("acme", 60, 2)
    day = Calendar("acme", "day", 100)
    windows = (subuser, account, day)

    async def work() -> tuple[list[Usage | None], list[Usage]]:
        answers = [await store.store.take(windows) for _ in range(3)]
        return answers, await store.store.peek(windows)

    answers, usage = store.run(work())
    assert answers[:2] == [None, None]
    assert answers[2] is not None and answers[2].window == account
    assert [u.count for u in usage] == [2.0, 2.0, 2.0]


def test_the_first_window_that_refuses_is_named(store: Store) -> None:
    windows = (Sliding("acme/app", 60, 1), Sliding("acme", 60, 1))
    refused = store.run(_take_twice(store.store, windows))
    assert refused is not None and refused.window == windows[0]


async def _take_twice(store: CounterStore, windows: tuple[Sliding, ...]) -> Usage | None:
    await store.take(windows)
    return await store.take(windows)


def test_an_amount_counts_as_that_many(store: Store) -> None:
    day = Calendar("acme/app", "day", 12)

    async def work() -> list[Usage | None]:
        return [await store.store.take((day,), 5), await store.store.take((day,), 5),
                await store.store.take((day,), 5), await store.store.take((day,), 2),
                await store.store.take((day,), 0), await store.store.take((day,), 1)]

    answers = store.run(work())
    assert answers[:2] == [None, None]
    assert answers[2] is not None and answers[2].count == 10.0
    assert answers[3:5] == [None, None]  # 12 exactly; 0 more still fits
    assert answers[5] is not None and answers[5].count == 12.0


def test_a_sliding_window_forgets_the_previous_bucket_gradually(store: Store) -> None:
    minute = Sliding("acme/app", 60, 10)

    async def work() -> list[object]:
        seen: list[object] = []
        for _ in range(10):
            assert await store.store.take((minute,)) is None
        store.clock.now = START + 60  # the next bucket: the previous weighs in full
        seen.append(await store.store.take((minute,)))
        store.clock.now = START + 90  # half way: 10 * 0.5 = 5 counted
        seen.append((await store.store.peek((minute,)))[0].count)
        seen.append(await store.store.take((minute,), 5))
        seen.append(await store.store.take((minute,)))
        store.clock.now = START + 180  # two buckets later: nothing left
        seen.append((await store.store.peek((minute,)))[0].count)
        return seen

    refused, half, five_more, one_more, later = store.run(work())
    assert isinstance(refused, Usage) and refused.count == 10.0
    assert half == 5.0
    assert five_more is None
    assert isinstance(one_more, Usage) and one_more.count == 10.0
    assert later == 0.0


def test_a_day_quota_resets_at_midnight_in_its_time_zone(store: Store, tmp_path: Path) -> None:
    paris = other(store, tmp_path, zone=PARIS)
    day = Calendar("acme", "day", 2)
    before = datetime(2026, 12, 4, 23, 59, 30, tzinfo=PARIS).timestamp()
    store.clock.now = before

    async def work() -> list[Usage | None]:
        try:
            answers = [await paris.take((day,)) for _ in range(3)]
            store.clock.now = before + 30  # 00:00:00 in Paris, 23:00 UTC
            answers.append(await paris.take((day,)))
            return answers
        finally:
            await paris.close()

    answers = store.run(work())
    assert answers[:2] == [None, None]
    refused = answers[2]
    assert refused is not None and refused.resets_in == pytest.approx(30)
    assert answers[3] is None
    if store.server is not None:
        assert {"keyrelay:quota:acme:day:2026-12-04",
                "keyrelay:quota:acme:day:2026-12-05"} <= set(store.server.keys())


def test_a_month_quota_resets_on_the_first(store: Store) -> None:
    month = Calendar("acme", "month", 1)
    store.clock.now = datetime(2026, 12, 31, 23, 59, 59, tzinfo=ZoneInfo("UTC")).timestamp()

    async def work() -> list[Usage | None]:
        answers = [await store.store.take((month,)), await store.store.take((month,))]
        store.clock.now += 1
        answers.append(await store.store.take((month,)))
        return answers

    first, refused, new_year = store.run(work())
    assert first is None and new_year is None
    assert refused is not None and refused.resets_in == pytest.approx(1)


def test_peek_adds_nothing(store: Store) -> None:
    windows = (Sliding("acme", 3600, 5), Calendar("acme", "month", 5))

    async def work() -> list[list[Usage]]:
        return [await store.store.peek(windows), await store.store.peek(windows)]

    first, second = store.run(work())
    assert [u.count for u in first] == [0.0, 0.0] == [u.count for u in second]
    assert [u.limit for u in first] == [5, 5]


def test_contradictory_windows_are_the_callers_business(store: Store) -> None:
    # a month quota below the day quota: the month refuses first, the store does not judge
    windows = (Calendar("acme", "day", 10), Calendar("acme", "month", 1))
    refused = store.run(_take_twice(store.store, windows))  # type: ignore[arg-type]
    assert refused is not None and refused.window == windows[1]


@pytest.mark.parametrize(("windows", "amount"), [
    ((Sliding("acme:x", 60, 1),), 1),
    ((Sliding("", 60, 1),), 1),
    ((Sliding("acme", 60, 1),), -1),
    ((Sliding("acme", 0, 1),), 1),
    ((Calendar("acme", "day", -1),), 1),
])
def test_bad_arguments_are_refused(store: Store, windows: tuple[Sliding | Calendar, ...],
                                   amount: int) -> None:
    with pytest.raises(ValueError, match=r"amount|subject|limit|second"):
        store.run(store.store.take(windows, amount))


# -- failed logins and lock-outs -------------------------------------------------------------


def test_failures_lock_out_and_are_listed(store: Store) -> None:
    s = store.store

    async def work() -> list[object]:
        seen: list[object] = [await s.fail("address", "192.0.2.1", 3, 600, 900)
                              for _ in range(3)]
        seen.append(await s.locked_for("address", "192.0.2.1"))
        store.clock.now += 100
        seen.append(await s.fail("address", "192.0.2.1", 3, 600, 900))  # during: counted
        seen.append(await s.locked_for("address", "192.0.2.1"))
        seen.append(await s.locked_for("key", "192.0.2.1"))  # another kind
        seen.append(await s.locked())
        seen.append(await s.locked("key"))
        return seen

    f1, f2, f3, first, during, later, other_kind, listed, keys = store.run(work())
    assert (f1, f2, f3) == (False, False, True)
    assert first == pytest.approx(900)
    assert during is False and later == pytest.approx(800)
    assert other_kind == 0.0
    assert isinstance(listed, list) and len(listed) == 1 and keys == []
    lock = listed[0]
    assert isinstance(lock, Locked)
    assert (lock.kind, lock.subject, lock.since, lock.until, lock.failures) == (
        "address", "192.0.2.1", START, START + 900, 4)


def test_failures_outside_the_window_do_not_add_up(store: Store) -> None:
    s = store.store

    async def work() -> list[bool]:
        seen = [await s.fail("key", "kr_abc", 2, 60, 300)]
        store.clock.now += 61
        seen.append(await s.fail("key", "kr_abc", 2, 60, 300))
        seen.append(await s.fail("key", "kr_abc", 2, 60, 300))
        return seen

    assert store.run(work()) == [False, False, True]


def test_a_lock_out_ends_after_lockout(store: Store) -> None:
    s = store.store

    async def work() -> list[object]:
        await s.fail("key", "kr_abc", 1, 60, 300)
        store.clock.now += 301
        return [await s.locked_for("key", "kr_abc"), await s.locked(),
                await s.fail("key", "kr_abc", 1, 60, 300)]

    assert store.run(work()) == [0.0, [], True]


def test_clear_and_clear_all(store: Store) -> None:
    s = store.store

    async def work() -> list[object]:
        for key in ("192.0.2.1", "192.0.2.2"):
            await s.fail("address", key, 1, 60, 300)
        await s.fail("key", "kr_abc", 1, 60, 300)
        await s.fail("key", "kr_def", 5, 60, 300)  # failing, not locked out
        return [await s.clear("address", "192.0.2.1"), await s.clear("address", "192.0.2.1"),
                await s.locked_for("address", "192.0.2.1"), len(await s.locked()),
                await s.clear_all(), await s.locked(),
                await s.fail("key", "kr_def", 2, 60, 300)]  # its earlier failure forgotten

    assert store.run(work()) == [True, False, 0.0, 2, 2, [], False]


def test_failures_keep_at_most_max_tracked_keys(store: Store, tmp_path: Path) -> None:
    small = other(store, tmp_path, max_tracked=3)

    async def work() -> list[float]:
        try:
            await small.fail("address", "192.0.2.1", 1, 60, 300)
            for n in range(2, 5):
                store.clock.now += 1
                await small.fail("address", f"192.0.2.{n}", 5, 60, 300)
            return [await small.locked_for("address", "192.0.2.1"),
                    len(await small.locked())]
        finally:
            await small.close()

    assert store.run(work()) == [0.0, 0]  # the least recently failed, forgotten


# -- recent logins ---------------------------------------------------------------------------


def test_recent_logins(store: Store, tmp_path: Path) -> None:
    s = other(store, tmp_path, per_key=2)

    async def work() -> list[object]:
        try:
            await s.succeeded("kr_abc", "192.0.2.1", 3600)
            store.clock.now += 10
            await s.succeeded("kr_abc", "2001:db8::/64", 3600)
            seen: list[object] = [await s.since("kr_abc", "192.0.2.1"),
                                  await s.since("kr_abc", "2001:db8::/64"),
                                  await s.since("kr_abc", "192.0.2.9"),
                                  await s.since("kr_other", "192.0.2.1"),
                                  await s.clients("kr_abc", 60), await s.clients("kr_abc", 5)]
            store.clock.now += 10
            await s.succeeded("kr_abc", "192.0.2.3", 3600)  # per_key 2: the oldest goes
            seen += [await s.since("kr_abc", "192.0.2.1"), await s.clients("kr_abc", 60)]
            return seen
        finally:
            await s.close()

    assert store.run(work()) == [10.0, 0.0, None, None, 2, 1, None, 2]
