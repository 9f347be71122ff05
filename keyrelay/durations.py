"""Durations as admins write them in keyrelay.yaml and CLI options: ``300``, ``72h``, ``1h30m``.

A duration is a non-negative number of seconds, or a string of ``<count><unit>`` parts with the
units ``w`` (week), ``d``, ``h``, ``m`` (minute) and ``s``, largest first and each at most once.
Months and years are deliberately absent: their length varies, so ``90d`` is what to write.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

# Largest first: the order parts must have in a string, and the order format_duration writes.
_UNITS: tuple[tuple[str, int], ...] = (
    ("w", 7 * 86400),
    ("d", 86400),
    ("h", 3600),
    ("m", 60),
    ("s", 1),
)
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_PART = re.compile(r"(\d+(?:\.\d+)?)([a-zA-Z]+)")
_EXAMPLES = "a number of seconds or a string such as 30s, 5m, 72h, 90d, 2w or 1h30m"


def parse_duration(text: str | int | float) -> float:
    """Return the duration ``text`` in seconds; raise ValueError, saying why, if it is not one."""
    # bool is an int subclass, but `true` is never meant as "1 second".
    if isinstance(text, bool) or not isinstance(text, int | float | str):
        raise ValueError(f"invalid duration {text!r}: expected {_EXAMPLES}")
    if not isinstance(text, str):
        if not math.isfinite(text) or text < 0:
            raise ValueError(f"invalid duration {text!r}: must be a non-negative number")
        return float(text)
    spec = text.strip()
    if not spec:
        raise ValueError(f"invalid duration {text!r}: empty; expected {_EXAMPLES}")
    if spec.startswith("-"):
        raise ValueError(f"invalid duration {text!r}: must not be negative")
    if _NUMBER.fullmatch(spec):
        return float(spec)
    units = [unit for unit, _ in _UNITS]
    total, pos, previous = 0.0, 0, -1
    while pos < len(spec):
        part = _PART.match(spec, pos)
        if part is None:
            raise ValueError(f"invalid duration {text!r}: expected {_EXAMPLES}")
        count, unit = part.groups()
        if unit not in units:
            raise ValueError(
                f"invalid duration {text!r}: unknown unit {unit!r} (use {', '.join(units)})"
            )
        rank = units.index(unit)
        if rank <= previous:
            raise ValueError(
                f"invalid duration {text!r}: units must go from largest to smallest, "
                "each at most once (e.g. 1h30m)"
            )
        total += float(count) * _UNITS[rank][1]
        pos, previous = part.end(), rank
    return total


def format_duration(seconds: float) -> str:
    """Return the form an admin would write: ``2w``, ``90d``, ``1h30m``, ``0s``.

    Whole weeks are written in weeks; anything else from days down (``10d``, not ``1w3d``),
    which is how durations are usually said. Fractions of a second fall back to plain seconds.
    The result always parses back to ``seconds`` exactly.
    """
    if isinstance(seconds, bool) or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"cannot format {seconds!r} as a duration: must be a non-negative number")
    if not float(seconds).is_integer():
        # Decimal(repr()) gives the shortest exact digits without an exponent (1e-05 -> 0.00001).
        return f"{Decimal(repr(float(seconds))):f}s"
    rest = int(seconds)
    week = _UNITS[0][1]
    if rest and rest % week == 0:
        return f"{rest // week}w"
    parts = []
    for unit, size in _UNITS[1:]:
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"
