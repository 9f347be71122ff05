"""What the Prometheus metrics cost per message: each daemon with metrics off and on, side by
side in one run.

NAME
    metrics_cost.py - CPU per message of keyrelay-milter and keyrelay-policyd, metrics off/on

SYNOPSIS
    .venv/bin/python -m bench.metrics_cost [--repeat R] [--messages N] [--seconds S]
        [--scrape-interval SECONDS]

DESCRIPTION
    Two sites are built in a temporary folder as bench/milter_bench.py builds one (an
    account, a key, a verified domain with an RSA-2048 and an Ed25519 selector), one with
    milter.metrics_listen set; and two keyrelay-policyd on one directory of 1,000 keys
    (testkit/policydload.py), one with policyd.metrics_listen set. The milters run with
    their default workers (auto: one per CPU, so the multiprocess files are what is
    measured on a machine of several CPUs); the policyds with one process (counters in
    memory). Each "on" daemon is scraped (/metrics and /health) every --scrape-interval
    seconds during its runs, more often than Prometheus would (15 s).

    For each of R repetitions, interleaved: the milter off and on (N messages over 8
    connections, bench/milter_bench.py's load), then policyd off and on, each for S seconds
    of auth requests and S seconds of policy requests shaped like a message (RCPT then DATA,
    testkit/policydload.py's "message" stage), over 8 connections, closed loop. Which of off
    and on goes first alternates from one repetition to the next: run back to back, two
    identical daemons differ by a few per cent by their position alone.

MEASURES
    CPU per message (milter: its process tree, the supervisor and workers) or per request
    (policyd), from the kernel's per-process CPU clock; the median of R runs, and the
    difference on/off in per cent. Target (docs/metrics.md): at most +3 %.

    .venv/bin/python -m bench.metrics_cost --repeat 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from bench.milter_bench import make_site, milter_process, run_load
from testkit.net import free_port
from testkit.policydload import build_directory, endpoints, install_uvloop, measure, start_policyd


@contextlib.contextmanager
def scraping(port: int, interval: float) -> Iterator[list[int]]:
    """Scrape /metrics and /health on ``port`` every ``interval`` seconds; the scrapes' count."""
    stop, done = threading.Event(), [0]

    def loop() -> None:
        while not stop.wait(interval):
            for path in ("/metrics", "/health"):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
                    r.read()
            done[0] += 1

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield done
    finally:
        stop.set()
        thread.join()


def order(repeat: int) -> tuple[str, str]:
    """off first in even repetitions, on first in odd ones: the second of two runs in a row
    was measured a few per cent dearer even with two identical daemons (same machine state,
    a bias of the position), so each daemon takes each place as often."""
    return ("off", "on") if repeat % 2 == 0 else ("on", "off")


def milter_runs(root: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    sites: dict[str, Any] = {}
    ports: dict[str, int] = {}
    for name in ("off", "on"):
        folder = root / f"milter-{name}"
        folder.mkdir()
        site = make_site(folder)
        if name == "on":
            ports[name] = free_port()
            config = yaml.safe_load(site.config.read_text())
            config["milter"]["metrics_listen"] = f"127.0.0.1:{ports[name]}"
            site.config.write_text(yaml.safe_dump(config))
        sites[name] = site
    figures: dict[str, list[float]] = {"off": [], "on": []}
    with milter_process(sites["off"], None) as off_pid, \
            milter_process(sites["on"], None) as on_pid:
        pids: dict[str, int] = {"off": off_pid, "on": on_pid}
        for name, site in sites.items():  # warm-up: keys loaded, caches filled
            run_load(site.endpoint, pids[name], site.login, site.sender, 200, 8, 2000, 2)
        for repeat in range(args.repeat):
            for name in order(repeat):
                site = sites[name]
                with (scraping(ports[name], args.scrape_interval) if name == "on"
                      else contextlib.nullcontext([0])):
                    result = run_load(site.endpoint, pids[name], site.login, site.sender,
                                      args.messages, 8, 2000, 2)
                figures[name].append(result.milter_ms)
                print(f"milter  run {repeat + 1} metrics {name:3}: {result.milter_ms:.4f} ms "
                      f"CPU/msg, {result.rate:.0f} msg/s", flush=True)
    return figures


def policyd_runs(root: Path, args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    folder = root / "policyd"
    folder.mkdir()
    issued = build_directory(folder / "directory.yaml", 1000)
    procs, listens, ports = {}, {}, {}
    for name in ("off", "on"):
        listens[name] = endpoints(folder, "tcp")
        ports[name] = free_port() if name == "on" else 0
        procs[name] = start_policyd(folder, listens[name], name=f"policyd-{name}",
                                    metrics_listen=f"127.0.0.1:{ports[name]}"
                                    if name == "on" else "")
    figures: dict[str, dict[str, list[float]]] = {
        service: {"off": [], "on": []} for service in ("auth", "policy")}
    install_uvloop()
    try:
        for repeat in range(args.repeat):
            for service, stage in (("auth", "RCPT"), ("policy", "message")):
                for name in order(repeat):
                    with (scraping(ports[name], args.scrape_interval) if name == "on"
                          else contextlib.nullcontext([0])):
                        done = asyncio.run(measure(
                            service, listens[name][service], issued, 8, args.seconds, 0.0,
                            procs[name].pid, stage=stage))
                    us = done.cpu * 1e6 / done.requests
                    figures[service][name].append(us)
                    print(f"policyd run {repeat + 1} {service:6} metrics {name:3}: {us:.1f} µs "
                          f"CPU/request, {done.requests / done.seconds:.0f} requests/s",
                          flush=True)
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=30)
    return figures


def line(what: str, unit: str, off: list[float], on: list[float], digits: int) -> str:
    a, b = statistics.median(off), statistics.median(on)
    return (f"| {what} | {a:.{digits}f} {unit} | {b:.{digits}f} {unit} | "
            f"{(b - a) / a * 100:+.1f} % |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="interleaved runs (default 5)")
    parser.add_argument("--messages", type=int, default=3000,
                        help="milter messages per run (default 3000)")
    parser.add_argument("--seconds", type=float, default=4.0,
                        help="policyd seconds per run and service (default 4)")
    parser.add_argument("--scrape-interval", type=float, default=1.0,
                        help="seconds between two scrapes of an 'on' daemon (default 1)")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.messages < 1 or args.seconds <= 0 or args.scrape_interval <= 0:
        parser.error("--repeat, --messages, --seconds and --scrape-interval must be positive")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="kr-metrics-cost-") as tmp:
        root = Path(tmp)
        milter = milter_runs(root, args)
        policyd = policyd_runs(root, args)
    print(f"\nmedians of {args.repeat} interleaved runs, {started}, scraped every "
          f"{args.scrape_interval:g} s while on\n")
    print("| daemon | metrics off | metrics on | cost |")
    print("| --- | ---: | ---: | ---: |")
    print(line("keyrelay-milter, CPU per message (2 KB, both signatures)", "ms",
               milter["off"], milter["on"], 4))
    print(line("keyrelay-policyd, CPU per auth request", "µs", policyd["auth"]["off"],
               policyd["auth"]["on"], 1))
    print(line("keyrelay-policyd, CPU per policy request (RCPT, DATA)", "µs",
               policyd["policy"]["off"], policyd["policy"]["on"], 1))


if __name__ == "__main__":
    main()
