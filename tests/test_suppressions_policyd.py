"""A suppressed recipient at RCPT (docs/suppressions.md, "The refusal"): the engine's answer
in process, then through the real keyrelay-policyd's sockets with either store (the SQLite
file beside a one-node relay, Redis shared by nodes): the recipient refused with a text that
names the suppression, the message's other recipients accepted, a site's own login and port
25 not checked, the store away answered 451 4.3.0 and the answers back when it is."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from test_reasons import text_matches

from keyrelay.config import load_config
from keyrelay.decisions import (
    Action,
    EngineSettings,
    Reason,
    RecipientFacts,
    Verdict,
    decide_recipient,
    format_identity,
)
from keyrelay.events.outbox import Sender
from keyrelay.events.store import EventStore
from keyrelay.suppressions import Suppression, make
from testkit.factories import World
from testkit.policyd import Policyd, now, policyd_on, populate_acme
from testkit.protocols import PolicyClient, connect, new_instance
from testkit.redis import REDIS_SERVER, RedisServer

CREATED = int(datetime(2026, 12, 5, 0, 10, tzinfo=UTC).timestamp())


# -- the engine, in process ------------------------------------------------------------------
@pytest.fixture
def world() -> World:
    w = World()
    w.account("acme")
    w.subuser("acme/news")
    return w


def _ask(world: World, principal: str, found: Suppression | None) -> Verdict:
    return decide_recipient(world.snapshot(), EngineSettings(), RecipientFacts(
        _identity(world, principal), "gone@example.net", found))


def _identity(world: World, principal: str) -> str:
    key_id = next(kid for kid, key in world.data.keys.items() if key.principal == principal)
    return format_identity(principal, key_id)


BOUNCED = make("gone@example.net", "550 5.1.1 <gone@example.net>: user unknown", "5.1.1",
               CREATED, "bounce")


def test_a_subusers_suppressed_recipient_is_550_naming_the_account_date_and_reason(
        world: World) -> None:
    world.key("acme/news")
    verdict = _ask(world, "acme/news", BOUNCED)
    assert (verdict.action, verdict.code, verdict.status, verdict.reason) == (
        Action.REFUSE, 550, "5.7.1", Reason.SUPPRESSED)
    assert verdict.text == (
        "recipient suppressed for account acme since 2026-12-05 (hard bounce: 550 5.1.1 "
        "<gone@example.net>: user unknown); remove it with keyrelay suppression remove acme "
        "gone@example.net")
    assert text_matches("suppressed", verdict.text)
    assert verdict.principal == "acme/news"


def test_not_suppressed_is_allowed(world: World) -> None:
    world.key("acme")
    verdict = _ask(world, "acme", None)
    assert (verdict.action, verdict.reason) == (Action.ALLOW, Reason.OK)


def test_monitor_mode_lets_it_pass_with_the_refusal_it_would_be(world: World) -> None:
    world.key("acme/news")
    world.monitor("acme")
    verdict = _ask(world, "acme/news", BOUNCED)
    assert verdict.allowed and verdict.reason is Reason.MONITOR
    assert verdict.monitored is not None and verdict.monitored.reason is Reason.SUPPRESSED
    assert verdict.log_fields()["would_be"].startswith("550 5.7.1 recipient suppressed")


def test_a_site_login_is_not_asked_about(world: World) -> None:
    verdict = decide_recipient(world.snapshot(), EngineSettings(site_logins=True),
                               RecipientFacts("alice", "gone@example.net", BOUNCED))
    assert (verdict.action, verdict.reason) == (Action.ALLOW, Reason.SITE_LOGIN)


def test_a_hostile_reason_and_a_long_address_stay_one_short_ascii_line(world: World) -> None:
    world.key("acme")
    long_address = ("x" * 64) + "@" + ".".join(["d" * 60] * 4) + ".example"
    hostile = make(long_address, "550 \r\n5.1.1 \x1b]0;pwned\x07 ünïcode " + "A" * 9000,
                   "5.1.1", CREATED, "bounce")
    verdict = decide_recipient(world.snapshot(), EngineSettings(), RecipientFacts(
        _identity(world, "acme"), hostile.address, hostile))
    assert verdict.reason is Reason.SUPPRESSED
    assert len(verdict.smtp_reply) <= 420
    assert all(" " <= c <= "~" for c in verdict.text), verdict.text
    assert verdict.text.endswith("remove it with keyrelay suppression remove acme ADDRESS")
    assert text_matches("suppressed", verdict.text)


# -- through keyrelay-policyd ----------------------------------------------------------------
def _populate(daemon: Policyd) -> dict[str, str]:
    """Account acme (domain acme.example) with subuser news; their logins."""
    return populate_acme(daemon, ("news",))


def _rcpts(daemon: Policyd, identity: str, *recipients: str,
           **extra: str) -> list[str | None]:
    """One message's RCPT requests (and DATA), as Postfix sends them; the answers."""
    common = {"sasl_method": "PLAIN" if identity else "", "sasl_username": identity,
              "sender": "news@acme.example", "instance": new_instance(), **extra}
    with PolicyClient(connect(daemon.endpoint("policy"))) as policy:
        answers = [policy.ask(**common, protocol_state="RCPT", recipient=rcpt)
                   for rcpt in recipients]
        answers.append(policy.ask(**common, protocol_state="DATA",
                                  recipient_count=str(len(recipients))))
    return answers


