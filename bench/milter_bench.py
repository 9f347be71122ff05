"""keyrelay-milter driven directly over the milter protocol, as Postfix drives it (no Postfix).

NAME
    milter_bench.py - a milter-protocol load generator: messages/s and milter CPU per message

SYNOPSIS
    .venv/bin/python -m bench.milter_bench [--messages N] [--concurrency C] [--body-size B]
        [--repeat R] [--warmup W] [--source DIR]... [--workers N]... [--null]
        [--socket ENDPOINT --pid PID --login LOGIN --from ADDRESS] [--expect-signatures K]

DESCRIPTION
    Without --socket it builds a site in a temporary folder the way `keyrelay domain add`
    does (one account, one API key, one verified domain with an RSA-2048 and an Ed25519
    selector, a YAML directory), starts the real `keyrelay-milter` on a unix socket there
    (its decision log going to a file), and drives it. With --socket it drives a milter
    that is already running (any setup: one process, a supervisor with workers, another
    milter); --pid names the process whose CPU is counted (with every descendant, so a
    supervisor's workers are included) and --login the {auth_authen} to send.

    C client connections (threads) each send their share of N messages, one after another,
    as Postfix's smtpd does for an SMTP session that sends several messages:

      option negotiation (SMFIC_OPTNEG, protocol 6, every action and protocol step offered,
        as Postfix 3.7 offers them), then per connection the connect and HELO macros and
        events, then per message the macros and events of MAIL (with {auth_authen},
        {auth_type}, {client_addr}, i), RCPT, DATA, each header (with the end-of-header
        macros before each, as Postfix sends them; Postfix's own Received: is not shown to
        milters), end of headers, the body in chunks of at most 65,535 bytes (CRLF line
        ends, the end-of-message macros before each) and end-of-message; QUIT at the end.

    What the milter negotiated is honoured as Postfix honours it: the macros of a stage are
    the ones it asked for (its symbol lists), else Postfix's default lists; an event it
    skips (SMFIP_NO*) is not sent, but its macros are (Postfix does the same); an event it
    answers without a reply (SMFIP_NR_*) is written without waiting, so that everything up
    to end-of-message goes out in one write when the milter answers nothing before it.
    The replies to end-of-message are read, including the headers it inserts; a message
    not accepted (continue or accept) or without exactly K DKIM-Signature headers (K from
    --expect-signatures, default 2 for the built-in site) stops the benchmark (exit 1).
    For the built-in site one message's signatures are verified with dkimpy against the
    selectors' public keys before measuring.

    Runs are interleaved: for each of R repetitions, every --source in turn (default: this
    tree), then with --null keyrelay-milter's own glue (milters/milter.py, registered as
    milters/main.py does) over a service that does no work and answers every message with
    two fixed DKIM-Signature values: what libmilter, pymilter and the glue cost alone.
    A --source is another checkout of the repository: its `milters` package is run
    with this virtualenv's Python (PYTHONPATH=DIR python -m milters), so that two versions
    of the milter can be compared on one machine in one run.
    With --workers N (repeatable) the milter is started with milter.workers N, each count
    in turn within every repetition: the scaling of the worker processes (the CPU counted
    is the supervisor's and its workers').

MEASURES
    msg/s       N divided by the wall time from the first connection to the last reply
    CPU ms/msg  CPU time of the milter process and its descendants (the kernel's
                per-process CPU clock, testkit/stats.py) during the run, divided by N
    client ms   the same for this load generator (it shares the machine)

    The table gives each run and, per source, the median and the lowest. The load average
    before and after is printed: on a shared machine other processes only ever add time.

    .venv/bin/python -m bench.milter_bench --messages 3000 --concurrency 8 --repeat 3
    .venv/bin/python -m bench.milter_bench --source /tmp/main-checkout --source . --repeat 5
    .venv/bin/python -m bench.milter_bench --workers 1 --workers 2 --repeat 5
    .venv/bin/python -m bench.milter_bench --null --concurrency 1 --repeat 5
    .venv/bin/python -m bench.milter_bench --socket unix:/run/keyrelay/milter.sock \\
        --pid "$(pidof -s keyrelay-milter)" --login 'acme:KEYID' --from app@acme.example
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import dkim
import yaml

# the header block of a typical transactional message, the one milter_sign_bench.py signs
from bench.milter_sign_bench import HEADERS
from keyrelay import admin, dkimkeys
from keyrelay.decisions import Reason
from keyrelay.decisions.verdict import allow
from keyrelay.directory.model import Algorithm, DirectoryData, Selector, SelectorState
from keyrelay.directory.yamlfile import render
from milters.service import Message as MilterMessage
from milters.service import MessageOutcome, MilterService
from testkit.stats import load_average, process_tree_cpu

DOMAIN = "bench.example"
CHUNK = 65535  # Postfix's MILTER_CHUNK_SIZE
# -- the milter protocol (libmilter's mfdef.h), the MTA's side ---------------------------------
VERSION = 6
ACTIONS = 0x1FF  # SMFIF_* : every modification
PROTOCOL = 0x1FFFFF  # SMFIP_* : every step may be skipped or left unanswered (as Postfix 3.7)
STAGES = "CHMRTNBE"  # event: connect, HELO, MAIL, RCPT, DATA, EOH, body, EOM
# (SMFIP_NO* flag, SMFIP_NR_* flag) per event; EOM always has a reply
NO_FLAG = {"C": 0x01, "H": 0x02, "M": 0x04, "R": 0x08, "B": 0x10, "L": 0x20, "N": 0x40,
           "T": 0x200}
NR_FLAG = {"C": 0x1000, "H": 0x2000, "M": 0x4000, "R": 0x8000, "T": 0x10000, "L": 0x80,
           "N": 0x40000, "B": 0x80000}
HDR_LEADSPC = 0x100000
# symbol list stage numbers (SMFIM_*) and the command letters whose macros they are
MACRO_STAGE = {0: "C", 1: "H", 2: "M", 3: "R", 4: "T", 5: "E", 6: "N"}
# Postfix's defaults (milter_*_macros in postconf(5)); a stage the milter names is replaced
DEFAULT_MACROS = {
    "C": ("j", "{daemon_name}", "{daemon_addr}", "v", "_"),
    "H": ("{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}", "{cert_issuer}"),
    "M": ("i", "{auth_type}", "{auth_authen}", "{auth_author}", "{mail_addr}", "{mail_host}",
          "{mail_mailer}"),
    "R": ("i", "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"),
    "T": ("i",),
    "N": ("i",),
    "E": ("i",),
}
ACCEPTED = {b"c", b"a"}  # SMFIR_CONTINUE, SMFIR_ACCEPT
FINAL = {b"a", b"c", b"d", b"r", b"t", b"y"}  # the replies that end end-of-message


def packet(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + command + data


def strings(*values: str | bytes) -> bytes:
    return b"".join((v.encode() if isinstance(v, str) else v) + b"\0" for v in values)


class MilterError(Exception):
    """The milter answered something a benchmark run cannot go on with."""


@dataclass
class Negotiated:
    protocol: int
    macros: dict[str, tuple[str, ...]]  # command letter -> macro names to send

    def skips(self, event: str) -> bool:
        return bool(self.protocol & NO_FLAG.get(event, 0))

    def waits(self, event: str) -> bool:
        return event not in NR_FLAG or not self.protocol & NR_FLAG[event]


@dataclass
class Message:
    """What one message's conversation sends, the end-of-message part apart."""

    sender: str
    recipient: str
    headers: Sequence[tuple[str, bytes]]
    body: bytes
    macros: dict[str, str] = field(default_factory=dict)  # name -> value, for every stage


