"""The schema's ``events:`` section: what keyrelay-events follows and where it keeps its
state (docs/events.md). keyrelay/config/__init__.py says what a field's metadata holds."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from .base import Duration
from .services import check_port, metrics_listen_field

_SYSLOG_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True, slots=True)
class EventsConfig:
    source: Literal["file", "journal"] = field(
        default="file",
        metadata={"doc": 'Where Postfix\'s log is read: "file" (events.maillog) or "journal" '
                  "(the systemd journal, through journalctl, where Postfix logs to journald "
                  "and no file keeps its lines; docs/events.md, \"journald\")."},
    )
    journal_directory: str = field(
        default="",
        metadata={"doc": "With source journal: a folder of journal files to read "
                  "(journalctl --directory, e.g. a container's); empty: the system's journal.",
                  "absolute_path": True, "allow_empty": True},
    )
    maillog: str = field(
        default="/var/log/mail.log",
        metadata={"doc": "With source file: the file Postfix's log lines reach: rsyslog's "
                  "/var/log/mail.log on "
                  "Debian, or Postfix's own maillog_file. keyrelay-events must be able to "
                  "read it (Debian: group adm).", "absolute_path": True},
    )
    state: str = field(
        default="/var/lib/keyrelay/events.db",
        metadata={"doc": "The SQLite file of events (the webhook outbox), the log position "
                  "and the correlation state: one per relay node, on local disk.",
                  "absolute_path": True},
    )
    syslog_names: tuple[str, ...] = field(
        default=(),
        metadata={"doc": "Only the lines of these Postfix syslog_name values (a "
                  "multi-instance host); empty: every Postfix line in the file.",
                  "pattern": (_SYSLOG_NAME, "a syslog_name such as postfix or postfix-out")},
    )
    start_at_end: bool = field(
        default=True,
        metadata={"doc": "On the very first start (no position saved yet), begin at the end "
                  "of the log instead of its start, so that old mail gives no events."},
    )
    batch_lines: int = field(
        default=2000,
        metadata={"doc": "Lines per transaction at most.", "min": 1, "max": 1000000},
    )
    poll: Duration = field(
        default=Duration(0.25),
        metadata={"doc": "How often to look for new lines once caught up.", "min": 0.01,
                  "max": 60},
    )
    max_age: Duration = field(
        default=Duration(8 * 86400.0),
        metadata={"doc": "A message not finished after this long (log time) is forgotten: "
                  "longer than Postfix's maximal_queue_lifetime (5 days by default).",
                  "min": 3600},
    )
    keep: Duration = field(
        default=Duration(7 * 86400.0),
        metadata={"doc": "How long events stay in the state file after they were delivered, "
                  "given up or had no webhook to go to.", "min": 3600},
    )
    metrics_listen: str = metrics_listen_field(9466, "keyrelay-events")

    def __post_init__(self) -> None:
        check_port(self.metrics_listen)
