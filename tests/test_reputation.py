"""The reputation guard (docs/reputation.md): the counting and the decision in process with
both stores (a fake clock passed in), keyrelay-events' outbox round putting a ``paused``
event into the state file, then keyrelay-policyd's real sockets with both stores: a paused
principal gets 451 4.7.1 with the text, another principal of the account does not, resume
lets it send again, the pauses unreadable are 451 4.3.0."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_reasons import text_matches

from keyrelay import admin
from keyrelay.config import Config
from keyrelay.config.loader import parse_config
from keyrelay.decisions import (
    Action,
    EngineSettings,
    PauseFacts,
    Reason,
    decide_paused,
    format_identity,
)
from keyrelay.directory.yamlfile import YamlDirectory
from keyrelay.events.outbox import Sender
from keyrelay.events.store import EventStore
from keyrelay.reputation import (
    Guard,
    Pause,
    PauseCache,
    ReputationStore,
    ReputationUnavailable,
    SqliteReputation,
    log_line,
    open_reputation,
    reputation_path,
    tripped,
)
from testkit.factories import World
from testkit.policyd import Policyd, now, policyd_on, populate_acme
from testkit.protocols import PolicyClient, connect, new_instance
from testkit.redis import REDIS_SERVER, RedisServer

T0 = 1_796_000_000.0  # 2026-11-30 00:53:20 UTC, a fixed "now" for the fake clock
DAY = 86400.0


class Clock:
    def __init__(self, at: float = T0) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


def _events(principal: str, delivered: int, bounced: int, at: float = T0,
            start: int = 1) -> list[tuple[int, dict[str, Any]]]:
    account, _, sub = principal.partition("/")
    out: list[tuple[int, dict[str, Any]]] = []
    kinds = ["delivered"] * delivered + ["bounce"] * bounced
    for n, kind in enumerate(kinds):
        event: dict[str, Any] = {"event": kind, "account": account, "subuser": sub or None,
                                 "timestamp": int(at), "event_id": f"{principal}-{start + n}"}
        if kind == "bounce":
            event["type"] = "soft" if n % 2 else "hard"  # either type counts
        out.append((start + n, event))
    return out


def _config(tmp_path: Path, **extra: Any) -> Config:
    data: dict[str, Any] = {"reputation": {"path": str(tmp_path / "rep.db"), **extra},
                            "directory": {"path": str(tmp_path / "directory.yaml")},
                            "events": {"state": str(tmp_path / "events.db")},
                            "suppressions": {"path": str(tmp_path / "supp.db")}}
    return parse_config(data, str(tmp_path / "keyrelay.yaml"))


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ReputationStore]:
    if request.param == "sqlite":
        found = open_reputation(_config(tmp_path))
        yield found
        found.close()
        return
    if not REDIS_SERVER.exists():
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with RedisServer() as server:
        config = parse_config({"counters": server.counters_settings()},
                              str(tmp_path / "keyrelay.yaml"))
        found = open_reputation(config)
        yield found
        found.close()


def _guard(tmp_path: Path, store: ReputationStore, clock: Callable[[], float],
           **extra: Any) -> Guard:
    return Guard(_config(tmp_path, **extra).reputation, store, "node-a", clock)


def _never(principal: str) -> bool:
    return False


# -- the decision ----------------------------------------------------------------------------
def test_the_decision_needs_the_volume_and_a_rate_above_the_threshold() -> None:
    assert tripped(0, 199, 200, 0.05) is None  # every one a bounce, but below the volume
    assert tripped(190, 10, 200, 0.05) is None  # exactly 5 %: not above
    assert tripped(189, 11, 200, 0.05) == pytest.approx(0.055)
    assert tripped(0, 0, 1, 0.0) is None


def test_the_engine_refuses_a_paused_principal_and_monitor_mode_lets_it_pass() -> None:
    world = World()
    world.account("acme")
    world.subuser("acme/news")
    world.key("acme/news")
    key_id = next(kid for kid, key in world.data.keys.items() if key.principal == "acme/news")
    identity = format_identity("acme/news", key_id)
    pause = Pause("acme/news", T0, 0.125, 1750, 250, DAY, 0.05)
    verdict = decide_paused(world.snapshot(), EngineSettings(), PauseFacts(identity, pause))
    assert (verdict.action, verdict.code, verdict.status, verdict.reason) == (
        Action.TEMPFAIL, 451, "4.7.1", Reason.PAUSED)
    assert verdict.text == PAUSED.removeprefix("451 4.7.1 ")
    assert text_matches("paused", verdict.text)
    assert decide_paused(world.snapshot(), EngineSettings(),
                         PauseFacts(identity, None)).reason is Reason.OK
    # recorded in monitor mode (reputation.monitor), or the account in monitor mode
    watched = decide_paused(world.snapshot(), EngineSettings(), PauseFacts(
        identity, Pause("acme/news", T0, 0.125, 1750, 250, DAY, 0.05, monitor=True)))
    assert watched.allowed and watched.monitored is not None
    assert watched.log_fields()["would_be"] == PAUSED
    world.data.accounts["acme"] = replace(world.data.accounts["acme"], monitor=True)
    assert decide_paused(world.snapshot(), EngineSettings(),
                         PauseFacts(identity, pause)).log_fields()["verdict"] == "monitor-allow"
    # an account principal is told the account's command
    account = Pause("acme", T0, 0.5, 100, 100, 3600.0, 0.05)
    assert log_line(account).endswith("over 1h is above 5 %; resume with keyrelay account "
                                      "resume acme")


def test_the_file_is_beside_the_suppression_list_unless_named(tmp_path: Path) -> None:
    beside = parse_config({"suppressions": {"path": "/srv/kr/supp.db"}}, "k.yaml")
    assert reputation_path(beside) == "/srv/kr/reputation.db"
    assert reputation_path(parse_config({}, "k.yaml")) == "/var/lib/keyrelay/reputation.db"
    assert reputation_path(_config(tmp_path)) == str(tmp_path / "rep.db")


# -- counting and pausing, both stores ------------------------------------------------------
def test_below_min_volume_is_never_paused(tmp_path: Path, store: ReputationStore) -> None:
    guard = _guard(tmp_path, store, Clock())
    assert guard.round(lambda after: iter(_events("acme/few", 0, 199)), _never) == []
    assert store.paused() == {}


def test_exactly_at_the_threshold_stays_and_one_more_bounce_pauses(
        tmp_path: Path, store: ReputationStore) -> None:
    clock = Clock()
    guard = _guard(tmp_path, store, clock)
    first = _events("acme/news", 190, 10)
    assert guard.round(lambda after: iter(first[after:]), _never) == []
    more = first + _events("acme/news", 0, 1, start=201)
    paused = guard.round(lambda after: iter(more[after:]), _never)
    assert [(p.principal, p.delivered, p.bounced, p.monitor) for p in paused] == [
        ("acme/news", 190, 11, False)]
    assert log_line(paused[0]) == (
        "reputation: paused acme/news: bounce rate 5.5 % (11 of 201) over 24h is above 5 %; "
        "resume with keyrelay subuser resume acme/news")
    assert set(store.paused()) == {"acme/news"}
    # already paused: not paused (nor announced) again
    again = more + _events("acme/news", 0, 5, start=202)
    assert guard.round(lambda after: iter(again[after:]), _never) == []
    ended = store.resume("acme/news")
    assert ended is not None and ended.bounced == 11
    assert store.paused() == {}
    # the counts start afresh: below min_volume again
    assert store.counts(["acme/news"], 0) == {"acme/news": (0, 0)}


def test_counting_a_round_twice_adds_nothing(tmp_path: Path, store: ReputationStore) -> None:
    guard = _guard(tmp_path, store, Clock())
    events = _events("acme/news", 100, 3)
    assert guard.count(events) == {"acme/news"}
    assert store.mark("node-a") == 103
    guard.count(events)  # the same round after a crash: the mark is there already
    assert store.counts(["acme/news"], 0) == {"acme/news": (100, 3)}
    # another node's events are its own
    Guard(guard.settings, store, "node-b", guard.clock).count(events)
    assert store.counts(["acme/news"], 0) == {"acme/news": (200, 6)}


def test_events_leave_the_window(tmp_path: Path, store: ReputationStore) -> None:
    clock = Clock()
    guard = _guard(tmp_path, store, clock)
    old = _events("acme/news", 100, 100, at=T0)
    assert len(guard.round(lambda after: iter(old[after:]), _never)) == 1
    store.resume("acme/news")  # the counts start afresh
    guard.count(_events("acme/news", 100, 100, at=T0, start=1000))
    clock.at = T0 + DAY + 600  # a day and a bucket later: all of it outside the window
    # 6.25 % of 160 recent ones: below min_volume without the old 200, paused with them
    recent = _events("acme/news", 150, 10, at=clock.at, start=2000)
    assert guard.round(lambda after: iter(recent), _never) == []
    assert store.paused() == {}


def test_monitor_mode_records_what_would_be_paused(tmp_path: Path,
                                                   store: ReputationStore) -> None:
    guard = _guard(tmp_path, store, Clock(), monitor=True)
    paused = guard.round(lambda after: iter(_events("acme", 100, 100)), _never)
    assert [(p.principal, p.monitor) for p in paused] == [("acme", True)]
    assert log_line(paused[0]).startswith("reputation: would pause acme: bounce rate 50 % "
                                          "(100 of 200) over 24h is above 5 %")
    # monitor switched off: the next check makes it a real pause
    real = _guard(tmp_path, store, guard.clock)
    more = _events("acme", 0, 1, start=500)
    assert [p.monitor for p in real.round(lambda after: iter(more), _never)] == [False]


# -- keyrelay-events' outbox round -----------------------------------------------------------
def test_the_outbox_round_pauses_and_puts_a_paused_event_in_the_state_file(
        tmp_path: Path) -> None:
    config = _config(tmp_path, min_volume=50)
    with YamlDirectory(config.directory.path).transaction() as data:
        admin.add_account(data, "acme", now())
    store = EventStore(config.events.state)
    try:
        events = ([e for _, e in _events("acme/news", 60, 40, at=T0)]
                  + [e for _, e in _events("acme/small", 5, 20, at=T0)])
        store.commit(events, None, [], {}, T0)
        sender = Sender(config, store, clock=Clock(T0 + 60))
        sender.reputation()
        written = [e for _, e in store.events() if e["event"] == "paused"]
        assert [(e["account"], e["subuser"], e["delivered"], e["bounced"], e["bounce_rate"])
                for e in written] == [("acme", "news", 60, 40, 0.4)]
        assert written[0]["reason"] == "bounce rate 40 % (40 of 100) over 24h is above 5 %"
        assert store.counters().get("reputation_paused") == 1
        sender.reputation()  # nothing new: nothing more
        assert len([e for _, e in store.events() if e["event"] == "paused"]) == 1
        assert set(open_reputation(config).paused()) == {"acme/news"}
    finally:
        store.close()


def test_policyds_copy_is_read_every_refresh_and_used_a_while_when_unreadable(
        tmp_path: Path) -> None:
    path = tmp_path / "rep.db"
    writer = SqliteReputation(str(path))
    writer.pause(Pause("acme/news", T0, 0.5, 100, 100, DAY, 0.05))
    clock = Clock(100.0)
    cache = PauseCache(SqliteReputation(str(path), create=False), 5.0, clock)
    assert not cache.fresh() and not cache.usable()  # never read: nothing to go on
    cache.read()
    assert cache.get("acme/news") is not None and cache.get("acme/billing") is None
    clock.at += 5.0
    assert not cache.fresh() and cache.usable()  # to be read again; usable meanwhile
    writer.close()
    for name in ("rep.db", "rep.db-wal", "rep.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    path.mkdir()  # something that is no database in its place
    with pytest.raises(ReputationUnavailable):
        cache.read()
    assert cache.get("acme/news") is not None  # the last copy is kept
    clock.at += 45.0  # 10 refresh periods after the last good read
    assert not cache.usable()


# -- through keyrelay-policyd ----------------------------------------------------------------
def _populate(daemon: Policyd) -> dict[str, str]:
    return populate_acme(daemon, ("news", "billing"))


def _send(daemon: Policyd, identity: str, sender: str) -> list[str | None]:
    common = {"sasl_method": "PLAIN", "sasl_username": identity, "sender": sender,
              "instance": new_instance()}
    with PolicyClient(connect(daemon.endpoint("policy"))) as policy:
        return [policy.ask(**common, protocol_state="MAIL"),
                policy.ask(**common, protocol_state="RCPT", recipient="x@example.net")]


class Node(Policyd):
    redis: RedisServer | None = None
    config: Config


@pytest.fixture(params=["sqlite", "redis"])
def daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Node]:
    overrides: dict[str, Any] = {"reputation": {"path": str(tmp_path / "rep.db"),
                                                "refresh": 0.1},
                                 "suppressions": {"path": str(tmp_path / "supp.db")}}
    with policyd_on(request.param, tmp_path / "p", overrides, Node) as (found, server):
        found.redis = server
        found.config = parse_config(found.settings, str(found.config_path))
        yield found


def _pause(config: Config, principal: str) -> None:
    store = open_reputation(config)
    try:
        assert store.pause(Pause(principal, T0, 0.125, 1750, 250, DAY, 0.05))
    finally:
        store.close()


PAUSED = ("451 4.7.1 sending paused for acme/news since 2026-11-30 00:53 UTC: bounce rate "
          "12.5 % over 24h is above 5 %; the account's admin resumes it with keyrelay "
          "subuser resume acme/news")


def _until(daemon: Policyd, identity: str, sender: str, wanted: list[str | None]) -> None:
    """Ask until the answers are ``wanted``: the pauses are read again every 0.1 s
    (reputation.refresh); 30 s is generous."""
    import time
    deadline = time.monotonic() + 30
    while (got := _send(daemon, identity, sender)) != wanted:
        assert time.monotonic() < deadline, got
        time.sleep(0.05)


def test_a_paused_subuser_gets_451_4_7_1_its_siblings_do_not_and_resume_ends_it(
        daemon: Node) -> None:
    ids = _populate(daemon)
    daemon.start()
    assert _send(daemon, ids["news"], "news@acme.example") == ["DUNNO", "DUNNO"]
    _pause(daemon.config, "acme/news")
    _until(daemon, ids["news"], "news@acme.example", [PAUSED, PAUSED])
    assert text_matches("paused", PAUSED.removeprefix("451 4.7.1 "))
    assert _send(daemon, ids["billing"], "billing@acme.example") == ["DUNNO", "DUNNO"]
    assert _send(daemon, ids["acme"], "news@acme.example") == ["DUNNO", "DUNNO"]
    assert "reason=paused" in daemon.wait_for_log(r"reason=paused\b")
    out = daemon.keyrelay("subuser", "show", "acme/news")
    assert "paused:    paused since 2026-11-30 00:53 UTC: bounce rate 12.5 %" in out
    out = daemon.keyrelay("subuser", "resume", "acme/news")
    assert "Ended the reputation pause of acme/news" in out
    assert "reputation.resume" in (daemon.root / "audit.log").read_text()
    _until(daemon, ids["news"], "news@acme.example", ["DUNNO", "DUNNO"])


UNAVAILABLE = "451 4.3.0 sending pauses temporarily unavailable; try again later"


def test_the_pauses_unreadable_are_451_4_3_0(daemon: Node, tmp_path: Path) -> None:
    ids = _populate(daemon)
    _pause(daemon.config, "acme/news")
    daemon.start()
    _until(daemon, ids["news"], "news@acme.example", [PAUSED, PAUSED])
    if daemon.redis is not None:
        daemon.redis.kill()
        _until(daemon, ids["billing"], "billing@acme.example", [UNAVAILABLE, UNAVAILABLE])
        daemon.redis.start()  # empty: this test server persists nothing
        _until(daemon, ids["news"], "news@acme.example", ["DUNNO", "DUNNO"])
    else:
        path = tmp_path / "rep.db"
        kept = tmp_path / "kept.db"
        shutil.copy(path, kept)
        broken = tmp_path / "broken.db"
        broken.write_bytes(b"not a database " * 1000)
        broken.replace(path)
        _until(daemon, ids["billing"], "billing@acme.example", [UNAVAILABLE, UNAVAILABLE])
        kept.replace(path)
        _until(daemon, ids["news"], "news@acme.example", [PAUSED, PAUSED])
    assert "reason=reputation_unavailable" in daemon.log()
