"""What a scrape reads, and the HTTP server that serves it (docs/metrics.md, "Endpoints").

- ``AccountBound``: turns the per-account counts (recorder.py ``BY_ACCOUNT``) into
  ``keyrelay_messages_total{account,outcome}`` with at most ``top_accounts`` accounts and
  ``other``. Until the set is full an account joins when it is first seen; every hour the set
  becomes the accounts that sent most in that hour (those already in it fill what is left).
  A series never goes down and no count moves between series: a joining account starts at 0
  (or at its count, when it had never been seen before, so nothing of it was in ``other``);
  a leaving one's last value is kept aside so that ``other`` does not jump.
- ``ProcessTotals``: with workers, the daemon's ``process_*`` metrics: CPU of the supervisor,
  of the live workers and of every worker that already exited (the supervisor's ``cutime``);
  memory and descriptors of the live ones.
- ``MetricsServer``: ``/metrics`` and ``/health`` over plain HTTP (``http.server``), in a
  thread that never takes a signal meant for the daemon. Bound before privileges drop, so
  a port already taken stops the start with one line.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .recorder import BY_ACCOUNT, OUTCOMES

log = logging.getLogger("keyrelay.metrics")

SELECTION_PERIOD = 3600.0  # seconds: how often the accounts with their own series are chosen
OTHER = "other"
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1,
            signal.SIGUSR2}


class AccountBound:
    """``source``'s families, the per-account one replaced by its bounded form."""

    def __init__(self, source: Any, top_accounts: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self.top = top_accounts
        self.clock = clock
        self.lock = threading.Lock()
        self.members: dict[str, dict[str, float]] = {}  # account -> outcome -> base
        self.retired: dict[str, float] = dict.fromkeys(OUTCOMES, 0.0)
        self.seen: set[str] = set()  # every account seen by a previous scrape
        self.mark: dict[str, float] = {}  # per-account totals when the period began
        self.next_selection = clock() + SELECTION_PERIOD

    def collect(self) -> Iterator[Any]:
        for family in self.source.collect():
            if family.name == BY_ACCOUNT:
                with self.lock:
                    yield self.bounded(family)
            else:
                yield family

    def bounded(self, family: Any) -> Any:
        from prometheus_client.core import CounterMetricFamily

        counts: dict[tuple[str, str], float] = {}
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = (sample.labels["account"], sample.labels["outcome"])
                counts[key] = counts.get(key, 0.0) + sample.value
        totals: dict[str, float] = {}
        for (account, _), value in counts.items():
            totals[account] = totals.get(account, 0.0) + value
        now = self.clock()
        if now >= self.next_selection:
            self.select(counts, totals)
            self.next_selection = now + SELECTION_PERIOD
        for account in sorted(set(totals) - set(self.members)):
            if len(self.members) >= self.top:
                break
            self.join(account, counts, fresh=account not in self.seen)
        self.seen.update(totals)
        out = CounterMetricFamily("keyrelay_messages", "Messages decided at end of message, "
                                  "by account (bounded: docs/metrics.md) and outcome",
                                  labels=("account", "outcome"))
        other = dict.fromkeys(OUTCOMES, 0.0)
        for (_, outcome), value in counts.items():
            other[outcome] = other.get(outcome, 0.0) + value
        for account in sorted(self.members):
            for outcome, base in self.members[account].items():
                value = counts.get((account, outcome), 0.0) - base
                other[outcome] -= value
                out.add_metric((account, outcome), value)
        for outcome in OUTCOMES:
            out.add_metric((OTHER, outcome), max(0.0, other[outcome] - self.retired[outcome]))
        return out

    def join(self, account: str, counts: dict[tuple[str, str], float], fresh: bool) -> None:
        self.members[account] = {outcome: 0.0 if fresh else counts.get((account, outcome), 0.0)
                                 for outcome in OUTCOMES}

    def select(self, counts: dict[tuple[str, str], float], totals: dict[str, float]) -> None:
        """The hour's busiest accounts become the members; members fill what is left."""
        sent = {account: total - self.mark.get(account, 0.0) for account, total in totals.items()}
        ranked = sorted((a for a, n in sent.items() if n > 0), key=lambda a: (-sent[a], a))
        chosen = ranked[:self.top]
        for account in sorted(self.members, key=lambda a: (-sent.get(a, 0.0), a)):
            if len(chosen) >= self.top:
                break
            if account not in chosen:
                chosen.append(account)
        for account in set(self.members) - set(chosen):
            for outcome, base in self.members.pop(account).items():
                self.retired[outcome] += counts.get((account, outcome), 0.0) - base
        for account in chosen:
            if account not in self.members:
                self.join(account, counts, fresh=account not in self.seen)
        self.mark = totals


class ProcessTotals:
    """The ``process_*`` metrics of a supervisor and its workers (``workers()``: live pids)."""

    def __init__(self, workers: Callable[[], Iterable[int]]) -> None:
        self.workers = workers
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.page = resource.getpagesize()
        self.boot = _boot_time()

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        own = _stat(os.getpid())
        # summed in clock ticks (integers) and divided once: adding quotients in another
        # order could make the counter go down by a rounding step (0.22999999999999998)
        ticks = own[11] + own[12] + own[13] + own[14]  # utime stime cutime cstime
        rss, vms, fds = own[21] * self.page, own[20], _fds(os.getpid())
        for pid in self.workers():
            try:
                fields = _stat(pid)
            except OSError:
                continue  # exited meanwhile: its CPU shows in cutime once reaped
            ticks += fields[11] + fields[12]
            rss += fields[21] * self.page
            vms += fields[20]
            fds += _fds(pid)
        yield CounterMetricFamily("process_cpu_seconds", "CPU of the supervisor and its "
                                  "workers, those that exited included",
                                  value=ticks / self.ticks)
        yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory, supervisor "
                                "and live workers", value=rss)
        yield GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory, supervisor "
                                "and live workers", value=vms)
        yield GaugeMetricFamily("process_open_fds", "Open descriptors, supervisor and live "
                                "workers", value=fds)
        yield GaugeMetricFamily("process_max_fds", "Descriptor limit of each process",
                                value=resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        yield GaugeMetricFamily("process_start_time_seconds", "Start of the supervisor, "
                                "seconds since the epoch", value=self.boot + own[19] / self.ticks)


def _stat(pid: int) -> list[int]:
    """/proc/PID/stat's fields after the command name, as numbers (field 3 is index 0)."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        text = stat.read()
    return [int(x) if x.lstrip(b"-").isdigit() else 0
            for x in text[text.rindex(b")") + 2:].split()]


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _boot_time() -> float:
    with open("/proc/stat", "rb") as stat:
        for line in stat:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    return 0.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    exposition: Any
    health: Callable[[], str]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection
    timeout = 10.0  # seconds a client may take to send its request: none holds a thread

    def do_GET(self) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                self.reply(200, generate_latest(self.server.exposition), CONTENT_TYPE_LATEST)
            elif path == "/health":
                problem = self.server.health()
                self.reply(503 if problem else 200, f"{problem or 'ok'}\n".encode())
            else:
                self.reply(404, b"not found: this endpoint serves /metrics and /health\n")
        except Exception:
            log.exception("metrics: answering %s failed", path)
            self.reply(500, b"internal error (see the daemon's log)\n")

    def reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8"
              ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no access log: Prometheus scrapes every few seconds


def start_thread(target: Callable[[], None], name: str) -> threading.Thread:
    """A daemon thread started with the daemon's signals blocked, so that none of them is
    delivered to it (libmilter and the supervisor wait for them in their own thread)."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return thread


class MetricsServer:
    """``listen`` (HOST:PORT) bound now; ``start`` serves it in a thread."""

    def __init__(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6}) \
            if ":" in host else _Server
        try:
            self.server: _Server = server_class((host, int(port)), _Handler)
        except OSError as exc:
            raise OSError(f"metrics_listen: cannot serve {listen}: "
                          f"{exc.strerror or exc}") from None
        self.listen = listen
        self.thread: threading.Thread | None = None

    def start(self, exposition: Any, health: Callable[[], str]) -> None:
        self.server.exposition = exposition
        self.server.health = health
        self.thread = start_thread(lambda: self.server.serve_forever(0.5), "keyrelay-metrics")
        log.info("metrics: /metrics and /health on http://%s", self.listen)

    def close_socket(self) -> None:
        """In a forked worker: this process's copy of the listening socket, closed."""
        self.server.socket.close()

    def stop(self) -> None:
        if self.thread is not None:
            self.server.shutdown()
        self.server.server_close()
