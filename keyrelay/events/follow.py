"""Following the maillog file from a checkpoint (docs/events.md, "Following the log").

``FileSource`` reads complete lines from the file and knows the checkpoint after the last line
it handed out; ``Follower`` parses them, correlates them into events and commits events,
checkpoint and correlation changes to the store in one transaction per batch.

Rotation:
- the file renamed and a new one created (logrotate's default, postfix's
  ``maillog_file_rotate_suffix``): the old file is read to its end through the open descriptor,
  then the new one from offset 0. A restart that finds a new file at the path looks for the
  checkpoint's file at ``PATH.1`` and finishes it first;
- copytruncate: the file shrinking below the read position, or its first line changing,
  means it was truncated and refilled: reading starts at 0 of the new content;
- a missing file: one log line, then the follower waits for it.

A partial last line (no line feed yet) is kept until its line feed arrives. The other source,
the systemd journal (journal.py ``JournalSource``), gives lines with a ``Position`` and a
checkpoint too: ``LineSource``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from . import maillog
from .correlate import Correlator, Event, Position
from .journal import JOURNAL, JournalSource
from .store import Checkpoint, EventStore

log = logging.getLogger("keyrelay.events")

READ_SIZE = 1 << 16
SOURCE_PREFIX = 4096  # a file is named by the hash of its first line (at most this long)
MALFORMED_LOGGED = 10  # per process: the first malformed lines are logged, all are counted


class LineSource(Protocol):
    """Where lines come from: a file (``FileSource``) or the journal (``JournalSource``)."""

    def read(self, max_lines: int) -> list[tuple[Position, str]]:
        """Complete lines available now (maybe none), oldest first."""

    def checkpoint(self) -> Checkpoint | None:
        """The position just after the last line ``read`` gave."""

    def close(self) -> None:
        """Release the file."""


def _source_of(fd: int) -> str | None:
    """The hash of the file's first line, or None while it has no complete line."""
    head = os.pread(fd, SOURCE_PREFIX, 0)
    end = head.find(b"\n")
    if end < 0 and len(head) < SOURCE_PREFIX:
        return None
    return hashlib.blake2b(head[: end + 1] if end >= 0 else head, digest_size=10).hexdigest()


