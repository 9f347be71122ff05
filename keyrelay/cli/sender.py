"""``keyrelay sender``: verified single sender addresses."""

from __future__ import annotations

import argparse
from typing import Any

from .. import admin, names
from ..output import dump_json, table, when
from .core import Context, command, group


def sender_add(ctx: Context, args: argparse.Namespace) -> None:
    with ctx.change("sender.add", principal=args.principal, address=args.address) as data:
        sender = admin.add_sender(data, args.principal, args.address, ctx.now)
    ctx.say(f"{args.principal} may now send as {sender.address}.")


def sender_remove(ctx: Context, args: argparse.Namespace) -> None:
    with ctx.change("sender.remove", principal=args.principal, address=args.address) as data:
        admin.remove_sender(data, args.principal, args.address)
    ctx.say(f"{args.principal} may no longer send as {names.address(args.address)}.")


def sender_list(ctx: Context, args: argparse.Namespace) -> None:
    data = ctx.read()
    if args.principal:
        admin.principal(data, args.principal)
    found = sorted(
        (s for s in data.senders.values() if not args.principal or s.principal == args.principal),
        key=lambda s: (s.principal, s.address),
    )
    if ctx.json:
        dump_json(ctx.out, [
            {"address": s.address, "principal": s.principal, "created": when(s.created, "")}
            for s in found
        ])
        return
    table(ctx.out, ["ADDRESS", "PRINCIPAL"], [[s.address, s.principal] for s in found])


def register(sub: Any) -> None:
    snd = group(sub, "sender", "manage verified single sender addresses")
    for name, handler, text in [
        ("add", sender_add, "let a principal send as one address"),
        ("remove", sender_remove, "take a sender address back"),
    ]:
        cmd = command(snd, name, handler, text)
        cmd.add_argument("principal", metavar="PRINCIPAL")
        cmd.add_argument("address", metavar="ADDRESS")
    command(snd, "list", sender_list, "list verified senders", json=True).add_argument(
        "principal", nargs="?", metavar="PRINCIPAL")
