"""The events' SQLite file: outbox, log position and correlation state (docs/events.md,
"Exactly once").

One transaction per batch writes the batch's events, the position after its last line and
the correlation entries it changed. After a crash the file holds either all of a batch or none
of it, and the follower starts again from the position that matches the events and the state
it holds: nothing is emitted twice, nothing is skipped. WAL journal, ``synchronous=NORMAL``:
a commit is one WAL append and no fsync; a power loss may lose the last batches, together
with their position, so they are read again. ``event_id`` is also unique in the table, so a
batch read twice could never add an event twice.

The outbox rows carry what the webhook sender (a later change) needs: the account, a delivery
state (``pending``), the attempts so far and the time of the next attempt.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2  # 2: events.first_failure (the webhook outbox's retry_for)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    account TEXT,
    event TEXT NOT NULL,
    created REAL NOT NULL,
    body TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    first_failure REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS events_pending ON events (state, next_attempt);
CREATE TABLE IF NOT EXISTS position (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS correlation (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS suppress_queue (
    seq INTEGER PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class StoreError(Exception):
    """The state file cannot be used (not SQLite, a newer schema): one line for the admin."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Where reading stopped: the file (device, inode, the hash naming its first line) and
    the offset of the first byte not yet read (always just after a line feed); or, reading
    the journal (journal.py), ``source`` ``journal`` and the cursor of the last entry read."""

    device: int
    inode: int
    source: str
    offset: int
    cursor: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Checkpoint:
        data = json.loads(text)
        return cls(int(data["device"]), int(data["inode"]), str(data["source"]),
                   int(data["offset"]), str(data.get("cursor", "")))


@dataclass(frozen=True, slots=True)
class Pending:
    """An event waiting in the outbox, with its delivery state so far."""

    seq: int
    account: str
    attempts: int  # failed deliveries so far
    first_failure: float  # Unix seconds of the first failed delivery, 0: none yet
    created: float  # when the event was written
    event: dict[str, Any]


class EventStore:
    """The SQLite file; one instance per process (the follower is its only writer)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self.db = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
            row = self.db.execute("SELECT value FROM meta WHERE name='schema'").fetchone()
            if row is None:
                self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StoreError(f"{self.path}: schema version {row[0]} is newer than this "
                                 f"keyrelay's ({SCHEMA_VERSION})")
            elif int(row[0]) < 2:  # version 1 had no first_failure
                columns = {str(c[1]) for c in self.db.execute("PRAGMA table_info(events)")}
                if "first_failure" not in columns:
                    self.db.execute("ALTER TABLE events ADD COLUMN first_failure REAL NOT NULL "
                                    "DEFAULT 0")
                self.db.execute("UPDATE meta SET value = ? WHERE name = 'schema'",
                                (str(SCHEMA_VERSION),))
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: not a usable events state file ({exc})") from None

    def close(self) -> None:
        self.db.close()

    def checkpoint(self) -> Checkpoint | None:
        row = self.db.execute("SELECT body FROM position WHERE id = 1").fetchone()
        return None if row is None else Checkpoint.from_json(row[0])

    def correlation(self) -> list[tuple[str, str]]:
        return [(str(k), str(v)) for k, v in self.db.execute("SELECT key, value FROM correlation")]

    def counters(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.db.execute("SELECT name, value FROM counters")}

    def commit(self, events: Sequence[dict[str, Any]], checkpoint: Checkpoint | None,
               changes: Iterable[tuple[str, str | None]], counts: dict[str, int],
               now: float) -> int:
        """Write one batch in one transaction; returns how many events were new. Each new
        event adds one to the counter ``event_<kind>`` (keyrelay_events_total,
        keyrelay/events/metrics.py); one already stored (a replay) adds nothing."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            added = 0
            counts = dict(counts)
            for e in events:
                if db.execute(
                        "INSERT OR IGNORE INTO events (event_id, account, event, created, body)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (e["event_id"], e.get("account"), e["event"], now,
                         json.dumps(e, separators=(",", ":")))).rowcount:
                    added += 1
                    name = f"event_{e['event']}"
                    counts[name] = counts.get(name, 0) + 1
            hard = [e["event_id"] for e in events
                    if e.get("event") == "bounce" and e.get("type") == "hard"]
            if hard:  # queued in the same transaction: a hard bounce is never left unsuppressed
                db.executemany("INSERT OR IGNORE INTO suppress_queue SELECT seq FROM events"
                               " WHERE event_id = ?", [(event_id,) for event_id in hard])
            for key, value in changes:
                if value is None:
                    db.execute("DELETE FROM correlation WHERE key = ?", (key,))
                else:
                    db.execute("INSERT OR REPLACE INTO correlation VALUES (?, ?)", (key, value))
            if counts:
                db.executemany(
                    "INSERT INTO counters VALUES (?, ?)"
                    " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                    [(name, n) for name, n in counts.items() if n])
            if checkpoint is not None:
                db.execute("INSERT OR REPLACE INTO position VALUES (1, ?)",
                           (checkpoint.to_json(),))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return added

    def events(self, after: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
        """(seq, event) in the order they were written, from ``seq > after``."""
        for seq, body in self.db.execute(
                "SELECT seq, body FROM events WHERE seq > ? ORDER BY seq", (after,)):
            yield int(seq), json.loads(body)

    # -- the webhook outbox (keyrelay/events/outbox.py) ----------------------------------
    def due(self, now: float, limit: int) -> list[Pending]:
        """Pending events whose next attempt has come, oldest first, except those of an
        account whose earlier batch waits for its retry (an account's events go in order)."""
        # held accounts are left out in SQL, before the LIMIT: a long backlog behind one
        # failing receiver must not hide every other account's events
        rows = self.db.execute(
            "SELECT seq, account, attempts, first_failure, created, body FROM events"
            " WHERE state = 'pending' AND next_attempt <= ? AND COALESCE(account, '') NOT IN"
            " (SELECT COALESCE(account, '') FROM events WHERE state = 'pending'"
            " AND attempts > 0 AND next_attempt > ?) ORDER BY seq LIMIT ?",
            (now, now, limit))
        return [Pending(int(seq), str(account or ""), int(attempts), float(first), float(made),
                        json.loads(body))
                for seq, account, attempts, first, made, body in rows]

    def next_due(self, now: float) -> float | None:
        """When the next pending event may be tried (Unix seconds), None: none pending. An
        account held behind a batch waiting for its retry counts from that retry."""
        row = self.db.execute(
            "SELECT MIN(CASE WHEN held > 0 THEN held ELSE soonest END) FROM ("
            "SELECT COALESCE(account, '') AS a, MIN(next_attempt) AS soonest,"
            " MAX(CASE WHEN attempts > 0 AND next_attempt > ? THEN next_attempt ELSE 0 END)"
            " AS held FROM events WHERE state = 'pending' GROUP BY a)", (now,)).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def settle(self, seqs: Sequence[int], state: str, counter: str = "") -> None:
        """Mark events done with: ``delivered``, ``given_up`` or ``no_webhook``; ``counter``
        adds their number to that counter in the same transaction."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("UPDATE events SET state = ? WHERE seq = ?",
                           [(state, seq) for seq in seqs])
            if counter:
                db.execute("INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE"
                           " SET value = value + excluded.value", (counter, len(seqs)))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def retry(self, seqs: Sequence[int], attempts: int, first_failure: float,
              next_attempt: float, account: str) -> None:
        """A failed delivery of these events: try again at ``next_attempt``. The account's
        other pending events are held behind them since the same first failure, so that
        ``webhooks.retry_for`` counts from it for the whole backlog, not batch by batch."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "UPDATE events SET attempts = ?, first_failure = ?, next_attempt = ?"
                " WHERE seq = ?", [(attempts, first_failure, next_attempt, seq) for seq in seqs])
            db.execute("UPDATE events SET first_failure = ? WHERE state = 'pending'"
                       " AND first_failure = 0 AND COALESCE(account, '') = ?",
                       (first_failure, account))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- hard bounces waiting to be suppressed (keyrelay/events/outbox.py) --------------
    def suppress_due(self, limit: int) -> list[tuple[int, dict[str, Any]]]:
        return [(int(seq), json.loads(body)) for seq, body in self.db.execute(
            "SELECT q.seq, e.body FROM suppress_queue q JOIN events e ON e.seq = q.seq"
            " ORDER BY q.seq LIMIT ?", (limit,))]

    def suppress_done(self, seqs: Sequence[int]) -> None:
        self.db.executemany("DELETE FROM suppress_queue WHERE seq = ?",
                            [(seq,) for seq in seqs])

    def purge(self, before: float) -> int:
        """Remove events written before ``before`` (Unix seconds) that are finished with:
        delivered, given up, or with no webhook to go to (any state but ``pending``)."""
        cursor = self.db.execute(
            "DELETE FROM events WHERE state != 'pending' AND created < ?"
            " AND seq NOT IN (SELECT seq FROM suppress_queue)", (before,))
        return int(cursor.rowcount)

    def node(self) -> str:
        """This state file's own random name, made once: the reputation guard's mark of what
        it counted is kept per state file (keyrelay/reputation/guard.py)."""
        row = self.db.execute("SELECT value FROM meta WHERE name = 'node'").fetchone()
        if row is None:
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('node', ?)", (uuid.uuid4().hex,))
            row = self.db.execute("SELECT value FROM meta WHERE name = 'node'").fetchone()
        return str(row[0])

    def last_seq(self) -> int:
        row = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
        return int(row[0])


