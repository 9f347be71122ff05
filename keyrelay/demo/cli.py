"""``python -m keyrelay.demo [RUN_DIR]`` (what ``make run`` starts): the relay in the
foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..usage import ArgumentParser, echo_undecodable_arguments
from .processes import tail
from .relay import Relay
from .settings import ENVIRONMENT, DemoError, Settings


def main(argv: Sequence[str] | None = None) -> int:
    echo_undecodable_arguments()
    parser = ArgumentParser(
        prog="python -m keyrelay.demo",
        description="Run a keyrelay demo relay on loopback in the foreground (make run).",
        epilog=ENVIRONMENT,
    )
    parser.add_argument("run_dir", nargs="?", default="run", help="state folder (default: run)")
    args = parser.parse_args(argv)
    holder: list[Relay] = []

    def start() -> str:
        relay = Relay(Settings.from_env(Path(args.run_dir)), say=lambda text: print(text,
                                                                                     flush=True))
        holder.append(relay)
        relay.start()
        return relay.banner()

    def failed() -> str | None:
        child = holder[0].failed_child()
        return None if child is None else (f"{child.name} stopped; see {child.log}:\n"
                                           + tail(child.log))

    return run_in_foreground(
        "keyrelay demo", start, failed, lambda: holder[0].stop() if holder else None,
        "Postfix, keyrelay-milter, keyrelay-policyd and smtp-sink")


def run_in_foreground(prog: str, start: Callable[[], str], failed: Callable[[], str | None],
                      stop: Callable[[], None], parts: str) -> int:
    """``make run`` and ``make run-cluster`` (testkit/cluster.py): as root, ``start()`` (what
    it returns is printed), then wait until Ctrl-C, SIGTERM, a new parent or ``failed()``
    saying what stopped; then ``stop()``. The exit status: 0, or 1 when something failed
    (said on stderr as ``PROG: error: ...``)."""
    if os.geteuid() != 0:
        print(f"{prog}: error: run as root (it starts private Postfix instances)",
              file=sys.stderr)
        return 1
    stop_signal = {"number": 0}

    def on_signal(number: int, _frame: object) -> None:
        stop_signal["number"] = number

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        banner = start()
    except (DemoError, OSError, RuntimeError, subprocess.SubprocessError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        stop()
        return 1
    print(banner, flush=True)
    status = 0
    parent = os.getppid()
    # SIGTERM to `make` does not reach this process: a new parent (the old one exited) stops
    # everything too, so nothing keeps running behind a stopped `make run`.
    while not stop_signal["number"] and os.getppid() == parent:
        what = failed()
        if what is not None:
            print(f"{prog}: error: {what}", file=sys.stderr)
            status = 1
            break
        time.sleep(0.5)
    print(f"stopping {parts} ...", flush=True)
    stop()
    print("stopped.", flush=True)
    return status
