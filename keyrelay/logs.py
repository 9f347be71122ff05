"""Logging for the daemons: one line per decision, as ``key=value`` text or one JSON object.

Each decision is logged once with what an admin needs to answer "why was this refused?":
service, queue id, principal, key id, client address, verdict, reason and the SMTP reply.
Values come from verdicts and facts, which never hold a secret (keys and passwords are
``repr=False`` fields and are never passed here).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from operator import itemgetter
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import LoggingConfig

FIELDS_ATTR = "keyrelay_fields"


# Anything but printable ASCII (so any space or control character), a quote, "=" or a
# backslash. One character class, not an alternation: it is searched on every decision line.
_NEEDS_QUOTES = re.compile(r'[^\x21\x23-\x3c\x3e-\x5b\x5d-\x7e]')
_value = itemgetter(1)  # of a (key, value) pair: fields with an empty value are left out


def _quote(value: str) -> str:
    """``value`` bare when it is plain ASCII without spaces, quotes or ``=``; else as JSON."""
    if value and not _NEEDS_QUOTES.search(value):
        return value
    return json.dumps(value, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...``; values with spaces are quoted."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields: dict[str, str] | None = getattr(record, FIELDS_ATTR, None)
        if fields:
            line += " " + " ".join(f"{k}={_quote(v)}" for k, v in fields.items() if v)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the decision's fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields: dict[str, str] | None = getattr(record, FIELDS_ATTR, None)
        if fields:
            doc.update(fields)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def configure(settings: LoggingConfig, stream: Any = None) -> None:
    """Send every keyrelay log line to ``stream`` (stderr: the journal under systemd)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.format == "json" else TextFormatter())
    root = logging.getLogger("keyrelay")
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
    root.propagate = False


class DecisionLog:
    """The one line per decision, written without the ``logging`` machinery.

    Decisions are the daemons' hot path (thousands per second): a ``LogRecord``, a handler
    lookup and a flush per line would cost more than the decision itself. Lines have the
    same shape as ``TextFormatter``/``JsonFormatter`` output and go to the same stream. With
    ``schedule_flush`` (policyd: ``loop.call_soon``) lines are flushed once per event-loop
    iteration, so a burst of decisions costs one write; without it every line is flushed.
    """

    def __init__(
        self,
        settings: LoggingConfig,
        stream: IO[str] | None = None,
        schedule_flush: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        self.enabled = logging.getLevelName(settings.level.upper()) <= logging.INFO
        self.json = settings.format == "json"
        self.stream = stream or sys.stderr
        self.schedule_flush = schedule_flush
        self.unflushed = False
        self._second = -1
        self._stamp = ""

    def _time(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime(
                "%Y-%m-%dT%H:%M:%S" if self.json else "%Y-%m-%d %H:%M:%S", time.localtime(now)
            )
        millis = int((now - second) * 1000)
        return f"{self._stamp}.{millis:03d}" if self.json else f"{self._stamp},{millis:03d}"

    def emit(self, logger: str, message: str, fields: dict[str, str]) -> None:
        """Log one decision with its fields (empty values left out)."""
        if not self.enabled:
            return
        if self.json:
            doc = {"time": self._time(), "level": "info", "logger": logger, "message": message}
            doc.update((k, v) for k, v in fields.items() if v)
            line = json.dumps(doc, ensure_ascii=False)
        else:
            # one regex pass over all the values (empty ones add nothing), not one per value
            if _NEEDS_QUOTES.search("".join(fields.values())):
                pairs = " ".join([f"{k}={_quote(v)}" for k, v in fields.items() if v])
            else:  # the common case, as "k=v" pairs joined without Python code per field
                pairs = " ".join(map("=".join, filter(_value, fields.items())))
            line = f"{self._time()} INFO {logger}: {message} {pairs}"
        self.stream.write(line + "\n")
        if self.schedule_flush is None:
            self.flush()
        elif not self.unflushed:
            self.unflushed = True
            self.schedule_flush(self.flush)

    def flush(self) -> None:
        self.unflushed = False
        try:
            self.stream.flush()
        except OSError as exc:  # a full disk or closed journal must not stop mail
            logging.getLogger("keyrelay").warning("cannot write the decision log: %s", exc)
