"""The webhook outbox's state in the events file (keyrelay/events/store.py, outbox.py;
docs/webhooks.md "Delivery"), in process: an account's batch waiting for its retry holds that
account's later events and nobody else's, however long its backlog; the next round is due
when the held account's retry is, not at once; a failure dates the whole backlog, so
``webhooks.retry_for`` counts from the first failure for all of it. And a SendGrid CSV whose
``created`` is an absurd number is a line of the report, not a traceback."""

from __future__ import annotations

from pathlib import Path

from keyrelay.events.correlate import Position, event_id
from keyrelay.events.store import EventStore
from keyrelay.suppressions import csvfile

NOW = 1_800_000_000.0


def _events(account: str, first: int, count: int) -> list[dict[str, object]]:
    return [{"event": "delivered", "account": account, "email": f"r{n}@example.net",
             "event_id": event_id(Position("src", n), 0)} for n in range(first, first + count)]


def test_a_held_account_hides_nobody_elses_events(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "events.db")
    store.commit(_events("acme", 0, 5) + _events("beta", 100, 1), None, [], {}, NOW - 10)
    seqs = {p.event["email"]: p.seq for p in store.due(NOW, 100)}
    store.retry([seqs["r0@example.net"]], 1, NOW - 5, NOW + 60, "acme")
    # acme's four later events come first in the table, and are held: beta's is still found
    due = store.due(NOW, 4)
    assert [(p.account, p.event["email"]) for p in due] == [("beta", "r100@example.net")]
    store.settle([due[0].seq], "delivered")
    # nothing else is due before acme's retry: the sender sleeps until then
    assert store.next_due(NOW) == NOW + 60
    assert store.due(NOW, 100) == []
    # the failure dated acme's whole backlog, so retry_for runs out for all of it together
    held = store.due(NOW + 61, 100)
    assert len(held) == 5 and {p.first_failure for p in held} == {NOW - 5}
    store.close()


def test_a_csv_created_that_is_no_time_is_a_line_of_the_report() -> None:
    parsed = csvfile.parse("email,created\na@example.com," + "9" * 400 + "\n", 0)
    assert parsed.good == [] and len(parsed.problems) == 1
    assert parsed.problems[0].line == 2
    assert "is not a time in Unix seconds" in parsed.problems[0].reason
