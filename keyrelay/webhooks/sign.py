"""Signing a webhook delivery, and checking a signature as a receiver does (docs/webhooks.md,
"Checking the signature").

Every delivery carries ``X-Keyrelay-Signature: t=UNIX,v1=HEX``: ``UNIX`` is when it was
signed (whole seconds), ``HEX`` the HMAC-SHA256 of ``t + "." + body`` keyed with the
account's secret exactly as ``keyrelay webhook set`` printed it (its ASCII bytes).
``verify`` is written to be copied into a receiver as it is: the standard library only.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

HEADER = "X-Keyrelay-Signature"
SECRET_PREFIX = "krwhsec_"  # noqa: S105 - a prefix, not a secret
TOLERANCE = 300  # seconds: the replay window a receiver should keep
_SECRET = re.compile(r"[\x21-\x7e]{16,256}")  # printable ASCII, no space


def new_secret() -> str:
    """A new signing secret: the prefix and 32 random bytes in base64url (43 characters)."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def secret_problem(value: object) -> str | None:
    """Why ``value`` cannot be a signing secret (never quoting it), or None."""
    if not isinstance(value, str) or not _SECRET.fullmatch(value):
        return ("expected the signing secret `keyrelay webhook set` made: 16 to 256 printable "
                "ASCII characters without spaces")
    return None


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The header's value for ``body`` signed at ``timestamp`` (Unix seconds)."""
    mac = hmac.new(secret.encode("ascii"), f"{timestamp}.".encode("ascii") + body,
                   hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(secret: str, header: str, body: bytes, now: float,
           tolerance: int = TOLERANCE) -> bool:
    """True when ``header`` (the X-Keyrelay-Signature value) signs ``body`` (the raw request
    body, bytes as received) with ``secret``, at a time within ``tolerance`` seconds of
    ``now`` (Unix seconds): an older (or future) timestamp is refused, so a captured request
    cannot be replayed later. The comparison takes constant time."""
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit():
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value)
    if timestamp is None or not candidates or abs(now - timestamp) > tolerance:
        return False
    expected = hmac.new(secret.encode("ascii"), f"{timestamp}.".encode("ascii") + body,
                        hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected.encode("ascii"), c.encode("utf-8", "replace"))
               for c in candidates)
