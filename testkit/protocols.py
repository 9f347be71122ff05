"""Clients that speak keyrelay-policyd's three wire protocols exactly as Postfix 3.7 does
(docs/policyd.md, "Wiring it into Postfix").

- ``DovecotClient``: the Dovecot auth handshake and ``AUTH`` lines of Postfix's
  xsasl_dovecot_server.c, with complete PLAIN and LOGIN exchanges;
- ``PolicyClient``: the exact policy attribute list of smtpd_check.c (``policy_request``);
- ``SocketmapClient``: socketmap netstrings (dict_sockmap.c);
- ``connect`` opens a socket to an endpoint in Postfix's notation (``inet:host:port``,
  ``unix:/path``), ``closed_by_peer`` waits for the peer to hang up.
"""

from __future__ import annotations

import base64
import itertools
import os
import socket
import time
from dataclasses import dataclass


# -- sockets ---------------------------------------------------------------------------------
def connect(endpoint: str, timeout: float = 30.0) -> socket.socket:
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


def closed_by_peer(sock: socket.socket, timeout: float = 30.0) -> bool:
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

    def __init__(self, sock: socket.socket, timeout: float = 30.0) -> None:
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

    def __init__(self, sock: socket.socket, timeout: float = 30.0) -> None:
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
# Every attribute Postfix 3.7.11 sends, in its order (smtpd_check.c).
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

    def __init__(self, sock: socket.socket, timeout: float = 30.0) -> None:
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
    def __init__(self, sock: socket.socket, timeout: float = 30.0) -> None:
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


def peer_name(sock: socket.socket) -> str:
    """How the daemon names this client connection in its log (``host:port`` or ``unix``)."""
    name = sock.getsockname()
    return f"{name[0]}:{name[1]}" if isinstance(name, tuple) else "unix"

