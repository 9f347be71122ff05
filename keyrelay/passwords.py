"""Legacy password hashes: the password bridge's credential (docs/migration.md, step 5).

A stored hash is a Dovecot passwd-file value, ``{SCHEME}hash``, kept exactly as Dovecot wrote
it. The schemes verified here, each with a maintained library:

- ``ARGON2ID`` and ``ARGON2I``: argon2-cffi (also what a sasldb2's plaintext secret is hashed
  with at import: nothing else makes a new hash);
- ``BLF-CRYPT`` (bcrypt ``$2y$``/``$2b$``/``$2a$``): bcrypt;
- ``SHA512-CRYPT`` and ``SHA256-CRYPT`` (``$6$``/``$5$``): passlib, pinned to 1.7.x. No other
  maintained library verifies SHA-crypt: ``crypt`` leaves the standard library in Python 3.13,
  and passlib is what Debian 12 ships (python3-passlib). It imports ``crypt`` itself, whose
  DeprecationWarning is silenced here.

No function here logs, and no error names the hash or the password.
"""

from __future__ import annotations

import warnings

import argon2
import bcrypt
from argon2.exceptions import VerificationError, VerifyMismatchError
from argon2.low_level import Type, verify_secret

from .errors import UserError

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from passlib.hash import sha256_crypt, sha512_crypt

# scheme -> the prefix its hash (after ``{SCHEME}``) starts with
SCHEMES: dict[str, tuple[str, ...]] = {
    "ARGON2ID": ("$argon2id$",),
    "ARGON2I": ("$argon2i$",),
    "BLF-CRYPT": ("$2y$", "$2b$", "$2a$"),
    "SHA512-CRYPT": ("$6$",),
    "SHA256-CRYPT": ("$5$",),
}
# Argon2id, RFC 9106's second recommended option (64 MiB, 3 passes, 4 lanes): what a
# plaintext secret of a sasldb2 becomes at import
_HASHER = argon2.PasswordHasher(time_cost=3, memory_cost=64 * 1024, parallelism=4)


def scheme_of(stored: str) -> str:
    """The scheme of a stored ``{SCHEME}hash``; a UserError that never quotes the hash."""
    if not stored.startswith("{") or "}" not in stored:
        raise UserError("expected a password hash written {SCHEME}hash, scheme one of "
                        + ", ".join(SCHEMES))
    scheme, _, rest = stored[1:].partition("}")
    scheme = scheme.upper()
    if scheme not in SCHEMES:
        # the scheme is not named: a plaintext password may start with braces
        raise UserError(f"the password scheme is not supported (one of {', '.join(SCHEMES)}; "
                        "a plaintext or weak scheme such as PLAIN or MD5-CRYPT cannot be used)")
    if not rest.startswith(SCHEMES[scheme]):
        raise UserError(f"the {scheme} hash is malformed (it should start with "
                        f"{' or '.join(SCHEMES[scheme])})")
    return scheme


def checked(stored: str) -> str:
    """``stored`` in normal form (the scheme upper-case), or a UserError."""
    scheme = scheme_of(stored)
    return "{" + scheme + "}" + stored.partition("}")[2]


def hash_plaintext(password: str) -> str:
    """A new ``{ARGON2ID}`` hash of a plaintext secret."""
    return "{ARGON2ID}" + _HASHER.hash(password)


class HashUnusable(Exception):
    """A stored hash that cannot be checked (malformed, truncated, or the library failed):
    our fault, never the client's; the message never quotes the hash."""


def verify(stored: str, password: str) -> bool:
    """Whether ``password`` matches ``stored`` (slow by design: call it off the event loop).
    False only for a password that does not match; ``HashUnusable`` for a stored hash that
    cannot be checked (a login then gets a temporary answer, and no guess is counted)."""
    try:
        scheme = scheme_of(stored)
    except UserError as exc:
        raise HashUnusable(str(exc)) from None
    value = stored.partition("}")[2]
    try:
        secret = password.encode("utf-8")
    except UnicodeEncodeError:
        return False  # not a password anyone set: a mismatch, the client's doing
    try:
        if scheme in ("ARGON2ID", "ARGON2I"):
            kind = Type.ID if scheme == "ARGON2ID" else Type.I
            return verify_secret(value.encode("ascii"), secret, kind)
        if scheme == "BLF-CRYPT":
            if len(value) != 60:  # a cut bcrypt hash would only ever mismatch
                raise ValueError("not 60 characters")
            return bool(bcrypt.checkpw(secret, value.encode("ascii")))
        handler = sha512_crypt if scheme == "SHA512-CRYPT" else sha256_crypt
        return bool(handler.verify(secret, value))
    except VerifyMismatchError:
        return False
    except (VerificationError, ValueError, UnicodeEncodeError) as exc:
        # argon2's other errors (a corrupt hash, memory), bcrypt's invalid salt, passlib's
        # malformed hash: not a mismatch
        raise HashUnusable(f"the {scheme} hash cannot be checked "
                           f"({type(exc).__name__})") from None
