"""Reading and clearing lock-outs (issue 20, item 14), in process: the failure tracker's
``locked``/``clear``, the control socket's line protocol (keyrelay/control.py), the daemon's
side of it (policyd/control.py) on a real unix socket in this process, and the CLI's
refusals that need no daemon. The whole path through the real keyrelay-policyd is in
tests/test_lockout_e2e.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from test_cli import CliSite, assert_refused

import policyd.main
from keyrelay import control, keys
from keyrelay.config import Config, parse_config
from keyrelay.control import BadRequest, Lockout, Request, parse_request
from keyrelay.counters import Locked, MemoryCounters
from keyrelay.decisions import Verdict
from keyrelay.directory import YamlDirectory
from keyrelay.directory.yamlfile import render
from keyrelay.errors import ConfigError, UserError
from keyrelay.logs import DecisionLog
from policyd import dovecot
from policyd.auth import AuthService
from policyd.context import ServiceContext
from policyd.control import ControlService, listener, start
from policyd.policy import run_now
from testkit.factories import NOW, World, key_id

# -- the failure counts of the memory store ----------------------------------------------------


class Tracker:
    """``MemoryCounters``' failures of one kind (what the auth service and the control socket
    ask of any counter store), each call at the time it is given."""

    def __init__(self, max_failures: int) -> None:
        self.now = 0.0
        self.max_failures = max_failures
        self.store = MemoryCounters(max_tracked=100, clock=lambda: self.now)

    def at(self, now: float) -> MemoryCounters:
        self.now = now
        return self.store

    def fail(self, key: str, now: float) -> bool:
        return run_now(self.at(now).fail("key", key, self.max_failures, 600.0, 900.0))

    def locked_for(self, key: str, now: float) -> float:
        return run_now(self.at(now).locked_for("key", key))

    def locked(self, now: float) -> list[Locked]:
        return run_now(self.at(now).locked())

    def clear(self, key: str, now: float) -> bool:
        return run_now(self.at(now).clear("key", key))

    def clear_all(self, now: float) -> int:
        return run_now(self.at(now).clear_all())


def tracker(max_failures: int = 3) -> Tracker:
    return Tracker(max_failures)


def test_locked_lists_each_lock_out_in_force_with_its_times_and_failures() -> None:
    failures = tracker()
    for t in (100.0, 110.0, 120.0):
        failures.fail("192.0.2.1", t)
    failures.fail("192.0.2.2", 130.0)  # one failure: not locked
    for t in (200.0, 201.0, 202.0):
        failures.fail("k3y", t)
    assert failures.locked(300.0) == [
        _locked("192.0.2.1", 120.0, 1020.0, 3), _locked("k3y", 202.0, 1102.0, 3)]
    failures.fail("192.0.2.1", 400.0)  # counted during the lock-out (a trusted address)
    assert failures.locked(400.0)[0].failures == 4
    assert [lock.subject for lock in failures.locked(1050.0)] == ["k3y"]  # the first ended
    assert failures.locked(1102.0) == []


def _locked(subject: str, since: float, until: float, failures: int) -> Locked:
    return Locked("key", subject, since, until, failures)


def test_clear_lifts_a_lock_out_and_forgets_the_failures_behind_it() -> None:
    failures = tracker()
    for t in (1.0, 2.0, 3.0):
        failures.fail("k3y", t)
    assert failures.locked_for("k3y", 4.0) == 899.0
    assert failures.clear("k3y", 4.0) is True
    assert failures.locked_for("k3y", 4.0) == 0.0 and failures.locked(4.0) == []
    # forgotten, not only unlocked: two more failures do not lock it again
    assert failures.fail("k3y", 5.0) is False and failures.fail("k3y", 6.0) is False
    assert failures.fail("k3y", 7.0) is True


def test_clear_of_what_is_not_locked_forgets_its_failures_and_says_none_was_lifted() -> None:
    failures = tracker()
    failures.fail("k3y", 1.0)
    failures.fail("k3y", 2.0)
    assert failures.clear("k3y", 3.0) is False
    assert failures.fail("k3y", 4.0) is False  # the two before were forgotten
    assert failures.clear("nobody", 5.0) is False
    for t in (10.0, 11.0, 12.0):
        failures.fail("old", t)
    assert failures.clear("old", 912.0) is False  # its lock-out had ended by itself


def test_clear_all_lifts_every_lock_out_and_counts_those_in_force() -> None:
    failures = tracker(max_failures=1)
    failures.fail("a", 1.0)
    failures.fail("b", 2.0)
    failures.fail("ended", -1000.0)
    assert failures.clear_all(10.0) == 2
    assert failures.locked(10.0) == [] and failures.clear("ended", 10.0) is False
    assert failures.fail("a", 11.0) is True  # counted afresh


# -- the line protocol -------------------------------------------------------------------------
KEY_ID = "abcdefghijk23456"


@pytest.mark.parametrize(("line", "request_"), [
    (b"LIST", Request("LIST")),
    (b"LIST\r", Request("LIST")),
    (b"CLEAR ALL", Request("CLEAR", "all")),
    (f"CLEAR KEY {KEY_ID}".encode(), Request("CLEAR", "key", KEY_ID)),
    (b"CLEAR ADDRESS 192.0.2.7", Request("CLEAR", "address", "192.0.2.7")),
    (b"CLEAR ADDRESS ::ffff:192.0.2.7", Request("CLEAR", "address", "192.0.2.7")),
    (b"CLEAR ADDRESS 2001:db8:1:2::7", Request("CLEAR", "address", "2001:db8:1:2::7")),
    (b"CLEAR ADDRESS 2001:db8:1:2::/64", Request("CLEAR", "address", "2001:db8:1:2::/64")),
    (b"CLEAR ADDRESS 2001:db8:1:2::5/64", Request("CLEAR", "address", "2001:db8:1:2::/64")),
    (b"CLEAR ADDRESS 192.0.2.7/32", Request("CLEAR", "address", "192.0.2.7")),
])
def test_each_request_parses_and_writes_back_as_the_same_line(line: bytes,
                                                              request_: Request) -> None:
    assert parse_request(line) == request_
    assert parse_request(request_.line().removesuffix(b"\n")) == request_


@pytest.mark.parametrize(("line", "error"), [
    (b"", "unknown command '': expected LIST, CLEAR KEY <key id>, CLEAR ADDRESS <address> "
          "or CLEAR ALL"),
    (b"list", "unknown command 'list': expected LIST, CLEAR KEY"),
    (b"LIST ALL", "unknown command 'LIST': expected LIST"),
    (b"CLEAR", "CLEAR takes KEY <key id>, ADDRESS <address> or ALL"),
    (b"CLEAR KEY", "CLEAR takes KEY <key id>, ADDRESS <address> or ALL"),
    (b"CLEAR KEY  " + KEY_ID.encode(), "CLEAR takes KEY"),
    (b"CLEAR KEY ABCDEFGH23456789", "'ABCDEFGH23456789' is not a key id (16 characters a-z "
                                    "and 2-7; see: keyrelay lockout list)"),
    (b"CLEAR ADDRESS 192.0.2.0/24", "'192.0.2.0/24' is neither an IP address nor an IPv6 /64 "
                                    "(lock-outs are kept per IPv4 address and per IPv6 /64"),
    (b"CLEAR ADDRESS 2001:db8::/48", "is neither an IP address nor an IPv6 /64"),
    (b"CLEAR ADDRESS mail.example", "'mail.example' is not an IP address"),
    (b"CLEAR \xff", "not ASCII: expected LIST"),
    (b"CLEAR KEY a\x1bb", "'a\\\\x1bb' is not a key id"),
])
def test_a_bad_line_gets_one_precise_error(line: bytes, error: str) -> None:
    with pytest.raises(BadRequest) as raised:
        parse_request(line)
    assert error in str(raised.value)
    assert "\n" not in str(raised.value)


def _pasted(key: str) -> list[str]:
    _, kid, secret = key.split(".")
    return [key, f"{kid}.{secret}", secret, f"'{key}'", f"x.{secret}", f"5{secret}",
            secret[:24]]


def test_a_key_or_secret_given_where_a_key_id_belongs_is_never_repeated() -> None:
    for _ in range(3):
        key = keys.generate().text
        secret = key.split(".")[2]
        parts = {secret[i:i + 8] for i in range(len(secret) - 7)}
        for shape in _pasted(key):
            for given in (f"CLEAR KEY {shape}", f"CLEAR ADDRESS {shape}", shape):
                with pytest.raises(BadRequest) as raised:
                    parse_request(given.encode())
                said = str(raised.value)
                assert not [p for p in parts if p.lower() in said.lower()], (shape, said)
            with pytest.raises(UserError) as refused:
                control.key_id(shape)
            assert not [p for p in parts if p.lower() in str(refused.value).lower()]
    key = keys.generate().text
    with pytest.raises(BadRequest, match="that is an API key, not a key id; give only its id "
                                         f"'{key.split('.')[1]}'"):
        parse_request(f"CLEAR KEY {key}".encode())


def test_a_lock_out_goes_through_json_and_back() -> None:
    since = datetime(2026, 12, 4, 16, 0, 5, tzinfo=UTC)
    lockout = Lockout("key", KEY_ID, since, since + timedelta(minutes=15), 10, 2)
    line = control.listing([lockout]).decode().splitlines()[0]
    assert json.loads(line) == {"kind": "key", "subject": KEY_ID,
                                "since": "2026-12-04T16:00:05Z",
                                "until": "2026-12-04T16:15:05Z", "failures": 10,
                                "let_in_from": 2}
    assert Lockout.from_json(json.loads(line)) == lockout
    address = Lockout("address", "192.0.2.7", since, since, 3)
    assert "let_in_from" not in address.to_json()
    assert Lockout.from_json(address.to_json()) == address


# -- the daemon's side, on a real unix socket ----------------------------------------------
class Daemon:
    """An AuthService on a YAML directory with its clocks in the test's hand, and the
    control service over it."""

    def __init__(self, tmp_path: Path) -> None:
        world = World()
        world.account("acme")
        self.key = world.key("acme")
        path = tmp_path / "directory.yaml"
        path.write_text(render(world.data))
        self.config = parse_config({
            "directory": {"path": str(path)},
            "policyd": {"control_listen": f"unix:{tmp_path}/run/control.sock",
                        "bruteforce": {"max_failures_per_key": 3,
                                       "max_failures_per_address": 3,
                                       "lockout": "15m"}}}, "test")
        self.log = DecisionLog(self.config.logging, (tmp_path / "log").open("w"))
        # the counter store's wall clock: seconds since the epoch, moved only by the test;
        # it reaches NOW two minutes in
        self.tick = NOW.timestamp() - 120.0
        self.store = MemoryCounters(clock=lambda: self.tick)
        self.path = path
        self.auth = AuthService(self.context(self.config))
        self.control = ControlService(self.auth)

    def context(self, config: Config) -> ServiceContext:
        return ServiceContext(config, YamlDirectory(str(self.path)), self.log,
                              clock=lambda: NOW, counters=self.store)

    def lockouts(self) -> list[Lockout]:
        return run_now(self.control.lockouts())

    def clear(self, kind: str, subject: str) -> int:
        return run_now(self.control.clear(kind, subject, "uid 0"))

    def login(self, password: str, client: str) -> str:
        verdict = self.auth.login(dovecot.Attempt("1", "PLAIN", "apikey", password, client,
                                                  True, "smtp"))
        assert isinstance(verdict, Verdict)
        return "OK" if verdict.allowed else str(verdict.reason)

    def wrong(self) -> str:
        head, secret = self.key.rsplit(".", 1)
        return f"{head}.{'A' if secret[0] != 'A' else 'B'}{secret[1:]}"


def test_the_service_lists_lock_outs_in_wall_clock_time_and_clears_them(
        tmp_path: Path) -> None:
    site = Daemon(tmp_path)
    kid = key_id(site.key)
    assert site.login(site.key, "192.0.2.1") == "OK"  # the owner, at home
    for n in range(3):
        assert site.login(site.wrong(), f"198.51.100.{n}") == "wrong_secret"
    site.tick += 60.0
    for _ in range(3):
        site.login("kr.nonsense", "2001:db8:1:2::7")
    site.tick += 60.0
    assert site.lockouts() == [
        Lockout("key", kid, NOW - timedelta(seconds=120), NOW + timedelta(seconds=780), 3, 1),
        Lockout("address", "2001:db8:1:2::/64", NOW - timedelta(seconds=60),
                NOW + timedelta(seconds=840), 3),
    ]
    assert site.login(site.key, "192.0.2.9") == "key_locked_out"
    assert site.clear("key", kid) == 1
    assert site.login(site.key, "192.0.2.9") == "OK"
    # an IPv6 address clears its /64, where its failures were counted
    assert site.clear("address", "2001:db8:1:2::99") == 1
    assert site.lockouts() == []
    assert site.login(site.key, "2001:db8:1:2::7") == "OK"
    assert site.clear("all", "") == 0


def test_a_sighup_that_changes_the_thresholds_keeps_the_lock_outs_and_counts_anew_with_them(
        tmp_path: Path) -> None:
    site = Daemon(tmp_path)
    for n in range(3):
        site.login(site.wrong(), f"198.51.100.{n}")
    assert len(site.lockouts()) == 1
    # as policyd/main.py's reload: a new context over the same store, stricter thresholds
    stricter = dataclasses.replace(site.config.policyd, bruteforce=dataclasses.replace(
        site.config.policyd.bruteforce, max_failures_per_address=1))
    site.auth.context = site.context(dataclasses.replace(site.config, policyd=stricter))
    assert [lock.kind for lock in site.lockouts()] == ["key"]  # kept, not wiped
    assert site.login(site.key, "192.0.2.9") == "key_locked_out"
    site.login("kr.nonsense", "203.0.113.5")  # one failure now locks an address
    assert site.login(site.key, "203.0.113.5") == "address_locked_out"


async def _serve_and_ask(site: Daemon, path: Path, lines: list[bytes]) -> list[bytes]:
    """Start the control listener, send ``lines`` on one connection, return what came back
    for each (up to its status line)."""
    lst = listener(site.config.policyd, site.control)
    assert lst is not None
    await start(lst, site.config.policyd)
    try:
        return await asyncio.to_thread(_talk, path, lines)
    finally:
        lst.stop_accepting()
        for conn in list(lst.connections):
            conn.close_quietly()


def _talk(path: Path, lines: list[bytes]) -> list[bytes]:
    """Send ``lines`` at once (a client may send several requests before reading), then
    read the answer of each line that ends: its JSON lines up to its status line."""
    answers = []
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(30)  # generous: the daemon answers from memory
        conn.connect(str(path))
        reader = conn.makefile("rb")
        conn.sendall(b"".join(lines))
        for _ in range(b"".join(lines).count(b"\n")):
            answer = b""
            while True:
                got = reader.readline()
                answer += got
                if not got or not got.startswith(b"{"):
                    break
            answers.append(answer)
    return answers


def test_the_socket_answers_each_line_and_a_bad_one_does_not_end_the_connection(
        tmp_path: Path) -> None:
    site = Daemon(tmp_path)
    for n in range(3):
        site.login(site.wrong(), f"198.51.100.{n}")
    path = tmp_path / "run" / "control.sock"
    key = keys.generate().text
    answers = asyncio.run(_serve_and_ask(site, path, [
        b"LIST\n", b"HELLO\n", f"CLEAR KEY {key}\n".encode(), b"CLEAR KEY " + KEY_ID.encode()
        + b"\n", f"CLEAR KEY {key_id(site.key)}\n".encode(), b"LIST\n"]))
    listed, *rest = answers[0].splitlines()
    assert json.loads(listed)["subject"] == key_id(site.key) and rest == [b"OK 1"]
    assert answers[1] == (b"ERROR unknown command 'HELLO': expected LIST, CLEAR KEY <key id>, "
                          b"CLEAR ADDRESS <address> or CLEAR ALL, or PEEK "
                          b"<subject>:<60s|3600s|day|month>:<limit> ...\n")
    assert answers[2].startswith(b"ERROR that is an API key, not a key id")
    assert key.split(".")[2].encode() not in answers[2]
    assert answers[3:] == [b"OK 0\n", b"OK 1\n", b"OK 0\n"]


def test_the_socket_is_for_its_owner_only_and_a_line_too_long_is_refused_not_kept(
        tmp_path: Path) -> None:
    site = Daemon(tmp_path)
    path = tmp_path / "run" / "control.sock"  # its folder did not exist: made

    async def check() -> list[bytes]:
        lst = listener(site.config.policyd, site.control)
        assert lst is not None
        await start(lst, site.config.policyd)
        try:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            return await asyncio.to_thread(_talk, path, [
                b"L" * 2000, b"L" * 100000 + b"\n", b"C" * 1025 + b"\n", b"LIST\n"])
        finally:
            lst.stop_accepting()

    too_long = b"ERROR line longer than 1024 bytes\n"
    assert asyncio.run(check()) == [too_long, too_long, b"OK 0\n"]


def test_the_client_says_in_one_line_when_the_daemon_cannot_be_reached(
        tmp_path: Path) -> None:
    missing = str(tmp_path / "none.sock")
    with pytest.raises(control.ControlError) as raised:
        control.list_lockouts(missing)
    assert str(raised.value) == (
        f"keyrelay-policyd's control socket {missing} (policyd.control_listen) does not "
        "exist: is keyrelay-policyd running? (systemctl status keyrelay-policyd)")
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as left:
        left.bind(str(stale))  # bound, never listening: what a killed daemon leaves
    with pytest.raises(control.ControlError, match="refuses connections: keyrelay-policyd is "
                                                   "not running"):
        control.clear(str(stale), "all")


# -- the configuration -------------------------------------------------------------------------
def test_the_control_socket_is_served_by_default_on_a_unix_socket_only() -> None:
    cfg = parse_config({}, "k.yaml").policyd
    assert (cfg.control_listen, cfg.control_group) == (
        "unix:/run/keyrelay/policyd-control.sock", "")
    assert parse_config({"policyd": {"control_listen": ""}}, "k.yaml").policyd.control_listen == ""
    with pytest.raises(ConfigError) as refused:
        parse_config({"policyd": {"control_listen": "inet:127.0.0.1:10040"}}, "k.yaml")
    assert "k.yaml: policyd.control_listen: " in str(refused.value)
    assert ("unix:/absolute/path (a unix socket only: a TCP port would let every local user "
            "lift lock-outs)") in str(refused.value)


def test_an_unknown_control_group_stops_the_daemon_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "directory.yaml").write_text(render(World().data))
    config = tmp_path / "keyrelay.yaml"
    config.write_text(f"directory: {{path: {tmp_path}/directory.yaml}}\n"
                      "policyd: {user: root, control_group: no-such-group-here}\n")
    with pytest.raises(SystemExit) as stopped:
        policyd.main.main(["--config", str(config), "--check-config"])
    assert stopped.value.code == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "keyrelay-policyd: error: policyd.control_group: no such group: 'no-such-group-here'")


# -- the CLI, without a daemon -----------------------------------------------------------------
def test_lockout_commands_name_what_is_wrong_in_one_line(tmp_path: Path) -> None:
    site = CliSite(tmp_path, f"policyd:\n  control_listen: unix:{tmp_path}/no.sock\n")
    said = assert_refused(site.run("lockout list"))
    assert said == (f"keyrelay: error: keyrelay-policyd's control socket {tmp_path}/no.sock "
                    "(policyd.control_listen) does not exist: is keyrelay-policyd running? "
                    "(systemctl status keyrelay-policyd)")
    assert "does not exist" in assert_refused(site.run(f"lockout clear --key {KEY_ID}"))
    assert not site.audit_log.exists()  # nothing was cleared: nothing audited
    (tmp_path / "off").mkdir()
    off = CliSite(tmp_path / "off", "policyd:\n  control_listen: ''\n")
    assert assert_refused(off.run("lockout list")) == (
        f"keyrelay: error: {off.config}: policyd.control_listen is empty: keyrelay-policyd "
        "serves no control socket; set it (e.g. unix:/run/keyrelay/policyd-control.sock) "
        "and restart keyrelay-policyd")


def test_lockout_clear_needs_exactly_one_target(tmp_path: Path) -> None:
    site = CliSite(tmp_path)
    assert "one of the arguments --key --address --all is required" in assert_refused(
        site.run("lockout clear"), code=2)
    assert "not allowed with argument" in assert_refused(
        site.run(f"lockout clear --key {KEY_ID} --all"), code=2)
    assert "is not an IP address" in assert_refused(site.run("lockout clear --address x"))


def test_lockout_clear_never_repeats_a_key_or_secret_given_as_its_key_id(
        tmp_path: Path) -> None:
    site = CliSite(tmp_path)
    for _ in range(3):
        key = keys.generate().text
        secret = key.split(".")[2]
        parts = {secret[i:i + 8].lower() for i in range(len(secret) - 7)}
        for shape in [*_pasted(key), f"  {key}\t", f"SMTP password: {key}", f"{key}\n"]:
            for argv in (["lockout", "clear", "--key", shape],
                         ["lockout", "clear", "--address", shape],
                         ["lockout", "clear", f"--key={shape}", "--all"]):
                result = site.run(argv)
                shown = (result.out + result.err).lower()
                assert not [p for p in parts if p in shown], (shape, str(result))
                assert result.code in (1, 2), str(result)
    key = keys.generate().text
    assert assert_refused(site.run(["lockout", "clear", "--key", key])) == (
        f"keyrelay: error: that is an API key, not a key id; give only its id "
        f"'{key.split('.')[1]}' (the key was not shown or stored)")
