"""A load on keyrelay-policyd's policy and auth services, for bench/policyd_bench.py and
bench/ldap_bench.py: a YAML directory with many keys (``build_directory``), a policyd in its
own process (``start_policyd``, with any ``counters:`` section), and ``drive``/``measure``:
persistent connections each sending one request at a time as Postfix does, closed loop or at
a fixed rate, with the latencies and the daemon's CPU time (and other processes', e.g. a
redis-server's).

Policy requests are of one ``stage``: ``RCPT`` (nothing is charged to the counter store),
``DATA`` (every request charges its message, one recipient, to the store) or ``message``
(what Postfix sends for a message to one recipient: RCPT, then DATA with the same
``instance``)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from keyrelay import admin, keys
from keyrelay.directory.model import ApiKey, DirectoryData
from keyrelay.directory.yamlfile import render
from testkit.net import free_port
from testkit.stats import process_tree_cpu

ACCOUNT = "bench"
SUBUSERS = 100
DOMAIN = "bench.example"
STAGES = ("RCPT", "DATA", "message")
# Every account's limits lifted to the maxima (keyrelay/config/sections.py LimitsConfig), with
# a daily and a monthly quota: a message is charged to 4 windows of its account (minute, hour,
# day, month). Spread over 10 accounts, a closed loop of DATA requests stays far below them.
LIMITS = {"messages_per_minute": 1_000_000, "messages_per_hour": 60_000_000,
          "messages_per_day": 1_440_000_000, "messages_per_month": 44_640_000_000}


def account_name(number: int, accounts: int) -> str:
    return ACCOUNT if accounts == 1 else f"{ACCOUNT}{number}"


def domain_of(principal: str) -> str:
    """The verified domain of a principal's account (its senders' domain)."""
    account = principal.partition("/")[0]
    return DOMAIN if account == ACCOUNT else f"{account}.{DOMAIN}"


def build_directory(path: Path, count: int, accounts: int = 1) -> list[tuple[str, str]]:
    """Write a directory with ``count`` keys over 100 subusers of ``accounts`` accounts (each
    with a verified domain of its own); return (principal, key text) of every key."""
    now = datetime.now(UTC)
    data = DirectoryData()
    admin.add_pool(data, "benchpool", ["127.0.0.1"], "bench.relay.example", now)
    for number in range(accounts):
        account = account_name(number, accounts)
        admin.add_account(data, account, now)
        admin.assign_pool(data, account, "benchpool")
        admin.add_domain(data, account, domain_of(account), (), now)
        admin.mark_verified(data, domain_of(account), now)
    principals = []
    for i in range(SUBUSERS):
        pid = f"{account_name(i % accounts, accounts)}/s{i}"
        admin.add_subuser(data, pid, now)
        admin.grant_domain(data, domain_of(pid), pid)
        principals.append(pid)
    issued = []
    for i in range(count):
        pid = principals[i % SUBUSERS]
        new = keys.generate()
        data.keys[new.key_id] = ApiKey(
            key_id=new.key_id, principal=pid, name=f"k{i}", secret_hash=new.secret_hash,
            scopes=("mail.send",), created=now,
        )
        issued.append((pid, new.text))
    path.write_text(render(data), encoding="utf-8")
    return issued


def endpoints(folder: Path, transport: str) -> dict[str, str]:
    """Where each service listens: loopback TCP, or unix sockets as under Postfix's private/."""
    if transport == "unix":
        return {name: f"unix:{folder / name}" for name in ("auth", "policy")}
    return {name: f"inet:127.0.0.1:{free_port()}" for name in ("auth", "policy")}


def can_connect(endpoint: str) -> bool:
    try:
        if endpoint.startswith("unix:"):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(endpoint[5:])
        else:
            socket.create_connection(("127.0.0.1", int(endpoint.rpartition(":")[2])),
                                     timeout=1).close()
    except OSError:
        return False
    return True


