"""The admin audit log: one line per change made with the ``keyrelay`` CLI.

Lines are appended with ``O_APPEND`` (atomic for a line this short) so concurrent CLI runs do not
interleave. Nothing secret is ever passed here: key ids, never keys.

A change must not happen unaudited: ``check`` is asked before the change is written and
refuses when the log cannot be appended to; ``record`` appends the line after it.
"""

from __future__ import annotations

import errno
import getpass
import json
import os
import sys
from datetime import datetime

from .errors import KeyrelayError


class AuditLogUnwritable(KeyrelayError):
    """The audit log cannot be appended to: the change is refused before it is made."""


def check(path: str) -> None:
    """Raise AuditLogUnwritable, saying why, unless a line can be appended to the log at
    ``path``: the file can be opened for appending, or, when it does not exist yet, the
    nearest folder above it that exists is one this user may create it in. Nothing is
    created here: a command refused for another reason leaves no empty log behind.

    A FIFO that nobody reads yet counts as writable: ``record`` waits for its reader, as
    for a log shipper started later.
    """
    if not path:
        return
    reason = None
    if os.path.lexists(path):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: a FIFO without a reader
                reason = exc.strerror or str(exc)
        else:
            os.close(fd)
    else:
        folder = os.path.dirname(os.path.abspath(path))
        while not os.path.lexists(folder):
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder):
            reason = f"{folder} is a file, not a folder"
        elif not os.access(folder, os.W_OK | os.X_OK):
            reason = f"it cannot be created in {folder} (permission denied or read-only)"
    if reason is not None:
        raise AuditLogUnwritable(
            f"cannot append to the audit log {path} (logging.audit_log): {reason}; nothing "
            "was changed (every change is audited)")


def record(path: str, now: datetime, action: str, **details: str) -> None:
    """Append one JSON line. The change is made by then: a log that cannot be written now
    (``check`` passed before) is a warning."""
    if not path:
        return
    entry = {"time": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "user": _user(), "action": action}
    entry.update(details)
    line = json.dumps(entry, sort_keys=False) + "\n"
    try:
        os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)
    except OSError as exc:
        print(f"keyrelay: warning: cannot write audit log {path}: {exc.strerror} (the change "
              f"{action} was made)", file=sys.stderr)


def _user() -> str:
    try:
        return os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
