"""Run the real ``keyrelay-policyd`` on real sockets (``Policyd``) and fill its directory.

- ``Policyd`` writes a configuration into a folder (loopback TCP endpoints on free ports or
  unix sockets, ``socket_group: ""``), starts the daemon as a subprocess with its stderr in a
  log file, waits for readiness by connecting and completing a round trip (never a fixed
  sleep), and stops it with SIGTERM, returning the exit status. Its clients are in
  ``testkit.protocols``.
- ``add_key`` and friends fill a directory with ``keyrelay.admin`` inside a
  ``YamlDirectory.transaction()``, for tests that need many tenants quickly; tests that are
  about run-time changes use the real ``keyrelay`` CLI (``Policyd.keyrelay``).
- ``capabilities_of_every_thread`` and ``proc_status`` read a daemon's process state.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from keyrelay import admin
from keyrelay.decisions import format_identity
from keyrelay.directory import YamlDirectory
from keyrelay.directory.model import DirectoryData
from testkit.net import free_port, wait_until
from testkit.protocols import DovecotClient, PolicyClient, connect
from testkit.redis import REDIS_SERVER, RedisServer

BIN = Path(sys.executable).parent
KEYRELAY = BIN / "keyrelay"
POLICYD = BIN / "keyrelay-policyd"

# Every test uses its own client addresses (rip= / client_address=): brute-force counters are
# per address, so tests sharing a daemon never lock each other out.
_addresses = (f"198.51.100.{i}" for i in range(1, 255))
_more_addresses = (f"203.0.113.{i}" for i in range(1, 255))
_all_addresses = itertools.chain(_addresses, _more_addresses)


def fresh_address() -> str:
    """A client address no other test has used against the shared daemon."""
    return next(_all_addresses)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied section by section (a copy)."""
    result = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = value
    return result


# -- the directory -----------------------------------------------------------------------------
def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@dataclass(frozen=True)
class Key:
    """An API key created for a test: what the client presents, and what Postfix logs."""

    key_id: str
    text: str = ""
    principal: str = ""

    def __repr__(self) -> str:  # pytest prints reprs of failing parameters: no secret there
        return f"Key({self.key_id}, {self.principal})"

    @property
    def secret(self) -> str:
        return self.text.split(".", 2)[2]

    @property
    def identity(self) -> str:
        """The SASL user name policyd answers and Postfix passes on (principal:keyid)."""
        return f"{self.principal}:{self.key_id}"


def add_key(data: DirectoryData, principal: str, name: str,
            scopes: tuple[str, ...] = ("mail.send",)) -> Key:
    new = admin.create_key(data, principal, name, scopes, None, now())
    return Key(new.key_id, new.text, principal)


def add_verified_domain(data: DirectoryData, principal: str, domain: str,
                        grants: tuple[str, ...] = ()) -> None:
    admin.add_domain(data, principal, domain, (), now())  # no DKIM keys: policyd never signs
    for subuser in grants:
        admin.grant_domain(data, domain, subuser)
    admin.mark_verified(data, domain, now())


@contextlib.contextmanager
def locked_directory(path: Path) -> Iterator[None]:
    """Hold the directory's write lock (as the CLI and the daemon's last-used writer take it)."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def replace_file(path: Path, text: str) -> None:
    """Atomically replace ``path`` (a reader never sees a half-written file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".test-")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, path.stat().st_mode & 0o777)
    os.replace(tmp, path)


@contextlib.contextmanager
def broken_directory(path: Path) -> Iterator[None]:
    """Make the directory file invalid YAML for the duration; restore it afterwards.

    The write lock is held throughout so the daemon's last-used writer cannot overwrite the
    broken file with a good one (nor the good one with stale data afterwards).
    """
    with locked_directory(path):
        original = path.read_text()
        replace_file(path, "accounts: [this is not: valid yaml\n")
        try:
            yield
        finally:
            replace_file(path, original)


# -- the daemon --------------------------------------------------------------------------------
SERVICES = ("auth", "policy", "socketmap")


