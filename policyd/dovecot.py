"""The Dovecot authentication protocol, server side, as Postfix's ``smtpd_sasl_type = dovecot``
speaks it (docs/postfix-hooks.md section 1; Postfix ``xsasl_dovecot_server.c``).

Lines are TAB-separated fields ending in LF. On connect the server sends its handshake
(``VERSION``, ``MECH``..., ``SPID``, ``CUID``, ``COOKIE``, ``DONE``); the client sends
``VERSION 1 0`` and ``CPID <pid>``, then ``AUTH`` and ``CONT`` requests, each with its own id.
The server answers ``CONT <id> <base64>``, ``OK <id> user=<name>`` or ``FAIL <id> reason=...``.

This module turns lines into typed events and verdict parts back into lines; it knows nothing
about accounts or keys. Which user may log in is decided elsewhere.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from .errors import BadRequest
from .sasl import MECHANISMS, Challenge, Failure, Login, Plain, Step, decode_response

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 2
# Postfix uses one exchange at a time per connection, but never tells us when a client gives up
# ("*" or a dropped session): past this many unfinished exchanges the oldest is forgotten.
MAX_EXCHANGES = 16
_ID = re.compile(r"[0-9]{1,10}\Z")
# Protocol commands are short upper-case words; anything else is described, never echoed, as
# it may be part of a credential (errors.BadRequest).
_COMMAND = re.compile(r"[A-Z]{1,12}\Z")
# TAB, LF and the escape byte would break the line format; other controls are unreadable.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Attempt:
    """A finished exchange: credentials to decide on. ``password`` is never shown."""

    request_id: str
    mechanism: str
    username: str
    password: str = field(repr=False)
    client_address: str
    secured: bool
    service: str
    # the AUTH line's parameters but resp=, as Postfix sent them (service=, lip=, rip=,
    # secured...): what a login passed on to the site's Dovecot carries (policyd/siteauth.py)
    params: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Reply:
    """Bytes to send back at once: a challenge, or a failure of the exchange itself.

    ``failure`` is the reason of a failure (empty for a challenge), so it can be logged with
    the client's address.
    """

    data: bytes
    failure: str = ""
    mechanism: str = ""
    client_address: str = ""


def greeting(pid: int, connection_number: int, cookie: str) -> bytes:
    """The server handshake, sent as soon as a client connects."""
    lines = [f"VERSION\t{PROTOCOL_MAJOR}\t{PROTOCOL_MINOR}"]
    # "plaintext": the mechanisms send the password in clear, so Postfix offers them only
    # where smtpd_sasl_tls_security_options allow it (under TLS with noplaintext outside).
    lines += [f"MECH\t{name}\tplaintext" for name in MECHANISMS]
    lines += [f"SPID\t{pid}", f"CUID\t{connection_number}", f"COOKIE\t{cookie}", "DONE", ""]
    return "\n".join(lines).encode("ascii")


def ok(request_id: str, user: str) -> bytes:
    return f"OK\t{request_id}\tuser={_safe(user)}\n".encode()


def fail(request_id: str, reason: str) -> bytes:
    return f"FAIL\t{request_id}\treason={_safe(reason)}\n".encode()


def cont(request_id: str, data: bytes) -> bytes:
    return f"CONT\t{request_id}\t{base64.b64encode(data).decode('ascii')}\n".encode("ascii")


def _failed(request_id: str, reason: str, mechanism: str, client_address: str) -> Reply:
    return Reply(fail(request_id, reason), reason, mechanism, client_address)


def _safe(text: str) -> str:
    return _UNSAFE.sub(" ", text)


def _describe(command: str) -> str:
    if _COMMAND.match(command):
        return repr(command)
    return f"a line that is no command ({len(command)} characters)"


class LineReader:
    """Splits the byte stream into lines (LF, optional CR) of UTF-8 text without NULs.

    ``feed`` yields each complete line as soon as it is found, so a bad line later in the same
    piece of input does not stop the earlier ones from being answered. Only new bytes are
    searched: a line sent a byte at a time costs linear time.
    """

    def __init__(self, max_line: int) -> None:
        self._buffer = bytearray()
        self._searched = 0
        self._max = max_line

    @property
    def pending(self) -> bool:
        return bool(self._buffer)

    def feed(self, data: bytes) -> Iterator[str]:
        buffer: bytes | bytearray = data
        if self._buffer:
            self._buffer += data
            buffer = self._buffer
        start, search = 0, self._searched
        try:
            while True:
                end = buffer.find(b"\n", max(start, search))
                if end < 0:
                    break
                if end - start > self._max:
                    raise BadRequest(f"auth line longer than {self._max} bytes")
                line = bytes(buffer[start:end])
                start = end + 1
                yield _decode_line(line)
        finally:
            if start or buffer is not self._buffer:
                self._buffer = bytearray(buffer[start:])
            self._searched = len(self._buffer)
        if len(self._buffer) > self._max:
            raise BadRequest(f"auth line longer than {self._max} bytes")


def _decode_line(raw: bytes) -> str:
    if b"\0" in raw:
        raise BadRequest("auth line contains a NUL byte")
    try:
        return raw.decode("utf-8").removesuffix("\r")
    except UnicodeDecodeError:
        raise BadRequest("auth line is not UTF-8 text") from None


@dataclass(slots=True)
class _Exchange:
    mechanism: str
    machine: Plain | Login
    client_address: str
    secured: bool
    service: str
    params: tuple[str, ...]


class ServerSession:
    """The state of one client connection: handshake, then exchanges by request id."""

    def __init__(self) -> None:
        self._version_seen = False
        self._cpid_seen = False
        self._exchanges: dict[str, _Exchange] = {}

    def receive(self, line: str) -> Attempt | Reply | None:
        """Handle one line (without LF); raise ``BadRequest`` when the client broke protocol."""
        command, _, rest = line.partition("\t")
        if not self._version_seen:
            if command != "VERSION":
                raise BadRequest(f"expected the VERSION handshake first, got {_describe(command)}")
            major = rest.partition("\t")[0]
            if major != str(PROTOCOL_MAJOR):
                raise BadRequest(f"unsupported protocol major version {major[:10]!r}")
            self._version_seen = True
            return None
        if command == "CPID":
            self._cpid_seen = True
            return None
        if command in ("AUTH", "CONT") and not self._cpid_seen:
            raise BadRequest(f"{command} before the CPID handshake line")
        if command == "AUTH":
            return self._auth(rest.split("\t"))
        if command == "CONT":
            return self._cont(rest.split("\t"))
        raise BadRequest(f"unknown command {_describe(command)}")

    def _auth(self, fields: list[str]) -> Attempt | Reply:
        if len(fields) < 2 or not _ID.match(fields[0]):
            raise BadRequest("AUTH needs a numeric request id and a mechanism")
        request_id, mechanism = fields[0], fields[1].upper()
        if request_id in self._exchanges:
            raise BadRequest(f"AUTH reuses request id {request_id} still in progress")
        params: dict[str, str] = {}
        flags: set[str] = set()
        for item in fields[2:]:
            name, eq, value = item.partition("=")
            if eq:
                params[name] = value
            else:
                flags.add(name)
        factory = MECHANISMS.get(mechanism)
        if factory is None:
            return _failed(request_id, f"mechanism {mechanism[:20]} is not supported",
                           mechanism[:20], params.get("rip", ""))
        while len(self._exchanges) >= MAX_EXCHANGES:
            del self._exchanges[next(iter(self._exchanges))]  # the oldest, long abandoned
        exchange = _Exchange(
            mechanism=mechanism,
            machine=factory(),
            client_address=params.get("rip", ""),
            secured="secured" in flags,
            service=params.get("service", ""),
            params=tuple(item for item in fields[2:] if not item.startswith("resp=")),
        )
        initial: bytes | None = None
        if params.get("resp") == "=":
            initial = b""  # RFC 4954 section 4: "=" is an empty initial response
        elif "resp" in params:
            decoded = decode_response(params["resp"])
            if decoded is None:
                return _failed(request_id, "the initial response is not valid base64",
                               mechanism, exchange.client_address)
            initial = decoded
        return self._advance(request_id, exchange, exchange.machine.start(initial))

    def _cont(self, fields: list[str]) -> Attempt | Reply:
        if len(fields) != 2 or not _ID.match(fields[0]):
            raise BadRequest("CONT needs a request id and one base64 response")
        request_id, data = fields
        exchange = self._exchanges.pop(request_id, None)
        if exchange is None:
            raise BadRequest(f"CONT for request id {request_id}, which is not in progress")
        decoded = decode_response(data)
        if decoded is None:
            return _failed(request_id, "the response is not valid base64", exchange.mechanism,
                           exchange.client_address)
        return self._advance(request_id, exchange, exchange.machine.step(decoded))

    def _advance(self, request_id: str, exchange: _Exchange, step: Step) -> Attempt | Reply:
        if isinstance(step, Challenge):
            self._exchanges[request_id] = exchange
            return Reply(cont(request_id, step.data))
        if isinstance(step, Failure):
            return _failed(request_id, step.reason, exchange.mechanism, exchange.client_address)
        return Attempt(
            request_id=request_id,
            mechanism=exchange.mechanism,
            username=step.username,
            password=step.password,
            client_address=exchange.client_address,
            secured=exchange.secured,
            service=exchange.service,
            params=exchange.params,
        )
