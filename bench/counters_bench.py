"""The counter stores side by side: ``take`` per second and CPU per ``take``, in memory and in
Redis over a unix socket and over TCP (a private redis-server, testkit/redis.py), in one run.

Each ``take`` checks and counts the windows one policy request will: a subuser's per-minute
and per-hour limits, its account's, the subuser's daily and the account's monthly quota
(6 windows), spread over --principals subusers of 10 accounts. --concurrency tasks take in a
closed loop for --seconds, on uvloop (as keyrelay-policyd runs); the backends take turns,
--rounds each. CPU is this process's (the client) and redis-server's, per take.

    .venv/bin/python -m bench.counters_bench
    .venv/bin/python -m bench.counters_bench --seconds 5 --rounds 3 --concurrency 50

The issue's target (issue 21): policyd with Redis at 70 % of its requests/s with memory;
this bench shows what the store alone costs. Needs redis-server (`make deps`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from keyrelay.config import parse_config
from keyrelay.counters import Calendar, CounterStore, MemoryCounters, Sliding, open_counters
from testkit.policydload import cpu_seconds
from testkit.redis import RedisServer


def windows_of(principals: int) -> list[tuple[Sliding | Calendar, ...]]:
    found: list[tuple[Sliding | Calendar, ...]] = []
    for n in range(principals):
        account, subuser = f"acct{n % 10}", f"acct{n % 10}/app{n}"
        found.append((Sliding(subuser, 60, 10**9), Sliding(subuser, 3600, 10**9),
                      Sliding(account, 60, 10**9), Sliding(account, 3600, 10**9),
                      Calendar(subuser, "day", 10**9), Calendar(account, "month", 10**9)))
    return found


async def drive(make: Callable[[], CounterStore], principals: int, concurrency: int,
                seconds: float) -> tuple[int, float, list[float]]:
    """(takes, elapsed seconds, latencies in s) of a closed loop."""
    store = make()
    every = windows_of(principals)
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker(offset: int) -> int:
        done = 0
        while time.perf_counter() < stop:
            started = time.perf_counter()
            assert await store.take(every[(offset + done) % len(every)]) is None
            latencies.append(time.perf_counter() - started)
            done += 1
        return done

    await store.take(every[0])  # connect before the clock starts
    began = time.perf_counter()
    counts = await asyncio.gather(*(worker(i * 7) for i in range(concurrency)))
    elapsed = time.perf_counter() - began
    await store.close()
    return sum(counts), elapsed, latencies


def measure(make: Callable[[], CounterStore], args: argparse.Namespace,
            server_pid: int | None) -> dict[str, float]:
    import uvloop

    client_cpu, server_cpu = time.process_time(), cpu_seconds(server_pid) if server_pid else 0.0
    takes, elapsed, latencies = uvloop.run(drive(make, args.principals, args.concurrency,
                                                 args.seconds))
    client_cpu = time.process_time() - client_cpu
    server_cpu = (cpu_seconds(server_pid) - server_cpu) if server_pid else 0.0
    ordered = sorted(latencies)
    return {"takes_per_s": takes / elapsed,
            "p50_ms": 1000 * ordered[len(ordered) // 2],
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
            "client_cpu_us": 1e6 * client_cpu / takes,
            "redis_cpu_us": 1e6 * server_cpu / takes}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.counters_bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--principals", type=int, default=100)
    parser.add_argument("--json", action="store_true", help="one JSON object")
    args = parser.parse_args()
    with RedisServer() as server:
        assert server.process is not None
        pid = server.process.pid

        def redis(via: str) -> Callable[[], CounterStore]:
            settings = server.counters_settings(via=via, timeout=5)
            config = parse_config({"counters": settings}, "bench")
            return lambda: open_counters(config)

        backends: dict[str, tuple[Callable[[], CounterStore], int | None]] = {
            "memory": (MemoryCounters, None),
            "redis unix socket": (redis("unix"), pid),
            "redis TCP": (redis("tcp"), pid),
        }
        results: dict[str, list[dict[str, float]]] = {name: [] for name in backends}
        for _ in range(args.rounds):
            for name, (make, server_pid) in backends.items():
                server.flush()
                results[name].append(measure(make, args, server_pid))
    summary: dict[str, Any] = {
        name: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        for name, runs in results.items()}
    memory = summary["memory"]["takes_per_s"]
    for name in summary:
        summary[name]["of_memory"] = summary[name]["takes_per_s"] / memory
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"take of 6 windows, {args.principals} principals, {args.concurrency} concurrent "
          f"tasks, {args.seconds:g} s x {args.rounds} rounds (medians)")
    print(f"{'backend':<20} {'takes/s':>10} {'of memory':>10} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'client CPU us':>14} {'redis CPU us':>13}")
    for name, row in summary.items():
        print(f"{name:<20} {row['takes_per_s']:>10.0f} {row['of_memory']:>9.1%} "
              f"{row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} {row['client_cpu_us']:>14.1f} "
              f"{row['redis_cpu_us']:>13.1f}")


if __name__ == "__main__":
    main()
