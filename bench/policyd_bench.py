"""Throughput and latency of keyrelay-policyd's policy and auth services.

Builds a YAML directory with --keys API keys (spread over 100 subusers of one account),
starts a real keyrelay-policyd on loopback TCP in its own process (logging every decision to
a file, as in production), then drives it from this process over --connections persistent
connections, each sending one request at a time as Postfix does. Prints requests/s and the
p50/p99/max latency per service.

    .venv/bin/python -m bench.policyd_bench --keys 10000 --connections 50 --seconds 10
    .venv/bin/python -m bench.policyd_bench --keys 100 --service auth
    .venv/bin/python -m bench.policyd_bench --keys 100000 --service auth
    .venv/bin/python -m bench.policyd_bench --rate 3000    # latency at a fixed offered load

Closed loop (the default) measures the most policyd can answer: 50 connections always
waiting, so latency there is queueing (Little's law: 50 / throughput). --rate measures
latency at an offered load below saturation.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import tempfile
import time
from pathlib import Path

from testkit.policydload import build_directory, drive, endpoints, install_uvloop, start_policyd


def main() -> None:
    install_uvloop()
    parser = argparse.ArgumentParser(prog="python -m bench.policyd_bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=10000)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--service", choices=["policy", "auth", "both"], default="both")
    parser.add_argument("--transport", choices=["unix", "tcp"], default="unix",
                        help="unix sockets (as under Postfix's private/, the default) or "
                        "loopback TCP")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="offered load in requests/s, spread over the connections "
                        "(default 0: closed loop, as fast as policyd answers)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kr-bench-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        issued = build_directory(folder / "directory.yaml", args.keys)
        # the load generator's own GC pauses would show up as policyd latency
        gc.collect()
        gc.freeze()
        gc.disable()
        size = (folder / "directory.yaml").stat().st_size
        print(f"directory: {args.keys} keys, {size / 1e6:.1f} MB YAML, built in "
              f"{time.perf_counter() - t0:.1f}s")
        listen = endpoints(folder, args.transport)
        t0 = time.perf_counter()
        proc = start_policyd(folder, listen)
        print(f"policyd ready in {time.perf_counter() - t0:.1f}s")
        try:
            services = ["policy", "auth"] if args.service == "both" else [args.service]
            for service in services:
                count, elapsed, lat, cpu = asyncio.run(drive(
                    service, listen[service], issued, args.connections, args.seconds, args.rate,
                    proc.pid,
                ))
                lat.sort()
                p50 = statistics.median(lat) * 1e3
                p99 = lat[int(len(lat) * 0.99)] * 1e3
                mode = f"offered {args.rate:.0f}/s" if args.rate else "closed loop"
                mode += f", {args.transport}"
                print(f"{service:6s} {count / elapsed:9.0f} req/s  p50 {p50:.2f} ms  "
                      f"p99 {p99:.2f} ms  max {lat[-1] * 1e3:.2f} ms  "
                      f"policyd CPU {cpu / count * 1e6:.0f} us/request "
                      f"({100 * cpu / elapsed:.0f} % of a core)  "
                      f"({count} requests, {args.connections} connections, {mode}, "
                      f"{elapsed:.1f}s)")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