def _refusal(reason: str) -> str:
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    return (f"550 5.7.1 recipient suppressed for account acme since {today} ({reason}); "
            "remove it with keyrelay suppression remove acme gone@example.net")


PAUSES_UNAVAILABLE = "451 4.3.0 sending pauses temporarily unavailable; try again later"
UNAVAILABLE = "451 4.3.0 recipient suppression list temporarily unavailable; try again later"


class Node(Policyd):
    """keyrelay-policyd with its suppression store: the SQLite file, or ``redis``."""

    redis: RedisServer | None = None


@pytest.fixture(params=["sqlite", "redis"])
def daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Node]:
    with policyd_on(request.param, tmp_path / "p",
                    {"suppressions": {"path": str(tmp_path / "supp.db")}}, Node) as (
                        found, server):
        found.redis = server
        yield found


def test_a_suppressed_recipient_is_refused_and_the_others_of_the_message_accepted(
        daemon: Node) -> None:
    ids = _populate(daemon)
    daemon.keyrelay("suppression", "add", "acme", "Gone@Example.NET", "--reason",
                    "asked us to stop")
    daemon.start()
    refusal = _refusal("added by an administrator: asked us to stop")
    # a subuser's message: the account's list applies
    assert _rcpts(daemon, ids["news"], "ok@example.net", "gone@example.net",
                  "other@example.net") == ["DUNNO", refusal, "DUNNO", "DUNNO"]
    assert _rcpts(daemon, ids["acme"], "GONE@example.net") == [refusal, "DUNNO"]
    line = daemon.wait_for_log(r"reason=suppressed\b")
    assert "recipient=GONE@example.net" in line or "recipient=gone@example.net" in line
    # port 25 without a login: Postfix's own rules, keyrelay checks no list
    assert _rcpts(daemon, "", "gone@example.net", server_port="25") == ["DUNNO", "DUNNO"]
    daemon.keyrelay("suppression", "remove", "acme", "gone@example.net")
    assert _rcpts(daemon, ids["news"], "gone@example.net") == ["DUNNO", "DUNNO"]


def test_the_store_away_is_451_4_3_0_and_answers_come_back(daemon: Node,
                                                           tmp_path: Path) -> None:
    ids = _populate(daemon)
    daemon.keyrelay("suppression", "add", "acme", "gone@example.net")
    daemon.start()
    refusal = _refusal("added by an administrator: added by an administrator")
    assert _rcpts(daemon, ids["news"], "gone@example.net")[0] == refusal
    if daemon.redis is not None:
        daemon.redis.kill()
        # never an unchecked accept: every recipient of a keyrelay login waits. The
        # reputation pauses live in Redis too and are checked first: their copy in policyd
        # may have aged past its use by then (a slow machine), giving their own 451 4.3.0
        answers = _rcpts(daemon, ids["news"], "gone@example.net", "ok@example.net")[:2]
        assert all(a in (UNAVAILABLE, PAUSES_UNAVAILABLE) for a in answers), answers
        daemon.redis.start()  # empty: this test server persists nothing
        assert _rcpts(daemon, ids["news"], "gone@example.net", "ok@example.net")[:2] == [
            "DUNNO", "DUNNO"]
        daemon.keyrelay("suppression", "add", "acme", "gone@example.net")
    else:
        path = tmp_path / "supp.db"
        kept = tmp_path / "kept.db"
        shutil.copy(path, kept)
        broken = tmp_path / "broken.db"
        broken.write_bytes(b"not a database " * 1000)
        broken.replace(path)
        assert _rcpts(daemon, ids["news"], "gone@example.net", "ok@example.net")[:2] == [
            UNAVAILABLE, UNAVAILABLE]
        kept.replace(path)
    assert _rcpts(daemon, ids["news"], "gone@example.net")[0] == refusal
    assert "reason=suppressions_unavailable" in daemon.log()


def test_a_site_login_is_not_checked(tmp_path: Path) -> None:
    daemon = Policyd(tmp_path / "p", {"suppressions": {"path": str(tmp_path / "supp.db")},
                                      "auth": {"site_auth_socket": str(tmp_path / "none")}})
    _populate(daemon)
    daemon.keyrelay("suppression", "add", "acme", "gone@example.net")
    daemon.start()
    try:
        assert _rcpts(daemon, "alice", "gone@example.net") == ["DUNNO", "DUNNO"]
        assert "reason=site_login" in daemon.wait_for_log(r"reason=site_login\b")
    finally:
        assert daemon.stop() == 0