@dataclass(frozen=True, slots=True)
class Figures:
    """What a scrape reads from the state file (keyrelay/events/metrics.py)."""

    counters: dict[str, int]
    pending: int  # events waiting in the webhook outbox
    suppress_queued: int  # hard bounces waiting to be suppressed
    checkpoint: Checkpoint | None
    last_event_time: float | None  # log time of the newest event read from the log


# the events the reputation guard writes itself (outbox.py): not read from the log
_GUARD_EVENTS = ("paused", "would_pause")


def read_figures(path: Path | str, timeout: float = 5.0) -> Figures:
    """The state file's totals and queues through a short-lived read-only connection of the
    caller's own (SQLite connections stay in their thread): nothing is created or changed,
    and a missing file is an error. Raises ``StoreError``."""
    uri = Path(path).resolve().as_uri() + "?mode=ro"
    try:
        db = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot open it ({exc})") from None
    try:
        db.execute("BEGIN")  # one snapshot: the counters and the queues agree
        counters = {str(k): int(v) for k, v in db.execute("SELECT name, value FROM counters")}
        pending = int(db.execute(
            "SELECT COUNT(*) FROM events WHERE state = 'pending'").fetchone()[0])
        queued = int(db.execute("SELECT COUNT(*) FROM suppress_queue").fetchone()[0])
        row = db.execute("SELECT body FROM position WHERE id = 1").fetchone()
        checkpoint = None if row is None else Checkpoint.from_json(row[0])
        row = db.execute(
            "SELECT body FROM events WHERE event NOT IN (?, ?) ORDER BY seq DESC LIMIT 1",
            _GUARD_EVENTS).fetchone()
        db.execute("COMMIT")
    except (sqlite3.Error, ValueError, KeyError) as exc:
        raise StoreError(f"{path}: not a usable events state file ({exc})") from None
    finally:
        db.close()
    last: float | None = None
    if row is not None:
        stamp = json.loads(row[0]).get("timestamp")
        last = float(stamp) if isinstance(stamp, int | float) else None
    return Figures(counters, pending, queued, checkpoint, last)


__all__ = ["SCHEMA_VERSION", "Checkpoint", "EventStore", "Figures", "Pending", "StoreError",
           "read_figures"]
