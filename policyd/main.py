"""``keyrelay-policyd``: the SASL auth, policy and socketmap services in one asyncio process."""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import errno
import io
import logging
import os
import resource
import select
import signal
import socket
import sys
import textwrap
import time
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TextIO

from keyrelay import __version__, daemon, logs, supervisor
from keyrelay.config import Config, load_config, resolve_config_path
from keyrelay.counters import CounterStore, CountersUnavailable, check_counters, open_counters
from keyrelay.directory import open_directory
from keyrelay.errors import ConfigError
from keyrelay.logs import DecisionLog
from keyrelay.metrics import Metrics
from keyrelay.metrics.endpoint import Endpoint
from keyrelay.metrics.probe import INTERVAL, Probe
from keyrelay.usage import ArgumentParser, echo_undecodable_arguments

from . import control, server
from .auth import AuthService
from .context import ServiceContext
from .policy import PolicyService
from .siteauth import SiteAuth, SiteAuthUnavailable
from .socketmap import SocketmapService

log = logging.getLogger("keyrelay.policyd")

DESCRIPTION = """\
Serve Postfix's SASL authentication (Dovecot protocol, smtpd_sasl_type = dovecot), policy
delegation (check_policy_service) and socketmap lookups (map sender_login) for keyrelay:
applications log in with username "apikey" and an API key, and every message is checked
against the keyrelay directory before Postfix accepts it."""

EPILOG = """\
services (endpoints in the policyd section of the configuration):
  auth       smtpd_sasl_type = dovecot, smtpd_sasl_path = private/keyrelay-auth
  policy     check_policy_service unix:private/keyrelay-policy (RCPT and DATA stages)
  socketmap  smtpd_sender_login_maps = socketmap:unix:private/keyrelay-socketmap:sender_login
  control    keyrelay lockout list|clear (policyd.control_listen, for root only by default)

signals:
  (with policyd.workers above 1 they go to the supervisor, which passes them to every worker)
  SIGHUP   reload the configuration (listen endpoints need a restart)
  SIGTERM  stop accepting, let requests in progress finish, write keys' last-used times, exit

files:
  /etc/keyrelay/keyrelay.yaml   configuration (--config, or $KEYRELAY_CONFIG)
  /etc/keyrelay/directory.yaml  the directory (directory.path); changes apply without restart

exit status:
  0 stopped by SIGTERM/SIGINT, or --check-config found no problem
  1 configuration or directory error, or a socket could not be bound
  2 usage error"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="keyrelay-policyd",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    parser.add_argument("--config", metavar="PATH",
                        help="configuration file (default: $KEYRELAY_CONFIG or "
                        "/etc/keyrelay/keyrelay.yaml)")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the configuration and the directory, then exit")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser.parse_args(argv)


def fail(message: str) -> NoReturn:
    daemon.fail("keyrelay-policyd", message)


def check(config: Config) -> None:
    """Everything that can be checked before binding: the directory parses, names resolve."""
    cfg = config.policyd
    try:
        snapshot = daemon.preflight(
            config, "policyd", cfg.user, cfg.socket_group, log, records_use=True
        )
    except daemon.StartupError as exc:
        fail(str(exc))
    if not (cfg.auth_listen or cfg.policy_listen or cfg.socketmap_listen):
        fail("policyd: every *_listen endpoint is empty; nothing to serve")
    if cfg.control_group:
        try:
            control.owner_and_mode(cfg)
        except KeyError:
            fail(f"policyd.control_group: no such group: {cfg.control_group!r}")
    if config.counters.backend != "memory":
        log.info("counters.backend: %s counts rates and quotas, failed logins, lock-outs and "
                 "recent logins, shared by every node that uses it (docs/cluster.md)",
                 config.counters.backend)
    for pool in {config.routing.default_pool} - {""} - set(snapshot.pools):
        log.warning("routing.default_pool %r is not a pool in the directory", pool)


def check_site_auth(config: Config) -> None:
    """--check-config with auth.site_auth_socket: the site's Dovecot answers the handshake
    and offers PLAIN. A warning only: the site's Dovecot may start after keyrelay (until it
    answers, the site's logins get 454 4.7.0)."""
    target = config.auth.site_auth_socket
    if not target:
        return
    if not config.policyd.auth_listen:
        log.warning("auth.site_auth_socket is set but policyd.auth_listen is empty: no login "
                    "reaches keyrelay, so none is passed on")
        return

    async def handshake() -> None:
        await SiteAuth(target, timeout=5.0).check()

    try:
        asyncio.run(handshake())
    except SiteAuthUnavailable as exc:
        log.warning("auth.site_auth_socket: %s; the site's logins get 454 4.7.0 until it "
                    "answers (docs/coexistence.md)", exc)
    else:
        print(f"keyrelay-policyd: the site's auth service at {target} answers and offers "
              "PLAIN")