def test_even_with_on_unavailable_local_a_recipient_is_never_passed_unchecked(
        tmp_path: Path) -> None:
    if not REDIS_SERVER.exists():
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with RedisServer() as server:
        daemon = Policyd(tmp_path / "p", {
            "counters": server.counters_settings(on_unavailable="local")})
        ids = _populate(daemon)
        daemon.keyrelay("suppression", "add", "acme", "gone@example.net")
        daemon.start()
        try:
            assert _rcpts(daemon, ids["news"], "gone@example.net")[0].startswith(  # type: ignore[union-attr]
                "550 5.7.1 recipient suppressed")
            server.kill()
            # the counts have a local stand-in, the list has none: 451 for every recipient of
            # a keyrelay login, the outage logged once
            answers = _rcpts(daemon, ids["news"], "gone@example.net", "ok@example.net")
            assert all(a is not None and a.startswith("451 4.3.0 recipient suppression list "
                                                      "temporarily unavailable")
                       for a in answers[:2]), answers
            assert daemon.log().count("suppression list unavailable") == 1
            server.start()
            daemon.keyrelay("suppression", "add", "acme", "gone@example.net")
            assert _rcpts(daemon, ids["news"], "gone@example.net")[0].startswith(  # type: ignore[union-attr]
                "550 5.7.1 recipient suppressed")
            assert "suppression list answers again" in daemon.log()
        finally:
            assert daemon.stop() == 0


def test_with_on_unavailable_local_the_nodes_replica_answers_while_redis_is_away(
        tmp_path: Path) -> None:
    """keyrelay-events' copy of the lists (its Sender's ``replicate``, keyrelay/suppressions/
    replica.py) answers for Redis while it is away: the others accepted, the suppressed
    recipient held back (451 4.3.0, never a 550 of our outage); a copy older than
    suppressions.replica_max_age is not used (451 for all)."""
    if not REDIS_SERVER.exists():
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    replica = tmp_path / "replica.db"
    with RedisServer() as server:
        daemon = Policyd(tmp_path / "p", {
            "counters": server.counters_settings(on_unavailable="local"),
            "suppressions": {"replica": str(replica), "replica_interval": "5s",
                             "replica_max_age": "10m"},
            "events": {"state": str(tmp_path / "events.db")},
            # the pauses live in Redis too and are checked first; off, so that every answer
            # below is the suppression list's
            "reputation": {"enabled": False}})
        ids = _populate(daemon)
        daemon.keyrelay("suppression", "add", "acme", "gone@example.net", "--reason", "asked")
        # what keyrelay-events does every replica_interval, with the daemons' configuration
        config = load_config(str(daemon.config_path))
        store = EventStore(tmp_path / "events.db")
        try:
            Sender(config, store).replicate()
        finally:
            store.close()
        assert replica.exists()
        daemon.start()
        refusal = _refusal("added by an administrator: asked")
        try:
            assert _rcpts(daemon, ids["news"], "gone@example.net")[0] == refusal
            server.kill()
            # the others are accepted; the suppressed one waits (451), never a 550 of our
            # outage: the copy may be older than a removal only Redis knows of
            answers = _rcpts(daemon, ids["news"], "gone@example.net", "ok@example.net")
            assert answers == [UNAVAILABLE, "DUNNO", "DUNNO"], answers
            assert _rcpts(daemon, ids["news"], "other@example.net")[0] == "DUNNO"
            assert daemon.log().count("checked against this node's replica") == 1
            # a hard bounce keyrelay-events reads while Redis is away: queued for Redis, and
            # added to the replica meanwhile, so that its recipient is held back too
            store = EventStore(tmp_path / "events.db")
            try:
                store.commit([{"event": "bounce", "type": "hard", "account": "acme",
                               "email": "bounced@example.net", "event_id": "e2e-bounce",
                               "status": "5.1.1", "reason": "550 5.1.1 user unknown",
                               "timestamp": int(now().timestamp())}], None, [], {}, 0.0)
                Sender(config, store).suppress()
                assert store.suppress_due(10), "the bounce stays queued for Redis"
            finally:
                store.close()
            assert _rcpts(daemon, ids["news"], "bounced@example.net")[0] == UNAVAILABLE
            # a copy older than replica_max_age: not used, 451 as without one
            db = sqlite3.connect(replica)
            db.execute("UPDATE replica_meta SET value = value - 3600")
            db.commit()
            db.close()
            answers = _rcpts(daemon, ids["news"], "gone@example.net", "ok@example.net")
            assert answers[:2] == [UNAVAILABLE, UNAVAILABLE], answers
            assert "is older than suppressions.replica_max_age" in daemon.log()
            server.start()
            daemon.keyrelay("suppression", "add", "acme", "gone@example.net", "--reason",
                            "asked")
            assert _rcpts(daemon, ids["news"], "gone@example.net")[0] == refusal
            assert "suppression list answers again" in daemon.log()
        finally:
            assert daemon.stop() == 0
