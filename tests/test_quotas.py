"""Rate limits and quotas in the engine (keyrelay/decisions/quotas.py): which windows a
message is charged against (the subuser's own, its account's as a whole) and the answer when
one of them is full, with the reset time of a quota in the counters' time zone; and the
counts read back through keyrelay-policyd's control socket (``PEEK``, keyrelay/control.py),
as ``keyrelay usage`` and ``keyrelay limits set`` read them with in-process counters."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from test_decisions import assert_refused, identity
from test_lockout import Daemon, _serve_and_ask

from keyrelay import admin, control
from keyrelay.control import BadRequest, Request, parse_request
from keyrelay.counters import Calendar, MemoryCounters, Sliding, Usage
from keyrelay.decisions import (
    Action,
    EngineSettings,
    QuotaFacts,
    RateWindow,
    Verdict,
    decide_quota,
    windows_for,
)
from keyrelay.directory.model import Limits
from keyrelay.limits import store_window
from policyd.control import listener, start
from policyd.policy import run_now
from testkit.factories import World

SETTINGS = EngineSettings(default_limits=Limits(60, 1000, 20))
QUOTA_SETTINGS = EngineSettings(default_limits=Limits(60, 1000, 20, 5000, 100_000))


def _world() -> World:
    w = World()
    w.account("acme", limits=Limits(messages_per_minute=1, messages_per_day=1000))
    w.subuser("acme/app", limits=Limits(messages_per_minute=1, messages_per_hour=50,
                                        messages_per_month=20_000))
    w.subuser("acme/billing")
    w.account("globex")
    return w


def _shape(windows: tuple[RateWindow, ...]) -> list[tuple[str, str, int, str]]:
    return [(w.subject, w.span, w.limit, w.source) for w in windows]


def test_an_account_is_charged_once_against_its_account_wide_windows() -> None:
    w = _world()
    assert _shape(windows_for(w.snapshot(), SETTINGS, "acme")) == [
        ("acme", "minute", 1, "account"),
        ("acme", "hour", 1000, "config"),
        ("acme", "day", 1000, "account"),
    ]


def test_a_subuser_without_limits_of_its_own_is_charged_only_to_its_account() -> None:
    # issue 21: the account's number is one window over the account and all its subusers,
    # no longer a default each subuser gets separately
    w = _world()
    windows = windows_for(w.snapshot(), SETTINGS, "acme/billing")
    assert _shape(windows) == [
        ("acme", "minute", 1, "account"),
        ("acme", "hour", 1000, "config"),
        ("acme", "day", 1000, "account"),
    ]
    assert {x.scope for x in windows} == {"account"}


def test_a_subuser_with_its_own_limits_is_charged_to_both() -> None:
    w = _world()
    windows = windows_for(w.snapshot(), SETTINGS, "acme/app")
    assert _shape(windows) == [
        ("acme/app", "minute", 1, "subuser"),
        ("acme/app", "hour", 50, "subuser"),
        ("acme/app", "month", 20_000, "subuser"),
        ("acme", "minute", 1, "account"),
        ("acme", "hour", 1000, "config"),
        ("acme", "day", 1000, "account"),
    ]
    assert [(x.seconds, x.calendar) for x in windows[:3]] == [
        (60, False), (3600, False), (None, True)]


def test_two_subusers_share_the_account_window_by_its_name() -> None:
    # the store counts by subject: both subusers' messages land in the same "acme" window
    w = _world()
    snap = w.snapshot()
    app = [x for x in windows_for(snap, SETTINGS, "acme/app") if x.scope == "account"]
    billing = list(windows_for(snap, SETTINGS, "acme/billing"))
    assert app == billing


def test_config_quota_defaults_stand_in_for_an_account_without_its_own() -> None:
    w = _world()
    assert _shape(windows_for(w.snapshot(), QUOTA_SETTINGS, "globex")) == [
        ("globex", "minute", 60, "config"),
        ("globex", "hour", 1000, "config"),
        ("globex", "day", 5000, "config"),
        ("globex", "month", 100_000, "config"),
    ]
    # no config quota, no account quota: no calendar window at all
    assert [x.span for x in windows_for(w.snapshot(), SETTINGS, "globex")] == [
        "minute", "hour"]


def test_a_changed_limit_is_a_new_snapshot_with_new_windows() -> None:
    w = _world()
    assert windows_for(w.snapshot(), SETTINGS, "globex")[0].limit == 60
    w.account("initech", limits=Limits(messages_per_minute=7))
    assert windows_for(w.snapshot(), SETTINGS, "initech")[0].limit == 7


def _refused_by(w: World, principal: str, span: str, scope: str) -> RateWindow:
    return next(x for x in windows_for(w.snapshot(), SETTINGS, principal)
                if x.span == span and x.scope == scope)


def test_a_full_daily_quota_is_temporary_and_names_quota_account_and_reset_time() -> None:
    w = _world()
    ident = identity(w, w.key("acme/app"))
    window = _refused_by(w, "acme/app", "day", "account")
    now = datetime(2026, 12, 4, 17, 30, tzinfo=UTC)
    verdict = decide_quota(w.snapshot(), SETTINGS, QuotaFacts(
        ident, 3, window, used=999.0, resets_in=6.5 * 3600, now=now))
    assert_refused(verdict, 451, "4.7.1", "quota_exceeded")
    assert verdict.text == (
        "daily quota of 1000 messages for account acme reached; it resets at 2026-12-05 "
        "00:00 UTC (a message to N recipients counts N)")
    assert verdict.principal == "acme/app"


def test_the_reset_time_is_shown_in_the_counters_time_zone() -> None:
    w = _world()
    ident = identity(w, w.key("acme/app"))
    window = _refused_by(w, "acme/app", "month", "subuser")
    # 2026-12-31 23:00 UTC is already January 1st, 00:00 in Paris (CET, UTC+1)
    now = datetime(2026, 12, 31, 12, 0, tzinfo=UTC)
    verdict = decide_quota(w.snapshot(), SETTINGS, QuotaFacts(
        ident, 1, window, used=20_000.0, resets_in=11 * 3600, now=now, zone="Europe/Paris"))
    assert_refused(verdict, 451, "4.7.1", "quota_exceeded")
    assert verdict.text.startswith(
        "monthly quota of 20000 messages for acme/app reached; it resets at 2027-01-01 00:00 "
        "CET"), verdict.text


def test_a_full_minute_window_of_the_account_is_rate_limited() -> None:
    w = _world()
    ident = identity(w, w.key("acme/billing"))
    window = _refused_by(w, "acme/billing", "minute", "account")
    verdict = decide_quota(w.snapshot(), SETTINGS, QuotaFacts(
        ident, 1, window, used=1.0, resets_in=42.2))
    assert_refused(verdict, 451, "4.7.1", "rate_limited")
    assert verdict.text == (
        "limit of 1 messages per minute reached for account acme (a message to N recipients "
        "counts N); try again in 43 seconds")


def test_a_message_with_more_recipients_than_a_window_holds_says_so() -> None:
    w = _world()
    ident = identity(w, w.key("acme/app"))
    window = _refused_by(w, "acme/app", "hour", "subuser")
    verdict = decide_quota(w.snapshot(), SETTINGS, QuotaFacts(
        ident, 80, window, used=0.0, resets_in=7200.0))
    assert_refused(verdict, 451, "4.7.1", "rate_limited")
    assert verdict.text == (
        "limit of 50 messages per hour reached for acme/app (this message has 80 recipients, "
        "more than the whole hour's limit: send fewer recipients per message); try again in "
        "120 minutes")


def test_nothing_refused_is_an_allow_for_the_principal() -> None:
    w = _world()
    ident = identity(w, w.key("acme/app"))
    verdict = decide_quota(w.snapshot(), SETTINGS, QuotaFacts(ident, 3, None))
    assert (verdict.action, verdict.principal) == (Action.ALLOW, "acme/app")
    assert decide_quota(w.snapshot(), SETTINGS, QuotaFacts("", 3, None)).allowed


@pytest.mark.parametrize("where", ["account", "directory", "config"])
def test_monitor_mode_lets_a_full_quota_pass_and_carries_the_refusal(where: str) -> None:
    w = World()
    w.account("acme", limits=Limits(messages_per_day=10))
    admin.set_monitor(w.data, "acme" if where == "account" else None,
                      where in ("account", "directory"))
    settings = EngineSettings(default_limits=Limits(60, 1000, 20), monitor_mode=where == "config")
    ident = identity(w, w.key("acme"))
    window = windows_for(w.snapshot(), settings, "acme")[-1]
    verdict = decide_quota(w.snapshot(), settings, QuotaFacts(
        ident, 1, window, used=10.0, resets_in=60.0, now=datetime(2026, 12, 4, tzinfo=UTC)))
    assert verdict.allowed and verdict.monitored is not None
    assert verdict.monitored.reason == "quota_exceeded"


# -- the engine's windows charged to the real counter store (keyrelay/counters, in memory) ----
def _charge(w: World, store: MemoryCounters, principal: str, recipients: int,
            now: datetime = datetime(2026, 12, 4, 17, 30, tzinfo=UTC),
            zone: str = "UTC") -> Verdict:
    """One message at DATA, as the policy service charges it: every window of ``windows_for``
    in one ``take`` of its recipients, then ``decide_quota`` on the store's answer."""
    snapshot = w.snapshot()
    windows = windows_for(snapshot, SETTINGS, principal)
    charged = tuple(store_window(x) for x in windows)
    refused = asyncio.run(store.take(charged, recipients))
    facts = QuotaFacts(identity(w, w.key(principal)), recipients, None, now=now, zone=zone)
    if refused is not None:
        facts = facts._replace(window=windows[charged.index(refused.window)],
                               used=refused.count, resets_in=refused.resets_in)
    return decide_quota(snapshot, SETTINGS, facts)


