"""SASL mechanisms PLAIN (RFC 4616) and LOGIN, as exchanges of base64 messages.

Pure state machines: no sockets, no accounts. An exchange is started with the client's
initial response (or ``None`` when it sent none) and stepped with each further response;
every step yields either a challenge to send, the credentials, or a failure reason.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Challenge:
    data: bytes  # raw bytes; the codec base64-encodes them


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = field(repr=False)  # never in a repr or a log


@dataclass(frozen=True, slots=True)
class Failure:
    reason: str  # tells the user what was wrong with the exchange itself


Step = Challenge | Credentials | Failure


def decode_response(text: str) -> bytes | None:
    """Strict base64 (no stray characters); ``None`` when it is not base64."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _text(raw: bytes, what: str) -> str | Failure:
    if b"\0" in raw:
        return Failure(f"the {what} contains a NUL byte")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return Failure(f"the {what} is not UTF-8 text")


class Mechanism(Protocol):
    def start(self, initial: bytes | None) -> Step: ...

    def step(self, response: bytes) -> Step: ...


class Plain:
    """RFC 4616: ``[authzid] NUL authcid NUL passwd`` in one message."""

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(b"")  # "334 " and wait for the message (RFC 4954 section 4)
        return self.step(initial)

    def step(self, response: bytes) -> Step:
        parts = response.split(b"\0")
        if len(parts) != 3:
            return Failure("malformed PLAIN message (expected authzid NUL user NUL password)")
        authzid, authcid, password = parts
        username = _text(authcid, "username")
        if isinstance(username, Failure):
            return username
        if authzid and authzid != authcid:
            # We authenticate API keys, not proxies: acting as someone else is not offered.
            return Failure("authorization identity (authzid) is not supported; leave it empty")
        secret = _text(password, "password")
        if isinstance(secret, Failure):
            return secret
        return Credentials(username, secret)


class Login:
    """The de-facto LOGIN mechanism: "Username:" then "Password:" challenges."""

    def __init__(self) -> None:
        self._username: str | None = None

    def start(self, initial: bytes | None) -> Step:
        if not initial:  # none, or "AUTH LOGIN =": ask, as Dovecot's mech-login.c does
            return Challenge(b"Username:")
        return self.step(initial)

    def step(self, response: bytes) -> Step:
        if self._username is None:
            username = _text(response, "username")
            if isinstance(username, Failure):
                return username
            self._username = username
            return Challenge(b"Password:")
        password = _text(response, "password")
        if isinstance(password, Failure):
            return password
        return Credentials(self._username, password)


MECHANISMS: dict[str, type[Plain] | type[Login]] = {"PLAIN": Plain, "LOGIN": Login}
