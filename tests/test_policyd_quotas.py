"""Rates and quotas through the real keyrelay-policyd: what ``keyrelay limits`` sets is what
the daemon charges (issue 21). Account-wide windows shared by the subusers, a message counted
by its recipients, a daily quota's answer; with ``counters.backend: redis``, two daemons
sharing one limit (N relay nodes, one limit) and Redis away answered 451 4.3.0, never 5xx.

The counting itself, on a clock the test moves, is tests/test_policyd_services.py's; here the
answers on the wire. Limits of 1 per minute refuse a second message whenever it comes within
the minute, wherever the window's boundary falls; the daily quota's day ends at midnight in
``counters.time_zone`` (UTC here): a run across midnight would see a fresh day.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from keyrelay import admin
from keyrelay.decisions import format_identity
from testkit.policyd import Policyd, add_key, add_verified_domain, now
from testkit.protocols import PolicyClient, connect, new_instance, policy_request
from testkit.redis import REDIS_SERVER, RedisServer

# Redis away: the RCPT of a keyrelay login waits, for its suppression list or its pauses
SUPPRESSIONS_AWAY = ("451 4.3.0 recipient suppression list temporarily unavailable; try again "
                     "later")
PAUSES_AWAY = "451 4.3.0 sending pauses temporarily unavailable; try again later"


def _populate(daemon: Policyd, account: str) -> dict[str, str]:
    """``account`` (domain ACCOUNT.example) with subusers app and billing, each with a key
    and a sender address; their SASL user names, as the auth service hands them to Postfix."""
    identities: dict[str, str] = {}
    with daemon.directory().transaction() as data:
        admin.add_account(data, account, now())
        add_verified_domain(data, account, f"{account}.example")
        for name in ("app", "billing"):
            principal = f"{account}/{name}"
            admin.add_subuser(data, principal, now())
            admin.add_sender(data, principal, f"{name}@{account}.example", now())
            identities[name] = format_identity(principal, add_key(data, principal, name).key_id)
    return identities


def _message(daemon: Policyd, identity: str, recipients: int = 1) -> list[str | None]:
    """One message's RCPT (per recipient) and DATA requests, as Postfix sends them; the
    answers."""
    account, _, name = identity.rpartition(":")[0].partition("/")
    instance = new_instance()
    sender = f"{name}@{account}.example"
    common = {"sasl_method": "PLAIN", "sasl_username": identity, "sender": sender,
              "instance": instance, "queue_id": "4XyZ1"}
    with PolicyClient(connect(daemon.endpoint("policy"))) as policy:
        answers = [policy.ask(**common, protocol_state="RCPT", recipient=f"r{n}@example.net")
                   for n in range(recipients)]
        answers.append(policy.ask(**common, protocol_state="DATA",
                                  recipient_count=str(recipients),
                                  recipient="r0@example.net" if recipients == 1 else ""))
    return answers


def _rate_limited(per_minute: int, account: str) -> str:
    return (f"451 4.7.1 limit of {per_minute} messages per minute reached for account "
            f"{account} (a message to N recipients counts N); try again in ")


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Policyd]]:
    daemons: list[Policyd] = []

    def make(overrides: dict[str, Any] | None = None, name: str = "") -> Policyd:
        daemon = Policyd(tmp_path / (name or f"p{len(daemons)}"), overrides)
        daemons.append(daemon)
        return daemon

    yield make
    for daemon in daemons:
        if daemon.running():
            assert daemon.stop() == 0, daemon.log()[-3000:]
        assert not daemon.tracebacks(), daemon.tracebacks()


def test_two_subusers_of_an_account_at_1_per_minute_send_one_message_together(
        spawn: Callable[..., Policyd]) -> None:
    daemon = spawn()
    ids = _populate(daemon, "acme")
    daemon.keyrelay("limits", "set", "acme", "--per-minute", "1")
    daemon.start()
    assert _message(daemon, ids["app"]) == ["DUNNO", "DUNNO"]
    refused = _message(daemon, ids["billing"])
    assert refused[0] == "DUNNO"
    assert (refused[1] or "").startswith(_rate_limited(1, "acme")), refused


def test_a_message_to_3_recipients_counts_3_and_a_full_daily_quota_answers_451(
        spawn: Callable[..., Policyd]) -> None:
    daemon = spawn()
    ids = _populate(daemon, "acme")
    daemon.keyrelay("limits", "set", "acme", "--per-day", "5")
    daemon.start()
    assert _message(daemon, ids["app"], 3) == ["DUNNO"] * 4
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%d")
    # 3 + 3 > 5: refused at DATA, nothing charged
    assert _message(daemon, ids["billing"], 3) == ["DUNNO"] * 3 + [
        f"451 4.7.1 daily quota of 5 messages for account acme reached; it resets at "
        f"{tomorrow} 00:00 UTC (a message to N recipients counts N)"]
    assert _message(daemon, ids["billing"], 2) == ["DUNNO"] * 3  # 3 + 2 = 5
    assert (_message(daemon, ids["app"])[1] or "").startswith("451 4.7.1 daily quota of 5")


# -- counters.backend: redis ------------------------------------------------------------------
@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    if not REDIS_SERVER.exists():
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with RedisServer() as found:
        yield found


def test_two_daemons_on_one_redis_share_one_limit_and_redis_away_is_451_4_3_0(
        spawn: Callable[..., Policyd], redis_server: RedisServer) -> None:
    counters = {"counters": redis_server.counters_settings()}
    first = spawn(counters, "first")
    ids = _populate(first, "acme")
    first.keyrelay("limits", "set", "acme", "--per-minute", "1")
    # the second node: its own process and sockets, the same directory and Redis
    second = spawn({**counters, "directory": {"path": str(first.directory_path)}}, "second")
    first.start()
    second.start()
    assert "counts rates and quotas" in first.log()
    assert _message(first, ids["app"]) == ["DUNNO", "DUNNO"]
    refused = _message(second, ids["billing"])
    assert (refused[1] or "").startswith(_rate_limited(1, "acme")), refused
    assert (_message(first, ids["billing"])[1] or "").startswith(_rate_limited(1, "acme"))
    # requests that arrive while a message is being charged are answered after it, in order
    with PolicyClient(connect(second.endpoint("policy"))) as policy:
        for stage in ("DATA", "CONNECT", "DATA"):
            policy.send(policy_request(
                sasl_method="PLAIN", sasl_username=ids["app"], sender="app@acme.example",
                protocol_state=stage, instance=new_instance(), recipient_count="1"))
        answers = [policy.read_action() for _ in range(3)]
    assert [(answer or "")[:9] for answer in answers] == ["451 4.7.1", "DUNNO", "451 4.7.1"]

    redis_server.kill()  # an outage: on_unavailable tempfail, the default
    for daemon in (first, second):
        away = _message(daemon, ids["app"])
        # the recipient cannot be looked up in the suppression list (docs/suppressions.md),
        # nor the principal's pause once policyd's copy of the pauses aged (a slow machine),
        # the message cannot be counted
        assert away[0] in (SUPPRESSIONS_AWAY, PAUSES_AWAY), away
        assert away[1] == ("451 4.3.0 message rate limits temporarily unavailable; try "
                           "again later"), away
    assert "counters_unavailable" in first.log()


def test_with_on_unavailable_local_a_daemon_counts_in_memory_while_redis_is_away(
        spawn: Callable[..., Policyd], redis_server: RedisServer) -> None:
    daemon = spawn({"counters": redis_server.counters_settings(on_unavailable="local")})
    ids = _populate(daemon, "acme")
    daemon.keyrelay("limits", "set", "acme", "--per-minute", "1")
    daemon.start()
    redis_server.kill()
    # the counts have a stand-in in this process; the suppression list, in Redis too, has
    # none: its RCPT is answered 451 4.3.0 (never an unchecked accept, docs/suppressions.md)
    # while the message (DATA) is counted here
    away = _message(daemon, ids["app"])
    assert away[0] in (SUPPRESSIONS_AWAY, PAUSES_AWAY) and away[1] == "DUNNO", away
    refused = _message(daemon, ids["billing"])
    assert (refused[1] or "").startswith(_rate_limited(1, "acme")), refused


def test_a_sighup_keeps_the_counts_and_a_changed_counters_section_needs_a_restart(
        spawn: Callable[..., Policyd]) -> None:
    daemon = spawn()
    ids = _populate(daemon, "acme")
    daemon.keyrelay("limits", "set", "acme", "--per-minute", "1")
    daemon.start()
    assert _message(daemon, ids["app"]) == ["DUNNO", "DUNNO"]
    daemon.write_config({"counters": {"time_zone": "Europe/Paris"}})
    mark = daemon.mark()
    assert "configuration reloaded" in daemon.reload()
    assert "SIGHUP: counters changed; it takes effect after a restart" in daemon.log(mark)
    refused = _message(daemon, ids["billing"])
    assert (refused[1] or "").startswith(_rate_limited(1, "acme")), \
        "the count before the SIGHUP still holds"
