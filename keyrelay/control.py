"""keyrelay-policyd's control socket: its line protocol, both ends of it, and the client the
``keyrelay lockout`` commands use (docs/policyd.md, "Reading and clearing lock-outs"), and
``keyrelay usage`` and ``keyrelay limits set`` with in-process counters (keyrelay/usagecounts.py).

One request per line, one answer ending in one status line::

    LIST                    ->  one JSON object per lock-out, then  OK <count>
    CLEAR KEY <key id>      ->  OK <lock-outs lifted>
    CLEAR ADDRESS <address> ->  OK <lock-outs lifted>
    CLEAR ALL               ->  OK <lock-outs lifted>
    PEEK <window> ...       ->  one JSON object per window, then  OK <count>
    anything else           ->  ERROR <what was wrong>

A ``PEEK`` window is the counter store's (keyrelay/counters/model.py) as ``subject:60s:limit``
(sliding, its seconds) or ``subject:day:limit`` (calendar, day or month); the answer is its
count now, nothing added (the store's ``peek``): ``{"window": "acme:day", "count": 5.0,
"limit": 50000, "resets_in": 3600.0}``. The CLI names the windows (the engine's
``windows_for`` over its own read of the directory), so the numbers are those of the limits it
is about to set, not only of those the daemon knows.

The daemon lives in ``policyd`` (policyd/control.py), which may import this module; the CLI
may not import ``policyd`` (docs/ARCHITECTURE.md, "Import rules"), so what both ends share is
here. Nothing secret crosses the socket: key ids, never keys.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import socket
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from . import keys, names
from .counters import Calendar, Sliding, Usage, Window
from .errors import KeyrelayError, UserError, printable
from .output import when

KINDS = ("address", "key")
MAX_LINE = 1024  # a request is a few dozen bytes (a PEEK of 8 windows under 800); longer is
# not ours
MAX_WINDOWS = 8  # a subuser's own minute, hour, day and month, and its account's
# a PEEK window's subject: an account or a subuser name (keyrelay/names.py)
_SUBJECT_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?(?:/[a-z0-9](?:[a-z0-9-]{0,30}"
                         r"[a-z0-9])?)?$")
_SLIDING_SECONDS = (60, 3600)
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
    """``LIST``, ``CLEAR`` of a ``kind`` (``key``, ``address`` or ``all``) and a subject, or
    ``PEEK`` of counter windows."""

    command: str
    kind: str = ""
    subject: str = ""
    windows: tuple[Window, ...] = ()

    def line(self) -> bytes:
        words = [self.command, self.kind.upper(), self.subject,
                 *(window_word(w) for w in self.windows)]
        return (" ".join(w for w in words if w) + "\n").encode("ascii")


USAGE = ("expected LIST, CLEAR KEY <key id>, CLEAR ADDRESS <address> or CLEAR ALL, or PEEK "
         "<subject>:<60s|3600s|day|month>:<limit> ...")


def window_word(window: Window) -> str:
    """A window as ``PEEK`` names it: ``acme/app:60s:100``, ``acme:day:50000``."""
    return f"{window.name}:{window.limit}"


def parse_window(word: str) -> Window:
    """A ``PEEK`` window; raises BadRequest."""
    subject, _, rest = word.partition(":")
    span, _, limit = rest.partition(":")
    if not _SUBJECT_RE.match(subject):
        raise BadRequest(f"PEEK: {_shown(subject)} is not an account or a subuser name")
    if not limit.isdigit() or len(limit) > 12:
        raise BadRequest(f"PEEK: {_shown(word)}: the limit is not a whole number")
    if span in ("day", "month"):
        return Calendar(subject, "day" if span == "day" else "month", int(limit))
    seconds = span.removesuffix("s")
    if span.endswith("s") and seconds.isdigit() and int(seconds) in _SLIDING_SECONDS:
        return Sliding(subject, int(seconds), int(limit))
    raise BadRequest(f"PEEK: {_shown(word)}: the window is not 60s, 3600s, day or month")


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
        case ["PEEK", *given] if 0 < len(given) <= MAX_WINDOWS:
            return Request("PEEK", windows=tuple(parse_window(word) for word in given))
        case ["PEEK", *_]:
            raise BadRequest(f"PEEK takes 1 to {MAX_WINDOWS} windows, each "
                             "<subject>:<60s|3600s|day|month>:<limit>")
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


def counts(found: list[Usage]) -> bytes:
    """The answer to ``PEEK``: each window's count, in the order asked."""
    lines = [json.dumps({"window": usage.window.name, "count": usage.count,
                         "limit": usage.limit, "resets_in": usage.resets_in}) + "\n"
             for usage in found]
    return "".join(lines).encode("utf-8") + ok(len(found))


# -- the client ------------------------------------------------------------------------------
def socket_path(endpoint: str, config_path: str) -> str:
    """The control socket's path from ``policyd.control_listen`` (``unix:/path``)."""
    if not endpoint:
        raise ControlError(f"{config_path}: {ENDPOINT_KEY} is empty: keyrelay-policyd serves "
                           "no control socket; set it (e.g. "
                           "unix:/run/keyrelay/policyd-control.sock) and restart "
                           "keyrelay-policyd")
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


def peek(path: str, windows: tuple[Window, ...], timeout: float = TIMEOUT) -> list[Usage]:
    """Each window's count in the daemon's counter store now (nothing added), in order."""
    lines, count = ask(path, Request("PEEK", windows=windows), timeout)
    if count != len(lines) or count != len(windows):
        raise ControlError(f"keyrelay-policyd announced {count} counts and sent {len(lines)} "
                           f"for the {len(windows)} windows asked")
    found = []
    try:
        for window, line in zip(windows, lines, strict=True):
            answer = json.loads(line)
            if answer["window"] != window.name:
                raise ValueError(f"window {answer['window']!r} where {window.name!r} was asked")
            used, resets_in = float(answer["count"]), float(answer["resets_in"])
            if not (math.isfinite(used) and math.isfinite(resets_in)):
                raise ValueError(f"{window.name}: not a number")
            found.append(Usage(window, used, window.limit, resets_in))
    except (ValueError, KeyError, TypeError) as exc:
        raise ControlError(f"keyrelay-policyd answered a count this keyrelay cannot read "
                           f"({exc}): are both the same version?") from None
    return found
