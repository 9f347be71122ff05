"""The reputation guard's pauses in the CLI (docs/reputation.md, "Commands"): the ``paused:``
line of ``subuser show`` and ``account show``, and what ``subuser|account resume`` adds to
lifting a suspension."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from .. import audit
from ..reputation import Pause, ReputationUnavailable, describe, open_reputation
from .core import Context, Handler


def pause_of(ctx: Context, principal: str) -> tuple[Pause | None, str]:
    """The principal's reputation pause (docs/reputation.md), None: not paused or the guard
    off; and, when the store cannot be read, why (a show command still shows the rest)."""
    if not ctx.config.reputation.enabled:
        return None, ""
    try:
        store = open_reputation(ctx.config, create=False)
        try:
            return store.get(principal), ""
        finally:
            store.close()
    except ReputationUnavailable as exc:
        return None, str(exc)


def paused_line(pause: Pause | None, problem: str) -> str:
    if problem:
        return f"unknown ({problem})"
    return "-" if pause is None else pause_text(pause)


def pause_text(pause: Pause) -> str:
    since = datetime.fromtimestamp(pause.since, UTC).strftime("%Y-%m-%d %H:%M UTC")
    kind = "would be paused (monitor mode)" if pause.monitor else "paused"
    return f"{kind} since {since}: {describe(pause)}"


def pause_json(pause: Pause | None) -> dict[str, Any] | None:
    return None if pause is None else {
        "since": datetime.fromtimestamp(pause.since, UTC).isoformat(), "rate": pause.rate,
        "delivered": pause.delivered, "bounced": pause.bounced, "window": pause.window,
        "monitor": pause.monitor}


def resumer(lift: Handler) -> Handler:
    """``subuser|account resume``: ``lift`` the suspension (account.py ``status_setter``),
    and end a reputation pause (audited ``reputation.resume``; the principal's bounce counts
    start afresh, so the guard does not pause it again until it has min_volume new
    deliveries and bounces)."""

    def handler(ctx: Context, args: argparse.Namespace) -> None:
        lift(ctx, args)
        if not ctx.config.reputation.enabled:
            return
        store = open_reputation(ctx.config)
        try:
            ended = store.resume(args.name)
        finally:
            store.close()
        if ended is None:
            return
        audit.record(ctx.config.logging.audit_log, ctx.now, "reputation.resume",
                     principal=args.name, paused_since=str(int(ended.since)))
        ctx.say(f"Ended the reputation pause of {args.name} ({pause_text(ended)}); its "
                "bounce counts start afresh.")

    return handler
