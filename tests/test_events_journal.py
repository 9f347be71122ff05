"""keyrelay-events reading Postfix's log from the systemd journal (keyrelay/events/journal.py;
docs/events.md, "journald").

Real journal files, written by systemd's systemd-journal-remote and read by the real
journalctl (testkit/journal.py: this machine runs no journald for Postfix to log to). Checked:
an entry becomes the syslog line the parser reads; the golden story (tests/golden/maillog/
story.txt) read from the journal gives the same events as from the file; a follower stopped
in the middle and started again from its saved cursor gives every event once; following
picks up entries as they are written; the first start at the end skips what the journal
held; a journal folder that is not there yet is waited for; the daemon reads the journal with
``events.source: journal`` (--once, --check-config); switching events.source does not read
the other log from its start.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from keyrelay.events import maillog
from keyrelay.events.correlate import Event
from keyrelay.events.follow import Follower
from keyrelay.events.journal import JOURNALCTL, line_of
from keyrelay.events.store import EventStore
from testkit.journal import JOURNAL_REMOTE, JournalWriter, entries_in
from testkit.net import wait_until

GOLDEN = Path(__file__).resolve().parent / "golden" / "maillog"
BIN = Path(sys.executable).parent

needs_journal = pytest.mark.skipif(
    not (Path(JOURNAL_REMOTE).exists() and Path(JOURNALCTL).exists()),
    reason="systemd-journal-remote or journalctl is missing (make deps installs them)")


def story() -> list[str]:
    return [line for line in (GOLDEN / "story.txt").read_text().splitlines()
            if line and not line.startswith("#")]


def golden_events() -> list[Event]:
    return [json.loads(line) for line in (GOLDEN / "story.events").read_text().splitlines()]


def without_ids(events: list[Event]) -> list[Event]:
    """Events without ``event_id``: it is the line's position, a cursor in the journal."""
    return [{k: v for k, v in e.items() if k != "event_id"} for e in events]


def stored(state: Path) -> list[Event]:
    store = EventStore(state)
    try:
        return [e for _, e in store.events()]
    finally:
        store.close()


def write_story(folder: Path, lines: list[str]) -> None:
    with JournalWriter(folder) as journal:
        for line in lines:
            journal.line(line)
    wait_until(lambda: entries_in(folder) >= len(lines), 60, "journalctl to see the entries")


def follower(state: Path, folder: Path, *, once: bool, start_at_end: bool = False,
             batch_lines: int = 2000) -> tuple[Follower, EventStore]:
    store = EventStore(state)
    return Follower.open("/nonexistent", store, maillog.Parser(), journal=True,
                         journal_directory=str(folder), once=once,
                         start_at_end=start_at_end, batch_lines=batch_lines), store


class Following:
    """A follower of the journal in ``folder`` in a thread of its own (SQLite connections
    stay in their thread): ``lines`` read so far; ``stop()`` ends it."""

    def __init__(self, state: Path, folder: Path) -> None:
        self.lines = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(state, folder))
        self._thread.start()

    def _run(self, state: Path, folder: Path) -> None:
        reader, store = follower(state, folder, once=False)
        try:
            while not self._stop.is_set():
                self.lines += reader.step()
                self._stop.wait(0.05)
        finally:
            reader.source.close()
            store.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive()


def test_an_entry_becomes_the_syslog_line_the_parser_reads() -> None:
    entry: dict[str, Any] = {
        "__CURSOR": "s=1;i=2", "__REALTIME_TIMESTAMP": "1796430601250000",
        "_HOSTNAME": "relay", "SYSLOG_IDENTIFIER": "postfix/kr-pool-acme/smtp",
        "SYSLOG_PID": "4300", "_PID": "9",
        "MESSAGE": "A0000000001: to=<ok@example.net>, relay=mx.example.net[198.51.100.5]:25, "
                   "delay=1, delays=0.1/0/0.4/0.5, dsn=2.0.0, status=sent (250 2.0.0 Ok)",
    }
    line = line_of(entry)
    assert line is not None
    assert line == ("2026-12-05T00:30:01.250000+00:00 relay postfix/kr-pool-acme/smtp[4300]: "
                    + entry["MESSAGE"])
    record = maillog.Parser().parse(line)
    assert isinstance(record, maillog.Delivery)
    assert (record.header.syslog_name, record.header.daemon, record.header.pid) == (
        "postfix/kr-pool-acme", "smtp", 4300)
    assert record.header.when == 1796430601.25
    # MESSAGE that is not UTF-8 comes as an array of bytes; no SYSLOG_PID: _PID; a line
    # break inside cannot make a second line
    odd = dict(entry, MESSAGE=list(b"A1: removed\n\xff"), SYSLOG_PID=None)
    assert line_of(odd) == ("2026-12-05T00:30:01.250000+00:00 relay "
                            "postfix/kr-pool-acme/smtp[9]: A1: removed \ufffd")
    assert line_of(dict(entry, __REALTIME_TIMESTAMP="soon")) is None
    assert line_of({"__CURSOR": "x"}) is None


