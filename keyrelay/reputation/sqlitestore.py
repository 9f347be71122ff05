"""The reputation guard's counts and pauses in a SQLite file (``counters.backend: memory``:
one node), ``reputation.path`` (docs/reputation.md, "Where the counts and pauses live").

keyrelay-events and the CLI write it and create it; keyrelay-policyd only reads the pauses
and never creates the file (no file: nothing paused). WAL mode: readers never wait for the
writer. A file replaced under a reader (a restored backup) is opened again: one ``stat``.
"""

from __future__ import annotations

import sqlite3

from ..sqlitefile import SqliteFile
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


class SqliteReputation(SqliteFile):
    """``model.ReputationStore`` in the SQLite file ``path`` (keyrelay/sqlitefile.py: the
    connection, its faults, the file's owner)."""

    schema = _SCHEMA
    probe = "pauses"
    setting = "reputation.path"

    def unavailable(self, message: str) -> Exception:
        return ReputationUnavailable(message)

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

