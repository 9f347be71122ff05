"""``keyrelay subuser``: subusers (ACCOUNT/NAME) of an account."""

from __future__ import annotations

import argparse
from typing import Any

from .. import admin
from ..directory.model import DirectoryData, Status, Subuser
from ..errors import UserError
from ..output import dump_json, table, when
from .account import status_setter
from .core import Context, command, group
from .limits import Effective, effective_json, effective_text, limits_json, listed
from .pauses import pause_json, pause_of, paused_line, resumer


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
    command(subs, "resume", resumer(status_setter(Status.ACTIVE, "resume", subuser=True)),
            "lift a suspension and end a reputation pause").add_argument(
                "name", metavar="ACCOUNT/NAME")
