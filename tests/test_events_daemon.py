"""``keyrelay-events``, the daemon (keyrelay/events/daemon.py; docs/events.md, "The daemon"):
the real program on a log file, and inside the relay ``make run`` starts.

- --check-config: a usable state file is said so; a missing folder or a file that is not an
  events state file is one line and exit 1, no traceback;
- following: each event is logged as one line and stored; SIGTERM commits and exits 0; a
  restart goes on from the saved position, so every event of the log is stored exactly once;
- the demo relay runs it on its Postfix's maillog: a message sent with a key gives
  ``processed`` then ``delivered`` in ``events.db``, attributed to the login.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from keyrelay.demo import Relay
from keyrelay.events.store import EventStore
from testkit.net import wait_until
from testkit.relay import message, new_tenant, send, wait_delivered

STORY = Path(__file__).resolve().parent / "golden" / "maillog" / "story.txt"
BIN = Path(sys.executable).parent


def configure(tmp_path: Path, maillog: Path, state: Path) -> Path:
    config = tmp_path / "keyrelay.yaml"
    config.write_text(json.dumps({
        "directory": {"path": str(tmp_path / "directory.yaml")},
        "events": {"maillog": str(maillog), "state": str(state), "start_at_end": False,
                   "poll": "0.05s"},
    }))
    return config


def events(state: Path) -> list[dict[str, object]]:
    store = EventStore(state)
    try:
        return [event for _, event in store.events()]
    finally:
        store.close()


def story_lines() -> list[str]:
    return [line for line in STORY.read_text().splitlines(keepends=True)
            if not line.startswith("#")]


def expected_count() -> int:
    """The events the story gives, from its golden file (one JSON event per line)."""
    golden = STORY.with_suffix(".events").read_text().splitlines()
    return len([line for line in golden if line.startswith("{")])


def test_check_config_names_what_is_wrong(tmp_path: Path) -> None:
    state = tmp_path / "events.db"
    config = configure(tmp_path, tmp_path / "maillog", state)
    good = subprocess.run([BIN / "keyrelay-events", "--config", config, "--check-config"],
                          capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr
    assert f"keyrelay-events: state file {state} is usable" in good.stdout
    assert "does not exist yet; keyrelay-events waits for it" in good.stderr
    for bad, line in (
        (tmp_path / "missing" / "events.db",
         f"keyrelay-events: error: events.state: the folder {tmp_path / 'missing'} does not "
         "exist"),
        (tmp_path / "not-sqlite.db", "keyrelay-events: error: events.state: "),
    ):
        if bad.name == "not-sqlite.db":
            bad.write_text("this is not SQLite\n" * 100)
        result = subprocess.run(
            [BIN / "keyrelay-events", "--config", configure(tmp_path, tmp_path / "m", bad),
             "--check-config"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 1
        assert result.stderr.startswith(line), result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1


def test_the_daemon_stores_every_event_once_across_a_stop(tmp_path: Path) -> None:
    maillog, state = tmp_path / "maillog", tmp_path / "events.db"
    config = configure(tmp_path, maillog, state)
    lines = story_lines()
    half = len(lines) // 2
    maillog.write_text("".join(lines[:half]))
    log = tmp_path / "events.log"
    with log.open("ab") as out:
        first = subprocess.Popen([BIN / "keyrelay-events", "--config", config], stdout=out,
                                 stderr=out)
    try:
        wait_until(lambda: "event=processed" in log.read_text(), 60,
                   "the first half's events in the daemon's log")
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(60) == 0, log.read_text()[-2000:]
    assert "stopping (SIGTERM)" in log.read_text()
    with maillog.open("a") as handle:
        handle.write("".join(lines[half:]))
    with log.open("ab") as out:
        again = subprocess.Popen([BIN / "keyrelay-events", "--config", config], stdout=out,
                                 stderr=out)
    try:
        wait_until(lambda: len(events(state)) >= expected_count(), 60,
                   "every event of the story in the state file")
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(60) == 0, log.read_text()[-2000:]
    stored = events(state)
    assert len(stored) == expected_count()
    assert all(n == 1 for n in Counter(e["event_id"] for e in stored).values())
    logged = [line for line in log.read_text().splitlines() if " event=" in line]
    assert len(logged) == expected_count()
    assert "Traceback" not in log.read_text()


def test_the_demo_relay_turns_its_mail_into_events(demo_relay: Relay) -> None:
    tenant = new_tenant(demo_relay)
    account, subuser = tenant.principal.split("/")
    mid, text = message(tenant.sender, "rcpt@example.net", "events from the demo")
    send(demo_relay, "submission", tenant.key, tenant.sender, text)
    wait_delivered(demo_relay, mid)
    state = demo_relay.settings.events_state

    def mine() -> list[dict[str, object]]:
        return [e for e in events(state) if e.get("message_id") == mid]

    wait_until(lambda: {"processed", "delivered"} <= {e["event"] for e in mine()}, 60,
               "processed and delivered in the demo's events.db")
    for event in mine():
        assert (event["account"], event["subuser"], event["key_id"]) == (
            account, subuser, tenant.key_id)
    assert f"event=delivered account={account}" in (
        demo_relay.settings.logs / "events.log").read_text()
