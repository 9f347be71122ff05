"""The reputation guard's counts and pauses in a SQLite file (``counters.backend: memory``:
one node), ``reputation.path`` (docs/reputation.md, "Where the counts and pauses live").

keyrelay-events and the CLI write it and create it; keyrelay-policyd only reads the pauses
and never creates the file (no file: nothing paused). WAL mode: readers never wait for the
writer. A file replaced under a reader (a restored backup) is opened again: one ``stat``.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any

from .model import Increments, Pause, ReputationUnavailable

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counts (
    principal TEXT NOT NULL,
    bucket INTEGER NOT NULL,
    delivered INTEGER NOT NULL DEFAULT 0,
    bounced INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (principal, bucket)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS marks (
    node TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS pauses (
    principal TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""
BUSY_TIMEOUT = 5.0


class SqliteReputation:
    """``model.ReputationStore`` in the SQLite file ``path``."""

    def __init__(self, path: str, *, create: bool = True) -> None:
        self.path = path
        self.create = create
        self._db: sqlite3.Connection | None = None
        self._inode: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SqliteReputation({self.path!r})"

    def _fault(self, exc: BaseException) -> ReputationUnavailable:
        reason = getattr(exc, "strerror", None) or str(exc)
        return ReputationUnavailable(f"reputation.path: cannot use {self.path}: {reason}")

    def _open(self) -> sqlite3.Connection | None:
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
                    db.executescript(_SCHEMA)
                db.execute("SELECT 1 FROM pauses LIMIT 1").fetchall()
            except BaseException:
                db.close()
                raise
        except (sqlite3.Error, OSError) as exc:
            raise self._fault(exc) from None
        self._db = db
        if inode is None:
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

    def _write(self, steps: Any) -> Any:
        """Run ``steps(db)`` in one transaction; its result."""
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
        """As root (the CLI), the file and its WAL files go to the folder's owner (the
        daemons' user), as keyrelay/suppressions/sqlitestore.py does."""
        if os.geteuid() != 0:
            return
        owner = os.stat(os.path.dirname(os.path.abspath(self.path)))
        for name in (self.path, self.path + "-wal", self.path + "-shm"):
            if os.path.exists(name):
                os.chown(name, owner.st_uid, owner.st_gid)

    def mark(self, node: str) -> int:
        rows = self._read("SELECT seq FROM marks WHERE node = ?", (node,))
        return int(rows[0][0]) if rows else 0

    def record(self, node: str, upto: int, increments: Increments, oldest: int,
               window: float) -> bool:
        def steps(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT seq FROM marks WHERE node = ?", (node,)).fetchone()
            if row is not None and int(row[0]) >= upto:
                return False
            db.executemany(
                "INSERT INTO counts VALUES (?, ?, ?, ?) ON CONFLICT(principal, bucket) DO "
                "UPDATE SET delivered = delivered + excluded.delivered, "
                "bounced = bounced + excluded.bounced",
                [(p, b, n[0], n[1]) for (p, b), n in increments.items()])
            db.executemany("DELETE FROM counts WHERE principal = ? AND bucket < ?",
                           [(p, oldest) for p in {p for p, _ in increments}])
            db.execute("INSERT OR REPLACE INTO marks VALUES (?, ?)", (node, upto))
            return True
        return bool(self._write(steps))

    def counts(self, principals: list[str], oldest: int) -> dict[str, tuple[int, int]]:
        found = {p: (0, 0) for p in principals}
        for principal in principals:
            rows = self._read("SELECT COALESCE(SUM(delivered), 0), COALESCE(SUM(bounced), 0) "
                              "FROM counts WHERE principal = ? AND bucket >= ?",
                              (principal, oldest))
            if rows:
                found[principal] = (int(rows[0][0]), int(rows[0][1]))
        return found

    def pause(self, pause: Pause) -> bool:
        def steps(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT value FROM pauses WHERE principal = ?",
                             (pause.principal,)).fetchone()
            if row is not None and not (Pause.from_value(pause.principal, row[0]).monitor
                                        and not pause.monitor):
                return False
            db.execute("INSERT OR REPLACE INTO pauses VALUES (?, ?)",
                       (pause.principal, pause.value()))
            return True
        return bool(self._write(steps))

    def paused(self) -> dict[str, Pause]:
        return {str(p): Pause.from_value(str(p), str(v))
                for p, v in self._read("SELECT principal, value FROM pauses")}

    def get(self, principal: str) -> Pause | None:
        rows = self._read("SELECT value FROM pauses WHERE principal = ?", (principal,))
        return Pause.from_value(principal, str(rows[0][0])) if rows else None

    def resume(self, principal: str) -> Pause | None:
        if not self.create and self._open() is None:
            return None

        def steps(db: sqlite3.Connection) -> Pause | None:
            row = db.execute("SELECT value FROM pauses WHERE principal = ?",
                             (principal,)).fetchone()
            db.execute("DELETE FROM pauses WHERE principal = ?", (principal,))
            db.execute("DELETE FROM counts WHERE principal = ?", (principal,))
            return None if row is None else Pause.from_value(principal, str(row[0]))
        result: Pause | None = self._write(steps)
        return result

    def close(self) -> None:
        with self._lock:
            self._drop()
