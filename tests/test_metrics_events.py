"""keyrelay-events' /metrics and /health (``events.metrics_listen``; docs/metrics.md), against
the real program following a maillog of Postfix's lines; promtool lints every scrape.

- the golden story's events counted by kind, its lines counted, the outbox and the lag read
  from the state file, equal across a restart (the totals are the state file's, not the
  process's);
- /health: 200 while all is well; 503 naming the state file when it is gone from its path,
  naming the maillog when that is gone, and 200 again once each is back;
- the reputation guard's pause reaches ``keyrelay_reputation_pauses_total`` (the metric issue
  25 asks for);
- a port already taken: one line, exit 1; --check-config names the endpoint;
- in process: the lag across a rotation, and /health naming a thread that stopped.

Health and counts are waited for (the follower commits a batch, the sender settles it), with
generous deadlines; nothing is timed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_events_daemon import events, expected_count, story_lines
from test_metrics_daemons import Samples, get, healthy, scrape, value
from test_reputation_events import _lines

from keyrelay import admin
from keyrelay.config.loader import parse_config
from keyrelay.directory.yamlfile import YamlDirectory
from keyrelay.events.journal import JOURNAL, JOURNALCTL, JournalSource
from keyrelay.events.metrics import Health, lag_bytes
from keyrelay.events.store import Checkpoint, EventStore
from testkit.journal import JOURNAL_REMOTE, JournalWriter, entries_in
from testkit.net import free_port, wait_until
from testkit.policyd import now

BIN = Path(sys.executable).parent
DEADLINE = 60.0  # seconds: the follower polls every 0.05 s here, the sender every second


class Daemon:
    """A keyrelay-events process on ``config``, its output in ``log``."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen([BIN / "keyrelay-events", "--config", config],
                                            stdout=out, stderr=out)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(60) == 0, self.log.read_text()[-3000:]
        assert "Traceback" not in self.log.read_text()


def configure(tmp_path: Path, port: int, **sections: dict[str, Any]) -> Path:
    settings: dict[str, Any] = {
        "directory": {"path": str(tmp_path / "directory.yaml")},
        "events": {"maillog": str(tmp_path / "maillog"), "state": str(tmp_path / "events.db"),
                   "start_at_end": False, "poll": "0.05s",
                   "metrics_listen": f"127.0.0.1:{port}"},
        "suppressions": {"path": str(tmp_path / "supp.db")},
    }
    settings.update(sections)
    with YamlDirectory(str(tmp_path / "directory.yaml")).transaction() as data:
        if "acme" not in data.accounts:
            admin.add_account(data, "acme", now())  # without a webhook
    config = tmp_path / "keyrelay.yaml"
    config.write_text(json.dumps(settings))
    return config


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop()


def counted(samples: Samples) -> dict[str, float]:
    return {kind: value(samples, "keyrelay_events_total", event=kind)
            for kind in ("processed", "delivered", "deferred", "bounce", "dropped", "paused",
                         "would_pause")}


