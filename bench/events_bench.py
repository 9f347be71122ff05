"""What following Postfix's log costs (keyrelay/events; docs/events.md, "Cost").

Three figures over the same lines, each as lines/s and CPU microseconds per line (process
time, so another process on the machine does not count):

1. the parser alone (``maillog.Parser.parse``), called for every log line;
2. parser and correlator (``Correlator.feed``): the events;
3. the whole follower over a file: reading, parsing, correlating and committing each batch
   (events, position and state in one SQLite transaction) to a scratch state file;
4. the same follower over the systemd journal (``--journal-lines`` of them, written as
   journal entries with systemd-journal-remote, read through journalctl), with journalctl's
   own CPU per line.

The lines are a synthetic relay log (per message: connect, client with a keyrelay login,
message-id, queue active, one or two deliveries, removed, disconnect; some refusals and
deferrals) or, with ``--maillog FILE``, a real one (``--limit`` lines of it). No timed
assertion anywhere: this prints figures.

    .venv/bin/python -m bench.events_bench [--messages 50000] [--maillog FILE --limit N]
        [--journal-lines 100000]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from keyrelay.events import maillog
from keyrelay.events.correlate import Correlator, Position
from keyrelay.events.follow import Follower
from keyrelay.events.store import EventStore
from testkit.journal import JOURNAL_REMOTE, JournalWriter, entries_in
from testkit.net import wait_until


def synthetic(messages: int) -> list[str]:
    out = []
    for i in range(messages):
        qid = f"{0x10000000 + i:X}"
        pid = 4000 + i % 200
        t = f"Dec  5 {i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}"
        head = f"{t} relay postfix"
        out += [
            f"{head}/smtpd[{pid}]: connect from app.example[192.0.2.{i % 250}]",
            f"{head}/smtpd[{pid}]: {qid}: client=app.example[192.0.2.{i % 250}], "
            f"sasl_method=PLAIN, sasl_username=acme/s{i % 7}:abcdefghijklmnop",
            f"{head}/cleanup[77]: {qid}: message-id=<{i}.bench@acme.example>",
            f"{head}/qmgr[66]: {qid}: from=<app@acme.example>, size=2048, nrcpt=1 "
            "(queue active)",
        ]
        relay = (f"{head}/kr-pool-demo/smtp[{5000 + i % 50}]: {qid}: to=<r{i}@example.net>, "
                 "relay=mx.example.net[198.51.100.5]:25, delay=0.4, delays=0.1/0/0.1/0.2,")
        if i % 10 == 0:
            out.append(f"{relay} dsn=4.7.1, status=deferred (host mx.example.net"
                       "[198.51.100.5] said: 451 4.7.1 Try again later (in reply to RCPT TO "
                       "command))")
        if i % 50 == 0:
            out.append(f"{head}/smtpd[{pid}]: NOQUEUE: reject: RCPT from app.example"
                       f"[192.0.2.1]: 550 5.7.1 <gone{i}@example.net>: Recipient address "
                       "rejected: suppressed; from=<app@acme.example> "
                       f"to=<gone{i}@example.net> proto=ESMTP helo=<app>")
        out += [
            f"{relay} dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as X{i})",
            f"{head}/qmgr[66]: {qid}: removed",
            f"{head}/smtpd[{pid}]: disconnect from app.example[192.0.2.1] ehlo=1 auth=1 "
            "mail=1 rcpt=1 data=1 quit=1 commands=6",
        ]
    return out


def measure(name: str, lines: int, run: Callable[[], int]) -> None:
    wall, cpu = time.perf_counter(), time.process_time()
    events = run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    per_event = f"{events:>8,} events  {cpu / events * 1e6:>8.2f} us CPU/event" if events else ""
    print(f"{name:<28} {lines / wall:>12,.0f} lines/s  {cpu / lines * 1e6:>7.2f} us CPU/line"
          f"  {per_event}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=50_000)
    p.add_argument("--maillog", type=Path, help="a real maillog instead of synthetic lines")
    p.add_argument("--limit", type=int, default=500_000, help="lines of --maillog to use")
    p.add_argument("--journal-lines", type=int, default=100_000,
                   help="lines also followed from a systemd journal (0: none)")
    args = p.parse_args()
    if args.maillog:
        with args.maillog.open(encoding="utf-8", errors="replace") as f:
            lines = [line.rstrip("\n") for _, line in zip(range(args.limit), f, strict=False)]
        what = f"{args.maillog} (first {len(lines):,} lines)"
    else:
        lines = synthetic(args.messages)
        what = f"synthetic: {args.messages:,} messages, {len(lines):,} lines"
    print(f"keyrelay events bench: {what}")

    def parse_only() -> int:
        parse = maillog.Parser().parse
        for line in lines:
            parse(line)
        return 0

    def correlate() -> int:
        parse = maillog.Parser().parse
        feed = Correlator().feed
        n = 0
        for offset, line in enumerate(lines):
            n += len(feed(parse(line), Position("bench", offset)))
        return n

    with tempfile.TemporaryDirectory(prefix="kr-events-bench-") as tmp:
        log = Path(tmp) / "maillog"
        log.write_text("".join(line + "\n" for line in lines), encoding="utf-8")

        def follow() -> int:
            store = EventStore(Path(tmp) / "events.db")
            follower = Follower.open(log, store, maillog.Parser())
            follower.run_once()
            n = store.last_seq()
            store.close()
            return n

        measure("parser", len(lines), parse_only)
        measure("parser + correlator", len(lines), correlate)
        measure("follower (file -> SQLite)", len(lines), follow)
        if args.journal_lines and Path(JOURNAL_REMOTE).exists():
            journal_source(Path(tmp), lines[:args.journal_lines])


def journal_source(tmp: Path, lines: list[str]) -> None:
    """The follower over the systemd journal (events.source: journal): the lines written
    as journal entries by systemd-journal-remote (testkit/journal.py), then read through
    journalctl by ``JournalSource``; CPU of this process and of journalctl (a child)."""
    folder = tmp / "journal"
    with JournalWriter(folder) as journal:
        for line in lines:
            journal.line(line)
    wait_until(lambda: entries_in(folder) >= len(lines), 600, "the journal entries")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)

    def follow() -> int:
        """As the daemon follows (journalctl --follow; a batch short of batch_lines waits
        events.poll, 0.25 s, before the next), until every line is read."""
        store = EventStore(tmp / "journal-events.db")
        follower = Follower.open("/nonexistent", store, maillog.Parser(), journal=True,
                                 journal_directory=str(folder))
        try:
            read = 0
            while read < len(lines):
                n = follower.step()
                read += n
                if n < follower.batch_lines:
                    time.sleep(0.25)
        finally:
            follower.close()
        n = store.last_seq()
        store.close()
        return n

    measure("follower (journal -> SQLite)", len(lines), follow)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    child = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    print(f"{'  of which journalctl':<28} {child / len(lines) * 1e6:>31.2f} us CPU/line")


if __name__ == "__main__":
    main()