def start_policyd(folder: Path, listen: dict[str, str],
                  directory: str | None = None,
                  counters: Mapping[str, Any] | None = None,
                  name: str = "policyd", metrics_listen: str = "", workers: int = 1,
                  postfix_config_dir: str = "") -> subprocess.Popen[bytes]:
    """A policyd on ``folder``'s directory.yaml, or on the ``directory`` section given (YAML
    flow text, e.g. an LDAP one: ldap_bench.py), with the ``counters`` section given (None:
    the default, in memory), ``metrics_listen`` (bench/metrics_cost.py), ``workers`` and
    ``postfix_config_dir`` (a folder with a master.cf to check, as under Postfix); its
    configuration ``folder/<name>.yaml``, its log
    ``folder/<name>.log``. Returns once every service accepts."""
    config = folder / f"{name}.yaml"
    section = directory or f"{{path: {folder / 'directory.yaml'}}}"
    extra = f"counters: {json.dumps(dict(counters))}\n" if counters is not None else ""
    config.write_text(
        f"directory: {section}\n"
        f"limits: {json.dumps(LIMITS)}\n"
        f"{extra}"
        f"logging: {{audit_log: ''}}\n"
        # no Postfix (""): route without asking master.cf
        f"postfix: {{config_dir: '{postfix_config_dir}'}}\n"
        "policyd:\n"
        f"  auth_listen: {listen['auth']}\n"
        f"  policy_listen: {listen['policy']}\n"
        "  socketmap_listen: ''\n"
        "  control_listen: ''\n"
        "  socket_group: ''\n"
        "  user: root\n"  # the bench's folders are root's
        "  max_connections: 10000\n"
        f"  metrics_listen: '{metrics_listen}'\n"
        f"  workers: {workers}\n"
        "  bruteforce: {max_failures_per_address: 1000000}\n",
        encoding="utf-8",
    )
    logfile = folder / f"{name}.log"
    log = open(logfile, "wb")  # stays open as long as the daemon runs
    proc = subprocess.Popen(
        [sys.executable, "-m", "policyd", "--config", str(config)], stdout=log, stderr=log
    )
    deadline = time.monotonic() + 60
    for endpoint in listen.values():
        while not can_connect(endpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"policyd did not start; see {logfile}")
            time.sleep(0.05)
    return proc


def load_request(principal: str, key_id: str, n: int, stage: str = "RCPT",
                 instance: str = "") -> bytes:
    """A policy request as Postfix 3.7 sends it at ``stage`` (RCPT or DATA) for a message to
    one recipient; ``instance`` tells messages apart (default ``b<n>``)."""
    count = 1 if stage == "DATA" else 0  # Postfix sends 0 until DATA
    return (
        f"request=smtpd_access_policy\nprotocol_state={stage}\nprotocol_name=ESMTP\n"
        f"client_address=127.0.0.1\nclient_name=localhost\nserver_address=127.0.0.1\n"
        f"server_port=587\nhelo_name=app.example\nsender=app@{domain_of(principal)}\n"
        f"recipient=user{n}@example.net\nrecipient_count={count}\nqueue_id=\n"
        f"instance={instance or f'b{n}'}\n"
        f"size=1000\nsasl_method=PLAIN\nsasl_username={principal}:{key_id}\nsasl_sender=\n"
        "encryption_protocol=TLSv1.3\nencryption_cipher=TLS_AES_256_GCM_SHA384\n"
        "encryption_keysize=256\npolicy_context=submission\n\n"
    ).encode()


_CONNECTIONS = itertools.count()


