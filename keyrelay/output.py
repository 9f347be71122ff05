"""Plain-text tables and JSON for the CLI's listings (every listing has ``--json``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TextIO


def when(value: datetime | None, empty: str = "-") -> str:
    return empty if value is None else value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def table(out: TextIO, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns padded to their widest cell; an empty listing prints only the header."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    for row in [headers, *rows]:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def dump_json(out: TextIO, value: object) -> None:
    out.write(json.dumps(value, indent=2, sort_keys=False) + "\n")
