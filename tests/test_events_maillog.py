"""The maillog parser and the correlator of keyrelay/events, in process (docs/events.md).

Golden files: tests/golden/maillog/NAME.txt holds real-shaped Postfix 3.7 lines of one shape
family (the texts follow Postfix's format strings, and the lines keyrelay's own test relays
wrote); NAME.parsed holds each line followed by the record the parser makes of it. story.txt is
one relay's log in order, and story.events the events the correlator makes of it.
``KEYRELAY_UPDATE_GOLDEN=1 pytest tests/test_events_maillog.py`` rewrites the .parsed and
.events files; review the diff before committing it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import typing
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyrelay.events import maillog
from keyrelay.events.correlate import Correlator, Event, Position

GOLDEN = Path(__file__).parent / "golden" / "maillog"
UPDATE_GOLDEN = os.environ.get("KEYRELAY_UPDATE_GOLDEN") == "1"
# The parser's clock: a year-less "Dec 31" is then last year's (read across New Year).
NOW = datetime(2026, 12, 5, 1, 0, 0, tzinfo=UTC).timestamp()
SHAPES = ["prefixes", "smtpd", "cleanup_qmgr", "delivery", "reject"]


def parser() -> maillog.Parser:
    return maillog.utc_parser(NOW)


def render(record: maillog.Record) -> str:
    """A record as one line: its type and every field, the header's time as RFC 3339."""
    parts = []
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        if isinstance(value, maillog.Header):
            when = datetime.fromtimestamp(value.when, UTC).isoformat(timespec="microseconds")
            parts.append(f"at={when} host={value.host} syslog_name={value.syslog_name} "
                         f"daemon={value.daemon} pid={value.pid}")
        else:
            parts.append(f"{field.name}={value!r}")
    return f"{type(record).__name__}(" + ", ".join(parts) + ")"


def input_lines(name: str) -> list[str]:
    text = (GOLDEN / f"{name}.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE_GOLDEN:
        path.write_text(text, encoding="utf-8")
        return
    assert path.exists(), f"{path} is missing: run with KEYRELAY_UPDATE_GOLDEN=1 to write it"
    assert text == path.read_text(encoding="utf-8"), (
        f"{path} differs (KEYRELAY_UPDATE_GOLDEN=1 rewrites it; review the diff)")


@pytest.mark.parametrize("name", SHAPES)
def test_each_line_shape_parses_as_recorded(name: str) -> None:
    p = parser()
    out = ["# Regenerate: KEYRELAY_UPDATE_GOLDEN=1 pytest tests/test_events_maillog.py"]
    for line in input_lines(name):
        out += [line, "  -> " + render(p.parse(line))]
    assert_golden(f"{name}.parsed", "\n".join(out) + "\n")


def story_events(lines: list[str], correlator: Correlator | None = None) -> list[Event]:
    p = parser()
    c = correlator or Correlator()
    events: list[Event] = []
    for n, line in enumerate(lines):
        events += c.feed(p.parse(line), Position("story", n))
    return events


def test_the_story_gives_the_recorded_events() -> None:
    events = story_events(input_lines("story"))
    text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in events)
    assert_golden("story.events", text)


