"""Postfix with keyrelay-milter, OpenDKIM or dkimpy-milter: messages/s and CPU per message.

NAME
    postfix_milter_bench.py - one run through a real private Postfix, four milter setups

SYNOPSIS
    .venv/bin/python -m bench.postfix_milter_bench [--messages M] [--concurrency C]
        [--body-size BYTES]... [--setup NAME]... [--repeat R] [--warmup W]
        [--tmpdir DIR] [--keep] [--json FILE]

DESCRIPTION
    Builds a private Postfix instance the way `make run` does (keyrelay.demo: its own
    main.cf/master.cf written with `keyrelay postfix apply`, its own queue, `postfix -c DIR`;
    /etc/postfix is never touched), with keyrelay-policyd for SMTP AUTH and policy, and
    `smtp-sink` as the Internet. Every address is on loopback; ports are picked free.

    A load client in this process opens C concurrent SMTP sessions to the submission
    service, logs in with AUTH PLAIN as `apikey` with a keyrelay API key of the demo tenant,
    and sends M messages in total (From: app@demo.example, one recipient, a body of BYTES
    bytes), reusing the sessions (MAIL, RCPT and DATA pipelined, as Postfix offers
    PIPELINING). The same client, the same tenant and the same Postfix service serve every
    setup; only the service's `smtpd_milters` changes (`postconf -P` and `postfix reload`):

      none       no milter
      keyrelay   keyrelay-milter, the shipped default shape: the header From check and two
                 signatures, rsa-sha256 (RSA-2048) and ed25519-sha256, relaxed/relaxed
      opendkim   OpenDKIM (Debian package opendkim), rsa-sha256 with a 2048-bit key,
                 relaxed/relaxed, Mode s (it signs mail from InternalHosts, 127.0.0.1)
      dkimpy     dkimpy-milter (Debian package dkimpy-milter), rsa-sha256 with a 2048-bit
                 key, relaxed/relaxed, Mode s

    All three milters run during the whole run, each its own process started by this script
    with a configuration file of its own in the temporary folder (Debian's system services
    and /etc files are not used), each on a unix socket. Postfix talks to the one selected.

    Each measured run is preceded, after every switch, by W warm-up messages that must all
    arrive at the sink carrying exactly the signatures of the selected setup (no
    DKIM-Signature for none; rsa-sha256 and ed25519-sha256 from keyrelay's selectors;
    one rsa-sha256 with selector `opendkim` or `dkimpy`). The first warm-up of each setup
    also verifies every signature of one delivered message with dkimpy against the public
    keys (no DNS: the records are handed to dkimpy directly). After each measured run every
    message must have reached the sink, and the last one is checked for the same signatures.

    Runs are interleaved: for each of R repetitions, every setup in turn, every body size.

MEASURES
    msg/s        M divided by the time from the first connection until the last message
                 has left Postfix's queue (all delivered to the sink): end-to-end throughput
    accepted/s   M divided by the time until the client had its last 250 after DATA
    milter ms    CPU time (utime + stime from /proc/PID/stat) the selected milter's process
                 used during the run, divided by M
    Postfix ms   the same for the Postfix instance: its master, every live child process and
                 the children it reaped (cutime + cstime of the master): smtpd, cleanup,
                 qmgr, trivial-rewrite, smtp, postlogd, ...
    policyd ms   the same for keyrelay-policyd (SMTP AUTH, the policy requests at RCPT and
                 DATA); it takes part in every setup

    The table gives, per setup and body size, the median over the R runs and, in brackets,
    the lowest and highest. The load client runs on the same host and takes CPU from the
    others; its CPU per message is printed too. The load average before and after is
    printed, since the host may be shared.

OPTIONS
    --messages M       messages per measured run (default 1000)
    --concurrency C    concurrent SMTP sessions (default 4)
    --body-size BYTES  body size; repeatable (default: 2000 and 20000)
    --setup NAME       none, keyrelay, opendkim or dkimpy; repeatable (default: all four)
    --repeat R         measured runs per setup and body size (default 3)
    --warmup W         warm-up messages after each switch (default 20)
    --tmpdir DIR       where the temporary folder goes (default: $TMPDIR or /tmp)
    --keep             keep the temporary folder (configuration, logs, the messages of
                       the last run at the sink) and print where it is
    --json FILE        also write every run's figures as JSON

BENCH-ONLY SETTINGS
    To keep TLS out of the comparison, the submission service runs without TLS
    (`smtpd_tls_security_level=none`, `smtpd_tls_auth_only=no`,
    `smtpd_sasl_security_options=noanonymous`) and keyrelay's configuration says
    `auth: {require_tls: false}`. Never run a relay like that: an API key would cross the
    network in clear. The tenant's rate limits are lifted (`limits` in keyrelay.yaml) so that
    policyd does not answer 451 during the run.

    OpenDKIM's RequireSafeKeys is off: its key is mode 0600 in a 0700 folder, but the
    temporary folder sits in the world-writable /tmp, which OpenDKIM would refuse.

FILES
    A new folder krbench-XXXXXXXX in --tmpdir, removed at the end unless --keep or an error:
      relay/            as `make run` lays out run/: keyrelay.yaml, directory.yaml, dkim/,
                        postfix/etc (main.cf, master.cf), postfix/queue, postfix/maillog,
                        outbox/ (smtp-sink's files), logs/ (policyd, milter, sink)
      opendkim/, dkimpy/  each milter's configuration file and private key
      milters/          their unix sockets (group postfix)
      logs/             the output of opendkim and dkimpy-milter

REQUIREMENTS
    Root; Debian 12 with the packages of `make bench-deps` (postfix, opendkim,
    dkimpy-milter) and the virtual environment of `make deps`. OpenDKIM and dkimpy-milter
    run as their own users (group postfix, for the sockets); keyrelay-policyd and
    keyrelay-milter run as root, as under `make run`. Everything started is stopped at the
    end, also on Ctrl-C or SIGTERM.

EXIT STATUS
    0 all runs done; 1 a setup failed (a reply other than expected, a message missing or
    signed otherwise than the setup signs, a process that would not start: the message
    names it, and the temporary folder is kept); 130 interrupted.

EXAMPLES
    .venv/bin/python -m bench.postfix_milter_bench --messages 200 --repeat 1
    .venv/bin/python -m bench.postfix_milter_bench --messages 2000 --repeat 5   # docs/BENCHMARKS.md
    .venv/bin/python -m bench.postfix_milter_bench --setup none --setup keyrelay --body-size 2000
    .venv/bin/python -m bench.postfix_milter_bench --concurrency 1 --json /tmp/runs.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from keyrelay.demo import DEMO_DOMAIN, DEMO_FROM, DEMO_TO, keyrelay_cli
from keyrelay.postfixconf import run_postfix
from testkit.loadgen import make_body
from testkit.net import wait_until
from testkit.othermilters import MilterUnderTest, dkimpy_child, opendkim_child
from testkit.privaterelay import (
    BenchError,
    PrivateRelay,
    bench_folder,
    leave_folder,
    postconf,
    run_guarded,
    signatures,
)
from testkit.stats import describe_host, load_average, process_tree_cpu

SETUPS = ("none", "keyrelay", "opendkim", "dkimpy")


# -- the load client -------------------------------------------------------------------------
def make_message(number: int, run: str, body: bytes) -> bytes:
    headers = (
        f"From: Bench App <{DEMO_FROM}>\r\n"
        f"To: <{DEMO_TO}>\r\n"
        f"Subject: bench message {number} of run {run}\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        f"Message-ID: <{run}.{number}@{DEMO_DOMAIN}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "Content-Transfer-Encoding: 7bit\r\n"
        "\r\n"
    )
    return headers.encode() + body + b".\r\n"  # the body holds no line starting with "."


async def _reply(reader: asyncio.StreamReader, expected: int, what: str) -> None:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise BenchError(f"{what}: the server closed the connection")
        lines.append(line.decode("ascii", "replace").rstrip())
        if line[3:4] != b"-":
            break
    if not lines[-1].startswith(str(expected)):
        raise BenchError(f"{what}: expected {expected}, got: " + " / ".join(lines))


async def _session(host: str, port: int, key: str, todo: list[int],
                   message: Callable[[int], bytes]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await _reply(reader, 220, "greeting")
        writer.write(b"EHLO bench-client.example\r\n")
        await _reply(reader, 250, "EHLO")
        plain = base64.b64encode(b"\0apikey\0" + key.encode()).decode()
        writer.write(f"AUTH PLAIN {plain}\r\n".encode())
        await _reply(reader, 235, "AUTH PLAIN")
        envelope = f"MAIL FROM:<{DEMO_FROM}>\r\nRCPT TO:<{DEMO_TO}>\r\nDATA\r\n".encode()
        while todo:
            number = todo.pop()
            writer.write(envelope)
            await _reply(reader, 250, "MAIL FROM")
            await _reply(reader, 250, "RCPT TO")
            await _reply(reader, 354, "DATA")
            writer.write(message(number))
            await _reply(reader, 250, f"end of DATA of message {number}")
        writer.write(b"QUIT\r\n")
        await _reply(reader, 221, "QUIT")
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def _send_all(host: str, port: int, key: str, count: int, concurrency: int,
                    message: Callable[[int], bytes]) -> None:
    todo = list(range(count, 0, -1))
    sessions = [_session(host, port, key, todo, message) for _ in range(min(concurrency, count))]
    await asyncio.gather(*sessions)


def send(host: str, port: int, key: str, count: int, concurrency: int, body: bytes,
         run: str) -> None:
    """Send ``count`` messages over ``concurrency`` authenticated sessions; raise on any
    reply other than the expected one."""
    def message(number: int) -> bytes:
        return make_message(number, run, body)

    asyncio.run(_send_all(host, port, key, count, concurrency, message))


# -- one measured run ------------------------------------------------------------------------
@dataclass
class RunResult:
    setup: str
    body_size: int
    messages: int
    concurrency: int
    seconds: float
    accept_seconds: float
    milter_cpu: float
    postfix_cpu: float
    policyd_cpu: float
    client_cpu: float
    other_milters_cpu: float
    load_before: str
    load_after: str

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def accept_rate(self) -> float:
        return self.messages / self.accept_seconds

    def per_message(self, cpu: float) -> float:
        return cpu * 1000 / self.messages


# -- the bench -------------------------------------------------------------------------------
Signatures = list[tuple[str, str, str]]  # (a=, s=, d=) of each DKIM-Signature


@dataclass
class Bench(PrivateRelay):
    args: argparse.Namespace = field(default_factory=argparse.Namespace)
    milters: dict[str, MilterUnderTest] = field(default_factory=dict)
    # which signatures a message signed by each setup carries
    expected: dict[str, Callable[[Signatures], bool]] = field(default_factory=dict)
    verified: set[str] = field(default_factory=set)

    # -- building --------------------------------------------------------------------------
    def build(self) -> None:
        settings = self.prepare()
        self._bench_only_settings()
        printed = json.loads(keyrelay_cli(settings, "domain", "dns", DEMO_DOMAIN, "--json"))
        self.records = {r["name"].rstrip(".").lower(): r["value"].encode()
                        for r in printed["records"] if r["type"] == "TXT"}
        kr_selectors = {name.split("._domainkey.")[0] for name in self.records
                        if "._domainkey." in name}

        def keyrelay_signed(sigs: Signatures) -> bool:
            return (sorted(a for a, _, _ in sigs) == ["ed25519-sha256", "rsa-sha256"]
                    and all(s in kr_selectors and d == DEMO_DOMAIN for _, s, d in sigs))

        def signed_by(selector: str) -> Callable[[Signatures], bool]:
            return lambda sigs: sigs == [("rsa-sha256", selector, DEMO_DOMAIN)]

        folder = self.milter_folder()
        self.milters = {
            "none": MilterUnderTest("none", ""),
            "keyrelay": MilterUnderTest("keyrelay", "unix:private/keyrelay-milter"),
            "opendkim": MilterUnderTest("opendkim", f"unix:{folder / 'opendkim.sock'}"),
            "dkimpy": MilterUnderTest("dkimpy", f"unix:{folder / 'dkimpy.sock'}"),
        }
        self.expected = {"none": lambda sigs: sigs == [], "keyrelay": keyrelay_signed,
                         "opendkim": signed_by("opendkim"), "dkimpy": signed_by("dkimpy")}
        for name, make in (("opendkim", opendkim_child), ("dkimpy", dkimpy_child)):
            if name in self.args.setup:
                child, record = make(self.root, folder, [DEMO_DOMAIN])
                self.records[f"{name}._domainkey.{DEMO_DOMAIN}"] = record.encode()
                self.milters[name].child = child

    def _bench_only_settings(self) -> None:
        s = self.relay.settings
        # bench only: AUTH without TLS, so TLS costs stay out of the comparison
        self.rewrite_config("postfix_milter_bench.py: bench-only settings (AUTH without TLS, "
                            "no rate limits)", auth={"require_tls": False},
                            limits={"messages_per_minute": 1_000_000,  # the maxima
                                    "messages_per_hour": 60_000_000})
        self.service = f"{s.host}:{s.submission_port}"
        svc = f"{self.service}/inet"
        postconf(s.postfix_etc, "-P",
                 f"{svc}/smtpd_tls_security_level=none",
                 f"{svc}/smtpd_tls_auth_only=no",
                 f"{svc}/smtpd_sasl_security_options=noanonymous",
                 f"{svc}/smtpd_milters=")
        checked = run_postfix(s.postfix_etc, "check")
        if checked[0] != 0:
            raise BenchError(f"postfix check: {checked[1]}")

    # -- processes -------------------------------------------------------------------------
    def start_all(self) -> None:
        keyrelay = "keyrelay" in self.args.setup
        self.start(keyrelay, [m.child for n, m in self.milters.items()
                              if m.child is not None and n != "keyrelay"])
        if keyrelay:
            self.milters["keyrelay"].child = self.relay.children["milter"]

    # -- one setup at a time ---------------------------------------------------------------
    def select(self, name: str) -> None:
        self.switch(name, smtpd_milters=self.milters[name].endpoint)

    def deliver(self, count: int, size: int, run: str) -> None:
        s = self.relay.settings
        send(s.host, s.submission_port, self.relay.key, count, self.args.concurrency,
             make_body(size), run)

    def check_delivered(self, name: str, count: int, paths: Iterable[Path]) -> None:
        expected = self.expected[name]
        for path in paths:
            sigs = signatures(path.read_bytes())
            if not expected(sigs):
                raise BenchError(f"{name}: {path.name} arrived with DKIM-Signatures "
                                 f"{sigs or 'none'}, not those of {name}")

    def warm_up(self, name: str, size: int) -> None:
        """Send the warm-up messages until they all arrive signed as ``name`` signs (an
        smtpd of before the reload may still serve the first session)."""
        count = max(1, self.args.warmup)
        for attempt in range(10):
            self.clear_outbox()
            self.deliver(count, size, f"warmup-{name}-{size}-{attempt}")
            self.wait_drained()
            wait_until(lambda: len(self.outbox()) >= count, 30,
                       f"{count} warm-up messages at the sink")
            try:
                self.check_delivered(name, count, self.outbox())
                break
            except BenchError:
                if attempt == 9:
                    raise
                time.sleep(0.5)
        if name not in self.verified:
            self.verify(name, self.outbox()[-1])
            if name == "keyrelay":
                self.check_from_refused(self.relay.key, DEMO_FROM, DEMO_TO, starttls=False)
            self.verified.add(name)

    def measure(self, name: str, size: int, rep: int) -> RunResult:
        self.select(name)
        self.warm_up(name, size)
        self.clear_outbox()
        count = self.args.messages
        master = self.master_pid()
        policyd = self.relay.children["policyd"].process
        assert policyd is not None
        milter_pids = {n: m.pid() for n, m in self.milters.items() if m.pid() is not None}

        def snapshot() -> tuple[dict[str, float], float, float, float]:
            milters = {n: process_tree_cpu(p) for n, p in milter_pids.items() if p}
            usage = resource.getrusage(resource.RUSAGE_SELF)
            return (milters, process_tree_cpu(master, reaped=True),
                    process_tree_cpu(policyd.pid), usage.ru_utime + usage.ru_stime)

        load_before = load_average()
        before = snapshot()
        start = time.perf_counter()
        self.deliver(count, size, f"run-{name}-{size}-{rep}")
        accepted = time.perf_counter()
        self.wait_drained()
        done = time.perf_counter()
        after = snapshot()
        delivered = self.outbox()
        if len(delivered) != count:
            time.sleep(0.5)
            delivered = self.outbox()
            if len(delivered) != count:
                raise BenchError(f"{name}: {len(delivered)} of {count} messages reached the "
                                 "sink")
        self.check_delivered(name, count, delivered[-1:])
        milter_cpu = {n: after[0][n] - before[0][n] for n in before[0]}
        return RunResult(
            setup=name, body_size=size, messages=count, concurrency=self.args.concurrency,
            seconds=done - start, accept_seconds=accepted - start,
            milter_cpu=milter_cpu.get(name, 0.0),
            postfix_cpu=after[1] - before[1], policyd_cpu=after[2] - before[2],
            client_cpu=after[3] - before[3],
            other_milters_cpu=sum(v for n, v in milter_cpu.items() if n != name),
            load_before=load_before, load_after=load_average())


# -- output ----------------------------------------------------------------------------------
def spread(values: list[float], digits: int) -> str:
    median = statistics.median(values)
    if len(values) == 1:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def size_label(size: int) -> str:
    return f"{size / 1000:g} KB" if size >= 1000 else f"{size} B"


def table(results: list[RunResult], setups: list[str], sizes: list[int]) -> str:
    header = ("| setup | body | msg/s | accepted/s | milter CPU ms/msg | Postfix CPU ms/msg "
              "| policyd CPU ms/msg | client CPU ms/msg |")
    lines = [header, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for size in sizes:
        for name in setups:
            runs = [r for r in results if r.setup == name and r.body_size == size]
            if not runs:
                continue
            milter = ("-" if name == "none"
                      else spread([r.per_message(r.milter_cpu) for r in runs], 2))
            lines.append(
                f"| {name} | {size_label(size)} | {spread([r.rate for r in runs], 0)} "
                f"| {spread([r.accept_rate for r in runs], 0)} | {milter} "
                f"| {spread([r.per_message(r.postfix_cpu) for r in runs], 2)} "
                f"| {spread([r.per_message(r.policyd_cpu) for r in runs], 2)} "
                f"| {spread([r.per_message(r.client_cpu) for r in runs], 2)} |")
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    head, rest = doc.split("\nOPTIONS\n", 1)
    parser = argparse.ArgumentParser(
        prog="python -m bench.postfix_milter_bench",
        description=head.split("\n\n", 1)[1],
        epilog="BENCH-ONLY SETTINGS\n" + rest.split("\nBENCH-ONLY SETTINGS\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=1000, metavar="M",
                        help="messages per measured run (default 1000)")
    parser.add_argument("--concurrency", type=int, default=4, metavar="C",
                        help="concurrent SMTP sessions (default 4)")
    parser.add_argument("--body-size", type=int, action="append", metavar="BYTES",
                        help="body size in bytes; repeatable (default: 2000 and 20000)")
    parser.add_argument("--setup", action="append", choices=SETUPS, metavar="NAME",
                        help="none, keyrelay, opendkim or dkimpy; repeatable "
                             "(default: all four)")
    parser.add_argument("--repeat", type=int, default=3, metavar="R",
                        help="measured runs per setup and body size, interleaved (default 3)")
    parser.add_argument("--warmup", type=int, default=20, metavar="W",
                        help="warm-up messages after each switch (default 20)")
    parser.add_argument("--tmpdir", type=Path, metavar="DIR",
                        help="where the temporary folder goes (default: $TMPDIR or /tmp)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary folder and print where it is")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write every run's figures to FILE as JSON")
    args = parser.parse_args(argv)
    args.setup = [name for name in SETUPS if name in (args.setup or SETUPS)]
    args.body_size = args.body_size or [2000, 20000]
    for name in ("messages", "concurrency", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if any(size < 2 for size in args.body_size):
        parser.error("--body-size must be at least 2")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    return args



def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = bench_folder("postfix_milter_bench.py", "krbench-", args.tmpdir)
    if root is None:
        return 1
    bench = Bench(root, args=args)
    results: list[RunResult] = []
    print(describe_host())
    print(f"load average before: {load_average()}")
    print(f"setting up in {root} ...", flush=True)

    def body() -> None:
        bench.build()
        bench.start_all()
        print(f"{args.messages} messages per run, {args.concurrency} sessions, "
              f"{args.repeat} run(s) per setup and body size, interleaved", flush=True)
        for rep in range(1, args.repeat + 1):
            for name in args.setup:
                for size in args.body_size:
                    result = bench.measure(name, size, rep)
                    results.append(result)
                    milter = ("" if name == "none" else
                              f", milter {result.per_message(result.milter_cpu):.2f} ms")
                    print(f"  run {rep} {name:8} {size_label(size):>6}: {result.rate:6.0f} "
                          f"msg/s{milter}, Postfix {result.per_message(result.postfix_cpu):.2f}"
                          f" ms, policyd {result.per_message(result.policyd_cpu):.2f} ms per "
                          f"message (load {result.load_before} -> {result.load_after})",
                          flush=True)

    status = run_guarded("postfix_milter_bench.py", bench, body)
    print(f"load average after: {load_average()}")
    if results:
        print(f"\n{args.messages} messages per run, {args.concurrency} concurrent "
              "authenticated sessions; median (lowest-highest) of "
              f"{args.repeat} interleaved run(s)\n")
        print(table(results, args.setup, args.body_size))
        if args.json:
            args.json.write_text(json.dumps(
                [dict(vars(r), rate=r.rate, accept_rate=r.accept_rate) for r in results],
                indent=2) + "\n")
    return leave_folder(root, status, args.keep)


if __name__ == "__main__":
    sys.exit(main())
