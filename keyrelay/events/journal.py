"""Postfix's log from the systemd journal (``events.source: journal``; docs/events.md,
"journald").

Where Postfix logs through syslog() to journald and no file keeps the lines, keyrelay-events
reads the journal with ``journalctl --output=json --follow`` (systemd's own reader: the
journal's files, their rotation and vacuuming are its business) and turns each entry back into
the syslog line the parser reads (keyrelay/events/maillog.py):
``<__REALTIME_TIMESTAMP as RFC 3339> <_HOSTNAME> <SYSLOG_IDENTIFIER>[<SYSLOG_PID>]: <MESSAGE>``.

- Only Postfix's facility is asked for (``SYSLOG_FACILITY=2``, mail: Postfix's default
  ``syslog_facility``); ``events.syslog_names`` filters further, as for a file.
- The checkpoint is the journal's cursor of the last entry handed out (``Checkpoint.cursor``);
  a restart goes on with ``--after-cursor``, so nothing is read twice or skipped. An entry's
  position (and so its events' ``event_id``) is its cursor.
- With no checkpoint and ``events.start_at_end``, it starts after the journal's last mail
  entry (asked with ``journalctl --lines=1`` when it first reads; a journal without one is
  read from its start, which holds nothing old; a journal that cannot be read is asked
  again until it can); otherwise from the journal's first entry. The position is saved at
  once, even before any entry (an empty cursor: "from the start").
- journalctl that exits (a journal folder that is not there yet, a permission refused) is
  logged once and started again after ``RESTART_AFTER`` seconds, from the checkpoint.
- ``follow=False`` (``keyrelay-events --once``): journalctl without ``--follow`` reads what
  the journal holds now; the source then gives no more lines.

``JournalSource`` is a ``LineSource`` (follow.py): the ``Follower`` is the same for both.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import select
import shutil
import subprocess
import time
from datetime import UTC, datetime
from typing import IO, Any

from .correlate import Position
from .store import Checkpoint

log = logging.getLogger("keyrelay.events")

JOURNALCTL = shutil.which("journalctl") or "/usr/bin/journalctl"
MAIL_FACILITY = "SYSLOG_FACILITY=2"
JOURNAL = "journal"  # Checkpoint.source of a journal checkpoint
READ_SIZE = 1 << 16
PIPE_SIZE = 1 << 20  # journalctl's output pipe: a busy relay's entries without a stall
MORE_WAIT = 0.02  # seconds a read waits for journalctl's next output before it returns
# the fields read (journalctl always adds __CURSOR and the timestamps); a whole entry would be
# five to ten times longer, with every _SYSTEMD_* and _CMDLINE field
FIELDS = "MESSAGE,SYSLOG_IDENTIFIER,SYSLOG_PID,_PID,_HOSTNAME"
RESTART_AFTER = 2.0  # seconds before journalctl is started again after it exited
FIRST_ENTRY_TIMEOUT = 60.0  # seconds journalctl may take to name the last entry at a start


def _text(value: Any) -> str:
    """A journal field as text: JSON gives a string, or an array of bytes when the value is
    not UTF-8 (journalctl --output=json), or null when it is too large."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(b, int) and 0 <= b < 256 for b in value):
        return bytes(value).decode("utf-8", "replace")
    return ""


def line_of(entry: dict[str, Any]) -> str | None:
    """The syslog line of a journal entry, or None when it has no usable time."""
    try:
        micros = int(entry["__REALTIME_TIMESTAMP"])
        when = datetime.fromtimestamp(micros / 1e6, UTC).isoformat(timespec="microseconds")
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        return None
    host = (_text(entry.get("_HOSTNAME")).split() or ["localhost"])[0]
    ident = _text(entry.get("SYSLOG_IDENTIFIER")) or "unknown"
    pid = _text(entry.get("SYSLOG_PID")) or _text(entry.get("_PID")) or "0"
    message = _text(entry.get("MESSAGE")).replace("\r", " ").replace("\n", " ")
    return f"{when} {host} {ident}[{pid}]: {message}"


