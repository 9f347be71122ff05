"""``python -m keyrelay.events``: follow a maillog into the events state file, printing each
new event as one JSON line (docs/events.md, "Running it").

``--once`` reads what the file holds now and exits; without it the follower runs until SIGTERM
or SIGINT, committing what it has read before it exits.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from .correlate import DEFAULT_MAX_AGE, Event
from .follow import Follower
from .maillog import Parser
from .store import EventStore, StoreError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m keyrelay.events",
        description="Turn Postfix's maillog into keyrelay delivery events.")
    p.add_argument("--maillog", required=True, help="the log file Postfix writes")
    p.add_argument("--state", required=True,
                   help="the SQLite file of events, log position and correlation state")
    p.add_argument("--once", action="store_true", help="read what is there now, then exit")
    p.add_argument("--syslog-name", action="append", default=None, metavar="NAME",
                   help="only lines of this Postfix syslog_name (repeatable; default: all)")
    p.add_argument("--batch-lines", type=int, default=2000, metavar="N",
                   help="lines per transaction at most (default 2000)")
    p.add_argument("--poll", type=float, default=0.25, metavar="SECONDS",
                   help="how often to look for new lines once caught up (default 0.25)")
    p.add_argument("--max-age", type=float, default=DEFAULT_MAX_AGE, metavar="SECONDS",
                   help="forget a message not finished after this long in log time")
    p.add_argument("--from-end", action="store_true",
                   help="with no checkpoint yet, start at the end of the file, not its start")
    p.add_argument("--quiet", action="store_true", help="do not print the events")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.batch_lines < 1 or args.poll <= 0 or args.max_age <= 0:
        print("keyrelay.events: --batch-lines, --poll and --max-age must be positive",
              file=sys.stderr)
        return 2
    try:
        store = EventStore(args.state)
    except StoreError as exc:
        print(f"keyrelay.events: {exc}", file=sys.stderr)
        return 2

    def emit(events: list[Event]) -> None:
        if not args.quiet:
            for event in events:
                sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
            sys.stdout.flush()

    names = frozenset(args.syslog_name) if args.syslog_name else None
    follower = Follower.open(args.maillog, store, Parser(syslog_names=names),
                             start_at_end=args.from_end, batch_lines=args.batch_lines,
                             max_age=args.max_age, on_events=emit)
    try:
        if args.once:
            follower.run_once()
        else:
            stop = threading.Event()

            def stopping(signum: int, frame: FrameType | None) -> None:
                stop.set()

            signal.signal(signal.SIGTERM, stopping)
            signal.signal(signal.SIGINT, stopping)
            follower.run(stop, poll=args.poll)
    finally:
        follower.source.close()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
