"""Real systemd journal files for keyrelay-events' journal source (keyrelay/events/journal.py).

This machine runs no journald (its PID 1 is not systemd), so the tests cannot have Postfix log
to one. ``JournalWriter`` writes real journal files with systemd's own
``systemd-journal-remote`` (Debian's systemd-journal-remote, installed by ``make deps``): it
reads entries in the journal export format on its standard input and appends them to
``DIR/remote.journal``, which ``journalctl --directory=DIR`` reads and follows like the system
journal. The entries carry the fields journald gives a syslog() line of Postfix's:
``MESSAGE``, ``SYSLOG_IDENTIFIER``, ``SYSLOG_PID``, ``SYSLOG_FACILITY=2``, ``_HOSTNAME`` and
the timestamps.
"""

from __future__ import annotations

import re
import subprocess
import uuid
from datetime import datetime
from pathlib import Path
from types import TracebackType

from keyrelay.events.journal import JOURNALCTL

JOURNAL_REMOTE = "/lib/systemd/systemd-journal-remote"
_SYSLOG = re.compile(r"(?P<when>\w{3} [ \d]\d \d\d:\d\d:\d\d) (?P<host>\S+) "
                     r"(?P<ident>[^\s\[]+)\[(?P<pid>\d+)\]: (?P<message>.*)\Z")


class JournalWriter:
    """``with JournalWriter(folder) as journal: journal.line(...)``: entries appended to a
    journal file in ``folder`` as they are written (flushed at each call)."""

    def __init__(self, folder: Path, year: int = 2026) -> None:
        self.folder = folder
        self.year = year
        self.boot = uuid.uuid4().hex
        self.monotonic = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> JournalWriter:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder.parent / "journal-remote.log", "ab") as errors:
            self.proc = subprocess.Popen(
                [JOURNAL_REMOTE, f"--output={self.folder / 'remote.journal'}",
                 "--split-mode=none", "-"],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self.proc is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(30)
            self.proc = None

    def entry(self, fields: dict[str, str | bytes]) -> None:
        """One entry; the timestamps and boot id are added."""
        assert self.proc is not None and self.proc.stdin is not None
        self.monotonic += 1
        out = bytearray()
        for name, value in fields.items():
            raw = value if isinstance(value, bytes) else value.encode()
            if b"\n" in raw or not raw.isascii():
                # the export format's binary field: name, LF, 64-bit LE length, data, LF
                out += name.encode() + b"\n" + len(raw).to_bytes(8, "little") + raw + b"\n"
            else:
                out += name.encode() + b"=" + raw + b"\n"
        out += f"__MONOTONIC_TIMESTAMP={self.monotonic}\n_BOOT_ID={self.boot}\n\n".encode()
        self.proc.stdin.write(bytes(out))
        self.proc.stdin.flush()

    def line(self, syslog_line: str) -> None:
        """A traditional syslog line of Postfix's (``Dec 05 00:30:01 host prog[pid]: text``),
        as journald would have stored it (the line's time read as UTC, in ``year``)."""
        m = _SYSLOG.match(syslog_line)
        assert m is not None, syslog_line
        when = datetime.strptime(f"{self.year} {m['when']} +0000", "%Y %b %d %H:%M:%S %z")
        self.entry({"__REALTIME_TIMESTAMP": str(int(when.timestamp()) * 1_000_000),
                    "_HOSTNAME": m["host"], "SYSLOG_FACILITY": "2",
                    "SYSLOG_IDENTIFIER": m["ident"], "SYSLOG_PID": m["pid"],
                    "_PID": m["pid"], "MESSAGE": m["message"]})


def entries_in(folder: Path) -> int:
    """How many entries journalctl reads in ``folder`` now."""
    result = subprocess.run([JOURNALCTL, f"--directory={folder}", "--output=cat", "--no-pager",
                             "--quiet"], capture_output=True, check=False)
    return len(result.stdout.splitlines()) if result.returncode == 0 else 0


__all__ = ["JOURNAL_REMOTE", "JournalWriter", "entries_in"]
