"""Suppressions in a SQLite file (``counters.backend: memory``: one node). The CLI and the
events daemon write it; keyrelay-policyd reads it with one indexed look-up per recipient
(docs/suppressions.md, "Where the list lives").

WAL mode: readers never wait for a writer. A file that does not exist yet holds no
suppressions (policyd never creates it); a file that exists but cannot be read is
``SuppressionsUnavailable``, which the policy service answers temporarily.
"""

from __future__ import annotations

import builtins
import sqlite3

from ..sqlitefile import SqliteFile
from .model import Suppression, SuppressionsUnavailable

_SCHEMA = """
CREATE TABLE IF NOT EXISTS suppressions (
    account TEXT NOT NULL,
    address TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (account, address)
) WITHOUT ROWID
"""


class SqliteSuppressions(SqliteFile):
    """``model.SuppressionStore`` in the SQLite file ``path`` (keyrelay/sqlitefile.py: the
    connection, its faults, the file's owner)."""

    schema = _SCHEMA
    probe = "suppressions"
    setting = "suppressions.path"

    def unavailable(self, message: str) -> Exception:
        return SuppressionsUnavailable(message)

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

    def _add(self, account: str, suppressions: builtins.list[Suppression],
             replace: bool) -> int:
        def steps(db: sqlite3.Connection) -> int:
            added = 0
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
            return added
        return self._write(steps)

    def add(self, account: str, suppression: Suppression, *, replace: bool = True) -> bool:
        return self._add(account, [suppression], replace) == 1

    def add_many(self, account: str, suppressions: builtins.list[Suppression]) -> int:
        return self._add(account, suppressions, True)

    def remove(self, account: str, address: str) -> bool:
        if not self.create and self._open() is None:
            return False  # no file: nothing suppressed

        def steps(db: sqlite3.Connection) -> int:
            return int(db.execute("DELETE FROM suppressions WHERE account = ? AND address = ?",
                                  (account, address)).rowcount)
        return self._write(steps) > 0