def test_two_subusers_of_an_account_limited_to_1_per_minute_send_one_message_together() -> None:
    # issue 21: with `acme --per-minute 1`, two subusers sent one message each
    w = World()
    w.account("acme", limits=Limits(messages_per_minute=1))
    w.subuser("acme/app")
    w.subuser("acme/billing")
    clock = [1_000_000.0]
    store = MemoryCounters(clock=lambda: clock[0])
    assert _charge(w, store, "acme/app", 1).allowed
    refused = _charge(w, store, "acme/billing", 1)
    assert_refused(refused, 451, "4.7.1", "rate_limited")
    assert refused.text.startswith("limit of 1 messages per minute reached for account acme")
    clock[0] += 120  # the minute has slid past
    assert _charge(w, store, "acme/billing", 1).allowed


def test_a_message_to_3_recipients_counts_3() -> None:
    w = World()
    w.account("acme", limits=Limits(messages_per_minute=5))
    clock = [1_000_000.0]
    store = MemoryCounters(clock=lambda: clock[0])
    assert _charge(w, store, "acme", 3).allowed
    assert not _charge(w, store, "acme", 3).allowed  # 3 + 3 > 5: refused, nothing counted
    assert _charge(w, store, "acme", 2).allowed  # 3 + 2 = 5
    assert not _charge(w, store, "acme", 1).allowed