def test_a_scrape_counts_the_story_and_the_totals_survive_a_restart(
        tmp_path: Path, daemons: list[Daemon]) -> None:
    lines = story_lines()
    maillog = tmp_path / "maillog"
    maillog.write_text("".join(lines))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = configure(tmp_path, port)
    daemons.append(Daemon(config, tmp_path / "events.log"))
    wait_until(lambda: healthy_now(base), DEADLINE, "/health to say ok")
    # every event stored, and every one settled by the outbox (no account has a webhook)
    wait_until(lambda: value(scrape(base), "keyrelay_webhook_events_total",
                             result="no_webhook") == expected_count(), DEADLINE,
               "every event of the story settled as no_webhook")
    wait_until(lambda: value(scrape(base), "keyrelay_events_hard_bounces_queued") == 0,
               DEADLINE, "the hard bounce suppressed")
    first = scrape(base)
    stored = events(tmp_path / "events.db")
    assert len(stored) == expected_count()
    by_kind = Counter(str(e["event"]) for e in stored)
    assert counted(first) == {kind: float(by_kind.get(kind, 0)) for kind in counted(first)}
    assert by_kind["delivered"] >= 1 and by_kind["dropped"] >= 1 and by_kind["bounce"] >= 1
    # every line of the file read once, each counted under exactly one result
    assert sum(value(first, "keyrelay_events_log_lines_total", result=r)
               for r in ("used", "ignored", "malformed")) == len(lines)
    assert value(first, "keyrelay_events_maillog_lag_bytes") == 0
    assert value(first, "keyrelay_webhook_events_pending") == 0
    assert value(first, "keyrelay_webhook_events_total", result="delivered") == 0
    assert value(first, "keyrelay_reputation_pauses_total", mode="pause") == 0
    assert ("keyrelay_events_last_event_timestamp_seconds", ()) in first
    assert value(first, "keyrelay_events_last_event_timestamp_seconds") == max(
        float(str(e["timestamp"])) for e in stored)
    assert any(name == "keyrelay_build_info" for name, _ in first)
    assert value(first, "process_open_fds") > 0
    # no account, address or URL in any label: only the closed sets of docs/metrics.md
    labels = {v for (name, ls) in first for k, v in ls if name.startswith("keyrelay_")
              and k not in ("version", "python_version")}
    assert not {v for v in labels if "@" in v or "acme" in v or "/" in v}, labels

    # the figures are the state file's: a new process shows the same totals, and half the
    # story again (already read) adds nothing
    daemons.pop().stop()
    assert not healthy_now(base)  # nothing listens once it stopped
    daemons.append(Daemon(config, tmp_path / "events.log"))
    wait_until(lambda: healthy_now(base), DEADLINE, "/health to say ok after the restart")
    again = scrape(base)
    assert counted(again) == counted(first)
    assert value(again, "keyrelay_events_log_lines_total", result="used") == value(
        first, "keyrelay_events_log_lines_total", result="used")

    # lines appended now are counted (another program's lines: ignored), and the lag goes
    # back to 0 once they are read
    with maillog.open("a") as handle:
        handle.write("Dec 05 00:31:00 relay kernel: [1.0] eth0: link up\n" * 7)

    def read() -> float:
        samples = scrape(base)
        return sum(value(samples, "keyrelay_events_log_lines_total", result=r)
                   for r in ("used", "ignored", "malformed"))
    wait_until(lambda: read() == len(lines) + 7, DEADLINE, "the appended lines counted")
    assert value(scrape(base), "keyrelay_events_log_lines_total", result="ignored") == value(
        first, "keyrelay_events_log_lines_total", result="ignored") + 7
    assert value(scrape(base), "keyrelay_events_maillog_lag_bytes") == 0


def healthy_now(base: str) -> bool:
    """One /health, with a refused connection (nothing listening) as False."""
    try:
        return healthy(base)
    except OSError:
        return False


def test_health_names_the_state_file_or_the_maillog_when_it_is_gone(
        tmp_path: Path, daemons: list[Daemon]) -> None:
    maillog, state = tmp_path / "maillog", tmp_path / "events.db"
    maillog.write_text("".join(story_lines()))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    daemons.append(Daemon(configure(tmp_path, port), tmp_path / "events.log"))
    wait_until(lambda: healthy_now(base), DEADLINE, "/health to say ok")

    # the state file taken away from its path (the running threads keep their open file)
    state.rename(tmp_path / "moved.db")
    status, body = get(base + "/health")
    assert status == 503
    assert body.startswith(f"events.state: {state}: cannot open it") and body.count("\n") == 1
    # /metrics still answers, without the state file's figures
    left = scrape(base)
    assert any(name == "keyrelay_build_info" for name, _ in left)
    assert not any(name.startswith("keyrelay_events_total") for name, _ in left)
    (tmp_path / "moved.db").rename(state)
    wait_until(lambda: healthy_now(base), DEADLINE, "/health ok again with the state file back")

    # the maillog gone (the follower waits for it)
    maillog.rename(tmp_path / "maillog.gone")
    assert get(base + "/health") == (503, f"events.maillog: {maillog} does not exist\n")
    (tmp_path / "maillog.gone").rename(maillog)
    wait_until(lambda: healthy_now(base), DEADLINE, "/health ok again with the maillog back")
    log = (tmp_path / "events.log").read_text()
    assert f"health: events.maillog: {maillog} does not exist" in log
    assert "health: ok again" in log


