"""One contract for both suppression stores: the SQLite file and Redis (a real redis-server
with keyrelay's ACL user, testkit/redis.py) answer the same (keyrelay/suppressions/,
docs/suppressions.md). Also policyd's asyncio look-up in Redis against the blocking store,
the cleaning of hostile text, and the hard-bounce API keyrelay-events calls."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from keyrelay.config import parse_config
from keyrelay.counters import RedisCounters
from keyrelay.counters.open import redis_target
from keyrelay.errors import UserError
from keyrelay.suppressions import (
    MAX_REASON,
    RedisLookup,
    RedisSuppressions,
    SqliteSuppressions,
    Suppression,
    SuppressionStore,
    SuppressionsUnavailable,
    address,
    make,
    open_suppressions,
    suppress_hard_bounce,
)
from testkit.redis import REDIS_SERVER, RedisServer

BACKENDS = ("sqlite", "redis")
NOW = int(datetime(2026, 12, 5, 1, 0, tzinfo=UTC).timestamp())


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    if not REDIS_SERVER.exists():
        pytest.skip("redis-server is not installed (make test installs it)")
    with RedisServer() as found:
        yield found


_seen = 0


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SuppressionStore]:
    global _seen
    if request.param == "sqlite":
        found: SuppressionStore = SqliteSuppressions(str(tmp_path / "s" / "suppressions.db"))
    else:
        server: RedisServer = request.getfixturevalue("server")
        _seen += 1  # each test its own prefix: the server is shared by the module
        config = parse_config(
            {"counters": server.counters_settings(prefix=f"{server.prefix}t{_seen}:")},
            str(tmp_path / "k.yaml"))
        found = open_suppressions(config)
        assert isinstance(found, RedisSuppressions)
    try:
        yield found
    finally:
        found.close()


def one(text: str, reason: str = "550 5.1.1 user unknown", created: int = NOW,
        source: str = "bounce") -> Suppression:
    return make(text, reason, "5.1.1", created, source)  # type: ignore[arg-type]


def test_add_get_remove(store: SuppressionStore) -> None:
    assert store.get("acme", "bob@example.com") is None
    assert store.add("acme", one("Bob@Example.COM")) is True
    found = store.get("acme", "bob@example.com")
    assert found == Suppression("bob@example.com", "550 5.1.1 user unknown", "5.1.1", NOW,
                                "bounce")
    assert store.count("acme") == 1
    assert store.remove("acme", "bob@example.com") is True
    assert store.remove("acme", "bob@example.com") is False
    assert store.get("acme", "bob@example.com") is None
    assert store.count("acme") == 0


def test_per_account(store: SuppressionStore) -> None:
    store.add("acme", one("bob@example.com"))
    assert store.get("other", "bob@example.com") is None
    assert store.count("other") == 0
    assert store.list("other") == []


def test_a_second_add_keeps_date_and_source_and_replaces_the_reason(
        store: SuppressionStore) -> None:
    assert store.add("acme", one("bob@example.com", "first", NOW - 100, "import"))
    assert store.add("acme", one("bob@example.com", "second", NOW, "bounce")) is False
    found = store.get("acme", "bob@example.com")
    assert found is not None
    assert (found.reason, found.created, found.source) == ("second", NOW - 100, "import")
    assert store.add("acme", one("bob@example.com", "third"), replace=False) is False
    found = store.get("acme", "bob@example.com")
    assert found is not None and found.reason == "second"


def test_list_pages_in_address_order(store: SuppressionStore) -> None:
    addresses = [f"user{n:03d}@example.com" for n in range(25)]
    assert store.add_many("acme", [one(a) for a in reversed(addresses)]) == 25
    assert store.add_many("acme", [one(addresses[0]), one("new@example.com")]) == 1
    seen: list[str] = []
    after = ""
    while True:
        page = store.list("acme", after, 10)
        seen += [each.address for each in page]
        if len(page) < 10:
            break
        after = page[-1].address
    assert seen == sorted([*addresses, "new@example.com"])
    assert store.count("acme") == 26
    assert store.list("acme", "user023@example.com", 10)[0].address == "user024@example.com"


def test_many_in_one_import(store: SuppressionStore) -> None:
    many = [one(f"u{n}@example.org") for n in range(1200)]  # more than one Redis chunk
    assert store.add_many("acme", many) == 1200
    assert store.count("acme") == 1200


def test_unicode_and_hostile_reasons_come_back_clean(store: SuppressionStore) -> None:
    hostile = "550\r\n5.1.1 \x1b[31mgone\x00 \u202eevil é" + "x" * 5000
    store.add("acme", one("bob@example.com", hostile))
    found = store.get("acme", "bob@example.com")
    assert found is not None
    assert len(found.reason) <= MAX_REASON
    assert found.reason.startswith("550 5.1.1 [31mgone evil é")
    assert all(c.isprintable() for c in found.reason)


def test_redis_lookup_agrees_with_the_store(server: RedisServer, tmp_path: Path) -> None:
    config = parse_config({"counters": server.counters_settings(prefix=f"{server.prefix}look:")},
                          str(tmp_path / "k.yaml"))
    store = open_suppressions(config)
    store.add("acme", one("bob@example.com"))
    store.close()

    async def ask() -> tuple[Suppression | None, Suppression | None]:
        lookup = RedisLookup(RedisCounters(redis_target(config.counters.redis)))
        try:
            return (await lookup.get("acme", "bob@example.com"),
                    await lookup.get("acme", "eve@example.com"))
        finally:
            await lookup.close()

    found, missing = asyncio.run(ask())
    assert found is not None and found.reason == "550 5.1.1 user unknown"
    assert missing is None


def test_redis_away_is_unavailable(tmp_path: Path) -> None:
    config = parse_config({"counters": {"backend": "redis", "redis": {
        "host": "127.0.0.1", "port": 9, "timeout": 2}}}, str(tmp_path / "k.yaml"))
    store = open_suppressions(config)
    with pytest.raises(SuppressionsUnavailable, match="cannot connect to redis"):
        store.get("acme", "bob@example.com")


def test_sqlite_reader_without_file_is_empty_and_unreadable_file_is_unavailable(
        tmp_path: Path) -> None:
    reader = SqliteSuppressions(str(tmp_path / "none.db"), create=False)
    assert reader.get("acme", "bob@example.com") is None
    assert not (tmp_path / "none.db").exists()
    (tmp_path / "none.db").touch()  # a writer creating it this very moment
    assert reader.get("acme", "bob@example.com") is None
    broken = tmp_path / "broken.db"
    broken.write_bytes(b"this is not a database" * 100)
    with pytest.raises(SuppressionsUnavailable, match=r"suppressions\.path: cannot use"):
        SqliteSuppressions(str(broken), create=False).get("acme", "bob@example.com")


def test_a_writer_and_a_reader_share_the_file(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    writer = SqliteSuppressions(path)
    reader = SqliteSuppressions(path, create=False)
    writer.add("acme", one("bob@example.com"))
    assert reader.get("acme", "bob@example.com") is not None
    writer.remove("acme", "bob@example.com")
    assert reader.get("acme", "bob@example.com") is None


@pytest.mark.parametrize("bad", ["bob\x00@example.com", "bob@exa\nmple.com", "bob",
                                 "bob @example.com", "\x1b[2J@example.com"])
def test_addresses_with_control_characters_are_refused(bad: str) -> None:
    with pytest.raises(UserError):
        address(bad)


def test_hard_bounce_suppresses_once(store: SuppressionStore) -> None:
    event = {"event": "bounce", "type": "hard", "account": "acme", "subuser": "news",
             "email": "Gone@Example.com", "status": "5.1.1",
             "reason": "550 5.1.1 <gone@example.com>: user unknown", "timestamp": NOW - 60}
    now = datetime.fromtimestamp(NOW, UTC)
    assert suppress_hard_bounce(store, event, now) is True
    again = {**event, "timestamp": NOW, "reason": "550 5.1.1 no such user"}
    assert suppress_hard_bounce(store, again, now) is False
    found = store.get("acme", "gone@example.com")
    assert found == Suppression("gone@example.com", "550 5.1.1 no such user", "5.1.1",
                                NOW - 60, "bounce")
    assert store.count("acme") == 1


@pytest.mark.parametrize("event", [
    {"event": "bounce", "type": "soft", "account": "acme", "email": "a@example.com"},
    {"event": "deferred", "account": "acme", "email": "a@example.com"},
    {"event": "bounce", "type": "hard", "account": "", "email": "a@example.com"},
    {"event": "bounce", "type": "hard", "email": "a@example.com"},
    {"event": "bounce", "type": "hard", "account": "acme", "email": "not an address"},
    {"event": "bounce", "type": "hard", "account": "Acme Corp", "email": "a@example.com"},
])
def test_other_events_suppress_nothing(store: SuppressionStore,
                                       event: dict[str, object]) -> None:
    assert suppress_hard_bounce(store, event, datetime.fromtimestamp(NOW, UTC)) is False
    assert store.count("acme") == 0
