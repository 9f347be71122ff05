"""``keyrelay usage PRINCIPAL``: how much of each rate limit and quota a principal has used,
read from the shared counter store (``counters.backend: redis``), next to the limits.

The windows are the policy service's own (``keyrelay.decisions.windows_for``): the subuser's
own ones and its account's, which its siblings share. Counts are in recipients (a message to
N recipients counts N; docs/policyd.md, "What is counted"). A window without a limit is not
counted, so it is not shown. (Not ``cli/usage.py``: ``keyrelay.usage`` is the arguments'
module, imported by ``cli/__init__.py`` under that name.)
"""

from __future__ import annotations

import argparse
import asyncio
import math
from typing import Any
from zoneinfo import ZoneInfo

from .. import admin
from ..counters import RedisCounters, Usage, Window, redis_target
from ..decisions import EngineSettings, RateWindow, reset_text, windows_for
from ..directory.model import Directory
from ..errors import UserError
from ..limits import store_window
from ..output import dump_json, table
from .core import Context, command


async def _peek(ctx: Context, windows: tuple[Window, ...]) -> list[Usage]:
    store = RedisCounters(redis_target(ctx.config.counters.redis),
                          zone=ZoneInfo(ctx.config.counters.time_zone))
    try:
        return await store.peek(windows)
    finally:
        await store.close()


def _caps(window: RateWindow) -> str:
    return f"{window.subject} alone" if window.scope == "subuser" else f"all of {window.subject}"


def usage(ctx: Context, args: argparse.Namespace) -> None:
    counters = ctx.config.counters
    if counters.backend != "redis":
        raise UserError(
            "counters.backend is memory: the counts live inside each keyrelay-policyd and "
            "this command cannot read them; with counters.backend: redis (docs/cluster.md) it "
            "reads the shared counts")
    data = ctx.read()
    admin.principal(data, args.principal)
    found = windows_for(Directory(data), EngineSettings.from_config(ctx.config), args.principal)
    used = asyncio.run(_peek(ctx, tuple(store_window(w) for w in found))) if found else []
    rows: list[dict[str, Any]] = []
    for window, seen in zip(found, used, strict=True):
        rows.append({
            "limit": window.field, "span": window.span, "caps": window.scope,
            "subject": window.subject, "used": math.ceil(seen.count), "value": window.limit,
            "source": window.source,
            # a calendar window's end; a sliding window frees up as it slides
            "resets_at": (reset_text(ctx.now, seen.resets_in, counters.time_zone)
                          if window.calendar else None),
        })
    if ctx.json:
        dump_json(ctx.out, {"principal": args.principal, "backend": counters.backend,
                            "time_zone": counters.time_zone, "windows": rows})
        return
    if not rows:
        ctx.say(f"{args.principal} sends under no rate limit or quota: nothing is counted.")
        return
    table(ctx.out, ["WINDOW", "CAPS", "USED", "LIMIT", "RESETS"], [
        [f"per {row['span']}", _caps(window), str(row["used"]), str(row["value"]),
         row["resets_at"] or "sliding"]
        for row, window in zip(rows, found, strict=True)])


def register(sub: Any) -> None:
    command(sub, "usage", usage,
            "show how much of each rate limit and quota a principal has used (in "
            "recipients), from the shared counters (counters.backend: redis)",
            json=True).add_argument("principal", metavar="PRINCIPAL")