def test_a_pause_of_the_reputation_guard_is_counted(tmp_path: Path,
                                                     daemons: list[Daemon]) -> None:
    """The synthetic log of tests/test_reputation_events.py: acme/news bounces a third of its
    45 messages and is paused; acme/billing bounces 10 of 10, below min_volume."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = configure(
        tmp_path, port, reputation={"path": str(tmp_path / "reputation.db"), "min_volume": 20})
    (tmp_path / "maillog").write_text("".join(
        _lines("acme/news", "aaaaaaaaaaaaaaaa", 30, 15, 0)
        + _lines("acme/billing", "bbbbbbbbbbbbbbbb", 0, 10, 100)))
    daemons.append(Daemon(config, tmp_path / "events.log"))
    wait_until(lambda: healthy_now(base), DEADLINE, "/health to say ok")
    wait_until(lambda: value(scrape(base), "keyrelay_reputation_pauses_total", mode="pause")
               >= 1, DEADLINE, "the pause counted")
    # the sender settles every event, the pause's included (acme has no webhook)
    wait_until(lambda: value(scrape(base), "keyrelay_webhook_events_pending") == 0, DEADLINE,
               "the outbox empty")
    # the 25 hard bounces suppressed (each round suppresses the queue before it sends)
    wait_until(lambda: value(scrape(base), "keyrelay_events_hard_bounces_queued") == 0,
               DEADLINE, "the hard bounces suppressed")
    samples = scrape(base)
    assert value(samples, "keyrelay_reputation_pauses_total", mode="pause") == 1
    assert value(samples, "keyrelay_reputation_pauses_total", mode="monitor") == 0
    assert counted(samples)["paused"] == 1 and counted(samples)["would_pause"] == 0
    assert counted(samples)["bounce"] == 25 and counted(samples)["delivered"] == 30
    # the same pause as the log line
    assert "reputation: paused acme/news" in (tmp_path / "events.log").read_text()


def test_a_metrics_port_already_taken_stops_the_start_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "maillog").write_text("")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = configure(tmp_path, port)
        result = subprocess.run([BIN / "keyrelay-events", "--config", config],
                                capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"keyrelay-events: error: cannot start: metrics_listen: cannot serve "
        f"127.0.0.1:{port}: Address already in use"]


def test_check_config_names_the_endpoint(tmp_path: Path) -> None:
    (tmp_path / "maillog").write_text("")
    port = free_port()
    on = subprocess.run([BIN / "keyrelay-events", "--config", configure(tmp_path, port),
                         "--check-config"], capture_output=True, text=True, timeout=60)
    assert on.returncode == 0, on.stderr
    assert f"keyrelay-events: /metrics and /health on http://127.0.0.1:{port}" in on.stdout
    config = tmp_path / "keyrelay.yaml"
    settings = json.loads(config.read_text())
    settings["events"]["metrics_listen"] = "nowhere"
    config.write_text(json.dumps(settings))
    bad = subprocess.run([BIN / "keyrelay-events", "--config", config, "--check-config"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert bad.stderr.startswith(f"keyrelay-events: error: {config}")
    assert "events.metrics_listen: must be HOST:PORT" in bad.stderr
    assert len(bad.stderr.splitlines()) == 1 and "Traceback" not in bad.stderr


# -- in process ------------------------------------------------------------------------------
def test_the_lag_follows_the_checkpoint_across_a_rotation(tmp_path: Path) -> None:
    maillog = tmp_path / "maillog"
    maillog.write_bytes(b"x" * 100)
    st = os.stat(maillog)
    checkpoint = Checkpoint(st.st_dev, st.st_ino, "source", 40)
    assert lag_bytes(maillog, checkpoint) == 60
    assert lag_bytes(maillog, None) is None
    # renamed to PATH.1 and a new file begun: what is left of the old one, and all the new
    maillog.rename(tmp_path / "maillog.1")
    maillog.write_bytes(b"y" * 25)
    assert lag_bytes(maillog, checkpoint) == 60 + 25
    # the checkpoint's file at neither name: not known, so no sample
    (tmp_path / "maillog.1").unlink()
    assert lag_bytes(maillog, checkpoint) is None
    # a journal checkpoint (events.source: journal) has no lag in bytes
    assert lag_bytes(maillog, Checkpoint(0, 0, JOURNAL, 0, "s=1;i=2")) is None


def test_health_names_a_thread_that_stopped(tmp_path: Path) -> None:
    state, maillog = tmp_path / "events.db", tmp_path / "maillog"
    EventStore(state).close()
    maillog.write_text("")
    config = parse_config({"events": {"state": str(state), "maillog": str(maillog)}}, "x.yaml")
    stop = threading.Event()
    running = threading.Thread(target=stop.wait)
    done = threading.Thread(target=lambda: None)
    running.start()
    done.start()
    done.join()
    try:
        assert Health(config, [("follower", running)])() == ""
        assert Health(config, [("follower", running), ("webhook sender", done)])() == (
            "the webhook sender thread has stopped (see the daemon's log)")
    finally:
        stop.set()
        running.join()


def test_health_with_the_journal_checks_its_folder_not_the_maillog(tmp_path: Path) -> None:
    state = tmp_path / "events.db"
    EventStore(state).close()
    folder = tmp_path / "journal"
    config = parse_config({"events": {"state": str(state), "source": "journal",
                                      "journal_directory": str(folder),
                                      "maillog": str(tmp_path / "no-such-file")}}, "x.yaml")
    health = Health(config, [])
    assert health() == f"events.journal_directory: {folder} does not exist"
    folder.mkdir()
    assert health() == ""  # the maillog (which does not exist) is not looked at


@pytest.mark.skipif(not (Path(JOURNALCTL).exists() and Path(JOURNAL_REMOTE).exists()),
                    reason="journalctl or systemd-journal-remote is missing (make deps)")
def test_health_names_journalctl_failing_and_ok_once_it_reads(tmp_path: Path) -> None:
    """A journal keyrelay-events cannot read (here: journalctl not runnable, as with a
    missing permission it exits at once) is /health's 503, not a quiet 200; once journalctl
    runs and keeps running, it is 200 again."""
    state, folder = tmp_path / "events.db", tmp_path / "journal"
    EventStore(state).close()
    folder.mkdir()
    config = parse_config({"events": {"state": str(state), "source": "journal",
                                      "journal_directory": str(folder)}}, "x.yaml")
    source = JournalSource(None, directory=str(folder), journalctl=str(tmp_path / "none"))
    health = Health(config, [], lambda: source.problem)
    try:
        assert source.read(10) == []
        assert health().startswith(f"events.source journal: cannot run {tmp_path / 'none'}")
        with JournalWriter(folder) as journal:  # a journal with a file, as a system's has
            journal.entry({"__REALTIME_TIMESTAMP": "1796430600000000", "SYSLOG_FACILITY": "3",
                           "SYSLOG_IDENTIFIER": "sshd", "MESSAGE": "not mail"})
        wait_until(lambda: entries_in(folder) == 1, 60, "journalctl to see the entry")
        source.journalctl = JOURNALCTL
        wait_until(lambda: source.read(10) == [] and health() == "", 60,
                   "/health to be ok once journalctl runs")
    finally:
        source.close()
