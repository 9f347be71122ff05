"""``keyrelay ip``: IP access rules, where an account may log in and send from."""

from __future__ import annotations

import argparse
from typing import Any

from .. import admin, names
from ..errors import UserError
from ..output import dump_json
from .core import Context, command, group


def account_only(args: argparse.Namespace, action: str) -> None:
    """IP access rules belong to accounts (and hold for all their subusers): a subuser
    named is told which account to give instead."""
    acc, sub = names.principal_id(args.account)
    if sub is not None:
        rest = f" {args.cidr}" if action != "list" else ""
        raise UserError(
            f"IP access rules are set on accounts; {args.account} is a subuser of {acc}: use "
            f"`keyrelay ip {action} {acc}{rest}` (the rules hold for all of {acc}'s subusers)")


def ip_allow(ctx: Context, args: argparse.Namespace) -> None:
    account_only(args, "allow")
    with ctx.change("ip.allow", account=args.account, cidr=args.cidr) as data:
        acc = admin.ip_allow(data, args.account, args.cidr)
    ctx.say(f"{args.account} may now log in and send from: "
            f"{', '.join(str(n) for n in acc.ip_allow)}.")


def ip_remove(ctx: Context, args: argparse.Namespace) -> None:
    account_only(args, "remove")
    with ctx.change("ip.remove", account=args.account, cidr=args.cidr) as data:
        acc = admin.ip_remove(data, args.account, args.cidr)
    rest = ", ".join(str(n) for n in acc.ip_allow) or "any address (no rules left)"
    ctx.say(f"{args.account} may now log in and send from: {rest}.")


def ip_list(ctx: Context, args: argparse.Namespace) -> None:
    account_only(args, "list")
    acc = admin.account(ctx.read(), args.account)
    if ctx.json:
        dump_json(ctx.out, [str(n) for n in acc.ip_allow])
    elif acc.ip_allow:
        ctx.out.writelines(f"{n}\n" for n in acc.ip_allow)
    else:
        ctx.out.write(f"{acc.name} has no IP access rules: any client address may log in.\n")


def register(sub: Any) -> None:
    ip = group(sub, "ip", "manage IP access rules: where an account may log in and send from")
    for name, handler, text in [
        ("allow", ip_allow, "allow logins and mail from CIDR (the first rule closes all others)"),
        ("remove", ip_remove, "remove a rule (no rules left: any address)"),
    ]:
        cmd = command(ip, name, handler, text)
        cmd.add_argument("account", metavar="ACCOUNT")
        cmd.add_argument("cidr", metavar="CIDR")
    command(ip, "list", ip_list, "list an account's rules", json=True).add_argument(
        "account", metavar="ACCOUNT")
