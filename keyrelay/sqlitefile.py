"""A small SQLite file shared by keyrelay's processes on one node: the suppression list
(keyrelay/suppressions/sqlitestore.py) and the reputation guard's counts and pauses
(keyrelay/reputation/sqlitestore.py), with ``counters.backend: memory``.

Writers (the CLI, keyrelay-events) create the file; readers (keyrelay-policyd) never do: no
file reads as empty, and an empty file is a writer creating it this very moment. WAL mode
(kept in the file, set by the writers): readers never wait for the writer. A file replaced
under an open connection (a restored backup, a new file moved in) is opened again: one
``stat`` per use. As root (the CLI), the file and its WAL files go to the owner of their
folder, the daemons' user, who must be able to write the ``-shm`` to read. Every fault is the
store's own ``unavailable`` exception, one line naming the setting and the file.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

BUSY_TIMEOUT = 5.0  # seconds a writer waits for another writer
T = TypeVar("T")


class SqliteFile:
    """The connection, its lock and the file's faults; subclasses add their queries."""

    schema = ""  # CREATE TABLE IF NOT EXISTS ... (a writer runs it when it opens the file)
    probe = ""  # a table every reader checks exists (a file of something else: a fault)
    setting = ""  # the configuration key naming the file, for the fault's line

    def __init__(self, path: str, *, create: bool = True) -> None:
        self.path = path
        self.create = create
        self._db: sqlite3.Connection | None = None
        self._inode: tuple[int, int] | None = None  # the file the connection has open
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"

    def unavailable(self, message: str) -> Exception:
        """The store's own exception for a fault (a subclass names its type)."""
        raise NotImplementedError

    def _fault(self, exc: BaseException) -> Exception:
        reason = getattr(exc, "strerror", None) or str(exc)
        return self.unavailable(f"{self.setting}: cannot use {self.path}: {reason}")

    def _open(self) -> sqlite3.Connection | None:
        """The connection; None when the file does not exist and may not be created."""
        try:
            found = os.stat(self.path)
            inode: tuple[int, int] | None = (found.st_dev, found.st_ino) if (
                found.st_size or self.create) else None
        except FileNotFoundError:
            inode = None
        except OSError as exc:
            raise self._fault(exc) from None
        if self._db is not None and inode == self._inode:
            return self._db
        self._drop()
        if not self.create and inode is None:
            return None
        try:
            if self.create:
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                 check_same_thread=False)
            try:
                if self.create:
                    db.execute("PRAGMA journal_mode=WAL")
                    db.executescript(self.schema)
                db.execute(f"SELECT 1 FROM {self.probe} LIMIT 1").fetchall()  # noqa: S608
            except BaseException:
                db.close()
                raise
        except (sqlite3.Error, OSError) as exc:
            raise self._fault(exc) from None
        self._db = db
        if inode is None:  # created just now
            found = os.stat(self.path)
            inode = (found.st_dev, found.st_ino)
        self._inode = inode
        return db

    def _drop(self) -> None:
        db, self._db, self._inode = self._db, None, None
        if db is not None:
            try:
                db.close()
            except sqlite3.Error:
                pass

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            db = self._open()
            if db is None:
                return []
            try:
                return db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                self._drop()
                raise self._fault(exc) from None

    def _write(self, steps: Callable[[sqlite3.Connection], T]) -> T:
        """``steps(db)`` in one transaction, let go on any error; its result."""
        with self._lock:
            db = self._open()
            assert db is not None  # a writer creates the file
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    result = steps(db)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                self._give_to_folder_owner()
            except (sqlite3.Error, OSError) as exc:
                self._drop()
                raise self._fault(exc) from None
            return result

    def _give_to_folder_owner(self) -> None:
        if os.geteuid() != 0:
            return
        owner = os.stat(os.path.dirname(os.path.abspath(self.path)))
        for name in (self.path, self.path + "-wal", self.path + "-shm"):
            if os.path.exists(name):
                os.chown(name, owner.st_uid, owner.st_gid)

    def close(self) -> None:
        with self._lock:
            self._drop()