def test_the_story_events_are_what_the_design_promises() -> None:
    """The golden file is reviewed once; the promises that matter are also asserted here."""
    events = story_events(input_lines("story"))
    seen = [(e["event"], e["email"], e["queue_id"]) for e in events]
    assert seen == [
        ("processed", None, "A0000000001"),
        ("delivered", "ok@example.net", "A0000000001"),
        ("deferred", "slow@defer.example", "A0000000001"),
        ("dropped", "gone@bounce.example", None),
        ("dropped", "gone@bounce.example", None),
        ("processed", None, "A0000000002"),
        ("bounce", "gone2@bounce.example", "A0000000002"),
        ("dropped", "ok@example.net", "A0000000004"),
        ("deferred", "slow@defer.example", "A0000000001"),
        ("delivered", "slow@defer.example", "A0000000001"),
        ("processed", None, "A0000000005"),
        ("deferred", "never@down.example", "A0000000005"),
        ("bounce", "never@down.example", "A0000000005"),
    ]
    by_kind: dict[str, list[Event]] = {}
    for e in events:
        by_kind.setdefault(e["event"], []).append(e)
    first = by_kind["processed"][0]
    assert (first["account"], first["subuser"], first["key_id"], first["message_id"]) == (
        "acme", "billing", "2xlvy4ec3wqiztun", "<m1@acme.example>")
    # the DKIM domain (keyrelay's milter_header_checks line) on every event of message 1;
    # none on the others, which the story does not sign, nor on a refusal before a queue file
    assert {e["dkim_domain"] for e in events if e["queue_id"] == "A0000000001"} == {
        "acme.example"}
    assert {e["dkim_domain"] for e in events if e["queue_id"] != "A0000000001"} == {None}
    # the refusal before the session's login is known is attributed once it is (acme itself)
    early_drop = by_kind["dropped"][1]
    assert (early_drop["account"], early_drop["subuser"], early_drop["key_id"]) == (
        "acme", None, "abcdefghijklmnop")
    hard, soft = by_kind["bounce"]
    assert (hard["status"], hard["type"]) == ("5.1.1", "hard")
    assert "User unknown" in hard["reason"]
    assert (soft["status"], soft["type"]) == ("4.4.1", "soft")
    assert soft["reason"].startswith("expired: connect to mx.down.example")
    assert [e["attempt"] for e in by_kind["deferred"]] == [1, 2, 1]
    assert by_kind["deferred"][0]["response"].startswith("host mx.defer.example")
    assert len({e["event_id"] for e in events}) == len(events)
    assert all(e["account"] == "acme" for e in events)


@pytest.mark.parametrize("max_age", [8 * 86400.0, 300.0])
def test_replaying_with_saved_state_gives_the_same_events(max_age: float) -> None:
    """Stop after any line, keep only what ``changes()`` gave, resume in a new correlator:
    the events are the same ones, with the same ids (what a restart relies on). With a
    five-minute ``max_age`` message 1 is forgotten before its later deliveries (two events
    fewer) and message 5 before it expires (one fewer): forgetting too depends on the lines
    only, not on where a batch ended."""
    lines = input_lines("story")
    whole = story_events(lines, Correlator(max_age=max_age))
    if max_age == 300.0:
        assert len(whole) == len(story_events(lines)) - 3
    p = parser()
    for cut in range(len(lines) + 1):
        saved: dict[str, str] = {}
        first = Correlator(max_age=max_age)
        events: list[Event] = []
        for n, line in enumerate(lines[:cut]):
            events += first.feed(p.parse(line), Position("story", n))
        for key, value in first.changes():
            if value is None:
                saved.pop(key, None)
            else:
                saved[key] = value
        second = Correlator(max_age=max_age)
        second.load(saved.items())
        for n, line in enumerate(lines[cut:], start=cut):
            events += second.feed(p.parse(line), Position("story", n))
        assert events == whole, f"resuming after line {cut} differs"


def test_unfinished_messages_and_idle_sessions_are_forgotten() -> None:
    p = parser()
    c = Correlator(max_age=600, session_max_age=60, max_messages=1000)
    client = ("Dec 05 00:{m:02d}:00 relay postfix/smtpd[{pid}]: A{n:010d}: client=x[192.0.2.1], "
              "sasl_method=PLAIN, sasl_username=acme:abcdefghijklmnop")
    for n in range(30):
        c.feed(p.parse(client.format(m=n, pid=1000 + n, n=n)), Position("s", n))
    # each new minute of log time sweeps: at 00:29, messages first seen before 00:19 and
    # sessions idle since before 00:28 are forgotten
    assert sorted(c.messages) == [f"A{n:010d}" for n in range(19, 30)]
    assert sorted(c.sessions) == ["relay/1028", "relay/1029"]
    assert c.counts["forgotten"] == 19
    changes = dict(c.changes())
    assert changes["m:A0000000000"] is None and changes["s:relay/1000"] is None
    assert changes["m:A0000000029"] is not None
    c.expire()  # again at the same log time: nothing more
    assert len(c.messages) == 11 and c.counts["forgotten"] == 19


