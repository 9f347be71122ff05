"""``keyrelay-milter``: the header From/Sender check and DKIM signing, in one milter process."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import logging
import os
import pwd
import re
import signal
import socket
import stat
import sys
import textwrap
import threading
import time
from typing import NoReturn, TextIO

import Milter

from keyrelay import __version__, daemon, logs, supervisor
from keyrelay.config import Config, load_config, resolve_config_path
from keyrelay.directory import Directory, open_directory
from keyrelay.errors import ConfigError, DirectoryUnavailable
from keyrelay.logs import DecisionLog
from keyrelay.metrics import NO_METRICS
from keyrelay.metrics.endpoint import Endpoint
from keyrelay.usage import ArgumentParser, echo_undecodable_arguments

from .dkimsign import KeyStore, KeyUnavailable
from .milter import KeyrelayMilter
from .service import MilterService

log = logging.getLogger("keyrelay.milter")

PROG = "keyrelay-milter"
DESCRIPTION = """\
Check and sign mail for Postfix (smtpd_milters): for every message from an SMTP AUTH session,
the header From: (and Sender:) must be an address of the logged-in principal's verified
domains or senders, else it is refused with 550 5.7.1; mail from a verified domain is then
DKIM-signed with the domain's active selectors (rsa-sha256 and ed25519-sha256,
relaxed/relaxed). Mail without SMTP AUTH passes untouched."""

EPILOG = """\
Postfix (main.cf, or -o on the submission services in master.cf):
  smtpd_milters = unix:private/keyrelay-milter   (milter.listen; keyrelay-milter last)
  milter_default_action = tempfail               (our faults are temporary: 451)
  milter_protocol = 6

answers:
  550 5.7.1 (or 554 5.7.1)  From:/Sender: not the principal's, no From:, several From: ...
  451 4.3.0                 directory or DKIM key unavailable, internal error: retry later

signals:
  (with milter.workers above 1 they go to the supervisor, which passes them on)
  SIGTERM, SIGINT  stop accepting connections at once, let messages in progress
                   finish (milter.shutdown_grace), exit
  SIGHUP           workers above 1: reload the configuration, replacing every worker;
                   workers 1: the same as SIGTERM

files:
  /etc/keyrelay/keyrelay.yaml   configuration (--config, or $KEYRELAY_CONFIG); section milter
  /etc/keyrelay/directory.yaml  the directory; changes apply without restart
  /etc/keyrelay/dkim/           private DKIM keys, read as milter.user; reloaded on rotation

exit status:
  0 stopped by a signal, or --check-config found no problem
  1 configuration or directory error, or the socket could not be bound
  2 usage error"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    parser.add_argument("--config", metavar="PATH",
                        help="configuration file (default: $KEYRELAY_CONFIG or "
                        "/etc/keyrelay/keyrelay.yaml)")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the configuration, the directory and the DKIM keys, "
                        "then exit")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser.parse_args(argv)


def fail(message: str) -> NoReturn:
    daemon.fail(PROG, message)


_POSTFIX_INET = re.compile(
    r"inet:(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+)):(?P<port>\d+)"
)


def libmilter_endpoint(listen: str) -> str:
    """libmilter's socket syntax for ``milter.listen`` (Postfix's inet:host:port converted)."""
    match = _POSTFIX_INET.fullmatch(listen)
    if match is None:
        return listen  # unix:/path, or already inet:port@host / inet6:port@host
    if match["v6"]:
        return f"inet6:{match['port']}@[{match['v6']}]"
    return f"inet:{match['port']}@{match['host']}"


def socket_path(listen: str) -> str | None:
    return listen[len("unix:"):] if listen.startswith("unix:") else None


def check(config: Config) -> Directory:
    """What can be checked before binding: the directory, the names, the keys (warnings)."""
    cfg = config.milter
    try:
        snapshot = daemon.preflight(config, "milter", cfg.user, cfg.socket_group, log)
    except daemon.StartupError as exc:
        fail(str(exc))
    return snapshot


def load_keys(snapshot: Directory, keys: KeyStore, reader: str = "") -> tuple[int, list[str]]:
    """Load every signing key of the directory: (keys loaded, problems).

    With ``reader`` (``milter.user``, checked as root) a key file that user cannot read is a
    problem too: root reads it now, the daemon would not.
    """
    uid = pwd.getpwnam(reader).pw_uid if reader else None
    loaded, problems = 0, []
    for domain in snapshot.domains.values():
        for selector in domain.signing_selectors():
            try:
                keys.key(selector)
            except KeyUnavailable as exc:
                problems.append(f"domain {domain.name}: {exc}")
                continue
            st = os.stat(selector.key_file)
            if uid is not None and st.st_uid != uid and not st.st_mode & stat.S_IROTH:
                problems.append(
                    f"domain {domain.name}: {selector.key_file}: owned by uid {st.st_uid}, "
                    f"unreadable for milter.user {reader}; chown {reader} it (and its folders)"
                )
                continue
            loaded += 1
    return loaded, problems


def serve(config: Config, config_path: str) -> bool:
    """Serve until stopped; True when libmilter ran in this process (one process), which
    must then end with ``exit_now``; False for a supervisor (its workers ran libmilter)."""
    count = supervisor.worker_count(config.milter.workers)
    # milter.metrics_listen: bound as root, with the milter's socket
    endpoint = (Endpoint("milter", config.milter.metrics_listen, config.metrics.top_accounts,
                         count, config.milter.user) if config.milter.metrics_listen else None)
    if endpoint is not None:
        _OTHER_LISTENERS.add(endpoint.server.server.fileno())
    try:
        if count > 1:
            serve_workers(config, config_path, count, endpoint)
            return False
        block_stop_signals()  # before the metrics threads start: they inherit it
        service, stream = open_service(config, endpoint)
        bind(config, shared=False)
        daemon.drop_privileges(config.milter.user, log, "milter.user")
        start_metrics(endpoint, service, here=True)
        run_milter(config, service, stream)
        return True
    finally:
        if endpoint is not None:
            endpoint.close()


def open_service(config: Config, endpoint: Endpoint | None = None
                 ) -> tuple[MilterService, TextIO]:
    stream = os.fdopen(os.dup(sys.stderr.fileno()), "w", errors="backslashreplace")
    service = MilterService(config, open_directory(config), DecisionLog(config.logging, stream),
                            metrics=endpoint.recorder() if endpoint else NO_METRICS)
    # pymilter creates one object per connection with an argument-less factory
    Milter.factory = functools.partial(KeyrelayMilter, service)
    return service, stream


def start_metrics(endpoint: Endpoint | None, service: MilterService, here: bool) -> None:
    """With milter.metrics_listen: the directory probe of this process, and (``here``: one
    process) the endpoint; a worker's values are served by its supervisor."""
    if endpoint is None:
        return
    service.directory.on_reload = service.metrics.reload
    probe = endpoint.probe_thread(service.metrics, lambda: service.directory)
    if here:
        endpoint.serve_here(probe)


def bind(config: Config, shared: bool) -> str | None:
    """Register with libmilter and bind milter.listen (as root if started so); the unix
    socket's path, if it is one.

    ``shared``: workers forked afterwards accept on this socket (libmilter keeps the bound
    socket and does not bind again). Then the socket is non-blocking, so that a worker that
    lost the race for a connection gets EAGAIN (libmilter waits again) instead of blocking in
    accept(); and a unix socket is bound by its name relative to its folder: a worker whose
    libmilter stops itself (a stop signal that reached libmilter's own thread, see
    ``run_milter``) runs libmilter's clean-up, which unlinks the socket's path when not root,
    and must not take the socket from the workers still serving. Workers run
    in /, where that relative name is nothing; the supervisor removes the socket at the end.
    """
    cfg = config.milter
    _register()
    endpoint = libmilter_endpoint(cfg.listen)
    path = socket_path(endpoint)
    if path is not None:
        # libmilter's own removal would take the socket from under a running milter
        daemon.remove_stale_socket(path)
    if shared and path is not None:
        os.chdir(os.path.dirname(path))
        try:
            Milter.setconn("unix:" + os.path.basename(path))
            Milter.opensocket(False)
        finally:
            os.chdir("/")
    else:
        Milter.setconn(endpoint)
        Milter.opensocket(False)  # bind now, as root if started so; raises Milter.error
    if shared:
        _listening_socket_nonblocking()
    if path is not None:
        os.chmod(path, int(cfg.socket_mode, 8))
        if os.geteuid() == 0:
            owner = daemon.socket_owner(cfg.user, cfg.socket_group)
            assert owner is not None
            os.chown(path, *owner)
    return path


# listening sockets of this process that are not libmilter's (the metrics endpoint's)
_OTHER_LISTENERS: set[int] = set()


def _listening_fds() -> list[int]:
    """libmilter's listening socket: the descriptors of this process that listen (it does
    not say which descriptor is its own), but those in ``_OTHER_LISTENERS``."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in _OTHER_LISTENERS:
            continue
        with contextlib.suppress(OSError):
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            probe = socket.socket(fileno=os.dup(fd))
            try:
                if probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    found.append(fd)
            finally:
                probe.close()
    return found


def _listening_socket_nonblocking() -> None:
    """Make libmilter's listening socket non-blocking, for every process that shares it."""
    for fd in _listening_fds():
        os.set_blocking(fd, False)


