"""``keyrelay usage PRINCIPAL``: how much of each rate limit and quota a principal has used,
next to the limits, from whichever counter store is configured (keyrelay/usagecounts.py:
Redis itself, or with ``counters.backend: memory`` the running keyrelay-policyd through its
control socket).

The windows are the policy service's own (``keyrelay.decisions.windows_for``): the subuser's
own ones and its account's, which its siblings share. Counts are in recipients (a message to
N recipients counts N; docs/policyd.md, "What is counted"). A window without a limit is not
counted, so it is not shown. (Not ``cli/usage.py``: ``keyrelay.usage`` is the arguments'
module, imported by ``cli/__init__.py`` under that name.)
"""

from __future__ import annotations

import argparse
from typing import Any

from .. import admin
from ..decisions import EngineSettings, RateWindow, reset_text, windows_for
from ..directory.model import Directory
from ..output import dump_json, table
from ..usagecounts import read_counts
from .core import Context, command


def _caps(window: RateWindow) -> str:
    return f"{window.subject} alone" if window.scope == "subuser" else f"all of {window.subject}"


def usage(ctx: Context, args: argparse.Namespace) -> None:
    counters = ctx.config.counters
    data = ctx.read()
    admin.principal(data, args.principal)
    found = windows_for(Directory(data), EngineSettings.from_config(ctx.config), args.principal)
    counts = read_counts(ctx.config, ctx.config_path, found) if found else None
    rows: list[dict[str, Any]] = []
    for seen in counts.windows if counts is not None else ():
        window = seen.window
        rows.append({
            "limit": window.field, "span": window.span, "caps": window.scope,
            "subject": window.subject, "used": seen.used, "value": window.limit,
            "source": window.source,
            # a calendar window's end; a sliding window frees up as it slides
            "resets_at": (reset_text(ctx.now, seen.resets_in, counters.time_zone)
                          if window.calendar else None),
        })
    if ctx.json:
        dump_json(ctx.out, {"principal": args.principal, "backend": counters.backend,
                            "counts_from": counts.origin if counts is not None else None,
                            "time_zone": counters.time_zone, "windows": rows})
        return
    if counts is None:
        ctx.say(f"{args.principal} sends under no rate limit or quota: nothing is counted.")
        return
    table(ctx.out, ["WINDOW", "CAPS", "USED", "LIMIT", "RESETS"], [
        [f"per {row['span']}", _caps(window), str(row["used"]), str(row["value"]),
         row["resets_at"] or "sliding"]
        for row, window in zip(rows, found, strict=True)])
    ctx.say(f"Counts from {counts.where}.")


def register(sub: Any) -> None:
    command(sub, "usage", usage,
            "show how much of each rate limit and quota a principal has used (in "
            "recipients), from the counter store: Redis, or keyrelay-policyd's memory "
            "through its control socket", json=True).add_argument("principal",
                                                                   metavar="PRINCIPAL")