class PolicydConnection:
    """One persistent connection speaking like Postfix: one request at a time. Policy
    requests are of ``stage`` (``STAGES``); every message has an ``instance`` of its own,
    across connections too (a message is charged once per instance)."""

    def __init__(self, service: str, endpoint: str, issued: list[tuple[str, str]],
                 stage: str = "RCPT") -> None:
        self.service, self.endpoint, self.issued = service, endpoint, issued
        self.stage = stage
        self.rng = random.Random()  # noqa: S311 - which key a request uses, not a secret
        self.n = 0
        self.tag = f"c{next(_CONNECTIONS)}m"
        self.message: tuple[str, str] | None = None  # "message": the login between RCPT, DATA

    async def connect(self) -> None:
        if self.endpoint.startswith("unix:"):
            self.reader, self.writer = await asyncio.open_unix_connection(self.endpoint[5:])
        else:
            port = int(self.endpoint.rpartition(":")[2])
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        if self.service == "auth":
            self.writer.write(b"VERSION\t1\t0\nCPID\t%d\n" % os.getpid())
            while (await self.reader.readline()) != b"DONE\n":
                pass

    def request(self) -> bytes:
        self.n += 1
        if self.service == "policy" and self.stage == "message":
            if self.message is None:  # a new message: its RCPT
                self.message = self.issued[self.rng.randrange(len(self.issued))]
                principal, text = self.message
                return load_request(principal, text.split(".")[1], self.n, "RCPT",
                                    f"{self.tag}{self.n}")
            principal, text = self.message  # its DATA, the same instance as its RCPT
            self.message = None
            return load_request(principal, text.split(".")[1], self.n, "DATA",
                                f"{self.tag}{self.n - 1}")
        principal, text = self.issued[self.rng.randrange(len(self.issued))]
        if self.service == "policy":
            return load_request(principal, text.split(".")[1], self.n, self.stage,
                                f"{self.tag}{self.n}")
        resp = base64.b64encode(b"\0apikey\0" + text.encode()).decode()
        return (f"AUTH\t{self.n}\tPLAIN\tservice=smtp\tnologin\tlip=127.0.0.1\t"
                f"rip=127.0.0.1\tsecured\tresp={resp}\n").encode()

    async def exchange(self, request: bytes) -> None:
        self.writer.write(request)
        if self.service == "policy":
            reply = await self.reader.readuntil(b"\n\n")
            if not reply.startswith(b"action=FILTER"):
                raise SystemExit(f"unexpected policy answer: {reply!r}")
        else:
            reply = await self.reader.readline()
            if not reply.startswith(b"OK\t"):
                raise SystemExit(f"unexpected auth answer: {reply!r}")

    async def run(self, stop: float, latencies: list[float], interval: float = 0.0) -> None:
        """Closed loop (``interval`` 0: next request as soon as the answer is in), or paced:
        one request every ``interval`` seconds, latency measured from the *scheduled* send
        time so a slow answer is not hidden by the requests it delayed."""
        due = time.perf_counter() + self.rng.random() * interval
        while True:
            if interval:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                started = due
                due += interval
            else:
                started = time.perf_counter()
            if started >= stop:
                break
            await self.exchange(self.request())
            latencies.append(time.perf_counter() - started)

    def close(self) -> None:
        self.writer.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (``/proc/PID/stat`` utime, stime)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Measured(NamedTuple):
    requests: int
    seconds: float
    latencies: list[float]
    cpu: float  # policyd's CPU seconds over the measured run
    others: dict[int, float]  # CPU seconds of the other processes asked for, by pid


async def measure(service: str, endpoint: str, issued: list[tuple[str, str]],
                  connections: int, seconds: float, rate: float, pid: int, *,
                  stage: str = "RCPT", others: tuple[int, ...] = ()) -> Measured:
    """One measured run after a second of warm-up: requests, seconds, latencies, and the CPU
    seconds of policyd (``pid``) and of ``others`` over the same seconds."""
    clients = [PolicydConnection(service, endpoint, issued, stage)
               for _ in range(connections)]
    await asyncio.gather(*(c.connect() for c in clients))
    interval = connections / rate if rate else 0.0
    warm: list[float] = []
    await asyncio.gather(*(c.run(time.perf_counter() + 1.0, warm, interval) for c in clients))
    latencies: list[float] = []
    # policyd's whole tree: with policyd.workers above 1 the supervisor and its workers
    before = {p: process_tree_cpu(p) if p == pid else cpu_seconds(p) for p in (pid, *others)}
    started = time.perf_counter()
    await asyncio.gather(*(c.run(started + seconds, latencies, interval) for c in clients))
    elapsed = time.perf_counter() - started
    used = {p: (process_tree_cpu(p) if p == pid else cpu_seconds(p)) - before[p]
            for p in before}
    for c in clients:
        c.close()
    return Measured(len(latencies), elapsed, latencies, used.pop(pid), used)


async def drive(service: str, endpoint: str, issued: list[tuple[str, str]], connections: int,
                seconds: float, rate: float, pid: int) -> tuple[int, float, list[float], float]:
    """(requests, seconds, latencies, policyd's CPU seconds) of the measured run (RCPT)."""
    done = await measure(service, endpoint, issued, connections, seconds, rate, pid)
    return done.requests, done.seconds, done.latencies, done.cpu


def install_uvloop() -> None:
    """The load generator must not be the bottleneck: the faster loop when it is there."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
