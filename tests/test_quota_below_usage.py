"""`keyrelay limits set` refuses a limit lowered below what is already counted in its window
(issue 21, "Tests: bad input"), through the real CLI: with in-process counters read from the
real keyrelay-policyd that counted real policy requests (testkit/policyd.py), and with Redis
counters in a real redis-server (testkit/redis.py). The refusal names the count, the window
and when it resets, and changes nothing: the directory file and the audit log stay as they
were. A limit equal to the count is accepted (the next message waits). Counts that cannot be
read (the daemon stopped, Redis away) do not stop an admin: the limit is set, with a warning.

Sliding windows are tested on the hour, whose estimate stays at the full count for the few
seconds a test takes; the refusal's "room for one more" time is not asserted (it slides).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from test_policyd_quotas import _message, _populate
from test_usage_cli import _config, _ok, _send
from test_yaml_directory import run_cli

from testkit.policyd import Policyd
from testkit.redis import REDIS_SERVER, RedisServer


def _tomorrow() -> str:
    return (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%d")


def _unchanged(directory: Path, audit_log: Path) -> tuple[bytes, bytes]:
    return directory.read_bytes(), audit_log.read_bytes() if audit_log.exists() else b""


def _refused(config: Path, *args: str) -> str:
    """A refusal: exit 1, nothing on stdout, one error line; that line."""
    result = run_cli(config, *args)
    assert (result.returncode, result.stdout) == (1, ""), result
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result
    return result.stderr.removeprefix("keyrelay: error: ").rstrip("\n")


def _warned(config: Path, *args: str) -> tuple[str, str]:
    """Done with a warning: exit 0; stdout and the one warning line."""
    result = run_cli(config, *args)
    assert result.returncode == 0 and result.stderr.count("\n") == 1, result
    assert result.stderr.startswith("keyrelay: warning: "), result
    return result.stdout, result.stderr.removeprefix("keyrelay: warning: ").rstrip("\n")


POLICYD = "keyrelay-policyd's memory, this node's mail only"


def test_in_process_counts_refuse_a_limit_below_them_and_accept_one_equal(
        tmp_path: Path) -> None:
    daemon = Policyd(tmp_path / "pd")
    ids = _populate(daemon, "acme")  # acme/app and acme/billing
    daemon.keyrelay("limits", "set", "acme", "--per-day", "100", "--per-month", "1000")
    daemon.keyrelay("limits", "set", "acme/app", "--per-hour", "3")
    config, directory = daemon.config_path, daemon.directory_path
    audit_log = Path(daemon.settings["logging"]["audit_log"])
    daemon.start()
    try:
        assert _message(daemon, ids["app"], 3) == ["DUNNO"] * 4
        assert _message(daemon, ids["billing"], 2) == ["DUNNO"] * 3
        before = _unchanged(directory, audit_log)

        # the account as a whole: both subusers' 5 recipients
        assert _refused(config, "limits", "set", "acme", "--per-day", "4") == (
            "account acme has already sent 5 recipients today, more than the 4 per day asked "
            f"(counts from {POLICYD}); the day resets at {_tomorrow()} 00:00 UTC. Nothing "
            "changed: give at least 5 (the next message then waits until the reset), or wait")
        # a subuser's own sliding window: its own 3
        said = _refused(config, "limits", "set", "acme/app", "--per-hour", "2")
        assert re.fullmatch(
            r"acme/app has already sent 3 recipients in the last hour, more than the 2 per "
            rf"hour asked \(counts from {re.escape(POLICYD)}\); the hour slides: room for one "
            r"more under 2 in [0-9hms]+\. Nothing changed: give at least 3 \(the next message "
            r"then waits until the hour slides\), or wait", said), said
        # several limits at once: the one below its count refuses them all
        assert _refused(config, "limits", "set", "acme", "--per-month", "500", "--per-day",
                        "4").startswith("account acme has already sent 5 recipients today")
        assert _unchanged(directory, audit_log) == before

        # equal to the count: accepted, and the next message waits for the reset
        assert _ok(config, "limits", "set", "acme", "--per-day", "5") == (
            "Limits of acme: 600/min (config default), 20000/hour (config default), 100 "
            "rcpt/msg (config default), 5/day (own), 1000/month (own).\n")
        assert (_message(daemon, ids["billing"])[1] or "").startswith(
            f"451 4.7.1 daily quota of 5 messages for account acme reached; it resets at "
            f"{_tomorrow()} 00:00 UTC")
        # raised again: nothing to compare (the count is under the old limit), no warning
        _ok(config, "limits", "set", "acme", "--per-day", "6")
        entries = [json.loads(line) for line in audit_log.read_text().splitlines()]
        assert [e["limits"] for e in entries[-2:]] == ["messages_per_day=5",
                                                       "messages_per_day=6"]
    finally:
        assert daemon.stop() == 0
    assert daemon.tracebacks() == []

    # the daemon stopped: its counts cannot be read; the limit is set anyway, with a warning
    out, warning = _warned(config, "limits", "set", "acme", "--per-day", "3")
    assert out.endswith(", 3/day (own), 1000/month (own).\n")
    assert warning == (
        "the new limits of acme were not compared with its current usage, which cannot be "
        "read (counters.backend is memory, so the counts live in keyrelay-policyd: "
        f"keyrelay-policyd's control socket {daemon.control_socket} (policyd.control_listen) "
        "does not exist: is keyrelay-policyd running? (systemctl status keyrelay-policyd)); "
        "they are set anyway")
    assert json.loads(audit_log.read_text().splitlines()[-1])["limits"] == "messages_per_day=3"


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    if not REDIS_SERVER.exists():
        pytest.skip("redis-server is not installed (make test installs it)")
    with RedisServer() as found:
        yield found


def test_redis_counts_refuse_a_limit_below_them_and_redis_away_only_warns(
        tmp_path: Path, server: RedisServer) -> None:
    server.flush()
    settings = server.counters_settings()
    config = _config(tmp_path, settings)
    _ok(config, "account", "add", "acme")
    _ok(config, "subuser", "add", "acme/app")
    _ok(config, "subuser", "add", "acme/news")
    _ok(config, "limits", "set", "acme", "--per-day", "100")
    _ok(config, "limits", "set", "acme/news", "--per-hour", "5")
    # charged as the policy service charges: every window of the principal at once
    _send(config, "acme/app", 4)
    _send(config, "acme/news", 3)
    directory = tmp_path / "directory.yaml"
    audit_log = tmp_path / "audit.log"
    before = _unchanged(directory, audit_log)
    redis = f"Redis at 127.0.0.1:{server.port}, shared by every relay node"

    assert _refused(config, "limits", "set", "acme", "--per-day", "6") == (
        "account acme has already sent 7 recipients today, more than the 6 per day asked "
        f"(counts from {redis}); the day resets at {_tomorrow()} 00:00 UTC. Nothing changed: "
        "give at least 7 (the next message then waits until the reset), or wait")
    # a subuser's own sliding hour
    assert _refused(config, "limits", "set", "acme/news", "--per-hour", "2").startswith(
        f"acme/news has already sent 3 recipients in the last hour, more than the 2 per hour "
        f"asked (counts from {redis}); the hour slides: room for one more under 2 in ")
    assert _unchanged(directory, audit_log) == before
    assert _ok(config, "limits", "set", "acme", "--per-day", "7").endswith(", 7/day (own).\n")
    # a monthly quota, of an account without a daily one
    _ok(config, "account", "add", "globex")
    _ok(config, "limits", "set", "globex", "--per-month", "100")
    _send(config, "globex", 9)
    now = datetime.now(UTC)
    next_month = datetime(now.year + now.month // 12, now.month % 12 + 1, 1)
    assert _refused(config, "limits", "set", "globex", "--per-month", "8") == (
        "account globex has already sent 9 recipients this month, more than the 8 per month "
        f"asked (counts from {redis}); the month resets at {next_month:%Y-%m-%d} 00:00 UTC. "
        "Nothing changed: give at least 9 (the next message then waits until the reset), or "
        "wait")

    # Redis away: set anyway, saying why nothing was compared
    away = _config(tmp_path, {**settings, "redis": {**settings["redis"], "port": 1}})
    out, warning = _warned(away, "limits", "set", "acme", "--per-day", "5")
    assert out.endswith(", 5/day (own).\n")  # below the 7 counted: Redis could not say so
    assert warning.startswith("the new limits of acme were not compared with its current "
                              "usage, which cannot be read (counters.redis: "), warning
    assert warning.endswith("); they are set anyway") and "127.0.0.1:1" in warning, warning
    assert server.password not in warning
