"""In process: the memory counter store's bounds, the sliding window's arithmetic, the
``counters:`` configuration section (one precise line per mistake) and which store it opens.
The behaviour both stores share is tests/test_counters_contract.py's."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from keyrelay.config import load_config
from keyrelay.counters import (
    Calendar,
    CountersUnavailable,
    MemoryCounters,
    RedisCounters,
    RedisTarget,
    Resilient,
    Sliding,
    open_counters,
)
from keyrelay.counters.scripts import acl_rules
from keyrelay.errors import ConfigError
from testkit.net import free_port

START = 1_796_378_400.0  # 2026-12-04 10:00:00 UTC, a whole hour


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def test_windows_whose_period_is_over_are_forgotten() -> None:
    clock = Clock()
    store = MemoryCounters(clock=clock, sweep_every=60)

    async def work() -> list[int]:
        sizes = []
        for n in range(50):
            await store.take((Sliding(f"p{n}", 60, 10), Calendar(f"p{n}", "day", 10)))
        sizes.append(len(store))
        clock.now += 121  # two minutes: every sliding bucket is stale
        await store.take((Sliding("q", 60, 10),))
        sizes.append(len(store))
        clock.now += 86400  # the next day: every day count is stale
        await store.take((Sliding("q", 60, 10),))
        sizes.append(len(store))
        return sizes

    assert asyncio.run(work()) == [100, 51, 1]


def test_recent_logins_keep_at_most_max_tracked_key_ids() -> None:
    store = MemoryCounters(max_tracked=3)

    async def work() -> list[float | None]:
        for n in range(5):
            await store.succeeded(f"kr_{n}", "192.0.2.1", 3600)
        return [await store.since(f"kr_{n}", "192.0.2.1") for n in range(5)]

    found = asyncio.run(work())
    assert found[:2] == [None, None]
    assert all(since is not None for since in found[2:])


@pytest.mark.parametrize(("current", "previous", "elapsed", "amount", "expected"), [
    (0, 0, 0.0, 1, 0.0),  # room now
    (10, 0, 0.0, 1, 60 * (1 + 0.1)),  # the next bucket, once 10 * (1 - f) <= 9
    (5, 10, 0.0, 1, 60 * 0.6),  # this bucket, once 10 * (1 - f) <= 4
    (0, 0, 0.5, 11, 120.0),  # more than the limit itself: two windows
])
def test_sliding_resets_in(current: int, previous: int, elapsed: float, amount: int,
                           expected: float) -> None:
    window = Sliding("acme", 60, 10)
    assert window.resets_in(current, previous, elapsed, amount) == pytest.approx(expected)


# -- configuration ---------------------------------------------------------------------------


def load_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "keyrelay.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    message = str(info.value)
    assert "\n" not in message
    return message.removeprefix(f"{path}:")


def test_the_default_is_memory_in_utc(tmp_path: Path) -> None:
    path = tmp_path / "keyrelay.yaml"
    path.write_text("")
    counters = load_config(str(path)).counters
    assert (counters.backend, counters.on_unavailable, counters.time_zone) == (
        "memory", "tempfail", "UTC")
    assert isinstance(open_counters(load_config(str(path))), MemoryCounters)


def test_a_full_redis_section_loads(tmp_path: Path) -> None:
    path = tmp_path / "keyrelay.yaml"
    path.write_text(
        "counters:\n  backend: redis\n  on_unavailable: local\n  time_zone: Europe/Paris\n"
        "  redis:\n    host: redis.example.net\n    port: 6380\n    db: 2\n"
        "    username: keyrelay\n    password_file: /etc/keyrelay/redis.secret\n"
        "    tls: {enabled: true, ca_file: /etc/ssl/redis-ca.pem}\n    timeout: 0.5\n"
        "    prefix: 'relay1:'\n    sentinels: ['10.0.0.5:26379', '[2001:db8::5]:26379']\n"
        "    service_name: counters\n")
    redis = load_config(str(path)).counters.redis
    assert (redis.host, redis.port, redis.db, redis.username, redis.tls.enabled,
            redis.timeout, redis.prefix, redis.sentinels, redis.service_name) == (
        "redis.example.net", 6380, 2, "keyrelay", True, 0.5, "relay1:",
        ("10.0.0.5:26379", "[2001:db8::5]:26379"), "counters")


@pytest.mark.parametrize(("text", "expected"), [
    ("counters:\n  backend: mongo\n",
     "2: counters.backend: must be one of 'memory', 'redis', got a string ('mongo')"),
    ("counters:\n  on_unavailable: accept\n",
     "2: counters.on_unavailable: must be one of 'tempfail', 'local', got a string ('accept')"),
    ("counters:\n  time_zone: Mars/Olympus\n",
     "2: counters.time_zone: no time zone 'Mars/Olympus' on this host"),
    ("counters:\n  redis:\n    username: keyrelay\n",
     # no password_file line: the line of its section
     "2: counters.redis.password_file: username keyrelay needs a password_file"),
    ("counters:\n  redis:\n    password_file: redis.secret\n",
     "3: counters.redis.password_file: must be an absolute path, got 'redis.secret'"),
    ("counters:\n  redis:\n    sentinels: [10.0.0.5]\n",
     "3: counters.redis.sentinels[0]: must be host:port"),
    ("counters:\n  redis:\n    sentinels: ['10.0.0.5:99999']\n",
     "3: counters.redis.sentinels: port must be 1 to 65535, got '10.0.0.5:99999'"),
    ("counters:\n  redis:\n    sentinels: ['a:1']\n    socket: /run/redis.sock\n",
     "4: counters.redis.socket: give either sentinels or socket, not both"),
    ("counters:\n  redis:\n    tls:\n      cert_file: /etc/c.pem\n",
     "3: counters.redis.tls.key_file: cert_file and key_file go together"),
    ("counters:\n  redis:\n    timeout: 0\n",
     "3: counters.redis.timeout: must be at least"),
    ("counters:\n  redis:\n    prefix: 'has space'\n",
     "3: counters.redis.prefix: must be up to 64 letters"),
    ("counters:\n  redis:\n    password: secret\n",
     "3: counters.redis.password: unknown key"),
])
def test_each_mistake_is_one_precise_line(tmp_path: Path, text: str, expected: str) -> None:
    message = load_error(tmp_path, text)
    assert message.startswith(expected), message
    assert "secret\n" not in message


def test_an_unreadable_password_file_is_named_when_opening(tmp_path: Path) -> None:
    path = tmp_path / "keyrelay.yaml"
    absent = tmp_path / "absent.secret"
    path.write_text(f"counters:\n  backend: redis\n  redis:\n    password_file: {absent}\n")
    with pytest.raises(CountersUnavailable) as info:
        open_counters(load_config(str(path)))
    assert str(info.value) == (f"counters.redis.password_file: cannot read {absent}: "
                               "No such file or directory")


def test_redis_opens_with_the_local_fallback_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "keyrelay.yaml"
    secret = tmp_path / "redis.secret"
    secret.write_text("s3cret-value\n")
    path.write_text(f"counters:\n  backend: redis\n  redis:\n    username: keyrelay\n"
                    f"    password_file: {secret}\n")
    store = open_counters(load_config(str(path)))
    assert isinstance(store, Resilient)
    assert store.shared.target.password == "s3cret-value"
    assert "s3cret" not in repr(store) and "s3cret" not in repr(store.shared.target)


# -- Redis away, with nothing listening (a refused connection needs no server) ---------------


def test_the_back_off_doubles_per_failed_retry_not_per_waiting_request() -> None:
    now = [100.0]
    refused = RedisCounters(RedisTarget(port=free_port(), timeout=5))
    store = Resilient(refused, MemoryCounters(), "tempfail", retry_first=0.5,
                      retry_most=2.0, monotonic=lambda: now[0])
    window = (Sliding("acme/app", 60, 10),)

    async def attempt() -> str:
        try:
            await store.take(window)
        except CountersUnavailable as exc:
            return str(exc)
        return "taken"

    async def work() -> list[float]:
        backoffs = []
        # 20 requests waiting on Redis when the outage begins: one outage, the first back-off
        answers = await asyncio.gather(*(attempt() for _ in range(20)))
        assert all(a.startswith("counters.redis: cannot connect") for a in answers), answers
        backoffs.append(store._backoff)
        assert await attempt() == answers[0]  # within the back-off: not even tried
        for _ in range(3):
            now[0] = store._next_try
            await attempt()
            backoffs.append(store._backoff)
        assert await store.fail("address", "192.0.2.1", 1, 60, 300) is True  # local
        await store.close()
        return backoffs

    assert asyncio.run(work()) == [0.5, 1.0, 2.0, 2.0]
    assert store.outages == 1 and store.away is not None


def test_the_documented_acl_is_the_one_the_tests_use() -> None:
    docs = (Path(__file__).resolve().parent.parent / "docs" / "cluster.md").read_text()
    assert f"ACL SETUSER keyrelay on >PASSWORD {acl_rules('keyrelay:')}\n" in docs
