"""Throughput and latency of keyrelay-policyd's policy and auth services.

Builds a YAML directory with --keys API keys (spread over 100 subusers of --accounts
accounts), starts a real keyrelay-policyd on loopback TCP or unix sockets in its own process
(logging every decision to a file, as in production), then drives it from this process over
--connections persistent connections, each sending one request at a time as Postfix does.
Prints requests/s, the p50/p99/max latency and policyd's CPU per request, per service.

    .venv/bin/python -m bench.policyd_bench --keys 10000 --connections 50 --seconds 10
    .venv/bin/python -m bench.policyd_bench --keys 100 --service auth
    .venv/bin/python -m bench.policyd_bench --keys 100000 --service auth
    .venv/bin/python -m bench.policyd_bench --rate 3000    # latency at a fixed offered load
    .venv/bin/python -m bench.policyd_bench --service policy --stage message \\
        --counters memory --counters redis --counters redis-tcp --rounds 3

Closed loop (the default) measures the most policyd can answer: 50 connections always
waiting, so latency there is queueing (Little's law: 50 / throughput). --rate measures
latency at an offered load below saturation.

--stage says what the policy requests are: RCPT (the default; nothing is charged to the
counter store), DATA (every request charges a message to the store: the most the store can
cost) or message (what Postfix sends per message to one recipient: RCPT, then DATA).

--counters (repeatable) runs the same load against one policyd per counter store, side by
side: ``memory`` (the default, in process), ``redis`` (a private redis-server,
testkit/redis.py, over its unix socket) and ``redis-tcp`` (the same server over loopback
TCP). Every account's limits are lifted and it has daily and monthly quotas, so a message is
charged to 4 windows. The stores take turns, --rounds times (memory, redis, ..., memory,
redis, ...); the summary gives the median of each, its share of memory's requests/s and the
redis-server's CPU per request. The target of issue 21: redis >= 70 % of memory's policy
requests/s.

--postfix drives policyd the way Postfix does under mail (issue 22; measured, see
docs/policyd-path.md): --smtpd simulated smtpd processes, each holding one auth and one
policy connection for the whole run (Postfix keeps both open per smtpd process, across SMTP
sessions), each sending one message at a time: an AUTH exchange every --per-session
messages (one login per SMTP session), then the policy requests at RCPT and at DATA, with
the 29 attributes Postfix 3.7.11 sends (client_port, ccert_*, stress, ...), and a master.cf
to check the pool's transport in, as under Postfix. First a closed loop gives the most
messages/s of that shape; then the same load paced at each --load percentage of it (open
loop: each smtpd sends its next message on a schedule). Each line gives policyd's CPU per
message and per request, from the kernel's exact per-process CPU clock. --strace adds, per
load, a second run with `strace -c -f` attached (it slows policyd, so that run's CPU is not
reported) and prints the system calls per message (apt-get install strace).

    .venv/bin/python -m bench.policyd_bench --postfix --smtpd 16 --load 10,50,100
    .venv/bin/python -m bench.policyd_bench --postfix --smtpd 4 --load 10 --strace
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import random
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from testkit.policydload import (
    STAGES,
    build_directory,
    domain_of,
    endpoints,
    install_uvloop,
    measure,
    start_policyd,
)
from testkit.stats import process_cpu_ns

COUNTERS = ("memory", "redis", "redis-tcp")
TARGET = 0.70  # issue 21: redis >= 70 % of memory's policy requests/s


class Row(NamedTuple):
    counters: str
    service: str
    rate: float
    p50_ms: float
    p99_ms: float
    cpu_us: float  # policyd's CPU per request
    redis_us: float  # redis-server's CPU per request (0 for memory)


@contextlib.contextmanager
def redis_server(wanted: list[str]) -> Iterator[Any]:
    """A private redis-server when a Redis store is asked for; else None."""
    if not any(name.startswith("redis") for name in wanted):
        yield None
        return
    from testkit.redis import RedisServer  # needs redis-server (make deps)

    with RedisServer() as server:
        yield server


def main() -> None:
    install_uvloop()
    parser = argparse.ArgumentParser(prog="python -m bench.policyd_bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=10000)
    parser.add_argument("--accounts", type=int, default=10,
                        help="accounts the 100 subusers are spread over (10)")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--service", choices=["policy", "auth", "both"], default="both")
    parser.add_argument("--stage", choices=STAGES, default="RCPT",
                        help="the policy requests: RCPT (charge nothing), DATA (each charges a "
                        "message), message (RCPT then DATA per message)")
    parser.add_argument("--counters", action="append", choices=COUNTERS,
                        help="counter store; repeatable: side by side (default memory)")
    parser.add_argument("--workers", type=int, action="append", metavar="N",
                        help="policyd.workers of each daemon (repeatable: each count side by "
                        "side, as COUNTERS-wN; above 1 needs a Redis store; default 1)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs per counter store and service, interleaved (1)")
    parser.add_argument("--transport", choices=["unix", "tcp"], default="unix",
                        help="unix sockets (as under Postfix's private/, the default) or "
                        "loopback TCP")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="offered load in requests/s, spread over the connections "
                        "(default 0: closed loop, as fast as policyd answers)")
    parser.add_argument("--postfix", action="store_true",
                        help="the load Postfix makes under mail: per message a login every "
                        "--per-session messages, then RCPT and DATA, on connections kept "
                        "per smtpd process; closed loop, then paced at each --load")
    parser.add_argument("--smtpd", type=int, default=16,
                        help="--postfix: smtpd processes, each with its own auth and policy "
                        "connection (16)")
    parser.add_argument("--per-session", type=int, default=20,
                        help="--postfix: messages per SMTP session, i.e. per login (20)")
    parser.add_argument("--load", default="10,50,100",
                        help="--postfix: offered loads in %% of the closed loop's messages/s, "
                        "comma-separated (10,50,100)")
    parser.add_argument("--strace", action="store_true",
                        help="--postfix: also count policyd's system calls per message "
                        "(strace -c, a separate run per load)")
    args = parser.parse_args()
    if args.postfix:
        postfix_main(parser, args)
        return
    stores = list(dict.fromkeys(args.counters or ["memory"]))
    if args.rounds < 1 or not 1 <= args.accounts <= 100:
        parser.error("--rounds must be at least 1, --accounts 1 to 100")
    counts = list(dict.fromkeys(args.workers or [1]))
    if any(n < 1 for n in counts) or (max(counts) > 1 and "memory" in stores):
        parser.error("--workers must be at least 1, and above 1 needs --counters redis or "
                     "redis-tcp (memory counters are one process's)")
    # each daemon: its counter store and workers; named by the store alone with one count
    setups = {(store if len(counts) == 1 else f"{store}-w{n}"): (store, n)
              for store in stores for n in counts}
    wanted = list(setups)
    with tempfile.TemporaryDirectory(prefix="kr-bench-") as tmp, \
            redis_server(wanted) as server:
        folder = Path(tmp)
        t0 = time.perf_counter()
        issued = build_directory(folder / "directory.yaml", args.keys, args.accounts)
        # the load generator's own GC pauses would show up as policyd latency
        gc.collect()
        gc.freeze()
        gc.disable()
        size = (folder / "directory.yaml").stat().st_size
        print(f"directory: {args.keys} keys, {size / 1e6:.1f} MB YAML, built in "
              f"{time.perf_counter() - t0:.1f}s")
        daemons = {}
        try:
            for name, (store, workers) in setups.items():
                where = folder / name
                where.mkdir()
                listen = endpoints(where, args.transport)
                counters = (None if server is None or store == "memory" else
                            server.counters_settings(via="unix" if store == "redis" else "tcp"))
                t0 = time.perf_counter()
                daemons[name] = (start_policyd(folder, listen, counters=counters,
                                               name=f"policyd-{name}", workers=workers), listen)
                print(f"policyd ({name} counters) ready in {time.perf_counter() - t0:.1f}s")
            rows = run(args, wanted, daemons, issued, server)
        finally:
            for proc, _ in daemons.values():
                proc.terminate()
                proc.wait(timeout=30)
    if len(wanted) > 1 or args.rounds > 1:
        summary(args, wanted, rows)


def run(args: argparse.Namespace, wanted: list[str], daemons: dict[str, Any],
        issued: list[tuple[str, str]], server: Any) -> list[Row]:
    services = ["policy", "auth"] if args.service == "both" else [args.service]
    rows = []
    redis_pid = server.process.pid if server is not None else None
    for round_ in range(args.rounds):
        if args.rounds > 1:
            print(f"round {round_ + 1} of {args.rounds}")
        for name in wanted:
            proc, listen = daemons[name]
            others = (redis_pid,) if redis_pid and not name.startswith("memory") else ()
            for service in services:
                done = asyncio.run(measure(
                    service, listen[service], issued, args.connections, args.seconds,
                    args.rate, proc.pid, stage=args.stage, others=others))
                lat = sorted(done.latencies)
                count, elapsed, cpu = done.requests, done.seconds, done.cpu
                row = Row(name, service, count / elapsed, statistics.median(lat) * 1e3,
                          lat[int(len(lat) * 0.99)] * 1e3, cpu / count * 1e6,
                          sum(done.others.values()) / count * 1e6)
                rows.append(row)
                mode = f"offered {args.rate:.0f}/s" if args.rate else "closed loop"
                mode += f", {args.transport}"
                stage = f" {args.stage}" if service == "policy" else ""
                redis = (f"  redis-server CPU {row.redis_us:.0f} us/request"
                         if not name.startswith("memory") else "")
                print(f"{service:6s}{stage} [{name}] {row.rate:9.0f} req/s  "
                      f"p50 {row.p50_ms:.2f} ms  p99 {row.p99_ms:.2f} ms  "
                      f"max {lat[-1] * 1e3:.2f} ms  "
                      f"policyd CPU {row.cpu_us:.0f} us/request "
                      f"({100 * cpu / elapsed:.0f} % of a core){redis}  "
                      f"({count} requests, {args.connections} connections, {mode}, "
                      f"{elapsed:.1f}s)", flush=True)
    return rows


def summary(args: argparse.Namespace, wanted: list[str], rows: list[Row]) -> None:
    services = ["policy", "auth"] if args.service == "both" else [args.service]
    print(f"\nmedians of {args.rounds} round(s), {args.seconds:g} s each, policy stage "
          f"{args.stage}:")
    print(f"{'service':8} {'counters':10} {'req/s':>8} {'of memory':>10} {'p50 ms':>7} "
          f"{'p99 ms':>7} {'CPU us/req':>11} {'redis us/req':>13}  runs (req/s)")
    for service in services:
        base = None
        for name in wanted:
            mine = [r for r in rows if (r.counters, r.service) == (name, service)]
            rate = statistics.median(r.rate for r in mine)
            if name == "memory":
                base = rate
            share = f"{rate / base:.0%}" if base else "-"
            print(f"{service:8} {name:10} {rate:8.0f} {share:>10} "
                  f"{statistics.median(r.p50_ms for r in mine):7.2f} "
                  f"{statistics.median(r.p99_ms for r in mine):7.2f} "
                  f"{statistics.median(r.cpu_us for r in mine):11.0f} "
                  f"{statistics.median(r.redis_us for r in mine):13.0f}  "
                  + " / ".join(f"{r.rate:.0f}" for r in mine))
            if service == "policy" and base and name != "memory":
                met = "met" if rate >= TARGET * base else "missed"
                print(f"  target: {name} >= {TARGET:.0%} of memory's policy requests/s: "
                      f"{rate / base:.0%}, {met}")


# -- the Postfix-shaped load (--postfix) -------------------------------------------------------
# What smtpd sends to check_policy_service, attribute for attribute, as Postfix 3.7.11 sent it
# in bench/e2e_bench.py's relay (captured with strace on policyd; docs/policyd-path.md). At
# RCPT queue_id is empty and recipient_count 0; at DATA both are set. The same instance for
# both stages of one message.
POSTFIX_POLICY = (
    "request=smtpd_access_policy\nprotocol_state={stage}\nprotocol_name=ESMTP\n"
    "client_address=127.0.0.1\nclient_name=localhost\nclient_port={port}\n"
    "reverse_client_name=localhost\nserver_address=127.0.0.1\nserver_port=587\n"
    "helo_name=app.example\nsender={sender}\nrecipient={recipient}\n"
    "recipient_count={count}\nqueue_id={queue_id}\ninstance={instance}\nsize=0\n"
    "etrn_domain=\nstress=\nsasl_method=PLAIN\nsasl_username={login}\nsasl_sender=\n"
    "ccert_subject=\nccert_issuer=\nccert_fingerprint=\nccert_pubkey_fingerprint=\n"
    "encryption_protocol=TLSv1.3\nencryption_cipher=TLS_AES_256_GCM_SHA384\n"
    "encryption_keysize=256\npolicy_context=submission\n\n"
)
POOL_TRANSPORT = "kr-pool-benchpool"  # build_directory's pool, as `postfix apply` names it


def start_shaped_policyd(folder: Path, listen: dict[str, str]) -> subprocess.Popen[bytes]:
    """A policyd as ``start_policyd`` starts it, but with a Postfix configuration folder whose
    master.cf has the pool's transport: every request also checks master.cf, as under
    Postfix."""
    etc = folder / "postfix"
    etc.mkdir()
    (etc / "master.cf").write_text(f"{POOL_TRANSPORT} unix - - n - - smtp\n")
    return start_policyd(folder, listen, postfix_config_dir=str(etc))


async def _open(endpoint: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if endpoint.startswith("unix:"):
        return await asyncio.open_unix_connection(endpoint[5:])
    return await asyncio.open_connection("127.0.0.1", int(endpoint.rpartition(":")[2]))


class Smtpd:
    """One smtpd process of Postfix: an auth and a policy connection, opened once and kept,
    one request at a time; a message is a login every ``per_session`` messages, then RCPT
    and DATA."""

    _numbers = iter(range(1, 1 << 30))

    def __init__(self, listen: dict[str, str], issued: list[tuple[str, str]],
                 per_session: int) -> None:
        self.listen, self.issued, self.per_session = listen, issued, per_session
        self.rng = random.Random()  # which key a session uses
        self.pid = next(self._numbers)
        self.sent = 0  # messages
        self.logins = 0
        self.login = ""  # sasl_username of the session
        self.principal = ""

    async def connect(self) -> None:
        self.auth = await _open(self.listen["auth"])
        self.policy = await _open(self.listen["policy"])
        # Postfix's xsasl_dovecot_server.c: VERSION and CPID, then reads the handshake
        self.auth[1].write(b"VERSION\t1\t0\nCPID\t%d\n" % self.pid)
        while (await self.auth[0].readline()) != b"DONE\n":
            pass

    async def session(self) -> None:
        """A new SMTP session on this smtpd: AUTH PLAIN with a random key."""
        self.principal, text = self.issued[self.rng.randrange(len(self.issued))]
        self.login = f"{self.principal}:{text.split('.')[1]}"
        self.logins += 1
        resp = base64.b64encode(b"\0apikey\0" + text.encode()).decode()
        self.auth[1].write(f"AUTH\t{self.logins}\tPLAIN\tservice=smtp\tnologin\t"
                           f"lip=127.0.0.1\trip=127.0.0.1\tsecured\tresp={resp}\n".encode())
        reply = await self.auth[0].readline()
        if not reply.startswith(b"OK\t"):
            raise SystemExit(f"unexpected auth answer: {reply!r}")

    async def ask(self, stage: str, instance: str) -> None:
        sender = f"app@{domain_of(self.principal)}"
        request = POSTFIX_POLICY.format(
            stage=stage, port=40000 + self.pid, sender=sender,
            recipient=f"user{self.sent}@example.net", count=int(stage == "DATA"),
            queue_id=f"{self.pid:05X}{self.sent:06X}" if stage == "DATA" else "",
            instance=instance, login=self.login)
        self.policy[1].write(request.encode())
        reply = await self.policy[0].readuntil(b"\n\n")
        if not reply.startswith(b"action=FILTER"):
            raise SystemExit(f"unexpected policy answer: {reply!r}")

    async def message(self) -> None:
        if self.sent % self.per_session == 0:
            await self.session()
        self.sent += 1
        instance = f"{self.pid:x}.6b13340b.{self.sent:x}.0"
        await self.ask("RCPT", instance)
        await self.ask("DATA", instance)

    async def run(self, stop: float, latencies: list[float], interval: float) -> None:
        """Closed loop (``interval`` 0), or a message every ``interval`` seconds from a random
        phase, latency counted from the scheduled time."""
        due = time.perf_counter() + self.rng.random() * interval
        while True:
            if interval:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                started, due = due, due + interval
            else:
                started = time.perf_counter()
            if started >= stop:
                return
            await self.message()
            latencies.append(time.perf_counter() - started)

    def close(self) -> None:
        self.auth[1].close()
        self.policy[1].close()


class Shaped(NamedTuple):
    messages: int
    logins: int
    seconds: float
    cpu: float  # policyd's CPU seconds
    latencies: list[float]


async def drive_shaped(listen: dict[str, str], issued: list[tuple[str, str]],
                       args: argparse.Namespace, rate: float, pid: int,
                       seconds: float) -> Shaped:
    """One run of the Postfix-shaped load (``rate`` messages/s; 0: closed loop) after a
    second of warm-up, on new connections."""
    smtpds = [Smtpd(listen, issued, args.per_session) for _ in range(args.smtpd)]
    for smtpd in smtpds:
        await smtpd.connect()
    interval = args.smtpd / rate if rate else 0.0
    await asyncio.gather(*(s.run(time.perf_counter() + 1.0, [], interval) for s in smtpds))
    sent, logins = sum(s.sent for s in smtpds), sum(s.logins for s in smtpds)
    latencies: list[float] = []
    before = process_cpu_ns(pid) or 0
    started = time.perf_counter()
    await asyncio.gather(*(s.run(started + seconds, latencies, interval) for s in smtpds))
    elapsed = time.perf_counter() - started
    cpu = ((process_cpu_ns(pid) or 0) - before) / 1e9
    for smtpd in smtpds:
        smtpd.close()
    return Shaped(sum(s.sent for s in smtpds) - sent, sum(s.logins for s in smtpds) - logins,
                  elapsed, cpu, latencies)


_STRACE_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


def strace_counts(text: str) -> Counter[str]:
    """System calls by name from ``strace -c``'s summary table."""
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        found = _STRACE_ROW.match(line)
        if found and found.group(2) != "total":
            counts[found.group(2)] += int(found.group(1))
    return counts