class FileSource:
    """Complete lines of one log file path, across rotations."""

    def __init__(self, path: Path | str, checkpoint: Checkpoint | None = None, *,
                 start_at_end: bool = False) -> None:
        self.path = Path(path)
        self.fd: int | None = None
        self.dev = self.ino = 0
        self.source: str | None = None
        self.consumed = 0  # file offset of the first byte not yet handed out
        self.buf = b""
        self.draining = False  # reading a rotated file to its end, then the path's file
        self.missing_logged = False
        self.counts: dict[str, int] = {}
        self._start(checkpoint, start_at_end)

    # --- opening --------------------------------------------------------------------------

    def _open(self, path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if not self.missing_logged:
                if isinstance(exc, FileNotFoundError):
                    log.warning("events: %s does not exist yet; waiting for it", path)
                else:
                    log.warning("events: cannot read %s (%s); waiting until it can be read",
                                path, exc.strerror)
                self.missing_logged = True
            return False
        st = os.fstat(fd)
        self.close()
        self.fd, self.dev, self.ino = fd, st.st_dev, st.st_ino
        self.source = _source_of(fd)
        self.consumed, self.buf = 0, b""
        self.missing_logged = False
        return True

    def _matches(self, path: Path, cp: Checkpoint) -> bool:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        if (st.st_dev, st.st_ino) != (cp.device, cp.inode) or st.st_size < cp.offset:
            return False
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return _source_of(fd) == cp.source
        finally:
            os.close(fd)

    def _start(self, cp: Checkpoint | None, start_at_end: bool) -> None:
        if cp is not None:
            rotated = self.path.with_name(self.path.name + ".1")
            for path, draining in ((self.path, False), (rotated, True)):
                if self._matches(path, cp) and self._open(path):
                    self.consumed = cp.offset
                    self.draining = draining
                    if draining:
                        log.info("events: finishing the rotated %s from offset %d first",
                                 path, cp.offset)
                    return
            log.warning("events: %s is not the file of the checkpoint (offset %d) and the "
                        "rotated %s is not either; reading %s from its start",
                        self.path, cp.offset, rotated, self.path)
            self.counts["lost_rotations"] = self.counts.get("lost_rotations", 0) + 1
        if self._open(self.path) and start_at_end and self.fd is not None:
            # after the last complete line: a partial one is read when its line feed comes
            size = os.fstat(self.fd).st_size
            tail = os.pread(self.fd, min(size, READ_SIZE), size - min(size, READ_SIZE))
            last_lf = tail.rfind(b"\n")
            self.consumed = size - len(tail) + last_lf + 1 if last_lf >= 0 else 0

    # --- reading --------------------------------------------------------------------------

    def checkpoint(self) -> Checkpoint | None:
        if self.fd is None or self.source is None:
            return None
        return Checkpoint(self.dev, self.ino, self.source, self.consumed)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _switch_if_rotated(self) -> bool:
        """At the end of the file: follow a rename or a truncation. True if it switched."""
        if self.fd is None:
            return self._open(self.path)
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False  # renamed, the new one not created yet: keep the old descriptor
        read_to = self.consumed + len(self.buf)
        if self.draining or (st.st_dev, st.st_ino) != (self.dev, self.ino):
            # The writer may have added to the old file between our last read and creating
            # the new one: read the old file to its end once more before leaving it.
            if os.pread(self.fd, 1, read_to):
                return True
            if self.buf:
                self.counts["partial_lost"] = self.counts.get("partial_lost", 0) + 1
                log.warning("events: %s ended in a partial line of %d bytes at its rotation; "
                            "it is skipped", self.path, len(self.buf))
            self.draining = False
            return self._open(self.path)
        truncated = st.st_size < read_to
        if not truncated and self.source is not None and read_to > 0:
            truncated = _source_of(self.fd) != self.source
        if truncated:
            log.info("events: %s was truncated (copytruncate); reading it from its start",
                     self.path)
            self.source = _source_of(self.fd)
            self.consumed, self.buf = 0, b""
            return True
        return False

    def read(self, max_lines: int) -> list[tuple[Position, str]]:
        out: list[tuple[Position, str]] = []
        while True:
            self._take_lines(out, max_lines)
            if len(out) >= max_lines:
                break
            if self.fd is None:
                if not self._open(self.path):
                    break
                continue
            data = os.pread(self.fd, READ_SIZE, self.consumed + len(self.buf))
            if data:
                self.buf += data
                continue
            if not self._switch_if_rotated():
                break
        return out

    def _take_lines(self, out: list[tuple[Position, str]], max_lines: int) -> None:
        buf = self.buf
        start = 0
        if self.source is None and b"\n" in buf and self.fd is not None:
            self.source = _source_of(self.fd)
        source = self.source or ""
        while len(out) < max_lines:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            out.append((Position(source, self.consumed + start),
                        buf[start:end].decode("utf-8", "replace")))
            start = end + 1
        if start:
            self.buf = buf[start:]
            self.consumed += start


class Follower:
    """Source → parser → correlator → store, one transaction per batch."""

    def __init__(self, source: LineSource, store: EventStore, parser: maillog.Parser,
                 correlator: Correlator, *, batch_lines: int = 2000,
                 on_events: Callable[[list[Event]], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.source = source
        self.store = store
        self.parser = parser
        self.correlator = correlator
        self.batch_lines = batch_lines
        self.on_events = on_events
        self.clock = clock
        self.malformed_logged = 0
        self.lines = 0

    @classmethod
    def open(cls, maillog_path: Path | str, store: EventStore, parser: maillog.Parser, *,
             start_at_end: bool = False, journal: bool = False, journal_directory: str = "",
             once: bool = False, **options: Any) -> Follower:
        """A follower of ``maillog_path`` (or, with ``journal``, of the systemd journal in
        ``journal_directory``, "" for the system's) resumed from what ``store`` holds;
        ``once``: for ``run_once`` (the journal is then read to its end, not followed)."""
        correlator = Correlator(**{k: options.pop(k) for k in
                                   ("max_age", "session_max_age", "max_messages")
                                   if k in options})
        correlator.load(store.correlation())
        saved = store.checkpoint()
        if saved is not None and (saved.source == JOURNAL) != journal:
            # events.source changed: the saved position is of the other kind of log
            log.warning("events: the saved position is in %s, but events.source is now %s; "
                        "starting as on a first start (events.start_at_end)",
                        "the journal" if saved.source == JOURNAL else "a file",
                        "journal" if journal else "file")
            saved = None
        source: LineSource
        if journal:
            source = JournalSource(saved, directory=journal_directory,
                                   start_at_end=start_at_end, follow=not once)
        else:
            source = FileSource(maillog_path, saved, start_at_end=start_at_end)
        follower = cls(source, store, parser, correlator, **options)
        start = source.checkpoint()
        if saved is None and start is not None:
            # the position it starts at (the end, with start_at_end) is saved at once: lines
            # written while it is stopped before reading any are then read at the next start,
            # not skipped by another start at the end
            store.commit([], start, [], {}, follower.clock())
        return follower

    def step(self) -> int:
        """Read, parse and commit one batch; returns the number of lines it held."""
        lines = self.source.read(self.batch_lines)
        counts: dict[str, int] = {}
        events: list[Event] = []
        parse, feed = self.parser.parse, self.correlator.feed
        ignored = 0
        for pos, line in lines:
            record = parse(line)
            kind = type(record)
            if kind is maillog.Unknown:
                ignored += 1
                continue
            if kind is maillog.Malformed:
                assert isinstance(record, maillog.Malformed)
                counts["malformed"] = counts.get("malformed", 0) + 1
                if self.malformed_logged < MALFORMED_LOGGED:
                    self.malformed_logged += 1
                    log.warning("events: a %s line that keyrelay cannot read is skipped: %.200r",
                                record.shape, record.text)
                continue
            events.extend(feed(record, pos))
        counts["lines"] = len(lines)
        counts["ignored"] = ignored
        for name, n in self.correlator.counts.items():
            counts[name] = counts.get(name, 0) + n
            self.correlator.counts[name] = 0
        source_counts = getattr(self.source, "counts", None)
        if isinstance(source_counts, dict):
            for name, n in source_counts.items():
                counts[name] = counts.get(name, 0) + n
            source_counts.clear()
        changes = self.correlator.changes()
        if lines or changes or any(counts.values()):
            self.store.commit(events, self.source.checkpoint(), changes, counts, self.clock())
            if events and self.on_events is not None:
                self.on_events(events)
        self.lines += len(lines)
        return len(lines)

    def close(self) -> None:
        """Let go of the source (the file, or the journalctl process)."""
        self.source.close()

    def run_once(self) -> int:
        """Everything there is now; returns the number of lines."""
        total = 0
        while n := self.step():
            total += n
        return total

    def run(self, stop: threading.Event, poll: float = 0.25) -> None:
        """Follow until ``stop`` is set; a batch is committed every ``batch_lines`` lines, or
        when the follower has caught up with the file (at most once per ``poll``)."""
        while not stop.is_set():
            if self.step() < self.batch_lines:
                stop.wait(poll)


__all__ = ["FileSource", "Follower", "LineSource"]
