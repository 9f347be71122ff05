"""``keyrelay account``: accounts (tenants); and the suspend/resume shared with subusers."""

from __future__ import annotations

import argparse
from typing import Any

from .. import admin
from ..directory.model import Account, DirectoryData, Status
from ..errors import UserError
from ..output import dump_json, table, when
from .core import Context, Handler, command, group
from .limits import Effective, effective_json, effective_text, limits_json, listed
from .pauses import pause_of, paused_line, resumer


def account_json(data: DirectoryData, acc: Account, limits: Effective) -> dict[str, Any]:
    return {
        "name": acc.name,
        "status": str(acc.status),
        "monitor": acc.monitor,
        "pool": acc.pool,
        "ip_allow": [str(n) for n in acc.ip_allow],
        "limits": limits_json(acc.limits),  # its own (null: inherited)
        "effective_limits": effective_json(limits(acc.name)),
        "created": when(acc.created, ""),
        "subusers": sorted(s.name for s in data.subusers.values() if s.account == acc.name),
        # keys not revoked, as the KEYS column of the text listing counts them
        "keys": sum(1 for k in data.keys.values() if k.account == acc.name and not k.revoked),
        "domains": sorted(d.name for d in data.domains.values() if d.owner == acc.name),
        "webhook": acc.webhook.url if acc.webhook else None,  # never its secret
    }


def account_add(ctx: Context, args: argparse.Namespace) -> None:
    with ctx.change("account.add", account=args.name) as data:
        admin.add_account(data, args.name, ctx.now)
    ctx.say(f"Added account {args.name}.")


def account_list(ctx: Context, args: argparse.Namespace) -> None:
    data = ctx.read()
    accounts = sorted(data.accounts.values(), key=lambda a: a.name)
    if ctx.json:
        limits = listed(ctx, data)
        dump_json(ctx.out, [account_json(data, a, limits) for a in accounts])
        return
    rows = [
        [
            a.name,
            str(a.status),
            "on" if a.monitor else "off",
            a.pool or "-",
            str(len([s for s in data.subusers.values() if s.account == a.name])),
            str(sum(1 for k in data.keys.values() if k.account == a.name and not k.revoked)),
            str(len([d for d in data.domains.values() if d.owner == a.name])),
        ]
        for a in accounts
    ]
    table(ctx.out, ["ACCOUNT", "STATUS", "MONITOR", "POOL", "SUBUSERS", "KEYS", "DOMAINS"], rows)


def account_show(ctx: Context, args: argparse.Namespace) -> None:
    data = ctx.read()
    limits = listed(ctx, data)
    info = account_json(data, admin.account(data, args.name), limits)
    if ctx.json:  # the same record as account list's; the text shows the pause too
        dump_json(ctx.out, info)
        return
    pause, problem = pause_of(ctx, args.name)  # its own sending (docs/reputation.md)
    for label, value in [
        ("account", info["name"]),
        ("status", info["status"]),
        ("paused", paused_line(pause, problem)),
        ("monitor", "on" if info["monitor"] else "off"),
        ("pool", info["pool"] or "-"),
        ("ip allow", ", ".join(info["ip_allow"]) or "any address"),
        ("limits", effective_text(limits(args.name), args.name)),
        ("subusers", ", ".join(info["subusers"]) or "-"),
        ("keys", str(info["keys"])),
        ("domains", ", ".join(info["domains"]) or "-"),
        ("webhook", info["webhook"] or "-"),
        ("created", info["created"] or "-"),
    ]:
        ctx.out.write(f"{label + ':':<10} {value}\n")


def status_setter(status: Status, verb: str, *, subuser: bool) -> Handler:
    """``account|subuser suspend|resume``."""

    def handler(ctx: Context, args: argparse.Namespace) -> None:
        # `subuser suspend acme` must not silently suspend the whole account (nor the reverse)
        if subuser and "/" not in args.name:
            raise UserError(f"expected ACCOUNT/SUBUSER, got {args.name!r} "
                            f"(to {verb} an account: keyrelay account {verb} {args.name})")
        if not subuser and "/" in args.name:
            raise UserError(f"expected an account name, got {args.name!r} "
                            f"(to {verb} a subuser: keyrelay subuser {verb} {args.name})")
        with ctx.change(f"principal.{verb}", principal=args.name) as data:
            admin.set_status(data, args.name, status)
        ctx.say(f"{args.name} is {status}.")

    return handler


def account_remove(ctx: Context, args: argparse.Namespace) -> None:
    with ctx.change("account.remove", account=args.name) as data:
        admin.remove_account(data, args.name)
    ctx.say(f"Removed account {args.name} with its subusers, keys and senders.")


def register(sub: Any) -> None:
    acc = group(sub, "account", "manage accounts (tenants)")
    command(acc, "add", account_add, "add an account").add_argument("name", metavar="ACCOUNT")
    command(acc, "list", account_list, "list accounts", json=True)
    command(acc, "show", account_show, "show one account", json=True).add_argument(
        "name", metavar="ACCOUNT")
    command(acc, "suspend", status_setter(Status.SUSPENDED, "suspend", subuser=False),
            "refuse every login and message of the account and its subusers"
            ).add_argument("name", metavar="ACCOUNT")
    command(acc, "resume", resumer(status_setter(Status.ACTIVE, "resume", subuser=False)),
            "lift a suspension and end a reputation pause").add_argument("name",
                                                                          metavar="ACCOUNT")
    command(acc, "remove", account_remove,
            "remove an account with its subusers, keys and senders (its domains first)"
            ).add_argument("name", metavar="ACCOUNT")