class JournalSource:
    """Complete entries of the journal's mail facility, as syslog lines, from a cursor."""

    def __init__(self, checkpoint: Checkpoint | None = None, *, directory: str = "",
                 start_at_end: bool = False, follow: bool = True,
                 journalctl: str = JOURNALCTL) -> None:
        self.directory = directory
        self.follow = follow  # False: what the journal holds now, then no more lines
        self.done = False
        self.journalctl = journalctl
        self.cursor = checkpoint.cursor if checkpoint is not None else ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.buf = b""
        self.restart_at = 0.0
        self.started = 0.0
        self.failed_logged = False
        self.problem = ""  # why journalctl cannot read the journal now ("" when it can)
        self.counts: dict[str, int] = {}
        # with no checkpoint and start_at_end: the journal's last mail entry is asked when
        # journalctl is first started (and again, while the journal cannot be read)
        self.at_end_pending = checkpoint is None and start_at_end
        self._resolve_end()

    def _where(self) -> list[str]:
        return [f"--directory={self.directory}"] if self.directory else []

    def _resolve_end(self) -> bool:
        """With a start at the end pending: ask where the end is; False while unknown."""
        if not self.at_end_pending:
            return True
        last = self._last_cursor()
        if last is None:
            return False
        # after the last mail entry; a journal without one has nothing old: its start
        self.cursor, self.at_end_pending = last, False
        return True

    def _last_cursor(self) -> str | None:
        """The cursor of the journal's last mail entry now ("" when it has none); None when
        the journal cannot be read (said by ``_failed``)."""
        try:
            result = subprocess.run(
                [self.journalctl, "--output=json", f"--output-fields={FIELDS}", "--lines=1",
                 "--no-pager", "--quiet", *self._where(), MAIL_FACILITY],
                capture_output=True, timeout=FIRST_ENTRY_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self._failed(f"cannot ask journalctl for the journal's last entry: {exc}")
            return None
        if result.returncode != 0:
            error = result.stderr.decode("utf-8", "replace").strip()
            self._failed(f"journalctl exited with status {result.returncode}"
                         + (f": {error.splitlines()[-1]}" if error else ""))
            return None
        lines = result.stdout.strip().splitlines()
        try:
            return str(json.loads(lines[-1])["__CURSOR"]) if lines else ""
        except (ValueError, KeyError, TypeError):
            self._failed("journalctl's last entry has no cursor")
            return None

    def _command(self) -> list[str]:
        command = [self.journalctl, "--output=json", f"--output-fields={FIELDS}", "--all",
                   "--no-pager", "--quiet", *self._where()]
        if self.follow:
            command.append("--follow")
        if self.cursor:
            command.append(f"--after-cursor={self.cursor}")
        else:
            command.append("--no-tail")  # from the journal's start (or, empty, all to come)
        return [*command, MAIL_FACILITY]

    def _start(self) -> bool:
        if time.monotonic() < self.restart_at:
            return False
        if not self._resolve_end():
            return False  # tried again after RESTART_AFTER
        try:
            self.proc = subprocess.Popen(self._command(), stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        except OSError as exc:
            self._failed(f"cannot run {self.journalctl}: {exc.strerror or exc}")
            return False
        for stream in (self.proc.stdout, self.proc.stderr):
            assert stream is not None
            os.set_blocking(stream.fileno(), False)
        assert self.proc.stdout is not None
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(self.proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self.started = time.monotonic()
        self.buf = b""
        return True

    def _failed(self, why: str) -> None:
        self.problem = why
        if not self.failed_logged:
            log.warning("events: reading the journal failed: %s; trying again every %g s",
                        why, RESTART_AFTER)
            self.failed_logged = True
        self.restart_at = time.monotonic() + RESTART_AFTER

    @staticmethod
    def _drain(stream: IO[bytes] | None) -> bytes:
        if stream is None:
            return b""
        chunks = []
        while True:
            try:
                data = os.read(stream.fileno(), READ_SIZE)
            except BlockingIOError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)

    def read(self, max_lines: int) -> list[tuple[Position, str]]:
        out: list[tuple[Position, str]] = []
        if self.done or (self.proc is None and not self._start()):
            return out
        assert self.proc is not None
        if not self.follow:
            return self._read_once(out, max_lines)
        self.buf += self._drain(self.proc.stdout)
        self._take_lines(out, max_lines)
        while len(out) < max_lines and select.select([self.proc.stdout], [], [], MORE_WAIT)[0]:
            # journalctl refills the pipe as it is read: go on while it has more to say
            more = self._drain(self.proc.stdout)
            if not more:
                break
            self.buf += more
            self._take_lines(out, max_lines)
        if self.problem and self.proc.poll() is None and (
                out or time.monotonic() - self.started > RESTART_AFTER):
            self.problem = ""  # started again and reading
        if not out and self.proc.poll() is not None:  # exited: say why, start again later
            self.buf += self._drain(self.proc.stdout)
            self._take_lines(out, max_lines)
            if not out:
                self._failed(self._exit_reason())
                self._close_proc()
        elif self.proc.stderr is not None:
            self._drain(self.proc.stderr)  # its warnings must not fill the pipe and stop it
        return out

    def _read_once(self, out: list[tuple[Position, str]], max_lines: int
                   ) -> list[tuple[Position, str]]:
        """Without --follow: full batches until journalctl has said everything and exited."""
        assert self.proc is not None
        while len(out) < max_lines:
            exited = self.proc.poll() is not None
            self.buf += self._drain(self.proc.stdout)
            self._take_lines(out, max_lines)
            if exited:
                if not out:
                    if self.proc.returncode != 0:
                        self._failed(self._exit_reason())
                    self.done = True
                    self._close_proc()
                break
            if len(out) < max_lines:
                select.select([self.proc.stdout, self.proc.stderr], [], [], 1.0)
                self._drain(self.proc.stderr)
        return out

    def _exit_reason(self) -> str:
        assert self.proc is not None
        error = self._drain(self.proc.stderr).decode("utf-8", "replace").strip()
        return (f"journalctl exited with status {self.proc.returncode}"
                + (f": {error.splitlines()[-1]}" if error else ""))

    def _take_lines(self, out: list[tuple[Position, str]], max_lines: int) -> None:
        buf = self.buf
        start = 0
        while len(out) < max_lines:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            raw = buf[start:end]
            start = end + 1
            try:
                entry = json.loads(raw)
                cursor = str(entry["__CURSOR"])
            except (ValueError, KeyError, TypeError):
                self.counts["journal_unreadable"] = self.counts.get("journal_unreadable", 0) + 1
                continue
            self.cursor = cursor
            self.failed_logged = False
            line = line_of(entry)
            if line is None:
                self.counts["journal_unreadable"] = self.counts.get("journal_unreadable", 0) + 1
                continue
            out.append((Position(cursor, 0), line))
        self.buf = buf[start:]

    def checkpoint(self) -> Checkpoint | None:
        """The cursor of the last entry handed out; with none yet, an empty cursor (read
        from the journal's start), or None while the start at the end is not known yet."""
        if self.at_end_pending:
            return None
        return Checkpoint(0, 0, JOURNAL, 0, self.cursor)

    def _close_proc(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()

    def close(self) -> None:
        self._close_proc()


__all__ = ["JOURNAL", "JournalSource", "line_of"]
