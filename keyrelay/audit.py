"""The admin audit log: one line per change made with the ``keyrelay`` CLI.

Lines are appended with ``O_APPEND`` (atomic for a line this short) so concurrent CLI runs do not
interleave. Nothing secret is ever passed here: key ids, never keys.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from datetime import datetime


def record(path: str, now: datetime, action: str, **details: str) -> None:
    """Append one JSON line; a log that cannot be written is a warning, not a failure."""
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
        print(f"keyrelay: warning: cannot write audit log {path}: {exc.strerror}", file=sys.stderr)


def _user() -> str:
    try:
        return os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