class Policyd:
    """One ``keyrelay-policyd`` process with its own configuration, directory and log."""

    def __init__(self, root: Path, overrides: dict[str, Any] | None = None, *,
                 unix: bool = False, module: bool = False) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.config_path = root / "keyrelay.yaml"
        self.directory_path = root / "directory.yaml"
        self.log_path = root / "policyd.log"
        self.module = module
        self.sockets = root / "sockets"  # the unix sockets' folder, with unix=True
        if unix:
            if len(str(self.sockets / "socketmap")) > 100:  # AF_UNIX paths hold 107 bytes
                self.sockets = Path(tempfile.mkdtemp(prefix="krsock-"))
            self.sockets.mkdir(exist_ok=True)
            listen = {f"{s}_listen": f"unix:{self.sockets / s}" for s in SERVICES}
        else:
            listen = {f"{s}_listen": f"inet:127.0.0.1:{free_port()}" for s in SERVICES}
        # its own control socket (keyrelay lockout), never the shared default in /run/keyrelay
        self.control_socket = root / "control.sock"
        if len(str(self.control_socket)) > 100:
            self.control_socket = Path(tempfile.mkdtemp(prefix="krctl-")) / "control.sock"
        self.base: dict[str, Any] = {
            "directory": {"path": str(self.directory_path)},
            "dkim": {"key_dir": str(root / "dkim")},
            "logging": {"audit_log": str(root / "audit.log")},
            # root: the test folders are root's (0700); the default user (keyrelay) is
            # tested by the demo relay, which runs its daemons unprivileged
            "policyd": {**listen, "control_listen": f"unix:{self.control_socket}",
                        "socket_group": "", "user": "root"},
            # no Postfix here: route to any pool transport without asking master.cf
            "postfix": {"config_dir": ""},
            # never the node's own copy in /var/lib/keyrelay (counters.on_unavailable local)
            "suppressions": {"replica": str(root / "suppressions-replica.db")},
        }
        self.settings = merge(self.base, overrides or {})
        self.write_config()
        self.process: subprocess.Popen[bytes] | None = None
        self.keys: dict[str, Key] = {}  # keys a test made for this daemon, by a short name

    # -- configuration and directory ------------------------------------------------------
    def write_config(self, overrides: dict[str, Any] | None = None) -> None:
        """(Re)write the configuration file: the current settings changed by ``overrides``."""
        if overrides is not None:
            self.settings = merge(self.settings, overrides)
        self.config_path.write_text(yaml.safe_dump(self.settings, sort_keys=False))

    def endpoint(self, service: str) -> str:
        return str(self.settings["policyd"][f"{service}_listen"])

    def directory(self) -> YamlDirectory:
        return YamlDirectory(str(self.directory_path))

    def keyrelay(self, *args: str) -> str:
        """Run the real admin CLI against this daemon's configuration; its stdout."""
        result = subprocess.run([str(KEYRELAY), "--config", str(self.config_path), *args],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"keyrelay {' '.join(args)}: {result.stderr}"
        return result.stdout

    def create_key(self, principal: str, name: str, *options: str) -> Key:
        created = json.loads(self.keyrelay("key", "create", principal, "--name", name,
                                           "--json", *options))
        return Key(created["key_id"], created["key"], principal)

    # -- the process ----------------------------------------------------------------------
    def command(self, *args: str) -> list[str]:
        if self.module:
            return [sys.executable, "-m", "policyd", "--config", str(self.config_path), *args]
        return [str(POLICYD), "--config", str(self.config_path), *args]

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 60.0) -> Policyd:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=log,
                                            stdin=subprocess.DEVNULL)
        try:
            wait_until(self.ready, timeout, "keyrelay-policyd to serve")
        except BaseException:
            self.kill()
            raise
        return self

    def ready(self) -> bool:
        """Every endpoint accepts, and the event loop completed a round trip.

        Connecting alone is not enough: the kernel accepts before the daemon's loop runs, and
        its signal handlers are installed only once every socket is bound. A policy round
        trip (a CONNECT-stage request is answered without a decision log line) proves the
        loop is running.
        """
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"keyrelay-policyd exited with {self.process.returncode}:\n"
                               + self.log())
        try:
            for service in SERVICES:
                if self.settings["policyd"].get(f"{service}_listen"):
                    connect(self.endpoint(service), timeout=1).close()
            if self.settings["policyd"].get("policy_listen"):
                with PolicyClient(connect(self.endpoint("policy"))) as client:
                    return client.ask(protocol_state="CONNECT") == "DUNNO"
            with DovecotClient(connect(self.endpoint("auth"))) as auth:
                return bool(auth.handshake())
        except OSError:
            return False

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then the exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def reload(self, timeout: float = 60.0) -> str:
        """SIGHUP; wait for the daemon to report the outcome, and return that log line."""
        mark = self.mark()
        self.signal(signal.SIGHUP)
        return self.wait_for_log(r"SIGHUP: configuration (not )?reloaded", since=mark,
                                 timeout=timeout)

    # -- the log --------------------------------------------------------------------------
    def log(self, since: int = 0) -> str:
        if not self.log_path.exists():  # never started
            return ""
        with self.log_path.open("rb") as handle:
            handle.seek(since)
            return handle.read().decode("utf-8", "backslashreplace")

    def mark(self) -> int:
        """The log's current size: pass as ``since`` to look only at what comes next."""
        return self.log_path.stat().st_size

    def tracebacks(self) -> list[str]:
        """Log lines that start a traceback, with the line before (what went wrong)."""
        lines = self.log().splitlines()
        return [f"{lines[i - 1]} / {line}" for i, line in enumerate(lines)
                if line.startswith("Traceback") and i]

    def log_lines(self, pattern: str, since: int = 0) -> list[str]:
        regex = re.compile(pattern)
        return [line for line in self.log(since).splitlines() if regex.search(line)]

    def wait_for_log(self, pattern: str, *, since: int = 0, timeout: float = 60.0) -> str:
        """The first complete log line matching ``pattern`` (decision lines are buffered)."""
        found: list[str] = []

        def appeared() -> bool:
            text = self.log(since)
            complete = text[: text.rfind("\n") + 1]
            found[:] = [line for line in complete.splitlines() if re.search(pattern, line)]
            return bool(found)

        wait_until(appeared, timeout, f"a log line matching {pattern!r} in {self.log_path}")
        return found[0]


