"""``keyrelay legacy``: the password bridge's old logins (docs/migration.md, steps 5 and 6).

An imported login keeps its old username and password until its sunset (made only by
``keyrelay sync`` of a declaration that ``keyrelay migrate postfix --sunset`` wrote). These
commands show who still logs in that way, move the sunset, and end one at once. Nothing here
shows a hash or a password.
"""

from __future__ import annotations

import argparse
from datetime import date
from typing import Any

from .. import admin
from ..directory.model import LegacyLogin
from ..errors import UserError
from ..output import dump_json, table
from .core import Context, command, group


def _day(text: str) -> date:
    try:
        if len(text) == 10:
            return date.fromisoformat(text)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}")


def _ts(cred: LegacyLogin) -> str | None:
    return cred.last_used.strftime("%Y-%m-%dT%H:%M:%SZ") if cred.last_used else None


def legacy_list(ctx: Context, args: argparse.Namespace) -> None:
    creds = sorted(ctx.read().legacy.values(), key=lambda c: c.principal)
    if ctx.json:
        dump_json(ctx.out, [{
            "principal": c.principal, "username": c.username,
            "scheme": c.password_hash[1:].partition("}")[0], "sunset": c.sunset.isoformat(),
            "days_left": c.days_left(ctx.now), "last_used": _ts(c),
        } for c in creds])
        return
    if not creds:
        ctx.out.write("No legacy password logins: every application logs in with an API key.\n")
        return
    table(ctx.out, ("PRINCIPAL", "USERNAME", "SUNSET", "DAYS LEFT", "LAST USED"), [
        (c.principal, c.username, c.sunset.isoformat(),
         str(c.days_left(ctx.now)) if c.days_left(ctx.now) >= 0 else "ended",
         _ts(c) or "never")
        for c in creds])


def legacy_sunset(ctx: Context, args: argparse.Namespace) -> None:
    if bool(args.all) == bool(args.principal):
        raise UserError("legacy sunset: give PRINCIPAL or --all, and the date")
    scope = "all legacy logins" if args.all else args.principal
    with ctx.change("legacy.sunset", scope=scope, sunset=args.date.isoformat()) as data:
        pids = sorted(data.legacy) if args.all else [args.principal]
        changed = admin.set_legacy_sunset(data, pids, args.date)
    left = changed[0].days_left(ctx.now) if changed else 0
    when = ("ended now: password logins are refused from now on" if left < 0
            else f"password logins work until {args.date.isoformat()} ({left} day(s) left)")
    ctx.say(f"Sunset of {len(changed)} legacy login(s) set to {args.date.isoformat()}: {when}.")


def legacy_remove(ctx: Context, args: argparse.Namespace) -> None:
    with ctx.change("legacy.remove", scope=args.principal) as data:
        cred = admin.remove_legacy_login(data, args.principal)
    ctx.say(f"Removed the legacy login {cred.username!r} of {cred.principal}: its password no "
            f"longer logs in; the application needs an API key (keyrelay key create "
            f"{cred.principal}).")


def register(sub: Any) -> None:
    leg = group(sub, "legacy", "old password logins kept until a sunset (the password bridge)")
    command(leg, "list", legacy_list,
            "who still logs in with an old password: username, sunset, days left, last use",
            json=True)
    sunset = command(leg, "sunset", legacy_sunset,
                     "move the sunset of one principal's legacy login, or of all (--all); a "
                     "date in the past ends it at once")
    sunset.add_argument("principal", nargs="?", metavar="PRINCIPAL")
    sunset.add_argument("--all", action="store_true", help="every legacy login")
    sunset.add_argument("date", type=_day, metavar="YYYY-MM-DD")
    command(leg, "remove", legacy_remove,
            "end one principal's legacy password login at once").add_argument(
                "principal", metavar="PRINCIPAL")
