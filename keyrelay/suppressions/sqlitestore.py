"""Suppressions in a SQLite file (``counters.backend: memory``: one node). The CLI and the
events daemon write it; keyrelay-policyd reads it with one indexed look-up per recipient
(docs/suppressions.md, "Where the list lives").

WAL mode: readers never wait for a writer. A file that does not exist yet holds no
suppressions (policyd never creates it); a file that exists but cannot be read is
``SuppressionsUnavailable``, which the policy service answers temporarily.
"""

from __future__ import annotations

import builtins
import os
import sqlite3
import threading

from .model import Suppression, SuppressionsUnavailable

_SCHEMA = """
CREATE TABLE IF NOT EXISTS suppressions (
    account TEXT NOT NULL,
    address TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (account, address)
) WITHOUT ROWID
"""
BUSY_TIMEOUT = 5.0  # seconds a writer waits for another writer


class SqliteSuppressions:
    """``model.SuppressionStore`` in the SQLite file ``path``."""

    def __init__(self, path: str, *, create: bool = True) -> None:
        self.path = path
        self.create = create
        self._db: sqlite3.Connection | None = None
        self._inode: tuple[int, int] | None = None  # the file the connection has open
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SqliteSuppressions({self.path!r})"

    def _fault(self, exc: BaseException) -> SuppressionsUnavailable:
        reason = getattr(exc, "strerror", None) or str(exc)
        return SuppressionsUnavailable(f"suppressions.path: cannot use {self.path}: {reason}")

    def _open(self) -> sqlite3.Connection | None:
        """The connection; None when the file does not exist and may not be created. A file
        replaced since it was opened (a restored backup, a new file moved in) is opened
        again: one ``stat`` per look-up."""
        try:
            found = os.stat(self.path)
            # an empty file: a writer creating it this very moment, nothing in it yet
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
                folder = os.path.dirname(os.path.abspath(self.path))
                os.makedirs(folder, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                 check_same_thread=False)
            try:
                if self.create:  # WAL is kept in the file: the writers set it
                    db.execute("PRAGMA journal_mode=WAL")
                    db.execute(_SCHEMA)
                db.execute("SELECT 1 FROM suppressions LIMIT 1").fetchall()
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

    def _read(self, sql: str, args: tuple[object, ...]) -> builtins.list[tuple[str, str]]:
        with self._lock:
            db = self._open()
            if db is None:
                return []
            try:
                return db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                self._drop()
                raise self._fault(exc) from None

    def _drop(self) -> None:
        db, self._db, self._inode = self._db, None, None
        if db is not None:
            try:
                db.close()
            except sqlite3.Error:
                pass

    def get(self, account: str, address: str) -> Suppression | None:
        rows = self._read("SELECT address, value FROM suppressions WHERE account = ? AND "
                          "address = ?", (account, address))
        return Suppression.from_value(*rows[0]) if rows else None

    def list(self, account: str, after: str = "", limit: int = 1000) -> list[Suppression]:
        rows = self._read("SELECT address, value FROM suppressions WHERE account = ? AND "
                          "address > ? ORDER BY address LIMIT ?", (account, after, limit))
        return [Suppression.from_value(*row) for row in rows]

    def count(self, account: str) -> int:
        rows = self._read("SELECT count(*), '' FROM suppressions WHERE account = ?",
                          (account,))
        return int(rows[0][0])

    def _write(self, account: str, suppressions: builtins.list[Suppression],
               replace: bool) -> int:
        with self._lock:
            db = self._open()
            assert db is not None  # a writer creates the file
            added = 0
            try:
                db.execute("BEGIN IMMEDIATE")
                for each in suppressions:
                    row = db.execute("SELECT value FROM suppressions WHERE account = ? AND "
                                     "address = ?", (account, each.address)).fetchone()
                    if row is None:
                        db.execute("INSERT INTO suppressions VALUES (?, ?, ?)",
                                   (account, each.address, each.value()))
                        added += 1
                    elif replace:
                        old = Suppression.from_value(each.address, row[0])
                        kept = Suppression(each.address, each.reason, each.status,
                                           old.created, old.source)
                        db.execute("UPDATE suppressions SET value = ? WHERE account = ? AND "
                                   "address = ?", (kept.value(), account, each.address))
                db.execute("COMMIT")
                self._give_to_folder_owner()
            except (sqlite3.Error, SuppressionsUnavailable) as exc:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                if isinstance(exc, SuppressionsUnavailable):
                    raise
                self._drop()
                raise self._fault(exc) from None
            except BaseException:  # anything else (a stored value keyrelay cannot read): the
                try:               # transaction and its write lock are let go all the same
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise
            return added

    def _give_to_folder_owner(self) -> None:
        """As root (the CLI), the file and its WAL files belong to the owner of their folder
        (the daemons' user), as the directory file does (keyrelay/directory/yamlfile.py):
        keyrelay-policyd, reading as that user, must be able to write the ``-shm``."""
        if os.geteuid() != 0:
            return
        try:
            owner = os.stat(os.path.dirname(os.path.abspath(self.path)))
            for name in (self.path, self.path + "-wal", self.path + "-shm"):
                if os.path.exists(name):
                    os.chown(name, owner.st_uid, owner.st_gid)
        except OSError as exc:
            raise self._fault(exc) from None

    def add(self, account: str, suppression: Suppression, *, replace: bool = True) -> bool:
        return self._write(account, [suppression], replace) == 1

    def add_many(self, account: str, suppressions: builtins.list[Suppression]) -> int:
        return self._write(account, suppressions, True)

    def remove(self, account: str, address: str) -> bool:
        with self._lock:
            db = self._open()
            if db is None:  # no file: nothing suppressed
                return False
            try:
                gone = db.execute("DELETE FROM suppressions WHERE account = ? AND address = ?",
                                  (account, address)).rowcount
                self._give_to_folder_owner()
            except sqlite3.Error as exc:
                self._drop()
                raise self._fault(exc) from None
            return gone > 0

    def close(self) -> None:
        with self._lock:
            self._drop()