class Daemon:
    def __init__(self, config_path: str, config: Config, counters: CounterStore,
                 inherited: dict[str, socket.socket] | None = None,
                 reload_at_start: Callable[[], bool] | None = None,
                 endpoint: Endpoint | None = None) -> None:
        self.config_path = config_path
        self.endpoint = endpoint  # policyd.metrics_listen, bound already; None: off
        # a worker: whether a SIGHUP came before it could handle one (keyrelay/supervisor.py)
        self.reload_at_start = reload_at_start
        # a worker's listening sockets, bound by the supervisor (by listener name); None:
        # this process binds them itself (policyd.workers 1)
        self.inherited = inherited
        # Decision lines are buffered and flushed once per event-loop iteration. Policy
        # requests may carry undecodable bytes (kept as surrogates): escape them as stderr
        # does, never fail on them.
        if inherited is None:
            self.log_stream: TextIO = os.fdopen(os.dup(sys.stderr.fileno()), "w",
                                                buffering=1 << 16, errors="backslashreplace")
        else:  # workers share stderr: whole lines per write, never torn by another's
            self.log_stream = io.TextIOWrapper(
                io.BufferedWriter(LineWriter(os.dup(sys.stderr.fileno())), 1 << 16),
                errors="backslashreplace")
        # the counter store: opened once, kept across SIGHUPs, closed at stop
        self.context = ServiceContext(config, open_directory(config), self.decision_log(config),
                                      counters=counters)
        self.auth = AuthService(self.context)
        self.policy = PolicyService(self.context)
        self.socketmap = SocketmapService(self.context)
        self.listeners = server.listeners(config.policyd, self.auth, self.policy, self.socketmap)
        self.control = control.listener(config.policyd, control.ControlService(self.auth))
        if self.control is not None:  # bound first: once the services answer, it is there
            self.listeners.insert(0, self.control)
        self.stopping = asyncio.Event()
        self.stop_by: float | None = None  # set at SIGTERM: when a flush must give up

    def decision_log(self, config: Config) -> DecisionLog:
        loop = asyncio.get_running_loop()
        return DecisionLog(config.logging, self.log_stream, loop.call_soon)

    async def run(self) -> None:
        cfg = self.context.config.policyd
        owner = daemon.socket_owner(cfg.user, cfg.socket_group)
        for listener in self.listeners:
            if self.inherited is not None:
                await adopt(listener, self.inherited[listener.name])
            elif listener is self.control:
                await self.start_control(listener)
            else:
                await listener.start(owner, int(cfg.socket_mode, 8))
        daemon.drop_privileges(cfg.user, log, "policyd.user")
        metrics_tasks = self.start_metrics()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        if self.reload_at_start is not None and self.reload_at_start():
            self.reload()
        tasks = [asyncio.create_task(self.every(1.0, self.sweep)),
                 asyncio.create_task(self.flush_loop()),
                 asyncio.create_task(self.policy.keep_pauses()), *metrics_tasks]
        log.info("keyrelay-policyd %s ready (pid %d)", __version__, os.getpid())
        await self.stopping.wait()
        await self.shutdown()
        # the last flush, and one already running in its thread, may not hold up the stop
        # for longer than shutdown_grace: an LDAP directory writes key by key
        self.stop_by = time.monotonic() + self.context.config.policyd.shutdown_grace
        for task in tasks:
            task.cancel()
        await self.flush()
        await self.auth.close()
        try:
            await self.context.store.close()
        except Exception as exc:  # noqa: BLE001 - stopping anyway
            log.warning("closing the counter store: %s", exc)

    def start_metrics(self) -> list[asyncio.Task[None]]:
        """With policyd.metrics_listen: this process's recorder in every service, the
        directory probe, the lock-out gauge, and (one process) the endpoint itself."""
        endpoint = self.endpoint
        if endpoint is None:
            return []
        recorder = endpoint.recorder()
        self.auth.metrics = self.policy.metrics = self.socketmap.metrics = recorder
        self.context.directory.on_reload = recorder.reload
        probe = Probe(recorder, lambda: self.context.directory, endpoint.folder)
        if self.inherited is None:
            endpoint.serve_here(probe)
        return [asyncio.create_task(self.probe_loop(probe)),
                asyncio.create_task(self.count_lockouts(recorder))]

    async def probe_loop(self, probe: Probe) -> None:
        """The directory probe every second, in a thread: a copy not loaded yet (LDAP away
        since the start) is loaded by ``snapshot()``, which waits for LDAP."""
        while True:
            await asyncio.to_thread(probe.run)
            await asyncio.sleep(INTERVAL)

    async def count_lockouts(self, metrics: Metrics) -> None:
        """keyrelay_lockouts_active, from the counter store every 5 seconds."""
        while True:
            store = self.context.store
            # Redis itself, not through the fallback: a failed read for a gauge must not
            # put the worker's limits into their Redis-away back-off
            shared = getattr(store, "shared", store)
            try:
                locked = await shared.locked()
            except Exception as exc:  # noqa: BLE001 - Redis away: the gauge keeps its value
                log.debug("metrics: lock-outs not counted: %s", exc)
            else:
                metrics.lockouts_active(collections.Counter(lock.kind for lock in locked))
            await asyncio.sleep(5.0)

    async def start_control(self, listener: server.Listener) -> None:
        try:
            await control.start(listener, self.context.config.policyd)
        except OSError as exc:
            hint = ""
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT):
                hint = (" (under systemd, RuntimeDirectory=keyrelay in the unit makes "
                        "/run/keyrelay; control_listen: '' serves no control socket)")
            raise OSError(f"policyd.control_listen: cannot serve {listener.endpoint}: "
                          f"{exc.strerror or exc}{hint}") from None

    async def every(self, seconds: float, job: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(seconds)
            job()

    def sweep(self) -> None:
        now = asyncio.get_running_loop().time()
        for listener in self.listeners:
            listener.sweep(now)

    async def flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.context.config.keys.last_used_flush_interval)
            await self.flush()

    def time_is_up(self) -> bool:
        """Read by a flush's worker thread: the daemon is stopping and its grace is over."""
        return self.stop_by is not None and time.monotonic() > self.stop_by

    async def flush(self) -> None:
        pending = self.context.take_key_use()
        if not pending:
            return
        written = await asyncio.to_thread(self.context.write_key_use, pending, self.time_is_up)
        if written:
            log.info("recorded last-used times of %d keys", len(pending))
        else:
            self.context.keep_key_use(pending)

    def reload(self) -> None:
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            log.error("SIGHUP: configuration not reloaded, keeping the running one: %s", exc)
            return
        old = self.context.config
        for name in ("auth_listen", "policy_listen", "socketmap_listen", "control_listen",
                     "control_group", "user"):
            if getattr(old.policyd, name) != getattr(config.policyd, name):
                log.warning("SIGHUP: policyd.%s changed; it takes effect after a restart", name)
        if config.counters != old.counters:
            # the counts so far live in the open store (this process's memory, or the Redis
            # it is connected to): a SIGHUP keeps it, and the settings it was opened with
            log.warning("SIGHUP: counters changed; it takes effect after a restart (the "
                        "running daemon keeps counting with the old counters settings)")
            config = dataclasses.replace(config, counters=old.counters)
        logs.configure(config.logging)
        directory = (self.context.directory if config.directory == old.directory
                     else open_directory(config))
        directory.on_reload = self.context.directory.on_reload
        new = ServiceContext(config, directory, self.decision_log(config),
                             counters=self.context.store)
        new.used_keys = self.context.used_keys
        self.context = new
        self.auth.context = self.policy.context = self.socketmap.context = new
        bf, was = config.policyd.bruteforce, old.policyd.bruteforce
        if bf != was:
            # failures, lock-outs and recent logins live in the counter store (with Redis:
            # every node's, not one node's reload to wipe): kept; the new thresholds count
            # from the next failure on (docs/policyd.md, "Brute-force protection")
            log.info("SIGHUP: policyd.bruteforce changed; the new thresholds apply to the "
                     "next failure counted, failures and lock-outs so far are kept")
            if bf.max_tracked != was.max_tracked:
                log.warning("SIGHUP: policyd.bruteforce.max_tracked changed; it takes effect "
                            "after a restart")
        for listener in self.listeners:
            listener.limits = config.policyd
        log.info("SIGHUP: configuration reloaded from %s (pid %d)", self.config_path, os.getpid())

    async def shutdown(self) -> None:
        """Stop accepting; close idle connections; give busy ones up to shutdown_grace."""
        log.info("stopping: no new connections; finishing requests in progress")
        for listener in self.listeners:
            if self.inherited is None:
                listener.stop_accepting()
            elif listener.server is not None:  # the supervisor removes the unix sockets
                listener.server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.context.config.policyd.shutdown_grace
        while True:
            busy = 0
            for listener in self.listeners:
                for conn in list(listener.connections):
                    if conn.pending():
                        busy += 1
                    else:
                        conn.close_quietly()
            if not busy or loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        for listener in self.listeners:
            for conn in list(listener.connections):
                conn.close_quietly()
        await asyncio.sleep(0)  # let the transports close


