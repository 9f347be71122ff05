"""``keyrelay subuser``: subusers (ACCOUNT/NAME) of an account."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from .. import admin, audit
from ..directory.model import DirectoryData, Status, Subuser
from ..errors import UserError
from ..output import dump_json, table, when
from ..reputation import Pause, ReputationUnavailable, describe, open_reputation
from .account import status_setter
from .core import Context, Handler, command, group
from .limits import Effective, effective_json, effective_text, limits_json, listed


def subuser_add(ctx: Context, args: argparse.Namespace) -> None:
    with ctx.change("subuser.add", principal=args.name) as data:
        admin.add_subuser(data, args.name, ctx.now)
    ctx.say(f"Added subuser {args.name}.")


def subuser_json(data: DirectoryData, sub: Subuser, limits: Effective) -> dict[str, Any]:
    return {
        "principal": sub.principal,
        "account": sub.account,
        "name": sub.name,
        "status": str(sub.status),
        "pool": sub.pool,
        "limits": limits_json(sub.limits),  # its own (null: inherited)
        "effective_limits": effective_json(limits(sub.principal)),
        "created": when(sub.created, ""),
        "keys": sum(
            1 for k in data.keys.values() if k.principal == sub.principal and not k.revoked
        ),
    }


def subuser_list(ctx: Context, args: argparse.Namespace) -> None:
    data = ctx.read()
    admin.account(data, args.account)
    subs = sorted(
        (s for s in data.subusers.values() if s.account == args.account), key=lambda s: s.name
    )
    limits = listed(ctx, data)
    if ctx.json:
        dump_json(ctx.out, [subuser_json(data, s, limits) for s in subs])
        return
    rows = [
        [s.principal, str(s.status), s.pool or "-", effective_text(limits(s.principal)),
         str(sum(1 for k in data.keys.values() if k.principal == s.principal and not k.revoked))]
        for s in subs
    ]
    table(ctx.out, ["SUBUSER", "STATUS", "POOL", "LIMITS", "KEYS"], rows)


def subuser_remove(ctx: Context, args: argparse.Namespace) -> None:
    with ctx.change("subuser.remove", principal=args.name) as data:
        admin.remove_subuser(data, args.name)
    ctx.say(f"Removed subuser {args.name} with its keys and senders.")


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


def resumer(*, subuser: bool) -> Handler:
    """``subuser|account resume``: lift a suspension, and end a reputation pause (audited
    ``reputation.resume``; the principal's bounce counts start afresh, so the guard does
    not pause it again until it has min_volume new deliveries and bounces)."""
    lift = status_setter(Status.ACTIVE, "resume", subuser=subuser)

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


def subuser_show(ctx: Context, args: argparse.Namespace) -> None:
    data = ctx.read()
    if "/" not in args.name:
        raise UserError(f"expected ACCOUNT/SUBUSER, got {args.name!r} (to show an account: "
                        f"keyrelay account show {args.name})")
    sub = data.subusers[admin.principal(data, args.name)]
    info = subuser_json(data, sub, listed(ctx, data))
    pause, problem = pause_of(ctx, sub.principal)
    info["paused"] = pause_json(pause)
    if ctx.json:
        dump_json(ctx.out, info)
        return
    for label, value in [
        ("subuser", info["principal"]),
        ("status", info["status"]),
        ("paused", paused_line(pause, problem)),
        ("pool", info["pool"] or "-"),
        ("limits", effective_text(listed(ctx, data)(sub.principal), sub.principal)),
        ("keys", str(info["keys"])),
        ("created", info["created"] or "-"),
    ]:
        ctx.out.write(f"{label + ':':<10} {value}\n")


def register(sub: Any) -> None:
    subs = group(sub, "subuser", "manage subusers (ACCOUNT/NAME)")
    command(subs, "add", subuser_add, "add a subuser").add_argument(
        "name", metavar="ACCOUNT/NAME")
    command(subs, "list", subuser_list, "list an account's subusers", json=True).add_argument(
        "account", metavar="ACCOUNT")
    command(subs, "show", subuser_show, "show one subuser, with its reputation pause",
            json=True).add_argument("name", metavar="ACCOUNT/NAME")
    command(subs, "remove", subuser_remove, "remove a subuser with its keys and senders"
            ).add_argument("name", metavar="ACCOUNT/NAME")
    command(subs, "suspend", status_setter(Status.SUSPENDED, "suspend", subuser=True),
            "refuse the subuser's logins and messages").add_argument(
                "name", metavar="ACCOUNT/NAME")
    command(subs, "resume", resumer(subuser=True),
            "lift a suspension and end a reputation pause").add_argument(
                "name", metavar="ACCOUNT/NAME")