def serve_workers(config: Config, config_path: str, count: int,
                  endpoint: Endpoint | None = None) -> None:
    """Bind once, drop root, and supervise ``count`` workers accepting on the socket. A
    SIGHUP reloads the configuration and replaces every worker by one that runs it (a
    worker's libmilter cannot reload in place), the old ones finishing their messages."""
    path = bind(config, shared=True)
    daemon.drop_privileges(config.milter.user, log, "milter.user")
    current = [config]

    def work(slot: int) -> int:
        block_stop_signals()
        logs.configure(current[0].logging)
        service, stream = open_service(current[0], endpoint)
        start_metrics(endpoint, service, here=False)
        run_milter(current[0], service, stream)
        log.info("%s worker %d stopped (pid %d)", PROG, slot, os.getpid())
        return 0

    def reload(workers: supervisor.Supervisor) -> None:
        try:
            new = load_config(config_path)
        except ConfigError as exc:
            log.error("SIGHUP: configuration not reloaded, keeping the running one: %s", exc)
            return
        fixed = {name: getattr(config.milter, name)
                 for name in ("listen", "socket_mode", "socket_group", "user", "workers")}
        for name, value in fixed.items():
            if getattr(new.milter, name) != value:
                log.warning("SIGHUP: milter.%s changed; it takes effect after a restart", name)
        current[0] = dataclasses.replace(new, milter=dataclasses.replace(new.milter, **fixed))
        logs.configure(current[0].logging)
        log.info("SIGHUP: configuration reloaded from %s; replacing %d workers",
                 config_path, len(workers.workers))
        workers.replace_all()

    # a worker stops accepting at once (run_milter), then finishes within the grace
    workers = supervisor.Supervisor(PROG, count, work, config.milter.shutdown_grace + 10, log,
                                    on_hup=reload)
    if endpoint is not None:
        endpoint.supervise(workers)
    workers.run()
    if path is not None:
        try:
            os.unlink(path)
        except OSError as exc:  # after dropping root: Postfix's private/ is not ours
            log.info("leaving socket %s in place: %s", path, exc.strerror or exc)


# SIGTERM, SIGINT and SIGHUP stop one milter process (a worker's SIGHUP comes from nobody: the
# supervisor replaces workers with SIGTERM). _LISTENER_ENDED wakes the main thread when
# libmilter's listener ends by itself.
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
_LISTENER_ENDED = signal.SIGUSR1


def run_milter(config: Config, service: MilterService, stream: TextIO) -> None:
    """Serve (libmilter's loop) until a stop signal, then let messages in progress finish.

    libmilter's own stop is not used: its signal thread sets a stop flag and then closes the
    listening socket, so that a listener thread that read the flag just before finds the
    socket closed under it and ends smfi_main() with MI_FAILURE (pymilter raises
    ``Milter.error``: exit status 1 after a plain SIGTERM under load); its pool of session
    threads then quits with messages half served; and once ``Milter.main()`` returns,
    pymilter has forgotten its interpreter, so a session accepted just before that crashes
    the process (SIGSEGV) at its first callback. Instead the stop signals are this thread's:
    libmilter serves in a thread of its own while this one waits for them (the kernel gives a
    signal sent to the process to its main thread when that thread waits for it), then swaps
    libmilter's listening socket for one nobody connects to, so that its listener accepts
    nothing more while its sessions go on, and waits for the messages in progress.
    ``Milter.main()`` never returns then; the process ends without unwinding libmilter
    (``exit_now``).
    """
    cfg = config.milter
    block_stop_signals()
    try:
        loaded, problems = load_keys(service.directory.snapshot(), service.keys)
    except DirectoryUnavailable as exc:
        log.warning("directory unavailable at start: %s", exc)
    else:
        for problem in problems:
            log.warning("DKIM key will not sign (mail of its domain is deferred): %s", problem)
        log.info("%d DKIM keys loaded", loaded)
    log.info("%s %s ready on %s (pid %d)", PROG, __version__, cfg.listen, os.getpid())
    try:
        stopped_by = _serve_until_stopped()
    except Milter.error as exc:  # no stop was asked for: systemd (or the supervisor) restarts
        log.error("libmilter stopped serving on %s by itself: %s (its reason goes to syslog)",
                  cfg.listen, exc)
        stream.flush()
        exit_now(1)
    log.info("stopping (%s): no new connections; finishing messages in progress",
             stopped_by)
    deadline = time.monotonic() + cfg.shutdown_grace
    while service.in_progress > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if service.in_progress > 0:
        log.warning("%d messages still in progress at exit; Postfix defers them",
                    service.in_progress)
    stream.flush()


def block_stop_signals() -> None:
    """Block the stop signals in this thread before it starts any other (the metrics
    threads, libmilter's): every thread inherits the mask, so that only sigwait takes them,
    and none dies of a SIGTERM it would otherwise get with its default action. Never
    unblocked: a second SIGTERM during the grace changes nothing."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS | {_LISTENER_ENDED})


def _serve_until_stopped() -> str:
    """libmilter's loop in a thread until a stop signal comes to this one; what stopped it.
    Raises ``Milter.error`` when the listener failed by itself."""
    failures: list[Milter.error] = []
    ended = threading.Event()
    waiting = threading.Event()
    waiter = threading.get_ident()

    def listen() -> None:
        # libmilter's signal thread, started by Milter.main(), would take a stop signal
        # already pending: this thread first lets the waiter get to sigwait (it holds the GIL
        # from waiting.set() until sigwait releases it)
        waiting.wait()
        try:
            Milter.main()
        except Milter.error as exc:
            failures.append(exc)
        finally:
            ended.set()
            signal.pthread_kill(waiter, _LISTENER_ENDED)

    listener = threading.Thread(target=listen, name="libmilter", daemon=True)
    listener.start()
    while True:
        waiting.set()
        signo = signal.sigwait(_STOP_SIGNALS | {_LISTENER_ENDED})
        if signo in _STOP_SIGNALS:
            _stop_accepting()
            return signal.Signals(signo).name
        if ended.is_set():  # a stray SIGUSR1 from outside changes nothing
            break
    listener.join()
    if failures:  # the listener failed by itself (or after a stop signal that went to
        raise failures[0]  # libmilter's own thread, which only a burst of signals does)
    return "libmilter's own signal thread"


def _stop_accepting() -> None:
    """Put a listening socket that nobody can reach (an unnamed unix socket, non-blocking: an
    accept() on it says EAGAIN, which libmilter takes as "nothing yet") in the place of
    libmilter's listening socket. This process then accepts nothing more; its sessions go
    on. The socket itself stays open where workers share it (the other workers accept on
    it); a single process's closes once libmilter's poll on it returns (at most 5 s), and a
    connection still waiting in its backlog is refused then: Postfix answers 451."""
    for fd in _listening_fds():
        dummy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dummy.bind("")  # Linux: a name of its own in the abstract namespace
        dummy.listen(1)
        dummy.setblocking(False)
        os.dup2(dummy.fileno(), fd, inheritable=False)
        dummy.close()


def exit_now(status: int) -> NoReturn:
    """End the process without unwinding libmilter: its threads (the listener, its pool of
    session threads, its signal thread) still run, and neither Python's finalization nor
    libmilter's exit handler (which destroys a lock its signal thread waits on) may run under
    them. The logs are flushed first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def _register() -> None:
    """pymilter's ``runmilter()`` up to the socket, so privileges drop between bind and serve."""
    Milter.set_connect_callback(Milter.connect_callback)
    Milter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
    Milter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
    Milter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
    Milter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
    Milter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
    Milter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    Milter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    Milter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    Milter.set_close_callback(Milter.close_callback)
    Milter.set_exception_policy(Milter.TEMPFAIL)  # an uncaught exception: 451, never accept
    Milter.register(
        "keyrelay",
        data=lambda ctx: ctx.getpriv().data(),
        unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
        negotiate=Milter.negotiate_callback,
    )


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
        daemon.empty_bounding_set(config.milter.user, log)  # before any thread starts
    snapshot = check(config)
    if args.check_config:
        reader = (config.milter.user if os.geteuid() == 0
                  and config.milter.user not in daemon.ROOT_USERS else "")
        loaded, problems = load_keys(snapshot, KeyStore(), reader)
        for problem in problems:
            print(f"{PROG}: warning: {problem}", file=sys.stderr)
        print(textwrap.dedent(f"""\
            {PROG}: configuration {path} is valid
            {PROG}: directory {config.directory.location} is valid
            {PROG}: {loaded} DKIM keys load, {len(problems)} do not"""))
        return
    try:
        ran = serve(config, path)
    except (OSError, Milter.error) as exc:
        # libmilter says why only to syslog: in use, no permission, no such folder or host
        fail(f"cannot start on {config.milter.listen}: {exc} (address in use, or the socket's "
             "folder missing or not writable?)")
    except KeyError as exc:
        fail(f"milter.user / milter.socket_group: no such user or group: {exc}")
    log.info("%s stopped", PROG)
    if ran:  # libmilter's threads still run in this process: no unwinding (exit_now)
        exit_now(0)
