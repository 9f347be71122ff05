"""What every section of the configuration schema shares: the ``Duration`` type and the
``InvalidField`` error of a rule across several fields of one section."""

from __future__ import annotations

import re
from typing import NewType

Duration = NewType("Duration", float)
"""Seconds. In YAML a number of seconds or a string such as ``72h`` (keyrelay.durations)."""

NO_SPACE = re.compile(r"\S+")


class InvalidField(ValueError):
    """A section's cross-field rule failed; ``key`` is the field the admin should change."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason
