"""What every keyrelay daemon does the same way as a Unix process: report a fatal error in
one line, give its unix sockets to the right owner, and drop root once they are bound."""

from __future__ import annotations

import grp
import logging
import os
import pwd
import sys
from typing import NoReturn


def fail(program: str, message: str) -> NoReturn:
    """One line on stderr, exit status 1: how every daemon reports a fatal error."""
    print(f"{program}: error: {message}", file=sys.stderr)
    raise SystemExit(1)


def socket_owner(user: str, group: str) -> tuple[int, int] | None:
    """(uid, gid) to give unix sockets when running as root, else ``None``.

    ``user`` empty: root keeps them; ``group`` empty: the daemon's own group. Raises
    ``KeyError`` for an unknown user or group.
    """
    if os.geteuid() != 0:
        return None
    uid = pwd.getpwnam(user).pw_uid if user else 0
    gid = grp.getgrnam(group).gr_gid if group else os.getegid()
    return uid, gid


def drop_privileges(user: str, log: logging.Logger) -> None:
    """Become ``user`` (with its groups) once the sockets are bound; no-op unless root."""
    if not user or os.geteuid() != 0:
        return
    entry = pwd.getpwnam(user)
    os.initgroups(user, entry.pw_gid)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    log.info("running as user %s (uid %d)", user, entry.pw_uid)
