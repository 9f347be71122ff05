"""``keyrelay-events``: Postfix's log turned into delivery events, kept in the state file
(the webhook outbox) and sent to the accounts' webhooks, one daemon per relay node
(docs/events.md, "The daemon").

One thread follows the maillog (keyrelay/events/follow.py: a batch of lines, its events, the
log position and the correlation state in one transaction); another sends the events to the
accounts' webhooks (keyrelay/events/outbox.py), suppresses hard bounces and runs the reputation
guard (keyrelay/reputation/guard.py: a principal whose bounce rate runs away is paused,
docs/reputation.md); with ``events.metrics_listen``, a third serves ``/metrics`` and
``/health``, read from the state file at each scrape (keyrelay/events/metrics.py,
docs/metrics.md); the main thread waits for signals and, every
``HOUSEKEEPING`` seconds, removes events older than ``events.keep`` that are finished with.
Every event is logged as one line (``event=... account=... queue_id=...``). SIGTERM and
SIGINT stop it after the batch in progress is committed: nothing is read twice or skipped
across a stop, a crash or a rotation.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import NoReturn

from .. import __version__, daemon, logs
from ..config import Config, load_config, resolve_config_path
from ..errors import ConfigError
from ..metrics.exposition import MetricsServer
from ..usage import ArgumentParser, echo_undecodable_arguments
from .correlate import Event
from .follow import Follower
from .journal import JOURNALCTL
from .maillog import Parser
from .metrics import EventsCollector, Health, logging_changes, registry
from .outbox import Sender
from .store import EventStore, StoreError

log = logging.getLogger("keyrelay.events")

HOUSEKEEPING = 600.0  # seconds between removals of old events
# the fields of an event's log line, in this order, when the event has them
_LOGGED = ("event", "account", "subuser", "key_id", "queue_id", "email", "status", "type",
           "stage", "message_id", "dkim_domain")

DESCRIPTION = """\
Follow Postfix's log and turn what became of each message sent with a keyrelay login into a
delivery event: processed, delivered, deferred, bounce (hard or soft) and dropped. The events
are kept in the state file (events.state), which is also the outbox the webhooks are sent
from; the log position is saved with them, so across a stop, a crash or a log rotation
nothing is emitted twice and nothing is skipped. Hard bounces are suppressed, and a sender
whose bounce rate passes reputation.max_bounce_rate is paused (the reputation guard). With
events.metrics_listen set it serves Prometheus metrics on /metrics (events by kind, webhook
results, reputation pauses, the outbox and the log's lag) and /health, over plain HTTP."""

EPILOG = """\
signals:
  SIGTERM, SIGINT  commit the batch being read, then exit
  SIGHUP           reread the configuration: logging applies at once, the events
                   and reputation sections after a restart

files:
  /etc/keyrelay/keyrelay.yaml   configuration (--config, or $KEYRELAY_CONFIG); section events
  /var/log/mail.log             Postfix's log (events.maillog; Debian: readable by group adm),
                                or the systemd journal with events.source: journal
  /var/lib/keyrelay/events.db   events, log position, correlation state (events.state)

endpoints (events.metrics_listen, off by default):
  /metrics  Prometheus text format; every metric is listed in docs/metrics.md
  /health   200 "ok" while the follower and webhook threads run, the state file opens
            and the maillog can be read (the journal: its folder exists, if one is set);
            otherwise 503 and one line saying what is wrong

exit status:
  0 stopped by SIGTERM/SIGINT, or --check-config found no problem
  1 configuration error, the state file cannot be used, or the
    events.metrics_listen address cannot be bound
  2 usage error"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="keyrelay-events", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--config", metavar="PATH",
                        help="configuration file (default: $KEYRELAY_CONFIG or "
                        "/etc/keyrelay/keyrelay.yaml)")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the configuration, open the state file, then exit")
    parser.add_argument("--once", action="store_true",
                        help="read what the log holds now, commit it, then exit")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser.parse_args(argv)


def fail(message: str) -> NoReturn:
    daemon.fail("keyrelay-events", message)


def open_store(config: Config) -> EventStore:
    """The state file, created if new; one line naming what is wrong otherwise."""
    state = Path(config.events.state)
    if not state.parent.is_dir():
        fail(f"events.state: the folder {state.parent} does not exist; create it for the "
             "user keyrelay-events runs as (the Debian package and the Ansible role make "
             "/var/lib/keyrelay)")
    try:
        return EventStore(state)
    except StoreError as exc:
        fail(f"events.state: {exc}")


def check_maillog(config: Config) -> None:
    """A missing or unreadable log is a warning: the follower waits for it. Reading the
    journal needs journalctl (systemd's package)."""
    if config.events.source == "journal":
        if not Path(JOURNALCTL).is_file():
            fail(f"events.source: journal: {JOURNALCTL} is not installed (Debian: systemd)")
        folder = config.events.journal_directory
        if folder and not Path(folder).is_dir():
            log.warning("events.journal_directory: %s does not exist yet; keyrelay-events "
                        "waits for it", folder)
        return
    path = Path(config.events.maillog)
    try:
        with path.open("rb"):
            pass
    except FileNotFoundError:
        log.warning("events.maillog: %s does not exist yet; keyrelay-events waits for it", path)
    except OSError as exc:
        log.warning("events.maillog: cannot read %s (%s); keyrelay-events waits until it can",
                    path, exc.strerror or exc)


def log_name(config: Config) -> str:
    """What keyrelay-events follows, for its log lines."""
    cfg = config.events
    if cfg.source == "file":
        return cfg.maillog
    return f"the journal in {cfg.journal_directory}" if cfg.journal_directory else "the journal"


def log_events(events: list[Event]) -> None:
    for event in events:
        fields = " ".join(f"{name}={event[name]}" for name in _LOGGED
                          if event.get(name) not in (None, ""))
        log.info("%s", fields)


def follower_for(config: Config, store: EventStore, once: bool = False) -> Follower:
    cfg = config.events
    names = frozenset(cfg.syslog_names) if cfg.syslog_names else None
    return Follower.open(cfg.maillog, store, Parser(syslog_names=names),
                         start_at_end=cfg.start_at_end, journal=cfg.source == "journal",
                         journal_directory=cfg.journal_directory, once=once,
                         batch_lines=cfg.batch_lines,
                         max_age=cfg.max_age, on_events=log_events)


def main(argv: list[str] | None = None) -> None:
    echo_undecodable_arguments()
    args = parse_args(argv)
    path = resolve_config_path(args.config)
    try:
        config = load_config(path)
    except ConfigError as exc:
        fail(str(exc))
    logs.configure(config.logging)
    store = open_store(config)
    check_maillog(config)
    if args.check_config:
        store.close()
        listen = config.events.metrics_listen
        print(f"keyrelay-events: configuration {path} is valid\n"
              f"keyrelay-events: state file {config.events.state} is usable\n"
              + (f"keyrelay-events: /metrics and /health on http://{listen}" if listen else
                 "keyrelay-events: no /metrics and /health endpoint (events.metrics_listen "
                 "is empty)"))
        return
    if args.once:
        try:
            follower = follower_for(config, store, once=True)
            try:
                follower.run_once()
            finally:
                follower.close()
        finally:
            store.close()
        return
    store.close()  # SQLite connections stay in their thread: the follower opens its own
    serve(path, config)


def serve(path: str, config: Config) -> None:
    endpoint: MetricsServer | None = None
    if config.events.metrics_listen:  # bound before anything starts: a port taken stops here
        try:
            endpoint = MetricsServer(config.events.metrics_listen)
        except OSError as exc:
            fail(f"cannot start: {exc}")
    try:
        run_threads(path, config, endpoint)
    finally:
        if endpoint is not None:
            endpoint.stop()


def run_threads(path: str, config: Config, endpoint: MetricsServer | None) -> None:
    """The follower and the webhook sender until SIGTERM/SIGINT (or a bug of ours); the
    endpoint served meanwhile."""
    stop = threading.Event()

    def stopping(signum: int, frame: FrameType | None) -> None:
        log.info("stopping (%s): committing the batch being read", signal.Signals(signum).name)
        stop.set()

    def reopen(signum: int, frame: FrameType | None) -> None:
        try:
            new = load_config(path)
        except ConfigError as exc:
            log.error("SIGHUP: configuration not reloaded, keeping the running one: %s", exc)
            return
        logs.configure(new.logging)
        for name in ("events", "reputation"):
            if getattr(new, name) != getattr(config, name):
                log.warning("SIGHUP: the %s section changed; it takes effect after a restart",
                            name)

    signal.signal(signal.SIGTERM, stopping)
    signal.signal(signal.SIGINT, stopping)
    signal.signal(signal.SIGHUP, reopen)
    failure: list[BaseException] = []
    following: list[Follower] = []  # the follower, once its thread made it (for /health)

    def follow() -> None:
        try:
            store = EventStore(config.events.state)
            try:
                follower = follower_for(config, store)
                following.append(follower)
                try:
                    follower.run(stop, poll=config.events.poll)
                finally:
                    follower.close()  # the journalctl process, with events.source journal
            finally:
                store.close()
        except BaseException as exc:  # a bug of ours: stop, and let systemd restart us
            log.exception("following %s failed", log_name(config))
            failure.append(exc)
            stop.set()

    def send() -> None:
        try:
            store = EventStore(config.events.state)
            try:
                Sender(config, store).run(stop)
            finally:
                store.close()
        except BaseException as exc:  # a bug of ours: stop, and let systemd restart us
            log.exception("sending webhooks failed")
            failure.append(exc)
            stop.set()

    thread = threading.Thread(target=follow, name="keyrelay-events-follow")
    sender = threading.Thread(target=send, name="keyrelay-events-webhooks")
    log.info("keyrelay-events %s following %s into %s", __version__, log_name(config),
             config.events.state)
    thread.start()
    sender.start()
    if endpoint is not None:
        health = Health(config, [("follower", thread), ("webhook sender", sender)],
                        lambda: getattr(following[0].source, "problem", "") if following
                        else "")
        endpoint.start(registry(EventsCollector(config)), logging_changes(health))
    next_sweep = 0.0
    while not stop.is_set():
        if time.monotonic() >= next_sweep:
            removed = store_purge(config)
            if removed:
                log.info("removed %d event(s) older than events.keep", removed)
            next_sweep = time.monotonic() + HOUSEKEEPING
        stop.wait(1.0)
    thread.join()
    sender.join()
    if failure:
        sys.exit(1)
    log.info("keyrelay-events stopped")


def store_purge(config: Config) -> int:
    """Events finished with (not pending) and older than ``events.keep``, removed through a
    connection of this thread's own (the follower thread writes through its own)."""
    try:
        other = EventStore(config.events.state)
    except StoreError as exc:
        log.error("events.state: %s", exc)
        return 0
    try:
        return other.purge(time.time() - config.events.keep)
    finally:
        other.close()


def run() -> None:
    """The console script: exit statuses as EPILOG says."""
    main(sys.argv[1:])