@needs_journal
def test_the_story_from_the_journal_gives_the_files_events_once_across_a_restart(
        tmp_path: Path) -> None:
    folder, state = tmp_path / "journal", tmp_path / "events.db"
    write_story(folder, story())
    first, store = follower(state, folder, once=True, batch_lines=9)
    try:
        assert first.step() == 9 and first.step() == 9  # then stopped: 18 entries read
    finally:
        first.source.close()
        store.close()
    second, store = follower(state, folder, once=True, batch_lines=9)
    try:
        second.run_once()
    finally:
        second.source.close()
        store.close()
    events = stored(state)
    assert without_ids(events) == without_ids(golden_events())
    assert len({e["event_id"] for e in events}) == len(events)
    # nothing more on a third start
    third, store = follower(state, folder, once=True)
    try:
        assert third.run_once() == 0
    finally:
        third.source.close()
        store.close()


@needs_journal
def test_following_reads_entries_as_they_are_written(tmp_path: Path) -> None:
    folder, state = tmp_path / "journal", tmp_path / "events.db"
    lines = story()
    half = len(lines) // 2
    with JournalWriter(folder) as journal:
        for line in lines[:half]:
            journal.line(line)
        # a journal with its file, as a system's always has (journalctl started on a folder
        # whose first file is still being made may not notice it)
        wait_until(lambda: entries_in(folder) == half, 60, "journalctl to see the entries")
        reader = Following(state, folder)
        try:
            wait_until(lambda: reader.lines == half, 60, "the first half of the entries")
            for line in lines[half:]:
                journal.line(line)
            wait_until(lambda: reader.lines == len(lines), 60, "the entries written later")
        finally:
            reader.stop()
    assert without_ids(stored(state)) == without_ids(golden_events())


@needs_journal
def test_the_first_start_at_the_end_skips_what_the_journal_held(tmp_path: Path) -> None:
    folder, state = tmp_path / "journal", tmp_path / "events.db"
    lines = story()
    write_story(folder, lines)  # old mail: no events for it
    reader, store = follower(state, folder, once=True, start_at_end=True)
    try:
        assert reader.run_once() == 0
    finally:
        reader.source.close()
        store.close()
    write_story(folder, [line.replace("A000000000", "C000000000") for line in lines])
    reader, store = follower(state, folder, once=True, start_at_end=True)
    try:
        assert reader.run_once() == len(lines)
    finally:
        reader.source.close()
        store.close()
    events = stored(state)
    assert events and all(not (e["queue_id"] or "C").startswith("A") for e in events)
    assert len(events) == len(golden_events())


@needs_journal
def test_a_first_start_at_the_end_of_a_journal_without_mail_keeps_what_comes_next(
        tmp_path: Path) -> None:
    """No mail entry yet: the start is saved as "the journal's start" at once, so entries
    written while keyrelay-events is stopped before reading any are read at the next start,
    not skipped by another start at the end."""
    folder, state = tmp_path / "journal", tmp_path / "events.db"
    with JournalWriter(folder) as journal:
        journal.entry({"__REALTIME_TIMESTAMP": "1796430600000000", "SYSLOG_FACILITY": "3",
                       "SYSLOG_IDENTIFIER": "sshd", "MESSAGE": "not mail"})
    wait_until(lambda: entries_in(folder) == 1, 60, "journalctl to see the entry")
    reader, store = follower(state, folder, once=True, start_at_end=True)
    try:
        assert reader.run_once() == 0
    finally:
        reader.close()
        store.close()
    write_story(folder, story())
    reader, store = follower(state, folder, once=True, start_at_end=True)
    try:
        assert reader.run_once() == len(story())
    finally:
        reader.close()
        store.close()
    assert without_ids(stored(state)) == without_ids(golden_events())


