"""API key text: generation, parsing and verification.

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
from dataclasses import dataclass

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