def test_a_daily_quota_in_the_store_refuses_until_midnight_in_the_time_zone() -> None:
    w = World()
    w.account("acme", limits=Limits(messages_per_day=1000))
    w.subuser("acme/app", limits=Limits(messages_per_day=10))
    now = datetime(2026, 12, 4, 17, 30, tzinfo=UTC)
    clock = [now.timestamp()]
    store = MemoryCounters(clock=lambda: clock[0], zone=ZoneInfo("Europe/Paris"))
    assert _charge(w, store, "acme/app", 10).allowed
    refused = _charge(w, store, "acme/app", 1, now, "Europe/Paris")
    assert_refused(refused, 451, "4.7.1", "quota_exceeded")
    assert refused.text == (
        "daily quota of 10 messages for acme/app reached; it resets at 2026-12-05 00:00 CET "
        "(a message to N recipients counts N)")
    # the account itself still sends: 10 + 40 within its 60 a minute (the default) and 1000 a day
    assert _charge(w, store, "acme", 40, now).allowed
    clock[0] = datetime(2026, 12, 4, 23, 0, 1, tzinfo=UTC).timestamp()  # Paris: 00:00:01
    assert _charge(w, store, "acme/app", 10).allowed


# -- the counts read through keyrelay-policyd's control socket (PEEK) --------------------------
def test_a_peek_request_names_the_stores_windows_and_parses_back() -> None:
    windows = (Sliding("acme/app", 60, 100), Sliding("acme", 3600, 20000),
               Calendar("acme", "day", 50000), Calendar("acme", "month", 1_000_000))
    line = Request("PEEK", windows=windows).line()
    assert line == (b"PEEK acme/app:60s:100 acme:3600s:20000 acme:day:50000 "
                    b"acme:month:1000000\n")
    assert parse_request(line[:-1]) == Request("PEEK", windows=windows)