async def serve(path: str, config: Config, counters: CounterStore,
                inherited: dict[str, socket.socket] | None = None,
                reload_at_start: Callable[[], bool] | None = None,
                endpoint: Endpoint | None = None) -> None:
    daemon = Daemon(path, config, counters, inherited, reload_at_start, endpoint)
    await daemon.run()
    daemon.context.decisions.flush()


async def adopt(listener: server.Listener, sock: socket.socket) -> None:
    """Serve ``listener`` on a socket the supervisor bound (a worker of policyd.workers)."""
    loop = asyncio.get_running_loop()
    if listener.endpoint.kind == "unix":
        listener.server = await loop.create_unix_server(lambda: listener.factory(listener),
                                                        sock=sock)
    else:
        listener.server = await loop.create_server(lambda: listener.factory(listener),
                                                   sock=sock)


class LineWriter(io.RawIOBase):
    """Writes to ``fd`` in pieces of whole lines of at most PIPE_BUF bytes: the kernel writes
    each at once (a pipe; journald's stream socket), so the decision lines of workers sharing
    stderr never tear each other's. A longer line goes alone."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        start = 0
        while start < len(view):
            end = min(start + select.PIPE_BUF, len(view))
            if end < len(view):
                cut = bytes(view[start:end]).rfind(b"\n")
                end = start + cut + 1 if cut >= 0 else end
            written = start
            while written < end:
                written += os.write(self.fd, view[written:end])
            start = end
        return len(view)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


def worker_count(config: Config) -> int:
    """How many workers policyd.workers gives. Never more than one where that would multiply
    limits without the admin asking: with the memory backend always one (a number above 1
    is a config error), with Redis and on_unavailable local one for ``auto``."""
    setting, counters = config.policyd.workers, config.counters
    if counters.backend == "memory":
        if setting == 0 and supervisor.cpus() > 1:
            log.info("policyd.workers: auto gives 1 worker: counters.backend is memory, whose "
                     "counts live in one process; use counters.backend redis to run one per "
                     "CPU (docs/policyd.md, \"Worker processes\")")
        return 1
    if counters.on_unavailable == "local":
        if setting == 0:
            if supervisor.cpus() > 1:
                log.info("policyd.workers: auto gives 1 worker: with counters.on_unavailable "
                         "local each process counts alone while Redis is away; set a number "
                         "to run several anyway (docs/policyd.md, \"Worker processes\")")
            return 1
        if setting > 1:
            log.warning("policyd.workers %d with counters.on_unavailable local: while Redis is "
                        "away each worker counts alone, so this node allows up to %d times "
                        "a limit or quota meanwhile", setting, setting)
    return supervisor.worker_count(setting)


def bind_all(config: Config) -> dict[str, socket.socket]:
    """Bind every listening socket once, as the single process would (owner, mode, the
    control socket's folder and umask); the workers inherit them."""
    cfg = config.policyd
    owner = daemon.socket_owner(cfg.user, cfg.socket_group)
    endpoints = {"control": cfg.control_listen, "auth": cfg.auth_listen,
                 "policy": cfg.policy_listen, "socketmap": cfg.socketmap_listen}
    bound: dict[str, socket.socket] = {}
    for name, text in endpoints.items():
        if not text:
            continue
        endpoint = server.Endpoint.parse(text)
        if endpoint.kind == "inet":
            bound[name] = socket.create_server((endpoint.host, endpoint.port), backlog=1024,
                                               family=socket.AF_INET6 if ":" in endpoint.host
                                               else socket.AF_INET)
        elif name == "control":
            control_owner, mode = control.owner_and_mode(cfg)
            folder = os.path.dirname(endpoint.path)
            if os.path.lexists(folder) and not os.path.isdir(folder):
                raise OSError(f"{folder} is not a folder")
            os.makedirs(folder, mode=0o755, exist_ok=True)
            old = os.umask(0o177)
            try:
                bound[name] = bind_unix(endpoint.path, control_owner, mode)
            finally:
                os.umask(old)
        else:
            bound[name] = bind_unix(endpoint.path, owner, int(cfg.socket_mode, 8))
        log.info("%s service listening on %s", name, endpoint)
    return bound


def bind_unix(path: str, owner: tuple[int, int] | None, mode: int) -> socket.socket:
    daemon.remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    if owner is not None:
        os.chown(path, *owner)
    os.chmod(path, mode)
    sock.listen(1024)
    return sock


def serve_workers(path: str, config: Config, counters: CounterStore, count: int,
                  endpoint: Endpoint | None) -> None:
    """Bind once, drop root, and supervise ``count`` workers serving on those sockets
    (and the metrics endpoint, when on, in the supervisor: the sum of the workers)."""
    bound = bind_all(config)
    daemon.drop_privileges(config.policyd.user, log, "policyd.user")

    def work(slot: int) -> int:
        run(serve(path, config, counters, bound, lambda: workers.reloads() > 0, endpoint))
        log.info("keyrelay-policyd worker %d stopped (pid %d)", slot, os.getpid())
        return 0

    grace = config.policyd.shutdown_grace
    # a worker finishes requests within the grace, then writes last-used times within it
    workers = supervisor.Supervisor("keyrelay-policyd", count, work, 2 * grace + 5, log)
    if endpoint is not None:
        endpoint.supervise(workers)
    workers.run()
    for name, sock in bound.items():
        if sock.family == socket.AF_UNIX:
            try:
                os.unlink(sock.getsockname())
            except OSError as exc:  # after dropping root: Postfix's private/ is not ours
                log.info("%s: leaving socket %s in place: %s", name, sock.getsockname(),
                         exc.strerror or exc)


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when it is installed (about twice asyncio's speed for small requests)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    # what uvloop.run does; that one is only in uvloop 0.18+, Debian 12 has 0.17
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def _raise_fd_limit() -> None:
    # Every smtpd process holds one connection per service: allow many.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> None:
    echo_undecodable_arguments()
    args = parse_args(argv)
    path = resolve_config_path(args.config)
    try:
        config = load_config(path)
    except ConfigError as exc:
        fail(str(exc))
    logs.configure(config.logging)
    daemon.preload()  # before any socket is bound: dropping root follows it at once
    if not args.check_config:
        daemon.empty_bounding_set(config.policyd.user, log)  # before any thread starts
    check(config)
    if args.check_config:
        try:  # here only: Redis away must not stop a daemon from starting (it answers 4xx)
            check_counters(config)
        except CountersUnavailable as exc:
            fail(str(exc))
        check_site_auth(config)
        print(textwrap.dedent(f"""\
            keyrelay-policyd: configuration {path} is valid
            keyrelay-policyd: directory {config.directory.location} is valid"""))
        return
    _raise_fd_limit()
    try:
        # no connection yet (Redis away must not stop a start: requests answer 451 4.3.0
        # until it is back); only an unreadable password file stops it here
        counters = open_counters(config, max_tracked=config.policyd.bruteforce.max_tracked)
    except CountersUnavailable as exc:
        fail(str(exc))
    count = worker_count(config)
    endpoint: Endpoint | None = None
    try:
        if config.policyd.metrics_listen:  # bound as root, with the sockets
            endpoint = Endpoint("policyd", config.policyd.metrics_listen,
                                config.metrics.top_accounts, count, config.policyd.user)
        if count > 1:
            serve_workers(path, config, counters, count, endpoint)
        else:
            run(serve(path, config, counters, endpoint=endpoint))
    except OSError as exc:
        fail(f"cannot start: {exc}")
    except KeyError as exc:
        fail(f"policyd.user / policyd.socket_group: no such user or group: {exc}")
    finally:
        if endpoint is not None:
            endpoint.close()
    log.info("keyrelay-policyd stopped")
