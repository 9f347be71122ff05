"""The soaks' shared ledger (bench/soak.py, one relay; bench/soak_cluster.py, two nodes): what
the client was told about each message, which messages to send again, and the accounting
against what the sinks hold at the end.

``Book.sort(outcome)`` files one round of testkit/loadgen.py: accepted messages (by whom),
those in doubt (the session broke after the end of DATA), the last answer of every refused
one, and returns the numbers to send again (a temporary answer, a broken session, or what the
caller's ``again`` says, e.g. the revoked key's refusals); any other answer is permanent.
``Book.ledger(seen, unsigned)`` compares the book with the sinks' census and gives the
accounting's lines and whether a promise was broken. ``parse_args`` reads the options both
soaks share, their help taken from the module's doc (its OPTIONS and REQUIREMENTS parts).
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from testkit.loadgen import LoadResult


@dataclass
class Book:
    accepted: dict[int, str] = field(default_factory=dict)  # number -> principal
    mail_sent_at: dict[int, float] = field(default_factory=dict)
    in_doubt: set[int] = field(default_factory=set)
    permanent: dict[int, str] = field(default_factory=dict)  # number -> its answer
    last_reply: dict[int, str] = field(default_factory=dict)
    replies: Counter[str] = field(default_factory=Counter)  # every refusal and broken session
    todo: list[int] = field(default_factory=list)  # still to send after the last round

    def sort(self, outcome: LoadResult,
             again: Callable[[int, str], bool] = lambda number, label: False) -> list[int]:
        """File one round; the messages to send again (also kept as ``todo``)."""
        self.replies.update(outcome.errors)
        self.accepted.update(outcome.sent_by)
        self.mail_sent_at.update(outcome.mail_sent_at)
        self.in_doubt |= outcome.in_doubt
        self.todo = []
        for number, label in sorted(outcome.reply_of.items()):
            self.last_reply[number] = label
            if again(number, label) or label[:1] == "4" or label.startswith("connection"):
                self.todo.append(number)  # temporary, or the session broke: send it again
            else:
                self.permanent[number] = label
        return self.todo

    def ledger(self, seen: Counter[int], unsigned: int,
               sinks: str = "at the sink") -> tuple[list[str], bool]:
        """The accounting's lines, and True when a promise was broken: a message lost,
        duplicated, unexpected at the sink, delivered unsigned or refused permanently (those
        still refused, temporarily, when the run gave up are listed, not counted)."""
        lost = sorted(set(self.accepted) - set(seen))
        duplicated = sorted(n for n, c in seen.items() if c > 1 and n not in self.in_doubt)
        doubtful_twice = sorted(n for n, c in seen.items() if c > 1 and n in self.in_doubt)
        unexpected = sorted(set(seen) - set(self.accepted) - self.in_doubt)
        lines = [
            f"  accepted by the relay           {len(self.accepted)}",
            f"  {sinks + ' ' * 32:.32}{sum(seen.values())} ({len(seen)} distinct)",
            f"  lost (accepted, not at sink)    {len(lost)}",
            f"  duplicated                      {len(duplicated)}",
            f"  in doubt (session broke after the end of DATA): {len(self.in_doubt)}, of "
            f"which {sinks} twice: {len(doubtful_twice)}",
            f"  {sinks + ', not accepted' + ' ' * 32:.32}{len(unexpected)}",
            f"  delivered unsigned (unchecked)  {unsigned}",
            f"  refused permanently (5xx)       {len(self.permanent)} "
            f"{dict(Counter(self.permanent.values())) or ''}",
            f"  given up, last answer temporary {len(self.todo)} "
            f"{dict(Counter(self.last_reply[n] for n in self.todo)) or ''}",
        ]
        broken = bool(lost or duplicated or unexpected or unsigned or self.permanent)
        return lines, broken


def parse_args(argv: Sequence[str] | None, doc: str, prog: str, messages: int,
               concurrency: int,
               more: Callable[[argparse.ArgumentParser], object] = lambda parser: None
               ) -> argparse.Namespace:
    """The options both soaks take (``messages`` and ``concurrency``: their defaults), and
    ``more`` of the caller's; a non-positive count is one usage error."""
    head, rest = doc.split("\nOPTIONS\n", 1)
    parser = argparse.ArgumentParser(
        prog=prog, description=head.split("\n\n", 1)[1],
        epilog="REQUIREMENTS\n" + rest.split("\nREQUIREMENTS\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    more(parser)
    parser.add_argument("--messages", type=int, default=messages, metavar="N")
    parser.add_argument("--concurrency", type=int, default=concurrency, metavar="C")
    parser.add_argument("--size", type=int, default=2000, metavar="BYTES")
    parser.add_argument("--faults-every", type=float, default=3.0, metavar="S")
    parser.add_argument("--max-seconds", type=float, default=1800.0, metavar="S")
    parser.add_argument("--fault-seconds", type=float, default=0.0, metavar="S")
    parser.add_argument("--seed", type=int, metavar="N")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.concurrency < 1 or args.size < 2 or args.faults_every <= 0:
        parser.error("--messages, --concurrency and --faults-every must be positive, "
                     "--size at least 2")
    return args
