"""API key text: generation, parsing and verification, and recognising a key (or its secret)
in what an admin typed, so that no error repeats it (``hide_secrets``).

A key reads ``kr.<key id>.<secret>``. The key id (16 base32 characters, 80 random bits) is public
and makes lookup O(1); the secret is 256 random bits from ``secrets`` (43 URL-safe base64
characters). Only SHA-256 of the secret is ever stored: for a 256-bit random token a slow KDF
adds nothing (docs/ARCHITECTURE.md, "Secrets"). Comparison is constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import UserError

KEY_PREFIX = "kr"
# \Z, not $: "$" also matches before a trailing newline, which would let "id\n" through
KEY_ID_RE = re.compile(r"^[a-z2-7]{16}\Z")
_SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{43}\Z")
SECRET_BYTES = 32


@dataclass(frozen=True, slots=True)
class NewKey:
    """A freshly generated key: the text to show once, and what may be stored."""

    key_id: str
    text: str
    secret_hash: str

    def __repr__(self) -> str:  # the full text must never reach a log through repr()
        return f"NewKey(key_id={self.key_id!r}, text=<redacted>)"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class PresentedKey:
    """A key as a client presented it, split into id and secret."""

    key_id: str
    secret: str

    def __repr__(self) -> str:
        return f"PresentedKey(key_id={self.key_id!r}, secret=<redacted>)"

    __str__ = __repr__


def new_key_id() -> str:
    return base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()


def generate(key_id: str | None = None) -> NewKey:
    """A new random key; pass ``key_id`` only to retry after an id collision."""
    kid = key_id or new_key_id()
    secret = secrets.token_urlsafe(SECRET_BYTES)
    return NewKey(key_id=kid, text=f"{KEY_PREFIX}.{kid}.{secret}", secret_hash=hash_secret(secret))


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def parse(text: str) -> PresentedKey | None:
    """Split a presented key, or ``None`` when it is not a well-formed keyrelay key."""
    prefix, _, rest = text.partition(".")
    key_id, _, secret = rest.partition(".")
    if prefix != KEY_PREFIX or not KEY_ID_RE.match(key_id) or not _SECRET_RE.match(secret):
        return None
    return PresentedKey(key_id=key_id, secret=secret)


def secret_matches(presented: PresentedKey, stored_hash: str) -> bool:
    """Constant-time check of a presented secret against the stored SHA-256 hex digest."""
    return hmac.compare_digest(hash_secret(presented.secret), stored_hash)


# -- a key in what an admin typed --------------------------------------------------------------
# A key pasted in any shape: whole, without its "kr." prefix, inside quotes or other text.
_PASTED = re.compile(
    r"(?<![A-Za-z0-9_-])(?:kr\.)?([a-z2-7]{16})\.([A-Za-z0-9_-]{43})(?![A-Za-z0-9_-])")
# Runs of the characters a secret is made of (URL-safe base64).
_RUN = re.compile(r"[A-Za-z0-9_-]+")
SECRET_LIKE = 20  # a typed run this long, mixing upper and lower case, may be a secret's part
WHOLE_SECRET_LIKE = 40  # a run this long, mixing cases, may be a whole secret (43 characters)
HIDDEN = "<hidden>"


def _mixed(run: str) -> bool:
    """Upper and lower case letters both: a secret's 43 random characters lack one of them
    with a chance of about 2 in 10^10; key ids, names, domains and config keys are lower
    case."""
    return any(c.isupper() for c in run) and any(c.islower() for c in run)


def pasted_key_id(text: str) -> str | None:
    """The key id of an API key pasted anywhere in ``text`` (whole, without its ``kr.``
    prefix, in quotes, with blanks around it), or ``None``."""
    found = _PASTED.search(text)
    return found[1] if found else None


def refuse_if_key(text: str, listing: str) -> None:
    """Raise ``UserError`` when ``text``, given where a key id belongs, is an API key (in any
    shape it was pasted) or could be a secret; the error never repeats it. ``listing``: the
    command that lists the key ids (``keyrelay key list``)."""
    pasted = pasted_key_id(text)
    if pasted is not None:
        raise UserError(f"that is an API key, not a key id; give only its id {pasted!r} "
                        "(the key was not shown or stored)")
    if holds_secret(text):
        raise UserError("that looks like an API key's secret, not a key id (16 characters "
                        f"a-z and 2-7; see: {listing}); it was not shown or stored")


def holds_secret(text: str) -> bool:
    """``text`` holds an API key, or a run of characters that could be a whole secret."""
    return pasted_key_id(text) is not None or any(
        len(run) >= WHOLE_SECRET_LIKE and _mixed(run) for run in _RUN.findall(text))


def hide_secrets(text: str, typed: Iterable[str] = ()) -> str:
    """``text`` (an error line) with everything that could be a secret replaced by
    ``<hidden>``: the one rule for what a program may repeat of what it was given.

    Hidden: every run of secret characters that could be a whole secret (``holds_secret``),
    and every run that shares 8 characters, in any case, with a run of ``typed`` (the
    command line) that could be (part of) a secret: 20 or more characters mixing upper and
    lower case. The second rule catches an echo that changed what was typed: a domain or an
    address is lower-cased, a duration's unit is cut out of its text.
    """
    grams: set[str] = set()
    for argument in typed:
        for run in _RUN.findall(argument):
            if len(run) >= SECRET_LIKE and _mixed(run):
                low = run.lower()
                grams.update(low[i:i + 8] for i in range(len(low) - 7))

    def hide(found: re.Match[str]) -> str:
        run = found[0]
        if len(run) >= WHOLE_SECRET_LIKE and _mixed(run):
            return HIDDEN
        low = run.lower()
        if any(low[i:i + 8] in grams for i in range(len(low) - 7)):
            return HIDDEN
        return run

    return _RUN.sub(hide, text)