def proc_status(pid: int, task: int | None = None) -> dict[str, str]:
    where = f"/proc/{pid}" if task is None else f"/proc/{pid}/task/{task}"
    lines = Path(f"{where}/status").read_text().splitlines()
    return {name: value.strip() for name, _, value in (line.partition(":") for line in lines)}


def capabilities_of_every_thread(pid: int) -> dict[int, dict[str, int]]:
    """Per thread of ``pid``: its capability sets (permitted, effective, inheritable,
    bounding, ambient) as numbers; capabilities are per thread."""
    found = {}
    for task in sorted(int(t) for t in os.listdir(f"/proc/{pid}/task")):
        status = proc_status(pid, task)
        found[task] = {name: int(status[name], 16) for name in
                       ("CapPrm", "CapEff", "CapInh", "CapBnd", "CapAmb")}
    return found


def populate_acme(daemon: Policyd, subusers: tuple[str, ...]) -> dict[str, str]:
    """Account acme (verified domain acme.example, key "main") and ``subusers``, each with the
    sender SUB@acme.example and a key of its own; their login identities by short name
    ("acme", then each subuser's name)."""
    identities: dict[str, str] = {}
    with daemon.directory().transaction() as data:
        admin.add_account(data, "acme", now())
        add_verified_domain(data, "acme", "acme.example")
        identities["acme"] = format_identity("acme", add_key(data, "acme", "main").key_id)
        for sub in subusers:
            admin.add_subuser(data, f"acme/{sub}", now())
            admin.add_sender(data, f"acme/{sub}", f"{sub}@acme.example", now())
            identities[sub] = format_identity(f"acme/{sub}",
                                              add_key(data, f"acme/{sub}", sub).key_id)
    return identities


P = TypeVar("P", bound=Policyd)


@contextlib.contextmanager
def policyd_on(store: str, root: Path, overrides: dict[str, Any], cls: type[P]
               ) -> Iterator[tuple[P, RedisServer | None]]:
    """A ``cls`` daemon (not started) in ``root`` whose counters, suppressions and pauses are
    in ``store``: "sqlite" (the files ``overrides`` names) or "redis" (a private
    redis-server, started here; the test is skipped without one). At the end: stopped,
    checked for tracebacks, the server closed."""
    server: RedisServer | None = None
    settings = dict(overrides)
    if store == "redis":
        if not REDIS_SERVER.exists():
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        server = RedisServer().start()
        settings["counters"] = server.counters_settings()
    daemon = cls(root, settings)
    try:
        yield daemon, server
        if daemon.running():
            assert daemon.stop() == 0, daemon.log()[-3000:]
        assert not daemon.tracebacks(), daemon.tracebacks()
    finally:
        if daemon.running():
            daemon.kill()
        if server is not None:
            server.close()