def test_the_oldest_messages_go_beyond_max_messages() -> None:
    p = parser()
    c = Correlator(max_messages=50)
    client = ("Dec 05 00:30:{s:02d} relay postfix/smtpd[7]: A{n:010d}: client=x[192.0.2.1], "
              "sasl_method=PLAIN, sasl_username=acme:abcdefghijklmnop")
    for n in range(200):
        c.feed(p.parse(client.format(s=n % 60, n=n)), Position("s", n))
    assert len(c.messages) == 50
    assert min(c.messages) == "A0000000150"
    assert c.counts["evicted"] == 150


# --- never an exception -----------------------------------------------------------------

TEMPLATES = [line for name in [*SHAPES, "story"] for line in input_lines(name)]


RECORD_TYPES = typing.get_args(maillog.Record)


def check_parse(line: str) -> maillog.Record:
    record = parser().parse(line)
    assert type(record) in RECORD_TYPES
    return record


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=600))
def test_any_text_parses_without_an_exception(text: str) -> None:
    check_parse(text)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_parse_without_an_exception(data: bytes) -> None:
    check_parse(data.decode("utf-8", "replace"))


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(TEMPLATES), st.data())
def test_cut_lines_parse_without_an_exception(line: str, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(line)))
    check_parse(line[:cut])
    check_parse(line[cut:])


HOSTILE = st.text(alphabet=st.sampled_from(list("<>()[];,=\"' \\:/.@x5\u00fc\t")), max_size=80)


@settings(max_examples=400, deadline=None)
@given(HOSTILE, HOSTILE, HOSTILE)
def test_hostile_replies_and_addresses_keep_the_line_readable(
        reply: str, rcpt: str, helo: str) -> None:
    """Whatever the remote server answers or the client names, a delivery line stays a
    Delivery (or, at worst, a counted Malformed) and a reject line a Reject."""
    delivery = ("Dec 05 00:30:10 relay postfix/smtp[1]: 0DD13262C31: to=<r@example.net>, "
                "relay=mx[192.0.2.1]:25, delay=1, delays=0/0/0.5/0.5, dsn=5.0.0, "
                f"status=bounced (host said: {reply})")
    record = check_parse(delivery)
    assert isinstance(record, maillog.Delivery)
    assert record.reply == f"host said: {reply}"
    assert record.recipient == "r@example.net"
    reject = ("Dec 05 00:30:11 relay postfix/smtpd[4]: NOQUEUE: reject: RCPT from x[192.0.2.9]: "
              f"550 5.7.1 <{rcpt}>: Recipient address rejected: {reply}; from=<a@b.example> "
              f"to=<{rcpt}> proto=ESMTP helo=<{helo}>")
    assert type(check_parse(reject)) in (maillog.Reject, maillog.Malformed)
    c = Correlator()
    for line in (delivery, reject):
        c.feed(parser().parse(line), Position("h", 0))


def test_a_corrupted_log_never_raises_in_the_correlator() -> None:
    """Story lines cut, swapped and mixed with noise at random (seeded): the correlator takes
    every record without an exception and its events keep their required fields."""
    rnd = random.Random(25)
    lines = input_lines("story")
    p = parser()
    for _ in range(200):
        mixed = []
        for line in lines:
            roll = rnd.random()
            if roll < 0.1:
                line = line[: rnd.randrange(len(line) + 1)]
            elif roll < 0.15:
                line = bytes(rnd.randrange(256) for _ in range(40)).decode("latin-1")
            mixed.append(line)
        rnd.shuffle(mixed)
        c = Correlator()
        for n, line in enumerate(mixed):
            for event in c.feed(p.parse(line), Position("x", n)):
                assert {"event", "timestamp", "event_id", "account"} <= event.keys()


def test_syslog_names_keep_only_the_instances_named() -> None:
    line = ("Dec  5 00:30:10 relay {name}/smtp[4300]: 0DD13262C31: to=<r@example.net>, "
            "relay=none, delay=1, delays=0/0/1/0, dsn=2.0.0, status=sent (ok)")
    only_out = maillog.Parser(syslog_names=frozenset({"postfix-out"}))
    assert isinstance(only_out.parse(line.format(name="postfix-out")), maillog.Delivery)
    assert isinstance(only_out.parse(line.format(name="postfix-out/kr-pool-x")),
                      maillog.Delivery)
    assert only_out.parse(line.format(name="postfix")) == maillog.Unknown(None)
