"""``python -m keyrelay.demo [RUN_DIR]`` (what ``make run`` starts): the relay in the
foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
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
    if os.geteuid() != 0:
        print("keyrelay demo: error: run as root (it starts a private Postfix instance)",
              file=sys.stderr)
        return 1
    stop = {"signal": 0}

    def on_signal(number: int, _frame: object) -> None:
        stop["signal"] = number

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        relay = Relay(Settings.from_env(Path(args.run_dir)), say=lambda text: print(text,
                                                                                     flush=True))
        relay.start()
    except (DemoError, OSError, subprocess.SubprocessError) as exc:
        print(f"keyrelay demo: error: {exc}", file=sys.stderr)
        return 1
    print(relay.banner(), flush=True)
    status = 0
    parent = os.getppid()
    # SIGTERM to `make` does not reach this process: a new parent (the old one exited) stops
    # the demo too, so nothing keeps running behind a stopped `make run`.
    while not stop["signal"] and os.getppid() == parent:
        failed = relay.failed_child()
        if failed is not None:
            print(f"keyrelay demo: error: {failed.name} stopped; see {failed.log}:\n"
                  + tail(failed.log), file=sys.stderr)
            status = 1
            break
        time.sleep(0.5)
    print("stopping Postfix, keyrelay-milter, keyrelay-policyd and smtp-sink ...", flush=True)
    relay.stop()
    print("stopped.", flush=True)
    return status
