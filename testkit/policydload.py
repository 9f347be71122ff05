"""A load on keyrelay-policyd's policy and auth services, for bench/policyd_bench.py and
bench/ldap_bench.py: a YAML directory with many keys (``build_directory``), a policyd in its
own process (``start_policyd``), and ``drive``: persistent connections each sending one
request at a time as Postfix does, closed loop or at a fixed rate, with the latencies and the
daemon's CPU time."""

from __future__ import annotations

import asyncio
import base64
import os
import random
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from keyrelay import admin, keys
from keyrelay.directory.model import ApiKey, DirectoryData
from keyrelay.directory.yamlfile import render
from testkit.net import free_port

ACCOUNT = "bench"
SUBUSERS = 100
DOMAIN = "bench.example"


def build_directory(path: Path, count: int) -> list[tuple[str, str]]:
    """Write a directory with ``count`` keys; return (principal, key text) of every key."""
    now = datetime.now(UTC)
    data = DirectoryData()
    admin.add_account(data, ACCOUNT, now)
    admin.add_pool(data, "benchpool", ["127.0.0.1"], "bench.relay.example", now)
    admin.assign_pool(data, ACCOUNT, "benchpool")
    admin.add_domain(data, ACCOUNT, DOMAIN, (), now)
    admin.mark_verified(data, DOMAIN, now)
    principals = []
    for i in range(SUBUSERS):
        pid = f"{ACCOUNT}/s{i}"
        admin.add_subuser(data, pid, now)
        admin.grant_domain(data, DOMAIN, pid)
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
                  directory: str | None = None) -> subprocess.Popen[bytes]:
    """A policyd on ``folder``'s directory.yaml, or on the ``directory`` section given (YAML
    flow text, e.g. an LDAP one: ldap_bench.py); returns once every service accepts."""
    config = folder / "keyrelay.yaml"
    section = directory or f"{{path: {folder / 'directory.yaml'}}}"
    config.write_text(
        f"directory: {section}\n"
        f"logging: {{audit_log: ''}}\n"
        "postfix: {config_dir: ''}\n"  # no Postfix: route without asking master.cf
        "policyd:\n"
        f"  auth_listen: {listen['auth']}\n"
        f"  policy_listen: {listen['policy']}\n"
        "  socketmap_listen: ''\n"
        "  control_listen: ''\n"
        "  socket_group: ''\n"
        "  user: root\n"  # the bench's folders are root's
        "  max_connections: 10000\n"
        "  bruteforce: {max_failures_per_address: 1000000}\n",
        encoding="utf-8",
    )
    log = open(folder / "policyd.log", "wb")  # stays open as long as the daemon runs
    proc = subprocess.Popen(
        [sys.executable, "-m", "policyd", "--config", str(config)], stdout=log, stderr=log
    )
    deadline = time.monotonic() + 60
    for endpoint in listen.values():
        while not can_connect(endpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                logfile = folder / "policyd.log"
                raise SystemExit(f"policyd did not start; see {logfile}")
            time.sleep(0.05)
    return proc


def load_request(principal: str, key_id: str, n: int) -> bytes:
    return (
        "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
        f"client_address=127.0.0.1\nclient_name=localhost\nserver_address=127.0.0.1\n"
        f"server_port=587\nhelo_name=app.example\nsender=app@{DOMAIN}\n"
        f"recipient=user{n}@example.net\nrecipient_count=0\nqueue_id=\ninstance=b{n}\n"
        f"size=1000\nsasl_method=PLAIN\nsasl_username={principal}:{key_id}\nsasl_sender=\n"
        "encryption_protocol=TLSv1.3\nencryption_cipher=TLS_AES_256_GCM_SHA384\n"
        "encryption_keysize=256\npolicy_context=submission\n\n"
    ).encode()


class PolicydConnection:
    """One persistent connection speaking like Postfix: one request at a time."""

    def __init__(self, service: str, endpoint: str, issued: list[tuple[str, str]]) -> None:
        self.service, self.endpoint, self.issued = service, endpoint, issued
        self.rng = random.Random()  # noqa: S311 - which key a request uses, not a secret
        self.n = 0

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
        principal, text = self.issued[self.rng.randrange(len(self.issued))]
        self.n += 1
        if self.service == "policy":
            return load_request(principal, text.split(".")[1], self.n)
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


async def drive(service: str, endpoint: str, issued: list[tuple[str, str]], connections: int,
                seconds: float, rate: float, pid: int) -> tuple[int, float, list[float], float]:
    """(requests, seconds, latencies, policyd's CPU seconds) of the measured run."""
    clients = [PolicydConnection(service, endpoint, issued) for _ in range(connections)]
    await asyncio.gather(*(c.connect() for c in clients))
    interval = connections / rate if rate else 0.0
    warm: list[float] = []
    await asyncio.gather(*(c.run(time.perf_counter() + 1.0, warm, interval) for c in clients))
    latencies: list[float] = []
    cpu = cpu_seconds(pid)
    started = time.perf_counter()
    await asyncio.gather(*(c.run(started + seconds, latencies, interval) for c in clients))
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(pid) - cpu
    for c in clients:
        c.close()
    return len(latencies), elapsed, latencies, cpu


def install_uvloop() -> None:
    """The load generator must not be the bottleneck: the faster loop when it is there."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
