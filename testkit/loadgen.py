"""An SMTP load generator that behaves like sending applications (bench/e2e_bench.py,
bench/soak.py).

Each session connects, says EHLO, starts TLS (STARTTLS, or implicit TLS on a port 465
service), says EHLO again, logs in with AUTH PLAIN as ``apikey`` with one principal's API
key, sends a batch of messages (MAIL, RCPT and DATA pipelined, as Postfix offers
PIPELINING) and says QUIT. ``concurrency`` sessions run at once, each with the next
principal in turn; a session takes the next message from a shared queue until it has sent
``per_session``, then the next session starts, until every message was tried.

Per message it records the latency from writing MAIL FROM to the 250 after the end of DATA,
or the SMTP reply that refused it (code, enhanced status and the stage: ``451 4.3.0 at
RCPT``), or ``connection: REASON`` when the session broke. Nothing is retried: a benchmark
counts what happened (bench/soak.py sends the refused ones again, as ``numbers``, and
needs to know which session broke after the end of DATA had been sent: ``in_doubt``). With
``rate`` the messages are sent on a schedule (message i is due
``i / rate`` seconds after the start: an open-loop load at a fixed rate) instead of as fast
as the sessions go.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import ssl
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from testkit.net import client_tls

TIMEOUT = 120.0  # seconds for any one reply (a 1 MB message through a busy milter included)


@dataclass(frozen=True)
class Principal:
    """One sending application: its principal, API key, envelope sender and recipient."""

    pid: str
    key: str = field(repr=False)
    mail_from: str
    rcpt_to: str

    @property
    def domain(self) -> str:
        return self.mail_from.rpartition("@")[2]


@dataclass
class LoadResult:
    """What the client saw: accepted messages with their latency, refusals by reply."""

    accepted: dict[int, float] = field(default_factory=dict)  # message number -> seconds
    errors: Counter[str] = field(default_factory=Counter)
    refused: set[int] = field(default_factory=set)
    reply_of: dict[int, str] = field(default_factory=dict)  # refused: the reply's label
    refused_by: dict[int, str] = field(default_factory=dict)  # refused: the principal
    in_doubt: set[int] = field(default_factory=set)  # broke after the end of DATA was sent
    sent_by: dict[int, str] = field(default_factory=dict)  # accepted: the principal
    accepted_at: dict[int, float] = field(default_factory=dict)  # accepted: time.time()
    # accepted: time.time() just before its MAIL FROM was sent (every check of the message
    # by the server came after it)
    mail_sent_at: dict[int, float] = field(default_factory=dict)
    lag: dict[int, float] = field(default_factory=dict)  # paced: seconds sent after due
    sessions: int = 0
    seconds: float = 0.0  # first connection to the last reply

    def latencies_ms(self) -> list[float]:
        return sorted(v * 1000 for v in self.accepted.values())


class ProtocolError(Exception):
    """The server answered a session step (greeting, EHLO, STARTTLS, AUTH) otherwise."""

    def __init__(self, stage: str, reply: str) -> None:
        super().__init__(f"{stage}: {reply}")
        self.stage = stage
        self.reply = reply


def message_id(run: str, number: int, domain: str) -> str:
    return f"<{run}.{number}@{domain}>"


def make_body(size: int) -> bytes:
    """``size`` bytes of text in CRLF lines, none starting with a dot."""
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n"
    body = (line * (size // len(line) + 1))[:size]
    return body if body.endswith(b"\r\n") else body[:-2] + b"\r\n"


def make_head(principal: Principal, run: str, number: int) -> bytes:
    return (
        f"From: Bench App <{principal.mail_from}>\r\n"
        f"To: <{principal.rcpt_to}>\r\n"
        f"Subject: bench message {number} of run {run}\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        f"Message-ID: {message_id(run, number, principal.domain)}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "Content-Transfer-Encoding: 7bit\r\n"
        "\r\n"
    ).encode()


async def _reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines = []
    while True:
        line = await asyncio.wait_for(reader.readline(), TIMEOUT)
        if not line:
            raise ConnectionError("the server closed the connection")
        lines.append(line.decode("ascii", "replace").rstrip())
        if line[3:4] != b"-":
            break
    text = lines[-1]
    return (int(text[:3]) if text[:3].isdigit() else 0), text


def _label(text: str, stage: str) -> str:
    """``451 4.3.0 at RCPT``: the code and enhanced status of a reply and where it came."""
    parts = text.split()
    status = parts[1] if len(parts) > 1 and parts[1][:1].isdigit() and "." in parts[1] else ""
    return f"{parts[0] if parts else '?'} {status} at {stage}".replace("  ", " ")


@dataclass
class Load:
    host: str
    port: int
    implicit_tls: bool
    principals: Sequence[Principal]
    body: bytes
    tag: str  # the run's name, in every Message-ID
    count: int
    per_session: int
    concurrency: int
    rate: float | None = None  # messages/s on a schedule; None: as fast as possible
    numbers: Sequence[int] | None = None  # which messages (default: 0 .. count-1)

    async def _expect(self, reader: asyncio.StreamReader, code: int, stage: str) -> None:
        got, text = await _reply(reader)
        if got != code:
            raise ProtocolError(stage, text)

    async def _session(self, principal: Principal, todo: deque[int], outcome: LoadResult,
                       start: float, tls: ssl.SSLContext, current: list[int]) -> None:
        """One session: up to ``per_session`` messages taken from ``todo``; the one being
        sent is in ``current`` (so that a broken session's message can be counted)."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            self.host, self.port, ssl=tls if self.implicit_tls else None), TIMEOUT)
        outcome.sessions += 1
        try:
            await self._expect(reader, 220, "greeting")
            writer.write(b"EHLO bench-client.example\r\n")
            await self._expect(reader, 250, "EHLO")
            if not self.implicit_tls:
                writer.write(b"STARTTLS\r\n")
                await self._expect(reader, 220, "STARTTLS")
                await asyncio.wait_for(writer.start_tls(tls), TIMEOUT)
                writer.write(b"EHLO bench-client.example\r\n")
                await self._expect(reader, 250, "EHLO after STARTTLS")
            plain = base64.b64encode(b"\0apikey\0" + principal.key.encode()).decode()
            writer.write(f"AUTH PLAIN {plain}\r\n".encode())
            await self._expect(reader, 235, "AUTH")
            envelope = (f"MAIL FROM:<{principal.mail_from}>\r\n"
                        f"RCPT TO:<{principal.rcpt_to}>\r\nDATA\r\n").encode()
            for _ in range(self.per_session):
                if not todo:
                    break
                number = todo.popleft()
                current.append(number)
                if self.rate:
                    due = start + number / self.rate
                    if due > time.perf_counter():
                        await asyncio.sleep(due - time.perf_counter())
                    outcome.lag[number] = time.perf_counter() - due
                began, mail_sent = time.perf_counter(), time.time()
                writer.write(envelope)
                replies = [await _reply(reader) for _ in range(3)]
                if replies[2][0] == 354:
                    writer.write(make_head(principal, self.tag, number))
                    writer.write(self.body)
                    writer.write(b".\r\n")
                    await writer.drain()
                    current.append(-1)  # the end of DATA is out: a break now leaves doubt
                    code, text = await _reply(reader)
                    current.clear()
                    if code == 250:
                        outcome.accepted[number] = time.perf_counter() - began
                        outcome.sent_by[number] = principal.pid
                        outcome.accepted_at[number] = time.time()
                        outcome.mail_sent_at[number] = mail_sent
                    else:
                        _refuse(outcome, number, _label(text, "end of DATA"), principal)
                    continue
                current.pop()
                stage, text = next(((s, t) for s, (c, t) in zip(
                    ("MAIL", "RCPT", "DATA"), replies, strict=True) if c >= 400),
                    ("DATA", replies[2][1]))
                _refuse(outcome, number, _label(text, stage), principal)
                writer.write(b"RSET\r\n")
                await self._expect(reader, 250, "RSET")
            writer.write(b"QUIT\r\n")
            await self._expect(reader, 221, "QUIT")
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass

    async def run(self) -> LoadResult:
        outcome = LoadResult()
        tls = client_tls()
        # shared: each session takes the next message
        todo = deque(range(self.count) if self.numbers is None else self.numbers)
        sessions = itertools.count()
        start = time.perf_counter()

        def fail(current: list[int], label: str, principal: Principal) -> None:
            # the message being sent or, for a session that broke before it took one, the
            # next (so that a refused login cannot loop forever)
            number = current[0] if current else (todo.popleft() if todo else None)
            if number is not None:
                _refuse(outcome, number, label, principal)
                if current[1:] == [-1]:
                    outcome.in_doubt.add(number)

        async def worker() -> None:
            while todo:
                principal = self.principals[next(sessions) % len(self.principals)]
                current: list[int] = []
                try:
                    await self._session(principal, todo, outcome, start, tls, current)
                except ProtocolError as exc:
                    fail(current, _label(exc.reply, exc.stage), principal)
                except (OSError, ssl.SSLError, ConnectionError, TimeoutError) as exc:
                    fail(current, f"connection: {type(exc).__name__}", principal)

        await asyncio.gather(*(worker() for _ in range(min(self.concurrency, len(todo)))))
        outcome.seconds = time.perf_counter() - start
        return outcome


def _refuse(outcome: LoadResult, number: int, label: str, principal: Principal) -> None:
    outcome.errors[label] += 1
    outcome.refused.add(number)
    outcome.reply_of[number] = label
    outcome.refused_by[number] = principal.pid


def send(load: Load) -> LoadResult:
    return asyncio.run(load.run())
