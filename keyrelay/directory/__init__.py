"""The account directory: data model, backend interface and the backends.

Every backend offers the same operations: ``snapshot()`` (a frozen ``Directory`` for the hot
path, cheap when nothing changed; raises ``DirectoryUnavailable``), ``load()`` (a fresh read),
``fresh_for_key()`` (a snapshot brought up to date when it lacks a key id that the backend
has: a key created a moment ago works at its first login; may block, bounded),
``transaction()`` (a context manager yielding ``DirectoryData`` to change; written back when
the block ends without an exception) and ``record_key_use()`` (the daemons' last-used
times, which no decision reads: the LDAP backend writes them without making every reader
reload). All rules about what a change may do live in ``keyrelay.admin``, once,
for every backend.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from .model import Directory, DirectoryData
from .yamlfile import YamlDirectory

if TYPE_CHECKING:
    from ..config import Config


class DirectoryBackend(Protocol):
    # True when a key id missing from snapshot() may still exist in the backend (a copy that
    # is refreshed in the background): the front ends then ask fresh_for_key before they
    # refuse a login as unknown. False: snapshot() is always current (the YAML file).
    reads_through: bool

    # told each time the copy is rebuilt (True) or could not be (False): the metrics
    on_reload: Callable[[bool], None] | None

    def snapshot(self) -> Directory: ...

    def fresh_for_key(self, key_id: str) -> Directory: ...

    def load(self, missing_ok: bool = False) -> DirectoryData: ...

    def transaction(self, create: bool = True) -> AbstractContextManager[DirectoryData]: ...

    def record_key_use(self, used: dict[str, datetime],
                       give_up: Callable[[], bool] | None = None) -> set[str]: ...


def open_directory(config: Config) -> DirectoryBackend:
    """The backend the configuration selects (``directory.backend``)."""
    if config.directory.backend == "ldap":
        # imported here: ldap3 is loaded only where LDAP is used
        from .ldap import LdapDirectory

        return LdapDirectory(config.directory.ldap)
    return YamlDirectory(config.directory.path)


__all__ = ["Directory", "DirectoryBackend", "DirectoryData", "YamlDirectory", "open_directory"]
