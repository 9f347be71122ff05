"""Following the maillog into the events store (keyrelay/events/follow.py, store.py;
docs/events.md, "Exactly once" and "Following the log").

In process, on real files in a temporary directory: partial lines, rotation by rename and by
copytruncate, a restart that finds its file rotated, a missing file. Then the promise itself:
a follower process SIGKILLed several times while the log grows and rotates holds every event
exactly once. Its oracle is the generator of the log, not keyrelay's parser: each message
written says which events it must give.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyrelay.events import maillog
from keyrelay.events.follow import FileSource, Follower
from keyrelay.events.store import EventStore, StoreError

REPO = Path(__file__).resolve().parent.parent
KEY_ID = "abcdefghijklmnop"
Expected = Counter[tuple[str, str | None, str | None]]


def message_lines(i: int) -> tuple[list[str], Expected]:
    """The log lines of message ``i`` and the events they must give (event, email, queue id).

    Every fifth message is deferred once before it is delivered, every seventh bounces,
    every fourth session first has a recipient refused (``NOQUEUE``, before the login is
    known), every ninth message is a site user's (no events)."""
    qid = f"Q{i:010d}"
    pid = 5000 + i % 97
    t = f"Dec 05 00:{i // 60 % 60:02d}:{i % 60:02d}"
    login = f"acme/s{i % 3}:{KEY_ID}" if i % 9 else "alice@example.org"
    rcpt = f"r{i}@example.net"
    ours = bool(i % 9)
    lines = [f"{t} relay postfix/smtpd[{pid}]: connect from app[192.0.2.10]"]
    expected: Expected = Counter()
    if i % 4 == 0:
        lines.append(f"{t} relay postfix/smtpd[{pid}]: NOQUEUE: reject: RCPT from app[192.0.2.10]:"
                     f" 550 5.7.1 <gone{i}@example.net>: Recipient address rejected: suppressed;"
                     f" from=<app@acme.example> to=<gone{i}@example.net> proto=ESMTP helo=<app>")
        if ours:
            expected[("dropped", f"gone{i}@example.net", None)] += 1
    lines += [
        f"{t} relay postfix/smtpd[{pid}]: {qid}: client=app[192.0.2.10], sasl_method=PLAIN,"
        f" sasl_username={login}",
        f"{t} relay postfix/cleanup[77]: {qid}: message-id=<m{i}@acme.example>",
        f"{t} relay postfix/qmgr[66]: {qid}: from=<app@acme.example>, size=300, nrcpt=1"
        " (queue active)",
        f"{t} relay postfix/smtpd[{pid}]: disconnect from app[192.0.2.10] commands=6",
    ]
    relay = f"{t} relay postfix/kr-pool-demo/smtp[88]: {qid}: to=<{rcpt}>, relay=mx[192.0.2.5]:25,"
    expected[("processed", None, qid)] += 1
    if i % 5 == 0:
        lines.append(f"{relay} delay=1, delays=0/0/0.5/0.5, dsn=4.7.1, status=deferred"
                     " (host mx said: 451 4.7.1 later (in reply to RCPT TO command))")
        expected[("deferred", rcpt, qid)] += 1
    if i % 7 == 0:
        lines.append(f"{relay} delay=1, delays=0/0/0.5/0.5, dsn=5.1.1, status=bounced"
                     " (host mx said: 550 5.1.1 unknown (in reply to RCPT TO command))")
        expected[("bounce", rcpt, qid)] += 1
    else:
        lines.append(f"{relay} delay=1, delays=0/0/0.5/0.5, dsn=2.0.0, status=sent (250 ok)")
        expected[("delivered", rcpt, qid)] += 1
    lines.append(f"{t} relay postfix/qmgr[66]: {qid}: removed")
    return lines, (expected if ours else Counter())


def seen(store: EventStore) -> Expected:
    return Counter((e["event"], e["email"], e["queue_id"]) for _, e in store.events())


def follower(log: Path, state: Path) -> Follower:
    return Follower.open(log, EventStore(state), maillog.Parser())


