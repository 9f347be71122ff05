"""keyrelay-policyd's control socket: its line protocol, both ends of it, and the client the
``keyrelay lockout`` commands use (docs/policyd.md, "Reading and clearing lock-outs").

One request per line, one answer ending in one status line::

    LIST                    ->  one JSON object per lock-out, then  OK <count>
    CLEAR KEY <key id>      ->  OK <lock-outs lifted>
    CLEAR ADDRESS <address> ->  OK <lock-outs lifted>
    CLEAR ALL               ->  OK <lock-outs lifted>
    anything else           ->  ERROR <what was wrong>

The daemon lives in ``policyd`` (policyd/control.py), which may import this module; the CLI
may not import ``policyd`` (docs/ARCHITECTURE.md, "Import rules"), so what both ends share is
here. Nothing secret crosses the socket: key ids, never keys.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from . import keys, names
from .errors import KeyrelayError, UserError, printable
from .output import when

KINDS = ("address", "key")
MAX_LINE = 1024  # a request is a few dozen bytes; longer is not ours
TIMEOUT = 10.0  # seconds for an answer: the daemon answers from memory, at once
ENDPOINT_KEY = "policyd.control_listen"


class BadRequest(ValueError):
    """A control line the daemon does not take; the message is the whole ``ERROR`` answer,
    safe to send back (it repeats nothing that could be a secret)."""


class ControlError(KeyrelayError):
    """keyrelay-policyd's control socket cannot be reached, or refused the request."""


# -- the arguments ---------------------------------------------------------------------------
def key_id(text: str) -> str:
    """A key id as given to ``lockout clear --key``; a key or its secret pasted there is
    named as such and never repeated."""
    given = text.strip()
    if keys.KEY_ID_RE.match(given):
        return given
    keys.refuse_if_key(text, "keyrelay lockout list")
    raise UserError(f"{_shown(text)} is not a key id (16 characters a-z and 2-7; see: "
                    "keyrelay lockout list)")


def address(text: str) -> str:
    """A client address as given to ``lockout clear --address``: an IP address, or the IPv6
    /64 that ``lockout list`` shows (failures are counted per IPv6 /64). Canonical text."""
    given = text.strip()
    if "/" not in given:
        try:
            return str(names.ip_address(given))
        except UserError:
            raise UserError(f"{_shown(text)} is not an IP address (lock-outs are kept per IPv4 "
                            "address and per IPv6 /64; see: keyrelay lockout list)") from None
    try:
        network = ipaddress.ip_network(given, strict=False)
    except ValueError:
        network = None
    if network is None or not ((network.version == 6 and network.prefixlen == 64)
                               or network.prefixlen == network.max_prefixlen):
        raise UserError(f"{_shown(text)} is neither an IP address nor an IPv6 /64 (lock-outs "
                        "are kept per IPv4 address and per IPv6 /64; see: keyrelay lockout "
                        "list)")
    if network.prefixlen == network.max_prefixlen:
        return address(str(network.network_address))
    return str(network)


def _shown(text: str) -> str:
    """An argument quoted in an error: printable, short, and nothing that could be (part of)
    a secret (``keys.hide_secrets``, the CLI's rule)."""
    if keys.holds_secret(text):
        return "that argument"
    return repr(keys.hide_secrets(printable(text[:64]), [text]))


# -- requests --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Request:
    """``LIST``, or ``CLEAR`` of a ``kind`` (``key``, ``address`` or ``all``) and a subject."""

    command: str
    kind: str = ""
    subject: str = ""

    def line(self) -> bytes:
        words = [self.command, self.kind.upper(), self.subject]
        return (" ".join(w for w in words if w) + "\n").encode("ascii")


USAGE = ("expected LIST, CLEAR KEY <key id>, CLEAR ADDRESS <address> or CLEAR ALL")


def parse_request(raw: bytes) -> Request:
    """One request line, without its line feed; raises BadRequest."""
    try:
        text = raw.decode("ascii").removesuffix("\r")
    except UnicodeDecodeError:
        raise BadRequest(f"not ASCII: {USAGE}") from None
    words = text.split(" ")
    match words:
        case ["LIST"]:
            return Request("LIST")
        case ["CLEAR", "ALL"]:
            return Request("CLEAR", "all")
        case ["CLEAR", "KEY", subject]:
            try:
                return Request("CLEAR", "key", key_id(subject))
            except UserError as exc:
                raise BadRequest(str(exc)) from None
        case ["CLEAR", "ADDRESS", subject]:
            try:
                return Request("CLEAR", "address", address(subject))
            except UserError as exc:
                raise BadRequest(str(exc)) from None
        case ["CLEAR", *_]:
            raise BadRequest(f"CLEAR takes KEY <key id>, ADDRESS <address> or ALL: {USAGE}")
        case _:
            raise BadRequest(f"unknown command {_shown(words[0])}: {USAGE}")