@needs_journal
def test_a_journal_folder_not_there_yet_is_waited_for(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder, state = tmp_path / "journal", tmp_path / "events.db"
    with caplog.at_level(logging.WARNING, logger="keyrelay.events"):
        reader = Following(state, folder)
        try:
            wait_until(lambda: "reading the journal failed" in caplog.text, 60,
                       "the warning about the missing journal")
            write_story(folder, story())
            wait_until(lambda: reader.lines == len(story()), 120, "the entries once it exists")
        finally:
            reader.stop()
    assert caplog.text.count("reading the journal failed") == 1
    assert len(stored(state)) == len(golden_events())


def configure(tmp_path: Path, **events: Any) -> Path:
    config = tmp_path / "keyrelay.yaml"
    config.write_text(json.dumps({
        "directory": {"path": str(tmp_path / "directory.yaml")},
        "events": {"state": str(tmp_path / "events.db"), "start_at_end": False, **events},
    }))
    return config


@needs_journal
def test_the_daemon_reads_the_journal(tmp_path: Path) -> None:
    folder = tmp_path / "journal"
    write_story(folder, story())
    config = configure(tmp_path, source="journal", journal_directory=str(folder))
    checked = subprocess.run([BIN / "keyrelay-events", "--config", config, "--check-config"],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    once = subprocess.run([BIN / "keyrelay-events", "--config", config, "--once"],
                          capture_output=True, text=True, timeout=120)
    assert once.returncode == 0, once.stderr
    assert without_ids(stored(tmp_path / "events.db")) == without_ids(golden_events())
    assert "event=delivered account=acme subuser=billing" in once.stderr

    # events.source back to a file: the journal's cursor is not a position in it; the file
    # is not read from its start (start_at_end), and the switch is said
    maillog = tmp_path / "mail.log"
    maillog.write_text("\n".join(story()) + "\n")
    config = configure(tmp_path, source="file", maillog=str(maillog), start_at_end=True)
    switched = subprocess.run([BIN / "keyrelay-events", "--config", config, "--once"],
                              capture_output=True, text=True, timeout=120)
    assert switched.returncode == 0, switched.stderr
    assert "the saved position is in the journal, but events.source is now file" in (
        switched.stderr)
    assert len(stored(tmp_path / "events.db")) == len(golden_events())


def _journalctl_of(folder: Path) -> list[int]:
    """The pids of journalctl processes reading ``folder``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if args and args[0].endswith(b"journalctl") and (
                    f"--directory={folder}".encode() in args):
                found.append(int(entry.name))
    return found


@needs_journal
def test_the_daemon_follows_the_journal_and_leaves_no_journalctl_behind(tmp_path: Path) -> None:
    folder = tmp_path / "journal"
    write_story(folder, story())
    config = configure(tmp_path, source="journal", journal_directory=str(folder),
                       poll="0.05s")
    with open(tmp_path / "events.log", "wb") as log_file:
        daemon = subprocess.Popen([BIN / "keyrelay-events", "--config", config],
                                  stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: (tmp_path / "events.db").exists()
                   and len(stored(tmp_path / "events.db")) == len(golden_events()), 60,
                   "keyrelay-events to store the story's events from the journal")
        assert _journalctl_of(folder), "keyrelay-events follows with a journalctl process"
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, (tmp_path / "events.log").read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()
    # its journalctl is stopped with it (no process left reading the journal)
    wait_until(lambda: not _journalctl_of(folder), 30, "journalctl to be gone")


def test_bad_journal_settings_are_one_line(tmp_path: Path) -> None:
    for events, text in (
        ({"source": "syslog"}, "events.source"),
        ({"source": "journal", "journal_directory": "relative/dir"}, "journal_directory"),
    ):
        result = subprocess.run([BIN / "keyrelay-events", "--config",
                                 configure(tmp_path, **events), "--check-config"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 1
        assert len(result.stderr.splitlines()) == 1 and text in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