class MilterClient:
    """The MTA side of one milter connection, on a blocking socket."""

    def __init__(self, endpoint: str, timeout: float = 60.0) -> None:
        if endpoint.startswith("unix:"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: str | tuple[str, int] = endpoint[len("unix:"):]
        elif endpoint.startswith("inet:"):
            host, _, port = endpoint[len("inet:"):].rpartition(":")
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (host, int(port))
        else:
            raise ValueError(f"{endpoint}: not unix:PATH or inet:HOST:PORT")
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.buffer = b""
        self.pending: list[bytes] = []  # written at the next wait or flush
        self.negotiated = Negotiated(0, {})

    def close(self) -> None:
        self.sock.close()

    # -- reading and writing ------------------------------------------------------------
    def _read(self) -> tuple[bytes, bytes]:
        while True:
            if len(self.buffer) >= 4:
                (size,) = struct.unpack(">I", self.buffer[:4])
                if len(self.buffer) >= 4 + size:
                    command = self.buffer[4:5]
                    data = self.buffer[5 : 4 + size]
                    self.buffer = self.buffer[4 + size :]
                    if command != b"p":  # SMFIR_PROGRESS
                        return command, data
                    continue
            chunk = self.sock.recv(65536)
            if not chunk:
                raise MilterError("the milter closed the connection")
            self.buffer += chunk

    def _flush(self) -> None:
        if self.pending:
            self.sock.sendall(b"".join(self.pending))
            self.pending = []

    def _event(self, event: str, data: bytes = b"", stage: str = "") -> tuple[bytes, bytes] | None:
        """Send an event (after the macros of ``stage``, by default its own); its reply when
        the milter gives one."""
        self._macros(event, stage or event)
        if self.negotiated.skips(event):
            return None
        self.pending.append(packet(event.encode(), data))
        if not self.negotiated.waits(event):
            return None
        self._flush()
        reply = self._read()
        if reply[0] not in ACCEPTED:
            raise MilterError(f"the milter answered {reply[0]!r} {reply[1][:200]!r} to {event}")
        return reply

    def _macros(self, event: str, stage: str) -> None:
        names = self.negotiated.macros.get(stage)
        if names and self._values is not None:
            pairs = [(n, self._values.get(n, "")) for n in names]
            self.pending.append(packet(b"D", event.encode() + strings(*(
                s for pair in pairs for s in pair))))

    _values: dict[str, str] | None = None

    # -- the conversation ---------------------------------------------------------------
    def negotiate(self) -> Negotiated:
        self.sock.sendall(packet(b"O", struct.pack(">III", VERSION, ACTIONS, PROTOCOL)))
        command, data = self._read()
        if command != b"O" or len(data) < 12:
            raise MilterError(f"no option negotiation: {command!r}")
        _, _, protocol = struct.unpack(">III", data[:12])
        macros = {event: DEFAULT_MACROS[event] for event in DEFAULT_MACROS}
        rest = data[12:]
        while len(rest) >= 4:  # symbol lists: u32 stage, NUL-terminated space-separated names
            (stage,) = struct.unpack(">I", rest[:4])
            names, _, rest = rest[4:].partition(b"\0")
            if stage in MACRO_STAGE:
                macros[MACRO_STAGE[stage]] = tuple(names.decode().split())
        self.negotiated = Negotiated(protocol, macros)
        return self.negotiated

    def open_session(self, values: dict[str, str], helo: str = "app.example.net") -> None:
        self._values = values
        address = values.get("{client_addr}", "127.0.0.1")
        self._event("C", strings("localhost") + b"4" + struct.pack(">H", 40000)
                    + strings(address))
        self._event("H", strings(helo))

    def send(self, message: Message) -> list[tuple[bytes, bytes]]:
        """One message; the end-of-message replies (modifications, then the verdict)."""
        self._values = message.macros
        self._event("M", strings(f"<{message.sender}>"))
        self._event("R", strings(f"<{message.recipient}>"))
        self._event("T")
        space = b" " if self.negotiated.protocol & HDR_LEADSPC else b""
        # Postfix sends the end-of-header macros with every header, and the end-of-message
        # macros with every body chunk, as Postfix does
        for name, value in message.headers:
            self._event("L", strings(name, space + value), stage="N")
        self._event("N")
        for start in range(0, len(message.body), CHUNK):
            self._event("B", message.body[start : start + CHUNK], stage="E")
        self._macros("E", "E")
        self.pending.append(packet(b"E"))
        self._flush()
        replies = []
        while True:
            reply = self._read()
            replies.append(reply)
            if reply[0] in FINAL:
                return replies

    def quit(self) -> None:
        self.pending.append(packet(b"Q"))
        self._flush()


def inserted_headers(replies: list[tuple[bytes, bytes]]) -> list[tuple[str, bytes]]:
    """The headers an end-of-message answer adds (SMFIR_INSHEADER and SMFIR_ADDHEADER)."""
    found = []
    for command, data in replies:
        if command == b"i":
            data = data[4:]  # the index
        elif command != b"h":
            continue
        name, value, _ = data.split(b"\0", 2)
        found.append((name.decode(), value))
    return found


def make_body(size: int) -> bytes:
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n"
    return (line * (size // len(line) + 1))[:size]


def make_message(login: str, sender: str, body_size: int, queue_id: str) -> Message:
    domain = sender.rpartition("@")[2]
    # Postfix does not show a milter its own Received: header: the headers start
    # with the client's
    headers = [(n, v.replace(b"sender@bench.example", sender.encode())
                .replace(b"bench.example", domain.encode())) for n, v in HEADERS]
    macros = {
        "j": "relay.example", "{daemon_name}": "submission", "{daemon_addr}": "127.0.0.1",
        "v": "Postfix 3.7.11", "_": "app.example.net [127.0.0.1]",
        "{client_addr}": "127.0.0.1", "i": queue_id, "{auth_type}": "PLAIN",
        "{auth_authen}": login, "{auth_author}": "", "{mail_addr}": sender,
        "{mail_host}": "", "{mail_mailer}": "", "{rcpt_addr}": "rcpt@example.net",
        "{rcpt_host}": "example.net", "{rcpt_mailer}": "smtp",
    }
    return Message(sender, "rcpt@example.net", headers, make_body(body_size), macros)


# -- a site of our own -----------------------------------------------------------------------
@dataclass
class Site:
    root: Path
    config: Path
    endpoint: str
    login: str
    sender: str
    selectors: tuple[Selector, ...]


def make_site(root: Path) -> Site:
    now = datetime.now(UTC)
    names = {Algorithm.RSA_SHA256: "bench-rsa", Algorithm.ED25519_SHA256: "bench-ed"}
    selectors = dkimkeys.create_selectors(str(root / "dkim"), DOMAIN, names,
                                          SelectorState.ACTIVE, now)
    data = DirectoryData()
    admin.add_account(data, "bench", now)
    admin.add_domain(data, "bench", DOMAIN, selectors, now)
    admin.mark_verified(data, DOMAIN, now - timedelta(days=1))
    key = admin.create_key(data, "bench", "app", ("mail.send",), None, now)
    (root / "directory.yaml").write_text(render(data), encoding="utf-8")
    endpoint = f"unix:{root}/milter.sock"
    config = root / "keyrelay.yaml"
    config.write_text(yaml.safe_dump({
        "directory": {"path": str(root / "directory.yaml")},
        "dkim": {"key_dir": str(root / "dkim")},
        "logging": {"format": "json"},
        "milter": {"listen": endpoint, "socket_group": "", "user": "root" if os.geteuid() == 0
                   else _user()},
    }))
    return Site(root, config, endpoint, f"bench:{key.key_id}", f"sender@{DOMAIN}", selectors)


def with_workers(site: Site, count: int) -> Site:
    """``site`` with milter.workers ``count`` (0: the configuration's default, auto)."""
    if not count:
        return site
    config = yaml.safe_load(site.config.read_text())
    config["milter"]["workers"] = count
    path = site.config.with_name(f"keyrelay-workers-{count}.yaml")
    path.write_text(yaml.safe_dump(config))
    return dataclasses.replace(site, config=path)


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


@contextmanager
def milter_process(site: Site, source: str | None, null: bool = False) -> Iterator[int]:
    """keyrelay-milter on the site's socket, from this tree or from ``source``; its pid.
    With ``null`` its glue over ``NullService`` instead (no check, no signing, no log)."""
    env = dict(os.environ)
    if source:
        env["PYTHONPATH"] = os.path.abspath(source)
    log = open(site.root / f"milter-{os.getpid()}-{time.monotonic_ns()}.log", "wb")
    command = (["-m", "bench.milter_bench", "--serve-null", site.endpoint] if null
               else ["-m", "milters", "--config", str(site.config)])
    proc = subprocess.Popen([sys.executable, *command], stdout=log, stderr=log, env=env,
                            cwd=source or None)
    try:
        deadline = time.monotonic() + 60  # generous: a busy shared machine
        path = site.endpoint[len("unix:"):]
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"keyrelay-milter exited with {proc.returncode}; see "
                                 f"{log.name}")
            try:
                MilterClient(site.endpoint, timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"keyrelay-milter did not listen on {path} in 60 s") \
                        from None
                time.sleep(0.05)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def verify_once(site: Site) -> None:
    """One message through the milter, its signatures verified by dkimpy (no DNS)."""
    records = {f"{s.name}._domainkey.{DOMAIN}.".encode():
               dkimkeys.dkim_record(DOMAIN, s).value.encode() for s in site.selectors}
    client = MilterClient(site.endpoint)
    try:
        client.negotiate()
        message = make_message(site.login, site.sender, 2000, "VERIFY0001")
        client.open_session(message.macros)
        added = inserted_headers(client.send(message))
        client.quit()
    finally:
        client.close()
    signatures = [value for name, value in added if name.lower() == "dkim-signature"]
    if len(signatures) != len(site.selectors):
        raise SystemExit(f"expected {len(site.selectors)} DKIM-Signature headers, got {added}")
    head = b"".join(b"DKIM-Signature: " + v.replace(b"\n", b"\r\n") + b"\r\n"
                    for v in signatures)
    head += b"".join(n.encode() + b": " + v.replace(b"\n", b"\r\n") + b"\r\n"
                     for n, v in message.headers)
    wire = head + b"\r\n" + message.body
    for index in range(len(signatures)):
        if not dkim.DKIM(wire).verify(idx=index, dnsfunc=lambda name, timeout=5:
                                      records.get(name, b"")):
            raise SystemExit(f"DKIM-Signature {index} does not verify")


# -- the milter layer alone -------------------------------------------------------------------
class NullService:
    """What ``KeyrelayMilter`` needs of a ``MilterService``, doing no work: every message is
    allowed with two fixed DKIM-Signature values of the real size. Behind the real glue
    (milters/milter.py) and registration (milters/main.py), it measures what libmilter,
    pymilter and the glue cost per message, with the same negotiation and callbacks."""

    kept_headers: frozenset[str] = frozenset()
    in_progress = 0
    _outcome = MessageOutcome(
        allow(Reason.OK, "bench", "key"),
        tuple(b"v=1; a=rsa-sha256; c=relaxed/relaxed; d=bench.example;\n\ts=bench; t=1;"
              b"\n\th=from:to:subject:date:message-id:mime-version:content-type:\n\t"
              b"bh=" + b"A" * 44 + b"; b=" + b"A" * size for size in (344, 88)),
    )

    def begin(self, identity: str, client_address: str) -> MilterMessage:
        return MilterMessage(identity, client_address, hash_body=False)

    def end(self) -> None:
        pass

    def finish(self, message: MilterMessage | None, queue_id: str) -> MessageOutcome:
        return self._outcome


def serve_null(endpoint: str) -> None:
    """keyrelay-milter's glue over ``NullService`` on ``endpoint`` until SIGTERM."""
    import functools

    import Milter

    from milters import main as milter_main
    from milters.milter import KeyrelayMilter

    service = cast(MilterService, NullService())  # the part of it that the glue uses
    Milter.factory = functools.partial(KeyrelayMilter, service)
    milter_main._register()
    if endpoint.startswith("unix:") and os.path.exists(endpoint[len("unix:"):]):
        os.unlink(endpoint[len("unix:"):])  # the last run's socket
    Milter.setconn(endpoint)
    Milter.opensocket(False)
    Milter.main()


# -- the load ---------------------------------------------------------------------------------
@dataclass
class Result:
    messages: int
    seconds: float
    milter_cpu: float
    client_cpu: float
    signatures: int

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def milter_ms(self) -> float:
        return self.milter_cpu * 1000 / self.messages

    @property
    def client_ms(self) -> float:
        return self.client_cpu * 1000 / self.messages


def run_load(endpoint: str, pid: int, login: str, sender: str, messages: int,
             concurrency: int, body_size: int, expect: int | None) -> Result:
    """``messages`` over ``concurrency`` connections; CPU of ``pid``'s tree meanwhile."""
    shares = [messages // concurrency + (i < messages % concurrency) for i in range(concurrency)]
    errors: list[BaseException] = []
    signed = [0] * concurrency

    def session(index: int, count: int) -> None:
        templates = [make_message(login, sender, body_size, f"{index:02X}Q{n:07X}")
                     for n in range(min(count, 16))]
        try:
            client = MilterClient(endpoint)
        except OSError as exc:
            errors.append(exc)
            start_line.abort()
            return
        try:
            client.negotiate()
            client.open_session(templates[0].macros)
            start_line.wait()
            for n in range(count):
                replies = client.send(templates[n % len(templates)])
                if replies[-1][0] not in ACCEPTED:
                    raise MilterError(f"message not accepted: {replies[-1]!r}")
                added = sum(1 for name, _ in inserted_headers(replies)
                            if name.lower() == "dkim-signature")
                if expect is not None and added != expect:
                    raise MilterError(f"{added} DKIM-Signature headers, expected {expect}")
                signed[index] += added
            client.quit()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            start_line.abort()
        finally:
            client.close()

    threads = [threading.Thread(target=session, args=(i, n), daemon=True)
               for i, n in enumerate(shares) if n]
    start_line = threading.Barrier(len(threads) + 1)
    for thread in threads:
        thread.start()
    try:
        start_line.wait(timeout=120)
    except threading.BrokenBarrierError:
        pass
    cpu0, client0, wall0 = process_tree_cpu(pid), time.process_time(), time.monotonic()
    for thread in threads:
        thread.join()
    wall, client = time.monotonic() - wall0, time.process_time() - client0
    cpu = process_tree_cpu(pid) - cpu0
    if errors:
        raise SystemExit(f"run failed: {errors[0]!r}")
    return Result(messages, wall, cpu, client, sum(signed))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.milter_bench",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000, help="per run (default 2000)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="milter connections, as Postfix's smtpd processes (default 8)")
    parser.add_argument("--body-size", type=int, default=2000, help="bytes (default 2000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per source (default 3)")
    parser.add_argument("--warmup", type=int, default=200,
                        help="messages before each measured run (default 200)")
    parser.add_argument("--source", action="append",
                        help="a checkout whose milters package to run (repeatable; default: "
                        "this tree)")
    parser.add_argument("--workers", action="append", type=int, metavar="N",
                        help="milter.workers of the milter started (repeatable: each count "
                        "in turn, interleaved; default: the configuration's default, auto)")
    parser.add_argument("--socket", help="drive this running milter (unix:PATH or "
                        "inet:HOST:PORT) instead of starting one")
    parser.add_argument("--pid", type=int, help="with --socket: the milter's process id")
    parser.add_argument("--login", help="with --socket: the {auth_authen} to send")
    parser.add_argument("--from", dest="sender", help="with --socket: the From: address")
    parser.add_argument("--null", action="store_true",
                        help="also run keyrelay-milter's glue over a service that does no "
                        "work (the cost of libmilter, pymilter and the glue), interleaved")
    parser.add_argument("--serve-null", metavar="ENDPOINT", help=argparse.SUPPRESS)
    parser.add_argument("--expect-signatures", type=int,
                        help="DKIM-Signature headers each message must get (default 2 "
                        "for the built-in site, not checked with --socket)")
    args = parser.parse_args(argv)
    if args.serve_null:
        serve_null(args.serve_null)
        return
    # stopped with SIGTERM: leave through the with-blocks, which stop the milter started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.socket and not (args.pid and args.login and args.sender):
        parser.error("--socket needs --pid, --login and --from")
    print(f"load average before: {load_average()}")
    print(f"{args.messages} messages of {args.body_size} body bytes, {args.concurrency} "
          f"connections, {args.repeat} runs each")
    results: dict[str, list[Result]] = {}
    if args.socket:
        for _ in range(args.repeat):
            run_load(args.socket, args.pid, args.login, args.sender, args.warmup,
                     args.concurrency, args.body_size, args.expect_signatures)
            result = run_load(args.socket, args.pid, args.login, args.sender, args.messages,
                              args.concurrency, args.body_size, args.expect_signatures)
            results.setdefault(args.socket, []).append(result)
            report_run(args.socket, result)
    else:
        expect = 2 if args.expect_signatures is None else args.expect_signatures
        with tempfile.TemporaryDirectory(prefix="milter-bench-") as tmp:
            base = make_site(Path(tmp))
            sites = {count: with_workers(base, count) for count in args.workers or [0]}
            setups = [(source, False, count) for source in args.source or [""]
                      for count in sites]
            if args.null:
                setups.append(("", True, 0))
            for _ in range(args.repeat):
                for source, null, count in setups:
                    site = sites[count]
                    with milter_process(site, source, null) as pid:
                        if not null:
                            verify_once(site)
                        run_load(site.endpoint, pid, site.login, site.sender, args.warmup,
                                 args.concurrency, args.body_size, expect)
                        result = run_load(site.endpoint, pid, site.login, site.sender,
                                          args.messages, args.concurrency, args.body_size,
                                          expect)
                    name = "null service (layer only)" if null else source or "."
                    if count and not null:
                        name += f", {count} worker{'s' if count > 1 else ''}"
                    results.setdefault(name, []).append(result)
                    report_run(name, result)
    print(f"load average after: {load_average()}")
    print(f"\n{'source':30} {'msg/s':>8} {'CPU ms/msg':>11} {'lowest':>8} {'client ms':>10}")
    for name, runs in results.items():
        print(f"{name[-30:]:30} {statistics.median(r.rate for r in runs):8.0f} "
              f"{statistics.median(r.milter_ms for r in runs):11.3f} "
              f"{min(r.milter_ms for r in runs):8.3f} "
              f"{statistics.median(r.client_ms for r in runs):10.3f}")


def report_run(name: str, result: Result) -> None:
    print(f"  {name[-30:]:30} {result.rate:8.0f} msg/s  milter {result.milter_ms:6.3f} ms/msg"
          f"  client {result.client_ms:6.3f} ms/msg  signatures {result.signatures}",
          flush=True)


if __name__ == "__main__":
    main()