def postfix_main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        loads = [float(x) for x in args.load.split(",") if x.strip()]
    except ValueError:
        parser.error("--load: percentages separated by commas, e.g. 10,50,100")
    if not loads or any(not 0 < x <= 200 for x in loads) or args.smtpd < 1 \
            or args.per_session < 1:
        parser.error("--load: percentages above 0 and at most 200; --smtpd and --per-session "
                     "at least 1")
    if args.strace and shutil.which("strace") is None:
        parser.error("--strace needs strace (apt-get install strace)")
    with tempfile.TemporaryDirectory(prefix="kr-bench-") as tmp:
        folder = Path(tmp)
        issued = build_directory(folder / "directory.yaml", args.keys, args.accounts)
        gc.collect()
        gc.freeze()
        gc.disable()
        listen = endpoints(folder, args.transport)
        proc = start_shaped_policyd(folder, listen)
        per_message = 2 + 1 / args.per_session  # requests: RCPT, DATA and a share of a login
        print(f"Postfix-shaped load: {args.smtpd} smtpd processes (one auth and one policy "
              f"connection each, kept), a login every {args.per_session} messages, RCPT and "
              f"DATA per message ({per_message:.2f} requests), {args.keys} keys, "
              f"{args.transport} sockets, {args.seconds:g} s per run")
        print(f"{'load':>8} {'msg/s':>7} {'busy':>5} {'CPU us/msg':>11} {'us/request':>11} "
              f"{'p50 ms':>7} {'p99 ms':>7}")
        try:
            top = shaped_line("closed", 0.0, listen, issued, args, proc.pid, per_message)
            for share in loads:
                rate = top * share / 100
                shaped_line(f"{share:g} %", rate, listen, issued, args, proc.pid, per_message)
                if args.strace:
                    strace_line(rate, listen, issued, args, proc.pid, folder)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def shaped_line(label: str, rate: float, listen: dict[str, str], issued: list[tuple[str, str]],
                args: argparse.Namespace, pid: int, per_message: float) -> float:
    done = asyncio.run(drive_shaped(listen, issued, args, rate, pid, args.seconds))
    lat = sorted(done.latencies)
    us = done.cpu / done.messages * 1e6
    print(f"{label:>8} {done.messages / done.seconds:7.0f} {done.cpu / done.seconds:5.0%} "
          f"{us:11.1f} {us / per_message:11.1f} {statistics.median(lat) * 1e3:7.2f} "
          f"{lat[int(len(lat) * 0.99)] * 1e3:7.2f}   ({done.messages} messages, "
          f"{done.logins} logins{f', offered {rate:.0f}/s' if rate else ''})", flush=True)
    return done.messages / done.seconds


def strace_line(rate: float, listen: dict[str, str], issued: list[tuple[str, str]],
                args: argparse.Namespace, pid: int, folder: Path) -> None:
    out = folder / "strace.txt"
    tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p", str(pid)],
                              stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached
    done = asyncio.run(drive_shaped(listen, issued, args, rate, pid, args.seconds))
    tracer.send_signal(signal.SIGINT)
    tracer.wait(timeout=30)
    counts = strace_counts(out.read_text())
    # the warm-up second is traced too: count per message over both
    messages = done.messages * (1 + 1 / args.seconds)
    total = sum(counts.values()) / messages
    print(f"{'':>8} under strace (CPU not comparable): {total:.1f} system calls per message: "
          + ", ".join(f"{name} {n / messages:.2f}" for name, n in counts.most_common()),
          flush=True)


if __name__ == "__main__":
    main()
