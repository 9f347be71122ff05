"""``keyrelay usage PRINCIPAL``: the counts of a principal's windows through the real CLI, next
to the limits: read from a real redis-server (testkit/redis.py), or with in-process counters
from the real keyrelay-policyd that counted them (testkit/policyd.py), through its control
socket.

Sliding windows (minute, hour) hold an estimate that falls as the window slides; counts are
asserted exactly only where the test's few seconds cannot move them: a day, a month, an hour
(its estimate rounds up to the full count for 12 minutes after a boundary)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml
from test_policyd_quotas import _message, _populate
from test_yaml_directory import run_cli, write_config

from keyrelay.config import parse_config
from keyrelay.counters import RedisCounters, redis_target
from keyrelay.decisions import EngineSettings, windows_for
from keyrelay.directory import YamlDirectory
from keyrelay.limits import store_window
from testkit.policyd import Policyd
from testkit.redis import REDIS_SERVER, RedisServer


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    if not REDIS_SERVER.exists():
        pytest.skip("redis-server is not installed (make test installs it)")
    with RedisServer() as found:
        yield found


def _config(tmp_path: Path, counters: dict[str, object] | None) -> Path:
    path = write_config(tmp_path)
    settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    if counters is not None:
        settings["counters"] = counters
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return path


def _ok(config: Path, *args: str) -> str:
    result = run_cli(config, *args)
    assert (result.returncode, result.stderr) == (0, ""), result
    return result.stdout


def _send(config: Path, principal: str, recipients: int) -> None:
    """Charge one message of ``recipients`` as the policy service does: every window of
    ``windows_for`` at once, in the shared store."""
    loaded = parse_config(yaml.safe_load(config.read_text(encoding="utf-8")), str(config))
    snapshot = YamlDirectory(loaded.directory.path).snapshot()
    windows = windows_for(snapshot, EngineSettings.from_config(loaded), principal)

    async def take() -> None:
        store = RedisCounters(redis_target(loaded.counters.redis),
                              zone=ZoneInfo(loaded.counters.time_zone))
        try:
            assert await store.take(tuple(store_window(w) for w in windows), recipients) is None
        finally:
            await store.close()

    asyncio.run(asyncio.wait_for(take(), 30))


def test_usage_shows_each_window_with_its_count_limit_and_reset(
        tmp_path: Path, server: RedisServer) -> None:
    server.flush()
    config = _config(tmp_path, server.counters_settings(time_zone="Europe/Paris"))
    _ok(config, "account", "add", "acme")
    _ok(config, "subuser", "add", "acme/app")
    _ok(config, "subuser", "add", "acme/billing")
    _ok(config, "limits", "set", "acme", "--per-day", "50000", "--per-month", "1000000")
    _ok(config, "limits", "set", "acme/app", "--per-minute", "100")
    _send(config, "acme/app", 3)  # a message to 3 recipients counts 3
    _send(config, "acme/billing", 2)

    shown = json.loads(_ok(config, "usage", "acme/app", "--json"))
    assert (shown["principal"], shown["backend"], shown["counts_from"], shown["time_zone"]) == (
        "acme/app", "redis", "redis", "Europe/Paris")
    by_window = {(w["caps"], w["span"]): w for w in shown["windows"]}
    assert list(by_window) == [("subuser", "minute"), ("account", "minute"),
                               ("account", "hour"), ("account", "day"), ("account", "month")]
    assert by_window["subuser", "minute"]["used"] == 3  # acme/app's own window
    # the account's windows hold both subusers' recipients
    assert [by_window["account", s]["used"] for s in ("minute", "hour", "day", "month")] == [
        5, 5, 5, 5]
    assert by_window["account", "day"]["value"] == 50000
    assert by_window["account", "minute"]["source"] == "config"
    day_reset = by_window["account", "day"]["resets_at"]
    assert day_reset.endswith(" 00:00 CET"), day_reset  # midnight in counters.time_zone
    assert by_window["account", "minute"]["resets_at"] is None

    text = _ok(config, "usage", "acme/billing").splitlines()
    assert text[0].split() == ["WINDOW", "CAPS", "USED", "LIMIT", "RESETS"]
    assert text[1].split()[:7] == ["per", "minute", "all", "of", "acme", "5", "600"]
    assert text[3].split()[:7] == ["per", "day", "all", "of", "acme", "5", "50000"]
    assert text[-1] == (f"Counts from Redis at 127.0.0.1:{server.port}, shared by every relay "
                        "node.")


def test_usage_with_in_process_counters_asks_the_keyrelay_policyd_that_counted(
        tmp_path: Path) -> None:
    """counters.backend: memory (the default): the counts live in keyrelay-policyd; the CLI
    reads them through its control socket, same windows and shape as from Redis."""
    daemon = Policyd(tmp_path / "pd")
    ids = _populate(daemon, "acme")  # acme/app and acme/billing, each with a key
    daemon.keyrelay("limits", "set", "acme", "--per-day", "50000", "--per-month", "1000000")
    daemon.keyrelay("limits", "set", "acme/app", "--per-hour", "100")
    daemon.start()
    try:
        # real policy requests, as Postfix sends them: RCPT per recipient, then DATA
        assert _message(daemon, ids["app"], 3) == ["DUNNO"] * 4
        assert _message(daemon, ids["billing"], 2) == ["DUNNO"] * 3
        shown = json.loads(_ok(daemon.config_path, "usage", "acme/app", "--json"))
        text = _ok(daemon.config_path, "usage", "acme/billing").splitlines()
    finally:
        assert daemon.stop() == 0
    assert daemon.tracebacks() == []
    assert (shown["principal"], shown["backend"], shown["counts_from"], shown["time_zone"]) == (
        "acme/app", "memory", "policyd", "UTC")
    by_window = {(w["caps"], w["span"]): w for w in shown["windows"]}
    assert list(by_window) == [("subuser", "hour"), ("account", "minute"),
                               ("account", "hour"), ("account", "day"), ("account", "month")]
    assert by_window["subuser", "hour"]["used"] == 3  # acme/app's own window
    assert [by_window["account", s]["used"] for s in ("hour", "day", "month")] == [5, 5, 5]
    assert 0 < by_window["account", "minute"]["used"] <= 5  # slides as the seconds pass
    assert by_window["account", "day"] == {
        "limit": "messages_per_day", "span": "day", "caps": "account", "subject": "acme",
        "used": 5, "value": 50000, "source": "account",
        "resets_at": by_window["account", "day"]["resets_at"]}
    assert by_window["account", "day"]["resets_at"].endswith(" 00:00 UTC")

    assert text[0].split() == ["WINDOW", "CAPS", "USED", "LIMIT", "RESETS"]
    assert text[2].split()[:7] == ["per", "hour", "all", "of", "acme", "5", "20000"]
    assert text[3].split()[:7] == ["per", "day", "all", "of", "acme", "5", "50000"]
    assert text[-1] == "Counts from keyrelay-policyd's memory, this node's mail only."

    # the daemon stopped: one line saying so and what to do
    result = run_cli(daemon.config_path, "usage", "acme")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        "keyrelay: error: counters.backend is memory, so the counts live in keyrelay-policyd: "
        f"keyrelay-policyd's control socket {daemon.control_socket} (policyd.control_listen) "
        "does not exist: is keyrelay-policyd running? (systemctl status keyrelay-policyd)\n")


def test_usage_without_a_control_socket_says_how_to_serve_one(tmp_path: Path) -> None:
    config = _config(tmp_path, None)
    settings = yaml.safe_load(config.read_text(encoding="utf-8"))
    config.write_text(yaml.safe_dump({**settings, "policyd": {"control_listen": ""}}),
                      encoding="utf-8")
    _ok(config, "account", "add", "acme")
    result = run_cli(config, "usage", "acme")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        "keyrelay: error: counters.backend is memory, so the counts live in keyrelay-policyd: "
        f"{config}: policyd.control_listen is empty: keyrelay-policyd serves no control "
        "socket; set it (e.g. unix:/run/keyrelay/policyd-control.sock) and restart "
        "keyrelay-policyd\n")


def test_usage_of_an_unknown_principal_and_redis_away_are_one_line(
        tmp_path: Path, server: RedisServer) -> None:
    settings = server.counters_settings()
    config = _config(tmp_path, settings)
    _ok(config, "account", "add", "acme")
    result = run_cli(config, "usage", "acme/nobody")
    assert result.returncode == 1 and result.stderr.startswith(
        "keyrelay: error: unknown subuser 'acme/nobody'"), result
    away = _config(tmp_path, {**settings, "redis": {**settings["redis"], "port": 1}})
    result = run_cli(away, "usage", "acme")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result
    assert result.stderr.startswith("keyrelay: error: ") and result.stderr.count("\n") == 1