def write(path: Path, lines: list[str], mode: str = "a") -> None:
    with path.open(mode, encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


def test_a_partial_last_line_waits_for_its_line_feed(tmp_path: Path) -> None:
    log, state = tmp_path / "maillog", tmp_path / "events.db"
    lines, expected = message_lines(1)
    text = "".join(line + "\n" for line in lines)
    cut = text.index("status=sent") + 3  # inside the delivery line
    log.write_text(text[:cut], encoding="utf-8")
    f = follower(log, state)
    f.run_once()
    assert ("delivered", "r1@example.net", "Q0000000001") not in seen(f.store)
    assert f.store.counters().get("malformed", 0) == 0
    with log.open("a", encoding="utf-8") as out:
        out.write(text[cut:])
    f.run_once()
    assert seen(f.store) == expected


def test_a_restart_resumes_at_the_checkpoint_with_the_state(tmp_path: Path) -> None:
    log, state = tmp_path / "maillog", tmp_path / "events.db"
    lines, expected = message_lines(5)  # processed, deferred, delivered
    write(log, lines[:5])
    first = follower(log, state)
    first.run_once()
    first.store.close()
    write(log, lines[5:])
    second = follower(log, state)
    assert second.run_once() == len(lines) - 5
    assert seen(second.store) == expected


def test_a_first_start_at_the_end_saves_that_position_at_once(tmp_path: Path) -> None:
    # old mail gives no events (start_at_end), but a stop before any new line must not make
    # the next start skip what was logged while it was down
    log, state = tmp_path / "maillog", tmp_path / "events.db"
    write(log, message_lines(1)[0])
    first = Follower.open(log, EventStore(state), maillog.Parser(), start_at_end=True)
    assert first.run_once() == 0
    first.store.close()
    lines, expected = message_lines(2)
    write(log, lines)
    second = Follower.open(log, EventStore(state), maillog.Parser(), start_at_end=True)
    assert second.run_once() == len(lines)
    assert seen(second.store) == expected


def test_rotation_by_rename_finishes_the_old_file_first(tmp_path: Path) -> None:
    log, state = tmp_path / "maillog", tmp_path / "events.db"
    a, ea = message_lines(10)
    b, eb = message_lines(11)
    write(log, a[:3])
    f = follower(log, state)
    f.run_once()
    with log.open("a", encoding="utf-8") as old:
        log.rename(tmp_path / "maillog.1")
        old.write("".join(line + "\n" for line in a[3:]))  # the writer has not reopened yet
    f.run_once()  # the path is missing for now: the old descriptor is kept
    write(log, b, mode="w")
    f.run_once()
    assert seen(f.store) == ea + eb
    cp = f.store.checkpoint()
    assert cp is not None and cp.inode == os.stat(log).st_ino


def test_a_restart_finishes_a_file_rotated_while_it_was_down(tmp_path: Path) -> None:
    log, state = tmp_path / "maillog", tmp_path / "events.db"
    a, ea = message_lines(20)
    b, eb = message_lines(21)
    write(log, a[:3])
    f = follower(log, state)
    f.run_once()
    f.store.close()
    write(log, a[3:])
    log.rename(tmp_path / "maillog.1")
    write(log, b, mode="w")
    again = follower(log, state)
    again.run_once()
    assert seen(again.store) == ea + eb


def test_copytruncate_starts_again_at_the_start(tmp_path: Path) -> None:
    log, state = tmp_path / "maillog", tmp_path / "events.db"
    a, ea = message_lines(30)
    b, eb = message_lines(31)
    write(log, a)
    f = follower(log, state)
    f.run_once()
    (tmp_path / "maillog.1").write_bytes(log.read_bytes())
    with log.open("r+") as trunc:
        trunc.truncate(0)
    write(log, b[:2])  # shorter than the old content: the size says it
    f.run_once()
    write(log, b[2:])
    f.run_once()
    assert seen(f.store) == ea + eb


def test_copytruncate_refilled_past_the_old_offset_is_seen_by_its_first_line(
        tmp_path: Path) -> None:
    log, state = tmp_path / "maillog", tmp_path / "events.db"
    a, _ = message_lines(40)
    b, eb = message_lines(41)
    write(log, a[:2])
    f = follower(log, state)
    f.run_once()
    with log.open("r+") as trunc:
        trunc.truncate(0)
    write(log, b)  # longer than what was read: only the changed first line tells
    f.run_once()
    # message 40's refusal waits for a login that the truncated file never shows
    assert seen(f.store) == eb


def test_a_missing_file_is_waited_for_with_one_log_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log, state = tmp_path / "maillog", tmp_path / "events.db"
    caplog.set_level(logging.INFO, logger="keyrelay.events")
    f = follower(log, state)
    for _ in range(5):
        assert f.run_once() == 0
    waiting = [r for r in caplog.records if "does not exist yet" in r.getMessage()]
    assert len(waiting) == 1
    lines, expected = message_lines(3)
    write(log, lines)
    f.run_once()
    assert seen(f.store) == expected


def test_malformed_lines_are_counted_and_skipped(tmp_path: Path) -> None:
    log, state = tmp_path / "maillog", tmp_path / "events.db"
    lines, expected = message_lines(2)
    cut = "Dec 05 00:00:02 relay postfix/smtp[88]: Q0000000002: to=<r2@exa"
    write(log, [cut, "\x00\xff garbage", *lines, cut])
    f = follower(log, state)
    f.run_once()
    assert seen(f.store) == expected
    counters = f.store.counters()
    assert counters["malformed"] == 2
    assert counters["lines"] == len(lines) + 3
    assert counters["ignored"] == 1  # the garbage line: no Postfix line at all


@pytest.mark.system  # runs the follower as a process
def test_a_state_file_that_is_not_sqlite_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "events.db"
    bad.write_text("not a database at all, " * 100)
    with pytest.raises(StoreError, match="not a usable events state file"):
        EventStore(bad)
    run = subprocess.run([sys.executable, "-m", "keyrelay.events", "--maillog",
                          str(tmp_path / "maillog"), "--state", str(bad), "--once"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "Traceback" not in run.stderr


def test_the_checkpoint_is_never_inside_a_line(tmp_path: Path) -> None:
    log = tmp_path / "maillog"
    lines, _ = message_lines(4)
    text = "".join(line + "\n" for line in lines)
    log.write_text(text[:-10], encoding="utf-8")
    source = FileSource(log)
    got = source.read(1000)
    cp = source.checkpoint()
    assert cp is not None and text[cp.offset - 1] == "\n"
    assert len(got) == len(lines) - 1


@pytest.mark.system  # runs the follower as a process, kills and restarts it
def test_exactly_once_across_sigkill_and_rotation(tmp_path: Path) -> None:
    """A follower process is killed (SIGKILL) several times while the log grows, once across
    a rotation; each restart resumes from the store. At the end every event the log holds is
    in the store exactly once: none lost, none repeated."""
    rnd = random.Random(2512)
    log, state = tmp_path / "maillog", tmp_path / "events.db"
    messages = 240
    all_lines: list[str] = []
    expected: Expected = Counter()
    for i in range(1, messages + 1):
        lines, exp = message_lines(i)
        all_lines += lines
        expected += exp
    text = "".join(line + "\n" for line in all_lines).encode()
    rotate_at = text.index(b"\n", len(text) // 2) + 1
    kill_points = sorted(rnd.sample(range(len(text) // 10, len(text)), 4))

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "keyrelay.events", "--maillog", str(log), "--state",
             str(state), "--batch-lines", "7", "--poll", "0.01", "--quiet"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    proc = start()
    kills = 0
    out = log.open("ab", buffering=0)
    try:
        pos = 0
        while pos < len(text):
            end = min(len(text), pos + rnd.randrange(1, 400))  # cuts lines anywhere
            if pos < rotate_at <= end:
                end = rotate_at
            out.write(text[pos:end])
            pos = end
            if pos == rotate_at:
                log.rename(tmp_path / "maillog.1")
                out.close()  # the writer reopens: new lines go to a new file
                out = log.open("ab", buffering=0)
            if kill_points and pos >= kill_points[0]:
                kill_points.pop(0)
                time.sleep(rnd.random() * 0.05)
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                kills += 1
                proc = start()
            time.sleep(0.002)
    finally:
        out.close()
    # generous deadline for a loaded 2-core machine: the follower reads a few hundred KB
    deadline = time.monotonic() + 120
    store = EventStore(state)
    while time.monotonic() < deadline:
        if sum(seen(store).values()) >= sum(expected.values()):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=30)[1].decode(errors="replace")
    assert proc.returncode == 0, stderr
    assert kills == 4
    got = seen(store)
    assert got == expected, (
        f"missing: {expected - got}, repeated or unexpected: {got - expected}")
    ids = [e["event_id"] for _, e in store.events()]
    assert len(ids) == len(set(ids))
    assert store.counters().get("malformed", 0) == 0


@pytest.mark.system  # runs python -m keyrelay.events
def test_once_prints_each_new_event_once_as_a_json_line(tmp_path: Path) -> None:
    log, state = tmp_path / "maillog", tmp_path / "events.db"
    lines, expected = message_lines(35)  # processed, deferred, delivered

    def once() -> list[dict[str, object]]:
        run = subprocess.run([sys.executable, "-m", "keyrelay.events", "--maillog", str(log),
                              "--state", str(state), "--once"],
                             capture_output=True, text=True, cwd=REPO, timeout=60, check=True)
        return [json.loads(line) for line in run.stdout.splitlines()]

    write(log, lines)
    printed = once()
    assert Counter((e["event"], e["email"], e["queue_id"]) for e in printed) == expected
    assert printed[0]["account"] == "acme" and printed[0]["key_id"] == KEY_ID
    assert once() == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=40), st.integers(1, 12))
def test_any_chunking_of_writes_and_batches_gives_the_same_events(
        chunks: list[int], batch_lines: int) -> None:
    """However the writer splits its bytes (inside lines too) and however many lines a batch
    holds, the store ends with the events of reading the whole file at once."""
    text = "".join(line + "\n" for i in range(60, 66) for line in message_lines(i)[0])
    with tempfile.TemporaryDirectory() as tmp:
        whole_log, whole_state = Path(tmp) / "whole.log", Path(tmp) / "whole.db"
        whole_log.write_text(text, encoding="utf-8")
        reference = follower(whole_log, whole_state)
        reference.run_once()
        want = [e for _, e in reference.store.events()]
        log, state = Path(tmp) / "maillog", Path(tmp) / "events.db"
        log.write_text("", encoding="utf-8")
        f = Follower.open(log, EventStore(state), maillog.Parser(), batch_lines=batch_lines)
        pos, n = 0, 0
        while pos < len(text):
            step = chunks[n % len(chunks)]
            n += 1
            with log.open("a", encoding="utf-8") as out:
                out.write(text[pos:pos + step])
            pos += step
            f.step()
        f.run_once()
        got = [e for _, e in f.store.events()]
        # the same events; the ids differ only by the file's name hash, which is its first
        # line: the same here, so the ids are equal too
        assert got == want
        reference.store.close()
        f.store.close()
