"""Typed errors for the faults keyrelay expects.

Front ends map these to answers in one place each: a ``UserError`` is the caller's mistake
(a permanent, explained refusal or CLI exit 1), a ``DirectoryUnavailable`` is our fault and
always becomes a temporary answer (DESIGN.md, "Decisions and what the client hears").
"""

from __future__ import annotations


class KeyrelayError(Exception):
    """Base class of every error keyrelay raises on purpose."""


class ConfigError(KeyrelayError):
    """A configuration (or directory) file is unreadable or invalid.

    The message always names the file, the key (dotted path) and the reason, so an admin can
    fix it without reading code.
    """

    def __init__(self, path: str, key: str, reason: str) -> None:
        self.path = path
        self.key = key
        self.reason = reason
        where = f"{path}: {key}: " if key else f"{path}: "
        super().__init__(where + reason)


class UserError(KeyrelayError):
    """A request the caller can fix: unknown name, duplicate, malformed value."""


class NotFound(UserError):
    """The named account, subuser, key, domain, sender or pool does not exist."""


class Conflict(UserError):
    """The request clashes with the directory's current state (duplicate, still in use)."""


class DirectoryUnavailable(KeyrelayError):
    """The directory cannot be read right now; every front end answers temporarily."""


class DirectoryConflict(KeyrelayError):
    """Someone else changed the directory during a transaction; nothing was written.

    Only backends without a writers' lock raise it (LDAP); the CLI runs the command again.
    """
