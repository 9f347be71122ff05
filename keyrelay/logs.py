"""Logging for the daemons: one line per decision, as ``key=value`` text or one JSON object.

Each decision is logged once with what an admin needs to answer "why was this refused?":
service, queue id, principal, key id, client address, verdict, reason and the SMTP reply.
Values come from verdicts and facts, which never hold a secret (keys and passwords are
``repr=False`` fields and are never passed here).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import LoggingConfig

FIELDS_ATTR = "keyrelay_fields"


def _quote(value: str) -> str:
    if value and not any(c in value for c in ' "=\\') and value.isprintable():
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
            line += " " + " ".join(f"{k}={_quote(v)}" for k, v in fields.items())
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


def decision(logger: logging.Logger, message: str, fields: dict[str, str]) -> None:
    """Log one decision with its fields (empty values left out)."""
    if logger.isEnabledFor(logging.INFO):
        kept = {k: v for k, v in fields.items() if v}
        logger.info(message, extra={FIELDS_ATTR: kept})
