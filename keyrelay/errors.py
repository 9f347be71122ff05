"""Typed errors for the faults keyrelay expects.

Front ends map these to answers in one place each: a ``UserError`` is the caller's mistake
(a permanent, explained refusal or CLI exit 1), a ``DirectoryUnavailable`` is our fault and
always becomes a temporary answer (docs/ARCHITECTURE.md, "Failures"; docs/answers.md).
"""

from __future__ import annotations


class KeyrelayError(Exception):
    """Base class of every error keyrelay raises on purpose."""


class ConfigError(KeyrelayError):
    """A configuration (or directory) file is unreadable or invalid.

    The message always names the file, the key (dotted path) and the reason, so an admin can
    fix it without reading code: ``FILE:LINE: KEY.PATH: reason`` (keyrelay/yamlread.py adds
    the line; without one, or without a key, that part is left out).
    """

    def __init__(self, path: str, key: str, reason: str, line: int | None = None) -> None:
        self.path = path
        self.key = key
        self.reason = reason
        self.line = line
        # a file name or a YAML key may hold a newline or an escape sequence
        where = printable(path) + (f":{line}: " if line is not None else ": ")
        super().__init__(where + (f"{printable(key)}: " if key else "") + reason)


def printable(text: str) -> str:
    """``text`` with each character that is not printable escaped as Python writes it
    (``\\n``, ``\\x1b``, ``\\udcff`` for a byte that is not UTF-8): shown on a terminal or in
    the journal, it stays on its line and cannot drive the terminal."""
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


def one_line(message: str) -> str:
    """An error ``message`` as the one line the programs promise: its lines (PyYAML's
    messages have several) joined with "; ", every character printable."""
    return "; ".join(printable(line.strip()) for line in message.splitlines() if line.strip())


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
