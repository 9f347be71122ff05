"""``keyrelay init``: the first step of a new install, an empty directory for the daemons.

Until something writes the directory there is no directory file, and the daemons refuse to
start without one (a missing file is far more often a typo in ``directory.path`` than a new
install). ``init`` writes it the way every other CLI write does (``Context.change``: under
its lock, atomically, audited; a new file and its lock belong to the folder's owner and
group, modes 0640 and 0660, so the daemons' user reads it through the folder's group). It
never changes an existing file. Then it makes the same checks as ``keyrelay check-config``
and the daemons' ``--check-config``: the directory (``keyrelay.directorycheck``) and, with
``counters.backend: redis``, Redis (``keyrelay.counters.check_counters``).
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
from typing import Any

from .. import daemon
from ..counters import check_counters
from ..directorycheck import check_directory
from ..errors import UserError
from .core import Context, command, warn


class _Exists(Exception):
    """Another ``init`` (or any write) made the file while this one waited for the lock."""


def init(ctx: Context, args: argparse.Namespace) -> None:
    settings = ctx.config.directory
    if settings.backend == "ldap":
        raise UserError(
            f"directory.backend is ldap ({settings.location}): there is no directory file "
            "to create; set the LDAP server up as docs/ldap.md describes (the schema, the "
            "base entry, the service DN and its ACLs), then the first keyrelay command that "
            "writes (e.g. `keyrelay account add`) makes the base a keyrelay directory; "
            "`keyrelay check-config` checks it")
    path = settings.path
    created = False
    if not os.path.exists(path):
        try:
            with ctx.change("directory.init", file=path):
                if os.path.exists(path):  # under the lock now: someone was quicker
                    raise _Exists
            created = True
        except _Exists:
            pass
    directory = check_directory(ctx.config)  # what check-config and the daemons check
    check_counters(ctx.config)  # Redis: a real connection, login and write, as check-config
    if created:
        ctx.say(f"created an empty directory {path} ({_owner_and_mode(path)})")
    else:
        ctx.say(f"{path} exists ({len(directory.accounts)} accounts); nothing changed")
    for problem in _unreadable_for_the_daemons(ctx, path):
        warn(problem)


def _owner_and_mode(path: str) -> str:
    st = os.stat(path)
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{user}:{group}, mode {st.st_mode & 0o777:04o}"


def _unreadable_for_the_daemons(ctx: Context, path: str) -> list[str]:
    """As root: what keeps policyd.user or milter.user from reading ``path`` (the daemons
    then refuse to start; ``keyrelay.daemon.check_directory_access`` says the same)."""
    if os.geteuid() != 0:
        return []
    problems = []
    settings: dict[str, list[str]] = {}
    for setting, user in (("policyd.user", ctx.config.policyd.user),
                          ("milter.user", ctx.config.milter.user)):
        if user not in daemon.ROOT_USERS:  # root reads everything: nothing to check
            settings.setdefault(user, []).append(setting)
    for user, named in settings.items():
        setting = " and ".join(named)
        try:
            pwd.getpwnam(user)
        except KeyError:
            problems.append(f"{setting}: no such user {user!r}; the daemons will not start "
                            "until it exists")
            continue
        if not daemon.accessible_as(user, path):
            problems.append(
                f"{setting} {user} cannot read {path}: give its folder "
                f"{os.path.dirname(os.path.abspath(path))} to that user's group (mode 0770: "
                "the policy daemon writes keys' last-used times there), then chgrp the file "
                "and its .lock too")
    return problems


def register(sub: Any) -> None:
    command(sub, "init", init,
            "a new install: create an empty directory file and its lock (nothing changes "
            "if it exists), then check it as check-config does")
