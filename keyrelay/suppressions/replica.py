"""This node's copy of the suppression lists in Redis, for ``counters.on_unavailable: local``
(docs/suppressions.md, "The replica").

With ``local``, the counts go on in each process's memory while Redis is away; the
suppression lists, in Redis too, would have no stand-in, and every recipient of a keyrelay
login would get ``451 4.3.0``. So keyrelay-events (one per node) copies every account's list
from Redis into a SQLite file on local disk every ``suppressions.replica_interval``, and while
Redis is away keyrelay-policyd checks recipients against that copy, if it is younger than
``suppressions.replica_max_age``; an older copy, or none, is ``451 4.3.0`` as before. A
recipient is never accepted unchecked: at worst it is checked against a list that is
``replica_max_age`` old (copies fail too, e.g. while Redis is away). What the copy refuses
gets ``451 4.3.0`` too, never a 550: the copy may predate a removal only Redis knows of. Hard
bounces keyrelay-events reads while Redis is away are added to it (``add_to_replica``).

The copy is written whole into a new file beside it (``PATH.new``), synced, then renamed over
it: a reader's next look-up finds the new file (keyrelay/sqlitefile.py opens a replaced file
again) and never sees half a copy, also after a power loss. It is written without WAL, so
readers need no ``-shm`` file. The time of the copy is in the file (``replica_meta``), so its
age does not depend on the file's mtime.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import time
from collections.abc import Iterable, Iterator

from .model import Suppression
from .redisstore import RedisSuppressions
from .sqlitestore import _SCHEMA, SqliteSuppressions

_META = "CREATE TABLE replica_meta (name TEXT PRIMARY KEY, value REAL NOT NULL)"


class SuppressionReplica(SqliteSuppressions):
    """The copy, read by keyrelay-policyd (never created by it)."""

    probe = "replica_meta"
    setting = "suppressions.replica"

    def __init__(self, path: str) -> None:
        super().__init__(path, create=False)

    def lookup(self, account: str, address: str) -> tuple[float | None, Suppression | None]:
        """(when the copy was taken, ``address``'s suppression in it) from one file in one
        read: a copy renamed in between cannot mix two files. (None, None): no copy."""
        rows = self._read(
            "SELECT m.value, s.address, s.value FROM replica_meta AS m LEFT JOIN "
            "suppressions AS s ON s.account = ? AND s.address = ? "
            "WHERE m.name = 'copied_at'", (account, address))
        if not rows:
            return None, None
        copied, found, value = rows[0]
        return float(copied), (Suppression.from_value(found, value) if found else None)


@contextlib.contextmanager
def _new_copy(path: str, *, from_current: bool) -> Iterator[sqlite3.Connection]:
    """A connection to ``PATH.new`` (empty, or a copy of the current file), in a
    transaction; at the end committed, synced and renamed over ``path`` (``_settle``). On any
    error the new file is removed and the current one stays."""
    temporary = f"{path}.new"  # one writer per node; a copy killed half-way is replaced
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    try:
        if from_current:
            shutil.copyfile(path, temporary)
        db = sqlite3.connect(temporary, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=DELETE")
            db.execute("PRAGMA synchronous=OFF")  # synced once, whole, by _settle
            db.execute("BEGIN")
            yield db
            db.execute("COMMIT")
        finally:
            db.close()
        _settle(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def add_to_replica(path: str, suppressions: Iterable[tuple[str, Suppression]]) -> int:
    """A new copy made of the current one plus ``suppressions`` (account, suppression):
    what keyrelay-events learns while Redis is away (hard bounces), so that the copy
    policyd asks meanwhile holds them. The time of the copy stays that of its Redis read.
    None added without a copy (policyd then has none to ask either); the number added."""
    rows = [(account, s.address, s.value()) for account, s in suppressions]
    if not rows or not os.path.exists(path):
        return 0
    with _new_copy(path, from_current=True) as db:
        before = db.total_changes
        db.executemany("INSERT OR IGNORE INTO suppressions VALUES (?, ?, ?)", rows)
        return db.total_changes - before


def _settle(temporary: str, path: str) -> None:
    """``temporary`` made readable by the daemons' user, on disk, renamed to ``path``, and
    the rename on disk: after a power loss the path holds the old copy or the new one."""
    os.chmod(temporary, 0o640)
    folder = os.path.dirname(os.path.abspath(path))
    if os.geteuid() == 0:  # by hand as root: the daemons' user (the folder's) reads it
        owner = os.stat(folder)
        os.chown(temporary, owner.st_uid, owner.st_gid)
    fd = os.open(temporary, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_replica(path: str, source: RedisSuppressions, accounts: Iterable[str],
                  clock: float | None = None) -> int:
    """Copy ``accounts``' lists from ``source`` into ``path``; the number of suppressions.
    Raises ``SuppressionsUnavailable`` (Redis) or ``OSError``/``sqlite3.Error`` (the file),
    leaving the previous copy in place."""
    copied_at = time.time() if clock is None else clock
    total = 0
    with _new_copy(path, from_current=False) as db:
        for statement in (*_SCHEMA.split(";"), _META):
            if statement.strip():
                db.execute(statement)
        for account in accounts:
            rows = [(account, address, value) for address, value in source.entries(account)]
            db.executemany("INSERT OR REPLACE INTO suppressions VALUES (?, ?, ?)", rows)
            total += len(rows)
        db.execute("INSERT INTO replica_meta VALUES ('copied_at', ?)", (copied_at,))
    return total


__all__ = ["SuppressionReplica", "add_to_replica", "write_replica"]
