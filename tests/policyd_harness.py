"""Run the real ``keyrelay-policyd`` on real sockets and talk to it exactly as Postfix does.

- ``Policyd`` writes a configuration into a temporary folder (loopback TCP endpoints on free
  ports or unix sockets, ``socket_group: ""``), starts the daemon as a subprocess with its
  stderr in a log file, waits for readiness by connecting and completing a round trip (never a
  fixed sleep), and stops it with SIGTERM, returning the exit status.
- ``DovecotClient``, ``PolicyClient`` and ``SocketmapClient`` speak the three wire protocols as
  Postfix 3.7.11 does (POSTFIX-REFERENCE.md sections 1-3): the Dovecot handshake and ``AUTH``
  line of ``xsasl_dovecot_server.c``, the exact policy attribute list of ``smtpd_check.c``,
  and socketmap netstrings.
- ``add_key`` and friends fill a directory with ``keyrelay.admin`` inside a
  ``YamlDirectory.transaction()``, for tests that need many tenants quickly; tests that are
  about run-time changes use the real ``keyrelay`` CLI (``Policyd.keyrelay``).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import fcntl
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from keyrelay import admin
from keyrelay.directory import YamlDirectory
from keyrelay.directory.model import DirectoryData

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


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback TCP port free now and never handed out before in this process: the kernel
    may give the same free port to two calls in a row (slapd was once started with its ldap://
    and ldaps:// listeners on one port, and refused to start)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``condition`` until it is true; a readiness check with a deadline, not a sleep.

    The pause between polls starts at 20 ms and doubles up to 0.25 s, so a condition that
    costs something (an SMTP session, a login) is not asked thousands of times while a slow
    machine catches up."""
    deadline = time.monotonic() + timeout
    pause = 0.02
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(pause)
        pause = min(0.25, pause * 2)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied section by section (a copy)."""
    result = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = value
    return result


# -- sockets ---------------------------------------------------------------------------------
def connect(endpoint: str, timeout: float = 5.0) -> socket.socket:
    """A client socket to ``inet:host:port`` or ``unix:/path`` (Postfix's notation)."""
    if endpoint.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(endpoint[5:])
        except OSError:
            sock.close()
            raise
        return sock
    host, _, port = endpoint[5:].rpartition(":")
    return socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True when the peer closes (EOF or reset) within ``timeout``; anything sent is dropped."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False


class Stream:
    """Buffered reads from a socket; ``None`` means the peer closed the connection."""

    def __init__(self, sock: socket.socket, timeout: float = 5.0) -> None:
        self.sock = sock
        self.timeout = timeout
        self.buffer = b""
        self.eof = False

    def fill(self) -> bool:
        if self.eof:
            return False
        self.sock.settimeout(self.timeout)
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    def until(self, terminator: bytes) -> bytes | None:
        """Bytes up to and including ``terminator``."""
        while terminator not in self.buffer:
            if not self.fill():
                return None
        end = self.buffer.index(terminator) + len(terminator)
        chunk, self.buffer = self.buffer[:end], self.buffer[end:]
        return chunk

    def exactly(self, count: int) -> bytes | None:
        while len(self.buffer) < count:
            if not self.fill():
                return None
        chunk, self.buffer = self.buffer[:count], self.buffer[count:]
        return chunk

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


# -- Dovecot auth, as Postfix's xsasl_dovecot_server.c -----------------------------------------
@dataclass(frozen=True)
class AuthReply:
    """``OK``/``FAIL``/``CONT`` with its fields, or ``CLOSED`` when the server hung up."""

    status: str
    params: dict[str, str]
    data: str = ""  # the base64 of a CONT

    @property
    def user(self) -> str | None:
        return self.params.get("user")

    @property
    def reason(self) -> str:
        return self.params.get("reason", "")


def b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


class DovecotClient:
    """One smtpd process's connection to the auth service (reused across logins)."""

    def __init__(self, sock: socket.socket, timeout: float = 5.0) -> None:
        self.stream = Stream(sock, timeout)
        self.request_id = 0
        self.server: list[list[str]] = []

    def __enter__(self) -> DovecotClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.stream.close()

    def send_line(self, line: str) -> None:
        self.stream.send(line.encode() + b"\n")

    def read_line(self) -> str | None:
        raw = self.stream.until(b"\n")
        return None if raw is None else raw[:-1].decode()

    def handshake(self) -> list[str]:
        """Send VERSION and CPID at once (as Postfix does), read up to DONE; the mechanisms."""
        self.stream.send(f"VERSION\t1\t0\nCPID\t{os.getpid()}\n".encode())
        mechanisms = []
        while True:
            line = self.read_line()
            if line is None:
                raise ConnectionError("auth service closed the connection during the handshake")
            fields = line.split("\t")
            self.server.append(fields)
            if fields[0] == "MECH":
                mechanisms.append(fields[1])
            if fields[0] == "DONE":
                return mechanisms

    def auth(self, mechanism: str, *, rip: str, resp: str | None = None, secured: bool = True,
             lip: str = "127.0.0.1", service: str = "smtp") -> AuthReply:
        """``AUTH`` exactly as Postfix 3.7 formats it."""
        self.request_id += 1
        line = (f"AUTH\t{self.request_id}\t{mechanism}\tservice={service}\tnologin"
                f"\tlip={lip}\trip={rip}")
        if secured:
            line += "\tsecured"
        if resp is not None:
            line += f"\tresp={resp}"
        self.send_line(line)
        return self.reply()

    def cont(self, data: str) -> AuthReply:
        self.send_line(f"CONT\t{self.request_id}\t{data}")
        return self.reply()

    def reply(self) -> AuthReply:
        line = self.read_line()
        if line is None:
            return AuthReply("CLOSED", {})
        status, request_id, *rest = line.split("\t")
        assert request_id == str(self.request_id), line
        if status == "CONT":
            return AuthReply(status, {}, rest[0] if rest else "")
        params = dict(item.partition("=")[::2] for item in rest)
        return AuthReply(status, params)

    # -- complete logins, as an SMTP client drives them through smtpd --------------------
    def plain(self, username: str, password: str, *, rip: str, initial: bool = True) -> AuthReply:
        message = b64(f"\0{username}\0{password}")
        if initial:
            return self.auth("PLAIN", rip=rip, resp=message)
        challenge = self.auth("PLAIN", rip=rip)
        assert challenge.status == "CONT" and challenge.data == "", challenge
        return self.cont(message)

    def login(self, username: str, password: str, *, rip: str, initial: bool = False) -> AuthReply:
        if initial:
            challenge = self.auth("LOGIN", rip=rip, resp=b64(username))
        else:
            challenge = self.auth("LOGIN", rip=rip)
            assert challenge.status == "CONT", challenge
            assert base64.b64decode(challenge.data) == b"Username:", challenge
            challenge = self.cont(b64(username))
        assert challenge.status == "CONT", challenge
        assert base64.b64decode(challenge.data) == b"Password:", challenge
        return self.cont(b64(password))


# -- policy delegation, as Postfix's smtpd_check.c check_policy_service() -----------------------
# Every attribute Postfix 3.7.11 sends, in its order (POSTFIX-REFERENCE.md section 2).
POLICY_ATTRIBUTES = (
    "request", "protocol_state", "protocol_name", "client_address", "client_name", "client_port",
    "reverse_client_name", "server_address", "server_port", "helo_name", "sender", "recipient",
    "recipient_count", "queue_id", "instance", "size", "etrn_domain", "stress", "sasl_method",
    "sasl_username", "sasl_sender", "ccert_subject", "ccert_issuer", "ccert_fingerprint",
    "ccert_pubkey_fingerprint", "encryption_protocol", "encryption_cipher",
    "encryption_keysize", "policy_context",
)
_instances = itertools.count(1)


def new_instance() -> str:
    """A value like Postfix's per-message ``instance`` attribute."""
    return f"{os.getpid():x}.{int(time.time()):x}.{next(_instances)}.0"


def policy_request(**values: str) -> dict[str, str]:
    """A complete request as a submission smtpd sends it over TLS (override what matters)."""
    request = {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "protocol_name": "ESMTP",
        "client_address": "192.0.2.10",
        "client_name": "unknown",
        "client_port": "41234",
        "reverse_client_name": "unknown",
        "server_address": "127.0.0.1",
        "server_port": "587",
        "helo_name": "app.client.example",
        "sender": "",
        "recipient": "rcpt@example.net",
        "recipient_count": "0",
        "queue_id": "",
        "instance": new_instance(),
        "size": "0",
        "etrn_domain": "",
        "stress": "",
        "sasl_method": "",
        "sasl_username": "",
        "sasl_sender": "",
        "ccert_subject": "",
        "ccert_issuer": "",
        "ccert_fingerprint": "",
        "ccert_pubkey_fingerprint": "",
        "encryption_protocol": "TLSv1.3",
        "encryption_cipher": "TLS_AES_256_GCM_SHA384",
        "encryption_keysize": "256",
        "policy_context": "",
    }
    unknown = set(values) - set(request)
    if unknown:
        raise ValueError(f"Postfix 3.7 sends no attribute {sorted(unknown)}")
    request.update(values)
    return request


def encode_policy(request: dict[str, str]) -> bytes:
    return "".join(f"{name}={value}\n" for name, value in request.items()).encode() + b"\n"


class PolicyClient:
    """One smtpd process's persistent connection to the policy service."""

    def __init__(self, sock: socket.socket, timeout: float = 5.0) -> None:
        self.stream = Stream(sock, timeout)

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stream.close()

    def send(self, request: dict[str, str]) -> None:
        self.stream.send(encode_policy(request))

    def read_action(self) -> str | None:
        """The ``action=`` value of the next reply; ``None`` when the server hung up."""
        block = self.stream.until(b"\n\n")
        if block is None:
            return None
        attributes = dict(line.partition("=")[::2] for line in block.decode().split("\n") if line)
        return attributes["action"]

    def ask(self, **values: str) -> str | None:
        self.send(policy_request(**values))
        return self.read_action()


# -- socketmap, as Postfix's dict_sockmap.c ----------------------------------------------------
def netstring(payload: bytes) -> bytes:
    return b"%d:%s," % (len(payload), payload)


class SocketmapClient:
    def __init__(self, sock: socket.socket, timeout: float = 5.0) -> None:
        self.stream = Stream(sock, timeout)

    def __enter__(self) -> SocketmapClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stream.close()

    def lookup(self, name: str, key: str) -> str | None:
        """The reply payload (``OK ...``, ``NOTFOUND ``, ``TEMP ...``, ``PERM ...``)."""
        self.stream.send(netstring(f"{name} {key}".encode()))
        header = self.stream.until(b":")
        if header is None:
            return None
        length = int(header[:-1])
        payload = self.stream.exactly(length + 1)
        if payload is None:
            return None
        assert payload.endswith(b","), payload
        return payload[:-1].decode()


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
        self.base: dict[str, Any] = {
            "directory": {"path": str(self.directory_path)},
            "dkim": {"key_dir": str(root / "dkim")},
            "logging": {"audit_log": str(root / "audit.log")},
            "policyd": {**listen, "socket_group": ""},
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

    def start(self, timeout: float = 20.0) -> Policyd:
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

    def reload(self, timeout: float = 10.0) -> str:
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

    def wait_for_log(self, pattern: str, *, since: int = 0, timeout: float = 10.0) -> str:
        """The first complete log line matching ``pattern`` (decision lines are buffered)."""
        found: list[str] = []

        def appeared() -> bool:
            text = self.log(since)
            complete = text[: text.rfind("\n") + 1]
            found[:] = [line for line in complete.splitlines() if re.search(pattern, line)]
            return bool(found)

        wait_until(appeared, timeout, f"a log line matching {pattern!r} in {self.log_path}")
        return found[0]


def peer_name(sock: socket.socket) -> str:
    """How the daemon names this client connection in its log (``host:port`` or ``unix``)."""
    name = sock.getsockname()
    return f"{name[0]}:{name[1]}" if isinstance(name, tuple) else "unix"


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
