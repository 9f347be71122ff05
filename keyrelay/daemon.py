"""What every keyrelay daemon does the same way as a Unix process: report a fatal error in
one line, give its unix sockets to the right owner, and drop root once they are bound."""

from __future__ import annotations

import ctypes
import grp
import importlib
import logging
import os
import pwd
import socket
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from .directory import Directory
from .directorycheck import check_directory
from .errors import DirectoryUnavailable, one_line

if TYPE_CHECKING:
    from .config import Config


def fail(program: str, message: str) -> NoReturn:
    """One line on stderr, exit status 1: how every daemon reports a fatal error."""
    print(f"{program}: error: {one_line(message)}", file=sys.stderr)
    raise SystemExit(1)


_DOCS = {"policyd": "docs/policyd.md", "milter": "docs/milters.md"}
ROOT_USERS = ("", "root")  # ``*.user`` values that keep a daemon started as root root


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


_PR_CAPBSET_DROP = 24  # <linux/prctl.h>


def empty_bounding_set(user: str, log: logging.Logger) -> None:
    """As root with a ``user`` to become: empty the capability bounding set, first thing,
    while the process has one thread (the set is per thread; threads started later inherit
    it). Root keeps the capabilities it holds to bind and chown the sockets; once it has
    become ``user`` none can come back, not even through an executable's file capabilities.
    Needs CAP_SETPCAP (the units grant it); without it, a warning says so and the daemon
    goes on (dropping root still leaves it no capability)."""
    if user in ROOT_USERS or os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last + 1):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            error = ctypes.get_errno()
            log.warning("cannot empty the capability bounding set (prctl PR_CAPBSET_DROP: "
                        "%s): give the service CAP_SETPCAP in CapabilityBoundingSet=",
                        os.strerror(error))
            return


# Modules the daemons import inside a function (to break an import cycle), loaded before the
# daemon stops being root: once it runs as its user, the files of a virtual environment in a
# folder of mode 0700 (root's) are out of its reach, and a first import there would fail in
# the middle of a request (tests/test_import_rules.py checks that this list is complete).
LATE_IMPORTS = ("keyrelay.admin", "keyrelay.webhooks.sign", "keyrelay.webhooks.target",
                "keyrelay.suppressions.model", "keyrelay.directory.ldap")


def preload() -> None:
    """Import ``LATE_IMPORTS`` now."""
    for name in LATE_IMPORTS:
        importlib.import_module(name)


def drop_privileges(user: str, log: logging.Logger, setting: str = "user") -> None:
    """Become ``user`` (with its groups) once the sockets are bound; no-op unless root.
    Staying root (``user`` root or empty, ``setting`` names it) is allowed, with a warning.
    The modules the daemon would import later are loaded first (``LATE_IMPORTS``)."""
    preload()
    if os.geteuid() != 0:
        return
    if user in ROOT_USERS:
        log.warning("running as root (%s is %s): set it to an unprivileged user such as "
                    "keyrelay, the default; nothing in the daemon needs root once its "
                    "sockets exist", setting, repr(user) if not user else user)
        return
    entry = pwd.getpwnam(user)
    os.initgroups(user, entry.pw_gid)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    log.info("running as user %s (uid %d)", user, entry.pw_uid)


def accessible_as(user: str, path: str, write: bool = False) -> bool:
    """As root: could ``user`` read (and with ``write``, write) ``path``?

    Checked in a child process that becomes ``user``, so group memberships and ACLs count
    exactly as they will once the daemon has dropped privileges.
    """
    entry = pwd.getpwnam(user)
    pid = os.fork()
    if pid == 0:  # the child: become the user, ask the kernel, report by exit status
        try:
            os.initgroups(user, entry.pw_gid)
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            allowed = os.access(path, os.R_OK | (os.W_OK if write else 0))
        except BaseException:  # noqa: BLE001 - any failure means "no"; the child must exit
            allowed = False
        os._exit(0 if allowed else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


class StartupError(Exception):
    """Something a daemon checks before binding is wrong; the message says what to fix."""


def preflight(
    config: Config, section: str, user: str, socket_group: str, log: logging.Logger,
    records_use: bool = False,
) -> Directory:
    """The checks every daemon makes before binding (and for --check-config): the directory
    loads, the socket owner names resolve and, as root, the daemon's user can read the
    directory. Returns the snapshot; raises ``StartupError``."""
    try:
        snapshot = check_directory(config)  # the same check as `keyrelay check-config`
    except DirectoryUnavailable as exc:
        raise StartupError(str(exc)) from None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(user or "root")
        except KeyError:
            raise StartupError(
                f"{section}.user: no user {user} on this host: create it (adduser --system "
                f"--group {user}) and give it the directory and keys ({_DOCS[section]}, "
                f"\"Running unprivileged\"), or name another user"
            ) from None
        try:
            socket_owner(user, socket_group)
        except KeyError as exc:
            raise StartupError(
                f"{section}.user / {section}.socket_group: no such user or group: {exc}"
            ) from None
        try:
            if config.directory.backend == "ldap":
                secret = config.directory.ldap.bind_password_file
                if (user not in ROOT_USERS and config.directory.ldap.bind_dn
                        and not accessible_as(user, secret)):
                    raise PermissionError(
                        f"{section}.user {user} cannot read the LDAP bind password {secret} "
                        "(directory.ldap.bind_password_file): give it to that user's group, "
                        "mode 0640")
            else:
                check_directory_access(
                    user, config.directory.path, f"{section}.user", log, records_use
                )
        except PermissionError as exc:
            raise StartupError(str(exc)) from None
    return snapshot


def check_directory_access(
    user: str, path: str, setting: str, log: logging.Logger, records_use: bool = False
) -> None:
    """Fail when the daemon's user could not read the directory file (as root, user set);
    with ``records_use``, warn when it could not write keys' last-used times either."""
    if user in ROOT_USERS or os.geteuid() != 0:
        return
    if not accessible_as(user, path):
        raise PermissionError(
            f"{setting} {user} cannot read the directory {path}: give the file and its "
            f"folder to that user or its group (the CLI keeps the owner of an existing file)"
        )
    folder = os.path.dirname(os.path.abspath(path))
    if records_use and not accessible_as(user, folder, write=True):
        log.warning("%s %s cannot write in %s: keys' last-used times will not be recorded",
                    setting, user, folder)


def remove_stale_socket(path: str) -> None:
    """Remove a socket left by an earlier run, but never one that a live process serves."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(f"{path} is in use by another running process")
