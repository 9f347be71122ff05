"""What every section of the configuration schema shares: the ``Duration`` type and the
``InvalidField`` error of a rule across several fields of one section."""

from __future__ import annotations

import re
from typing import NewType

Duration = NewType("Duration", float)
"""Seconds. In YAML a number of seconds or a string such as ``72h`` (keyrelay.durations)."""

Workers = NewType("Workers", int)
"""A number of worker processes. In YAML ``auto`` (kept as ``AUTO_WORKERS``, 0) or a whole
number within the field's ``min``/``max``; keyrelay/supervisor.py says what ``auto`` means."""

AUTO_WORKERS = Workers(0)

NO_SPACE = re.compile(r"\S+")


class InvalidField(ValueError):
    """A section's cross-field rule failed; ``key`` is the field the admin should change."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason
