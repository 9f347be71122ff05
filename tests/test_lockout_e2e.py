"""`keyrelay lockout list|clear` against the real keyrelay-policyd (issue 20, item 14): a key
id locked by wrong secrets over the Dovecot auth protocol is listed by the real CLI, cleared,
and logs in again at once; the same for a client address. The daemon and the CLI are the
console scripts, each with the test's own configuration and control socket
(testkit/policyd.py)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyrelay import keys
from testkit.policyd import KEYRELAY, Key, Policyd, fresh_address
from testkit.protocols import DovecotClient, connect

THRESHOLD = 3  # wrong secrets per key id, and guesses per address, before a lock-out


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Policyd]:
    site = Policyd(tmp_path_factory.mktemp("lockout") / "pd", {"policyd": {"bruteforce": {
        "max_failures_per_key": THRESHOLD, "max_failures_per_address": THRESHOLD,
        "window": "10m", "lockout": "15m"}}})
    site.keyrelay("account", "add", "acme")
    site.start()
    yield site
    assert site.stop() == 0
    assert site.tracebacks() == []


def cli(site: Policyd, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `keyrelay` console script against the daemon's configuration."""
    return subprocess.run([str(KEYRELAY), "--config", str(site.config_path), *args],
                          capture_output=True, text=True, timeout=60)


def login(site: Policyd, password: str, client: str) -> str:
    """``OK`` or the reason the client reads, over the Dovecot auth protocol."""
    with DovecotClient(connect(site.endpoint("auth"))) as auth:
        auth.handshake()
        reply = auth.plain("apikey", password, rip=client)
    return reply.status if reply.status == "OK" else reply.reason


def wrong(key: Key) -> str:
    head, secret = key.text.rsplit(".", 1)
    return f"{head}.{'A' if secret[0] != 'A' else 'B'}{secret[1:]}"


def listed(site: Policyd) -> list[dict[str, object]]:
    result = cli(site, "lockout", "list", "--json")
    assert (result.returncode, result.stderr) == (0, ""), result
    found: list[dict[str, object]] = json.loads(result.stdout)
    return found


def test_a_locked_key_is_listed_cleared_and_logs_in_again(daemon: Policyd) -> None:
    key = daemon.create_key("acme", "app")
    home, elsewhere = fresh_address(), fresh_address()
    assert login(daemon, key.text, home) == "OK"
    for _ in range(THRESHOLD):  # a stranger, one guess from each of its addresses
        assert login(daemon, wrong(key), fresh_address()).startswith("unknown API key")
    assert login(daemon, key.text, elsewhere).startswith(
        f"too many failed logins for API key {key.key_id}")

    lockouts = [lock for lock in listed(daemon) if lock["subject"] == key.key_id]
    assert len(lockouts) == 1
    lock = lockouts[0]
    assert (lock["kind"], lock["failures"], lock["let_in_from"]) == ("key", THRESHOLD, 1)
    text = cli(daemon, "lockout", "list").stdout
    row = next(line for line in text.splitlines() if key.key_id in line)
    assert row.split()[:3] == ["key", key.key_id, str(THRESHOLD)]
    assert text.splitlines()[0].split()[:3] == ["KIND", "LOCKED", "OUT"]

    mark = daemon.mark()
    cleared = cli(daemon, "lockout", "clear", "--key", key.key_id)
    assert (cleared.returncode, cleared.stderr) == (0, ""), cleared
    assert cleared.stdout == (f"Cleared 1 lock-out(s) of API key {key.key_id}, and forgot its "
                              "failed logins; it may log in again at once.\n")
    assert login(daemon, key.text, elsewhere) == "OK"
    assert [lock for lock in listed(daemon) if lock["subject"] == key.key_id] == []
    line = daemon.wait_for_log(f"API key {key.key_id}: failures forgotten", since=mark)
    assert f"1 lock-out(s) lifted, through the control socket by uid {os.getuid()}" in line
    audited = [json.loads(entry) for entry in
               Path(daemon.settings["logging"]["audit_log"]).read_text().splitlines()]
    assert {"action": "lockout.clear", "kind": "key", "subject": key.key_id,
            "lifted": "1"}.items() <= audited[-1].items()

    again = cli(daemon, "lockout", "clear", "--key", key.key_id)
    assert again.stdout == (f"No lock-out of API key {key.key_id} was in force; its failed "
                            "logins are forgotten.\n")


def test_a_locked_address_is_cleared_by_its_address(daemon: Policyd) -> None:
    key = daemon.create_key("acme", "office")
    office = fresh_address()
    for _ in range(THRESHOLD):
        assert login(daemon, keys.generate().text, office).startswith("unknown API key")
    assert login(daemon, key.text, office).startswith(f"too many failed logins from {office}")
    assert {"kind": "address", "subject": office, "failures": THRESHOLD}.items() <= next(
        lock for lock in listed(daemon) if lock["subject"] == office).items()
    cleared = cli(daemon, "lockout", "clear", "--address", office)
    assert cleared.returncode == 0 and cleared.stdout.startswith(
        f"Cleared 1 lock-out(s) of address {office}"), cleared
    assert login(daemon, key.text, office) == "OK"


def test_the_control_socket_is_for_root_only_and_survives_a_bad_line(daemon: Policyd) -> None:
    path = str(daemon.control_socket)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(30)
        conn.connect(path)
        reader = conn.makefile("rb")
        conn.sendall(b"UNLOCK everything\n")
        assert reader.readline().startswith(b"ERROR unknown command 'UNLOCK'")
        conn.sendall(b"CLEAR ADDRESS 192.0.2.0/24\n")
        assert b"neither an IP address nor an IPv6 /64" in reader.readline()
        conn.sendall(b"LIST\n")
        while (line := reader.readline()).startswith(b"{"):
            pass
        assert line.startswith(b"OK ")
    assert daemon.running()


def test_a_stopped_daemon_is_named_in_one_line(tmp_path: Path) -> None:
    site = Policyd(tmp_path / "pd")
    site.keyrelay("account", "add", "acme")
    site.start()
    assert site.stop() == 0
    result = cli(site, "lockout", "list")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        f"keyrelay: error: keyrelay-policyd's control socket {site.control_socket} "
        "(policyd.control_listen) does not exist: is keyrelay-policyd running? (systemctl "
        "status keyrelay-policyd)\n")


def test_a_control_socket_that_cannot_be_served_stops_the_daemon_in_one_line(
        daemon: Policyd, tmp_path: Path) -> None:
    """Two daemons never share a control socket (a clear would reach the wrong one), and a
    path that cannot be a socket is named."""
    taken = Policyd(tmp_path / "taken", {"policyd": {
        "control_listen": f"unix:{daemon.control_socket}"}})
    file = tmp_path / "a-file"
    file.write_text("")
    blocked = Policyd(tmp_path / "blocked", {"policyd": {
        "control_listen": f"unix:{file}/control.sock"}})
    for site, reason in (
            (taken, f"{daemon.control_socket} is in use by another running process"),
            (blocked, f"{file} is not a folder")):
        site.keyrelay("account", "add", "acme")
        result = subprocess.run(site.command(), capture_output=True, text=True, timeout=60)
        assert result.returncode == 1, result.stderr
        assert result.stderr.splitlines()[-1] == (
            "keyrelay-policyd: error: cannot start: policyd.control_listen: cannot serve "
            f"unix:{site.settings['policyd']['control_listen'][5:]}: {reason}")
    assert daemon.running() and listed(daemon) is not None
