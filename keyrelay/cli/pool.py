"""``keyrelay pool``: outbound IP pools (bind addresses and HELO name) and who uses them."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

from .. import admin, mastercf
from ..config import Config
from ..directory.model import Pool
from ..errors import UserError
from ..output import dump_json, table, when
from .core import Context, command, group


def pool_json(pool: Pool, config: Config) -> dict[str, Any]:
    return {
        "name": pool.name,
        "bind": [str(a) for a in pool.bind],
        "helo": pool.helo,
        "transport": config.routing.transport_prefix + pool.name,
        "created": when(pool.created, ""),
    }


def postfix_needs_apply(ctx: Context, pools: Iterable[str], changed: Iterable[str] = ()) -> None:
    """Tell the admin when Postfix needs `keyrelay postfix apply` for these pools (added or
    assigned) and ``changed`` ones (new bind address or HELO): those whose transport is not in
    postfix.config_dir's master.cf, or all when it cannot be read; changed ones whose
    transport is there have old settings. Until then keyrelay-policyd answers their mail
    451 4.3.0, or Postfix defers it (docs/postfix.md, "One transport per IP pool")."""
    prefix, config_dir = ctx.config.routing.transport_prefix, ctx.config.postfix.config_dir
    have = mastercf.read_transports(config_dir)
    command = f"keyrelay postfix apply{'' if config_dir else ' --config-dir DIR'} --reload"
    wanted = sorted(set(pools) | set(changed))
    missing = [prefix + p for p in wanted if have is None or prefix + p not in have]
    old = [prefix + p for p in sorted(set(changed)) if have is not None and prefix + p in have]
    if missing:
        ctx.say(f"Postfix needs the transport{'s' if len(missing) > 1 else ''} "
                f"{', '.join(missing)}: run `{command}`; mail through "
                f"{'this pool' if len(missing) == 1 else 'these pools'} waits until then.")
    if old:
        ctx.say(f"Postfix still has the old settings of {', '.join(old)} (bind address or HELO "
                f"changed): run `{command}`.")


def pool_add(ctx: Context, args: argparse.Namespace) -> None:
    if args.name == "none":  # `pool assign PRINCIPAL none` means "no pool of its own"
        raise UserError("'none' cannot name a pool: `keyrelay pool assign PRINCIPAL none` "
                        "means no pool")
    with ctx.change("pool.add", pool=args.name, bind=" ".join(args.bind), helo=args.helo) as data:
        pool = admin.add_pool(data, args.name, args.bind, args.helo, ctx.now)
    ctx.say(f"Added pool {pool.name}: {', '.join(map(str, pool.bind))}, HELO {pool.helo}, "
            f"Postfix transport {ctx.config.routing.transport_prefix}{pool.name}.")
    postfix_needs_apply(ctx, [pool.name])


def pool_list(ctx: Context, args: argparse.Namespace) -> None:
    data = ctx.read()
    pools = sorted(data.pools.values(), key=lambda p: p.name)
    if ctx.json:
        dump_json(ctx.out, [pool_json(p, ctx.config) for p in pools])
        return
    prefix = ctx.config.routing.transport_prefix
    rows = [[p.name, " ".join(map(str, p.bind)), p.helo, prefix + p.name] for p in pools]
    table(ctx.out, ["POOL", "BIND", "HELO", "TRANSPORT"], rows)


def pool_remove(ctx: Context, args: argparse.Namespace) -> None:
    with ctx.change("pool.remove", pool=args.name) as data:
        admin.remove_pool(data, args.name)
    ctx.say(f"Removed pool {args.name}.")
    prefix = ctx.config.routing.transport_prefix
    if args.name and prefix + args.name in (
            mastercf.read_transports(ctx.config.postfix.config_dir) or ()):
        ctx.say(f"Postfix still has its transport {prefix}{args.name}: `keyrelay postfix "
                "apply --reload` removes it.")


def pool_assign(ctx: Context, args: argparse.Namespace) -> None:
    target = None if args.pool == "none" else args.pool
    with ctx.change("pool.assign", principal=args.principal, pool=args.pool) as data:
        admin.assign_pool(data, args.principal, target)
    if target is None:
        ctx.say(f"{args.principal} now uses its account's pool or the default route.")
    else:
        ctx.say(f"{args.principal} now sends through pool {target}.")
        postfix_needs_apply(ctx, [target])


def register(sub: Any) -> None:
    pools = group(sub, "pool", "manage outbound IP pools (bind addresses and HELO name)")
    padd = command(pools, "add", pool_add, "add a pool")
    padd.add_argument("name", metavar="NAME")
    padd.add_argument("--bind", action="append", required=True, metavar="IP",
                      help="outbound source address (repeatable)")
    padd.add_argument("--helo", required=True, metavar="NAME",
                      help="HELO name; its forward and reverse DNS should match the addresses")
    command(pools, "list", pool_list, "list pools", json=True)
    command(pools, "remove", pool_remove, "remove an unused pool").add_argument(
        "name", metavar="NAME")
    assign = command(pools, "assign", pool_assign,
                     "route a principal's mail through a pool ('none' to inherit)")
    assign.add_argument("principal", metavar="PRINCIPAL")
    assign.add_argument("pool", metavar="POOL")