# -- answers ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Lockout:
    """One lock-out in force, as ``LIST`` answers it."""

    kind: str  # "address" (an IPv4 address or IPv6 /64) or "key" (a key id)
    subject: str
    since: datetime
    until: datetime
    failures: int  # guesses that led to it, and those counted during it
    let_in_from: int | None = None  # a key: addresses where its owner still logs in

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "kind": self.kind, "subject": self.subject, "since": when(self.since),
            "until": when(self.until), "failures": self.failures,
        }
        if self.let_in_from is not None:
            found["let_in_from"] = self.let_in_from
        return found

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Lockout:
        return cls(str(data["kind"]), str(data["subject"]), _parse_time(data["since"]),
                   _parse_time(data["until"]), int(data["failures"]),
                   None if data.get("let_in_from") is None else int(data["let_in_from"]))


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def ok(count: int) -> bytes:
    return f"OK {count}\n".encode("ascii")


def error(text: str) -> bytes:
    return f"ERROR {printable(text)}\n".encode("utf-8", "backslashreplace")


def listing(lockouts: list[Lockout]) -> bytes:
    lines = [json.dumps(lockout.to_json()) + "\n" for lockout in lockouts]
    return "".join(lines).encode("utf-8") + ok(len(lockouts))


# -- the client ------------------------------------------------------------------------------
def socket_path(endpoint: str, config_path: str) -> str:
    """The control socket's path from ``policyd.control_listen`` (``unix:/path``)."""
    if not endpoint:
        raise ControlError(f"{config_path}: {ENDPOINT_KEY} is empty: keyrelay-policyd serves "
                           "no control socket; set it (e.g. unix:/run/keyrelay/policyd.sock) "
                           "and restart keyrelay-policyd")
    return endpoint.removeprefix("unix:")


def ask(path: str, request: Request, timeout: float = TIMEOUT) -> tuple[list[str], int]:
    """Send one request; the lines of the answer before its status, and the status's count.
    Raises ControlError with one line that says what to do."""
    where = f"keyrelay-policyd's control socket {path} ({ENDPOINT_KEY})"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(path)
            conn.sendall(request.line())
            answer = _read_answer(conn)
    except FileNotFoundError:
        raise ControlError(f"{where} does not exist: is keyrelay-policyd running? (systemctl "
                           "status keyrelay-policyd)") from None
    except ConnectionRefusedError:
        raise ControlError(f"{where} refuses connections: keyrelay-policyd is not running "
                           "(systemctl status keyrelay-policyd)") from None
    except PermissionError:
        raise ControlError(f"{where}: permission denied: run keyrelay as root, or as a member "
                           "of policyd.control_group") from None
    except TimeoutError:
        raise ControlError(f"{where} did not answer within {timeout:g}s") from None
    except OSError as exc:
        raise ControlError(f"{where}: {exc.strerror or exc}") from None
    *lines, status = answer
    if status.startswith("ERROR "):
        raise ControlError(f"keyrelay-policyd refused the request: {status[6:]}")
    count = status.removeprefix("OK ")
    if not status.startswith("OK ") or not count.isdigit():
        raise ControlError(f"{where} answered {status[:80]!r}, not OK or ERROR: is it "
                           "keyrelay-policyd's control socket?")
    return lines, int(count)


def _read_answer(conn: socket.socket) -> list[str]:
    """Lines up to and including the status line (``OK ...`` or ``ERROR ...``)."""
    buffer = b""
    lines: list[str] = []
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            raise ControlError("keyrelay-policyd closed the control connection before its "
                               "answer was complete")
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "backslashreplace")
            lines.append(line)
            if not line.startswith("{"):
                return lines


def list_lockouts(path: str, timeout: float = TIMEOUT) -> list[Lockout]:
    lines, count = ask(path, Request("LIST"), timeout)
    try:
        found = [Lockout.from_json(json.loads(line)) for line in lines]
    except (ValueError, KeyError, TypeError) as exc:
        raise ControlError(f"keyrelay-policyd answered a lock-out this keyrelay cannot read "
                           f"({exc}): are both the same version?") from None
    if len(found) != count:
        raise ControlError(f"keyrelay-policyd announced {count} lock-outs and sent "
                           f"{len(found)}")
    return found


def clear(path: str, kind: str, subject: str = "", timeout: float = TIMEOUT) -> int:
    """Lift lock-outs (``kind``: key, address or all); how many were in force."""
    return ask(path, Request("CLEAR", kind, subject), timeout)[1]