@pytest.mark.parametrize(("line", "error"), [
    (b"PEEK", "PEEK takes 1 to 8 windows, each <subject>:<60s|3600s|day|month>:<limit>"),
    (b"PEEK " + b" ".join([b"acme:day:1"] * 9), "PEEK takes 1 to 8 windows"),
    (b"PEEK acme:week:5", "PEEK: 'acme:week:5': the window is not 60s, 3600s, day or month"),
    (b"PEEK acme:61s:5", "the window is not 60s, 3600s, day or month"),
    (b"PEEK acme:day:-5", "PEEK: 'acme:day:-5': the limit is not a whole number"),
    (b"PEEK acme:day", "the limit is not a whole number"),
    (b"PEEK Acme:day:5", "PEEK: 'Acme' is not an account or a subuser name"),
    (b"PEEK acme/app/x:day:5", "is not an account or a subuser name"),
    (b"PEEK :day:5", "'' is not an account or a subuser name"),
])
def test_a_bad_peek_is_one_precise_error(line: bytes, error: str) -> None:
    with pytest.raises(BadRequest) as raised:
        parse_request(line)
    assert error in str(raised.value)


def test_the_daemon_answers_a_peek_with_its_stores_counts_nothing_added(tmp_path: Path) -> None:
    """The control service over the daemon's memory store, on a real unix socket: the counts
    of the windows asked (the CLI's, whatever the daemon's directory says), read twice to
    show that reading adds nothing; and the client's side (``control.peek``)."""
    site = Daemon(tmp_path)  # tests/test_lockout.py: an AuthService and its control service
    hour, day = Sliding("acme", 3600, 20000), Calendar("acme", "day", 50)
    assert run_now(site.store.take((hour, day), 7)) is None
    path = tmp_path / "run" / "control.sock"
    asked = b"PEEK acme:3600s:20000 acme:day:50 globex:day:10\n"
    first, second = asyncio.run(_serve_and_ask(site, path, [asked, asked]))
    assert first == second
    *counts, status = first.decode().splitlines()
    assert status == "OK 3"
    found = [json.loads(line) for line in counts]
    assert [(f["window"], f["count"], f["limit"]) for f in found] == [
        ("acme:3600s", 7.0, 20000), ("acme:day", 7.0, 50), ("globex:day", 0.0, 10)]
    # the day's window resets at midnight (UTC), on the store's clock
    assert found[1]["resets_in"] == Calendar("acme", "day", 50).period(
        site.tick, ZoneInfo("UTC"))[1]

    async def client() -> list[Usage]:
        lst = listener(site.config.policyd, site.control)
        assert lst is not None
        await start(lst, site.config.policyd)
        try:
            return await asyncio.to_thread(control.peek, str(path), (hour, day))
        finally:
            lst.stop_accepting()
            for conn in list(lst.connections):
                conn.close_quietly()

    usage = asyncio.run(client())
    assert [(u.window, u.count, u.limit) for u in usage] == [(hour, 7.0, 20000), (day, 7.0, 50)]
