"""The one check of the directory that every program makes before relying on it:
``keyrelay check-config``, ``keyrelay init`` (after it made the file), and each daemon's
``--check-config`` and start (``keyrelay.daemon.preflight``).

One function, so the checks cannot disagree: a directory file missing (a typo in
``directory.path``) was "OK ... 0 accounts" for the CLI while both daemons refused it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .directory import Directory, open_directory
from .errors import DirectoryUnavailable

if TYPE_CHECKING:
    from .config import Config


def missing_file(path: str) -> str:
    """The error of a directory file that does not exist, with the two ways out."""
    return (f"directory.path: {path} does not exist; create an empty directory with "
            "`keyrelay init`, or correct the path")


def check_directory(config: Config) -> Directory:
    """The directory the configuration names, read and validated now; raises
    ``DirectoryUnavailable`` (one line: the file, the key, the reason) when it is missing,
    unreadable or invalid, or LDAP cannot serve it."""
    if config.directory.backend == "ldap":
        # one read now, no refresher thread; a base that is no keyrelay directory yet is
        # refused with what to do (the first write makes it one)
        return Directory(open_directory(config).load())
    try:
        os.stat(config.directory.path)
    except FileNotFoundError:  # other errors: the backend's own message says which
        raise DirectoryUnavailable(missing_file(config.directory.path)) from None
    except OSError:
        pass
    return open_directory(config).snapshot()
