"""A capacity model of one relay node: messages per second at 2, 4, 8 and 16 cores, from the
CPU per message of each process, and which process caps first.

NAME
    capacity.py - predict a node's throughput from measured CPU per message

SYNOPSIS
    .venv/bin/python -m bench.capacity --postfix MS --policyd MS --milter MS [--redis MS]
        [--counters memory|redis] [--cores N]... [--measured CORES:MSG_PER_S [--client MS]]

DESCRIPTION
    The figures are CPU milliseconds per message of each process group, as bench/e2e_bench.py
    measures them (its table's "CPU ms/msg" columns): Postfix (every Postfix process of the
    message: smtpd, cleanup, qmgr, smtp, ...), keyrelay-policyd (its two requests), keyrelay-
    milter (the check and both signatures), and with --counters redis the redis-server's.

    The model: every process group is CPU-bound and runs on any core, so a node of C cores
    sends at most C x 1000 / (sum of the CPU per message) messages a second; and a group that
    is one process (one event loop, one GIL, one Redis thread) sends at most 1000 / (its
    CPU per message), whatever C is:
      - Postfix: many processes (smtpd per client, cleanup, smtp per delivery): no cap of its
        own below the node's;
      - keyrelay-milter: one worker per CPU (milter.workers auto, at most 16): a cap only
        above 16 cores, 16 x 1000 / milter;
      - keyrelay-policyd: with counters.backend memory, one process: 1000 / policyd; with
        redis, one worker per CPU (at most 16), and redis-server, single-threaded, caps at
        1000 / redis.
    The prediction for C cores is the lowest of these; the cap that binds is named. With
    --measured CORES:RATE the model's prediction for that machine is set against the rate
    measured there (e.g. 2:479 for the e2e run of docs/BENCHMARKS.md); --client is the CPU
    per message of the load generator, which shared that machine (e2e_bench.py measures it
    too): it counts in that check only, since a real node's clients are elsewhere.

    It ignores what a real node adds (interrupts, the network, disk writes of the queue,
    scheduling between more processes than cores) and what it saves (idle time of a closed
    loop): its 2-core prediction, checked against the 2-core measurement, says how far to
    trust the others.
"""

from __future__ import annotations

import argparse

AUTO_CAP = 16  # keyrelay/supervisor.py: auto workers at most


def caps(cores: int, args: argparse.Namespace, client: float = 0.0) -> dict[str, float]:
    """msg/s each limit allows on ``cores`` cores (``client``: CPU per message of a load
    generator on the same cores)."""
    total = (args.postfix + args.policyd + args.milter + (args.redis if args.redis else 0.0)
             + client)
    limits = {"all cores busy (CPU per message summed)": cores * 1000 / total,
              "keyrelay-milter workers (16 at most)": min(cores, AUTO_CAP) * 1000 / args.milter}
    if args.counters == "memory":
        limits["keyrelay-policyd, one process (counters in memory)"] = 1000 / args.policyd
    else:
        limits["keyrelay-policyd workers (16 at most)"] = min(cores, AUTO_CAP) * 1000 / args.policyd
        if args.redis:
            limits["redis-server, one thread"] = 1000 / args.redis
    return limits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("postfix", "policyd", "milter"):
        parser.add_argument(f"--{name}", type=float, required=True, metavar="MS",
                            help=f"CPU ms per message of {name}")
    parser.add_argument("--redis", type=float, default=0.0, metavar="MS",
                        help="CPU ms per message of redis-server (--counters redis)")
    parser.add_argument("--counters", choices=("memory", "redis"), default="memory")
    parser.add_argument("--cores", type=int, action="append", metavar="N",
                        help="cores to predict for (repeatable; default 2 4 8 16)")
    parser.add_argument("--measured", metavar="CORES:RATE",
                        help="a measured rate to check the model against, e.g. 2:479")
    parser.add_argument("--client", type=float, default=0.0, metavar="MS",
                        help="with --measured: the load generator's CPU ms per message on "
                        "that machine")
    args = parser.parse_args(argv)
    if min(args.postfix, args.policyd, args.milter) <= 0 or args.redis < 0:
        parser.error("CPU per message must be positive")
    print(f"CPU ms per message: Postfix {args.postfix}, keyrelay-policyd {args.policyd}, "
          f"keyrelay-milter {args.milter}" + (f", redis-server {args.redis}" if args.redis
                                              else "") + f"; counters {args.counters}\n")
    print("| cores | predicted msg/s | what caps it | next cap |")
    print("| ---: | ---: | --- | --- |")
    for cores in args.cores or [2, 4, 8, 16]:
        ranked = sorted(caps(cores, args).items(), key=lambda item: item[1])
        (first, rate), (second, then) = ranked[0], ranked[1]
        print(f"| {cores} | {rate:,.0f} | {first} | {second} ({then:,.0f}) |")
    if args.measured:
        cores_text, _, rate_text = args.measured.partition(":")
        cores, measured = int(cores_text), float(rate_text)
        predicted = min(caps(cores, args, args.client).values())
        with_client = f" (with the load generator's {args.client} ms)" if args.client else ""
        print(f"\nat {cores} cores the model predicts {predicted:,.0f} msg/s{with_client}; "
              f"measured {measured:,.0f} ({measured / predicted * 100:.0f} % of the "
              "prediction)")


if __name__ == "__main__":
    main()
