"""keyrelay-events' ``/metrics`` and ``/health`` (``events.metrics_listen``; docs/metrics.md is
the contract: every name, label and value).

Nothing is counted in memory: each scrape reads the state file (store.py ``read_figures``)
through a short-lived read-only connection of the HTTP thread's own (SQLite connections stay
in their thread). The counters there are written in the same transaction as what they count
(the follower's batch, the outbox's settle, the reputation guard's pause event), so the figures
are the node's persistent totals: they never go back across a restart, and a crash loses a
count only together with what it counted.

- ``EventsCollector``: the prometheus_client collector of those figures, plus the maillog's
  lag (its size beyond the checkpoint; with ``events.source: journal`` there is no file, so
  no lag) and ``keyrelay_build_info``.
- ``Health``: ``/health``'s line: "" while the follower and sender threads run, the state
  file opens and the maillog can be read (with the journal: its folder, when one is set,
  exists); otherwise what is wrong.

Label values are closed sets (the tuples below): a counter name this version does not know is
not exported, so no label ever carries an account, an address or a URL.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .. import __version__
from ..config import Config
from .journal import JOURNAL
from .store import Checkpoint, Figures, StoreError, read_figures

log = logging.getLogger("keyrelay.events")

# keyrelay_events_total{event}: the state file's counter event_<kind> (follow.py, outbox.py)
EVENTS = ("processed", "delivered", "deferred", "bounce", "dropped", "paused", "would_pause")
# keyrelay_events_log_lines_total{result}: used is lines read minus ignored and malformed
LINE_RESULTS = ("used", "ignored", "malformed")
# keyrelay_events_state_dropped_total{cause}: correlation entries dropped without an event
STATE_CAUSES = ("forgotten", "evicted", "unattributed")
# keyrelay_events_log_gaps_total{cause}: counter name in the state file -> label value
GAP_CAUSES = {"lost_rotations": "rotation_lost", "partial_lost": "partial_line",
              "journal_unreadable": "journal_entry"}
# keyrelay_webhook_events_total{result}: the counter webhook_<result> (outbox.py)
WEBHOOK_RESULTS = ("delivered", "given_up", "no_webhook")
# keyrelay_reputation_pauses_total{mode}: counter name -> label value
PAUSE_MODES = {"reputation_paused": "pause", "reputation_would_pause": "monitor"}


def lag_bytes(maillog: Path, checkpoint: Checkpoint | None) -> float | None:
    """Bytes of the maillog not read yet: the file's size beyond the checkpoint when the
    checkpoint's file is the one at the path; when it is the rotated ``PATH.1`` (the follower
    finishes it first), what is left of it plus the whole new file. None: not known (no
    checkpoint yet, the file missing, or the checkpoint's file found at neither name)."""
    if checkpoint is None or checkpoint.source == JOURNAL:
        return None
    try:
        current = os.stat(maillog)
    except OSError:
        return None
    if (current.st_dev, current.st_ino) == (checkpoint.device, checkpoint.inode):
        return float(max(0, current.st_size - checkpoint.offset))
    try:
        rotated = os.stat(maillog.with_name(maillog.name + ".1"))
    except OSError:
        return None
    if (rotated.st_dev, rotated.st_ino) == (checkpoint.device, checkpoint.inode):
        return float(max(0, rotated.st_size - checkpoint.offset) + current.st_size)
    return None


class EventsCollector:
    """The figures of one scrape, read from ``config.events.state`` when it is scraped."""

    def __init__(self, config: Config) -> None:
        self.state = Path(config.events.state)
        self.maillog = Path(config.events.maillog)
        self.file = config.events.source == "file"  # the journal has no lag in bytes
        self._failed = False  # the last scrape could not read the state file (logged once)

    def figures(self) -> Figures | None:
        try:
            figures = read_figures(self.state)
        except StoreError as exc:
            if not self._failed:
                log.error("metrics: cannot read the state file: %s; the scrapes leave out its "
                          "figures until it can be read", exc)
                self._failed = True
            return None
        if self._failed:
            log.info("metrics: the state file can be read again")
            self._failed = False
        return figures

    def collect(self) -> Iterator[Metric]:
        build = GaugeMetricFamily("keyrelay_build_info", "keyrelay's version (always 1)",
                                  labels=("version", "python_version"))
        build.add_metric((__version__, platform.python_version()), 1.0)
        yield build
        figures = self.figures()
        if figures is None:
            return
        yield from families(figures)
        lag = lag_bytes(self.maillog, figures.checkpoint) if self.file else None
        if lag is not None:
            yield GaugeMetricFamily(
                "keyrelay_events_maillog_lag_bytes",
                "Bytes of the maillog keyrelay-events has not read yet", value=lag)

    def describe(self) -> Iterator[Metric]:
        return iter(())  # nothing to check at registration: the families vary per scrape


def families(figures: Figures) -> Iterator[Metric]:
    """Every family the state file's figures give (docs/metrics.md, "Metrics")."""
    counters = figures.counters

    def count(name: str) -> float:
        return float(counters.get(name, 0))

    events = CounterMetricFamily("keyrelay_events", "Delivery events written, by kind",
                                 labels=("event",))
    for kind in EVENTS:
        events.add_metric((kind,), count(f"event_{kind}"))
    yield events
    lines = CounterMetricFamily("keyrelay_events_log_lines", "Maillog lines read, by result",
                                labels=("result",))
    ignored, malformed = count("ignored"), count("malformed")
    lines.add_metric(("used",), max(0.0, count("lines") - ignored - malformed))
    lines.add_metric(("ignored",), ignored)
    lines.add_metric(("malformed",), malformed)
    yield lines
    dropped = CounterMetricFamily(
        "keyrelay_events_state_dropped",
        "Messages or refusals the follower stopped waiting for, without an event",
        labels=("cause",))
    for cause in STATE_CAUSES:
        dropped.add_metric((cause,), count(cause))
    yield dropped
    gaps = CounterMetricFamily("keyrelay_events_log_gaps",
                               "Places where lines of the maillog may have been missed",
                               labels=("cause",))
    for name, cause in GAP_CAUSES.items():
        gaps.add_metric((cause,), count(name))
    yield gaps
    webhook = CounterMetricFamily("keyrelay_webhook_events",
                                  "Events done with by the webhook outbox, by result",
                                  labels=("result",))
    for result in WEBHOOK_RESULTS:
        webhook.add_metric((result,), count(f"webhook_{result}"))
    yield webhook
    pauses = CounterMetricFamily("keyrelay_reputation_pauses",
                                 "Principals the reputation guard paused (monitor: would "
                                 "have paused)", labels=("mode",))
    for name, mode in PAUSE_MODES.items():
        pauses.add_metric((mode,), count(name))
    yield pauses
    yield GaugeMetricFamily("keyrelay_webhook_events_pending",
                            "Events waiting in the webhook outbox", value=figures.pending)
    yield GaugeMetricFamily("keyrelay_events_hard_bounces_queued",
                            "Hard bounces waiting to be added to the suppression list",
                            value=figures.suppress_queued)
    if figures.last_event_time is not None:
        yield GaugeMetricFamily(
            "keyrelay_events_last_event_timestamp_seconds",
            "Log time of the newest event read from the maillog (Unix seconds)",
            value=figures.last_event_time)


class Health:
    """``/health``'s line for keyrelay-events; "" while all is well."""

    def __init__(self, config: Config, threads: Sequence[tuple[str, threading.Thread]],
                 source_problem: Callable[[], str] = lambda: "") -> None:
        self.state = Path(config.events.state)
        self.maillog = Path(config.events.maillog)
        self.source = config.events.source
        self.journal_directory = config.events.journal_directory
        self.threads = threads  # (what it does, the thread), e.g. ("follower", ...)
        self.source_problem = source_problem  # the journal source's: journalctl failing

    def __call__(self) -> str:
        for name, thread in self.threads:
            if not thread.is_alive():
                return f"the {name} thread has stopped (see the daemon's log)"
        try:
            read_figures(self.state)
        except StoreError as exc:
            return f"events.state: {exc}"
        if self.source != "file":
            folder = self.journal_directory
            if folder and not os.path.isdir(folder):
                return f"events.journal_directory: {folder} does not exist"
            problem = self.source_problem()
            return f"events.source journal: {problem}" if problem else ""
        try:
            with self.maillog.open("rb"):
                pass
        except FileNotFoundError:
            return f"events.maillog: {self.maillog} does not exist"
        except OSError as exc:
            return f"events.maillog: cannot read {self.maillog}: {exc.strerror or exc}"
        return ""


def registry(collector: EventsCollector) -> CollectorRegistry:
    """What ``/metrics`` serves: the state file's figures and the process's own metrics."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(collector)
    return registry


def logging_changes(health: Callable[[], str]) -> Callable[[], str]:
    """``health`` that logs each change of its answer once (a warning naming the problem,
    then "ok again"), not every scrape."""
    last = [""]

    def check() -> str:
        problem = health()
        if problem != last[0]:
            if problem:
                log.warning("health: %s", problem)
            else:
                log.info("health: ok again")
            last[0] = problem
        return problem

    return check


__all__ = ["EVENTS", "EventsCollector", "Health", "families", "lag_bytes", "logging_changes",
           "registry"]

