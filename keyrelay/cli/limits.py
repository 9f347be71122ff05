"""``keyrelay limits``: per-principal sending limits and quotas, and how accounts and
subusers show them.

``limits set`` changes only the limits it is given (``inherit`` clears one); ``limits show``
prints the numbers the policy service applies, each with where it comes from (the subuser,
its account, or the configuration's default) and whom it caps (the subuser alone, or the
whole account with its subusers). Listings show the tightest of those numbers.

``limits set`` refuses a window's limit lowered below what has already been counted in it
(``check_usage``; docs/cli.md, "Limits"): the counts come from ``keyrelay.usagecounts``, as
``keyrelay usage`` reads them. A limit equal to the count is accepted (the next message
waits for the window). When the counts cannot be read the limits are set anyway, with a
warning: an admin lowering a limit in an emergency is not stopped by Redis or the daemon
being away.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from .. import admin
from ..decisions import EngineSettings, reset_text, windows_for
from ..directory.model import LIMIT_FIELDS, Directory, DirectoryData, Limits
from ..durations import format_duration
from ..errors import UserError
from ..limits import LIMIT_MAXIMA, LIMIT_WORDS, EffectiveLimit, effective_limits, tightest
from ..limits import check_effective_limits as check_effective
from ..output import dump_json, table
from ..usagecounts import Counted, Counts, UsageUnreadable, read_counts
from .core import Context, command, group, warn

INHERIT = "inherit"
# the options of `limits set`, by limit
OPTIONS = {
    "messages_per_minute": "--per-minute",
    "messages_per_hour": "--per-hour",
    "recipients_per_message": "--recipients",
    "messages_per_day": "--per-day",
    "messages_per_month": "--per-month",
}
_UNITS = {
    "messages_per_minute": "/min",
    "messages_per_hour": "/hour",
    "recipients_per_message": " rcpt/msg",
    "messages_per_day": "/day",
    "messages_per_month": "/month",
}


def limits_json(limits: Limits) -> dict[str, int | None]:
    """A principal's own limits (``None``: inherited), as the directory holds them."""
    return {name: getattr(limits, name) for name in LIMIT_FIELDS}


def effective_json(found: tuple[EffectiveLimit, ...]) -> dict[str, int | None]:
    """Each limit's tightest number (the one that refuses first; None: none set)."""
    return {name: (e.value if (e := tightest(found, name)) else None) for name in LIMIT_FIELDS}


def effective_text(found: tuple[EffectiveLimit, ...], pid: str | None = None) -> str:
    """``10/min, 20000/hour, 5 rcpt/msg, 1000/day``: each limit's tightest number (a quota
    nobody set is left out); with ``pid``, each followed by where it is set: ``(own)``,
    ``(account acme)``, ``(config default)``, and for a subuser's own window the account's
    number beside it: ``(own; account: 600/min)``."""
    parts = []
    for name in LIMIT_FIELDS:
        e = tightest(found, name)
        if e is None:
            continue
        text = f"{e.value}{_UNITS[name]}"
        if pid is not None:
            where = ("config default" if e.source == "config"
                     else "own" if e.origin == pid else f"{e.source} {e.origin}")
            if "/" in pid and e.source == "config" and e.scope == "account":
                where = f"account {pid.partition('/')[0]}, config default"
            wide = [o for o in found if o.name == name and o.scope == "account"
                    and o is not e and o.value is not None]
            if wide and e.scope == "subuser":
                where += f"; account: {wide[0].value}{_UNITS[name]}"
            text += f" ({where})"
        parts.append(text)
    return ", ".join(parts)


_CAPS = {"subuser": "{pid} alone", "account": "all of {account}", "message": "each message"}


def caps(e: EffectiveLimit, pid: str) -> str:
    """Whom a number caps: ``acme/app alone``, ``all of acme`` (the account with all its
    subusers together), ``each message``."""
    return _CAPS[e.scope].format(pid=pid, account=pid.partition("/")[0])


def limit_value(text: str) -> int | None:
    """A ``limits set`` option: a whole number, or ``inherit`` (``None``)."""
    if text == INHERIT:
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number or {INHERIT}, got {text!r}") from None


def limits_set(ctx: Context, args: argparse.Namespace) -> None:
    # an option not given leaves no attribute (argparse.SUPPRESS): that limit keeps its value
    changes = {name: getattr(args, name) for name in LIMIT_FIELDS if hasattr(args, name)}
    if not changes:
        raise UserError(
            "nothing to set: give --per-minute, --per-hour, --recipients, --per-day or "
            f"--per-month, each a number or {INHERIT} (see the limits in use: keyrelay limits "
            f"show {args.principal})")
    settings = EngineSettings.from_config(ctx.config)
    ctx.check_audit()  # refused first when the change could not be audited
    check_usage(ctx, settings, args.principal, changes)
    said = " ".join(f"{name}={INHERIT if v is None else v}" for name, v in changes.items())
    with ctx.change("limits.set", principal=args.principal, limits=said) as data:
        admin.change_limits(data, args.principal, changes)
        check_effective(data, settings, [args.principal])
        found = effective_limits(Directory(data), settings, args.principal)
    ctx.say(f"Limits of {args.principal}: {effective_text(found, args.principal)}.")


def check_usage(ctx: Context, settings: EngineSettings, pid: str,
                changes: dict[str, int | None]) -> None:
    """Refuse ``changes`` when they lower a window's limit below what is already counted in
    it (UserError naming the count, the window and when it resets); before the directory
    transaction, which is not held open while the counts are read. Only windows whose limit
    goes down are read: a raised limit is above a count that its old one held, and a window
    that had no limit was not counted. Counts that cannot be read: a warning, and on."""
    data = ctx.read()
    before = {(w.subject, w.span): w.limit for w in windows_for(Directory(data), settings, pid)}
    # the errors the transaction gives (unknown principal, bounds, contradictions) come first
    admin.change_limits(data, pid, changes)
    check_effective(data, settings, [pid])
    lowered = [w for w in windows_for(Directory(data), settings, pid)
               if w.limit < before.get((w.subject, w.span), 0)]
    if not lowered:
        return
    try:
        counts = read_counts(ctx.config, ctx.config_path, lowered)
    except UsageUnreadable as exc:
        warn(f"the new limits of {pid} were not compared with its current usage, which cannot "
             f"be read ({exc}); they are set anyway")
        return
    for counted in counts.windows:
        if counted.used > counted.window.limit:
            raise UserError(_below_usage(ctx, counted, counts))


_SO_FAR = {"minute": "in the last minute", "hour": "in the last hour", "day": "today",
           "month": "this month"}


def _below_usage(ctx: Context, counted: Counted, counts: Counts) -> str:
    window, used = counted.window, counted.used
    if window.calendar:
        resets = (f"the {window.span} resets at "
                  f"{reset_text(ctx.now, counted.resets_in, ctx.config.counters.time_zone)}")
        until = "the reset"
    else:
        resets = (f"the {window.span} slides: room for one more under {window.limit} in "
                  f"{format_duration(max(1, math.ceil(counted.resets_in)))}")
        until = f"the {window.span} slides"
    return (f"{window.owner()} has already sent {used} recipients {_SO_FAR[window.span]}, more "
            f"than the {window.limit} per {window.span} asked (counts from {counts.where}); "
            f"{resets}. Nothing changed: give at least {used} (the next message then waits "
            f"until {until}), or wait")


def limits_show(ctx: Context, args: argparse.Namespace) -> None:
    data = ctx.read()
    admin.principal(data, args.principal)
    found = listed(ctx, data)(args.principal)
    if ctx.json:
        def entry(e: EffectiveLimit) -> dict[str, Any]:
            return {"value": e.value, "source": e.source, "set_on": e.origin}

        tight = {name: tightest(found, name) for name in LIMIT_FIELDS}
        dump_json(ctx.out, {
            "principal": args.principal,
            # each limit's number that refuses first; a quota nobody set: value null
            "limits": {name: entry(e) if e else {"value": None, "source": "none",
                                                 "set_on": None}
                       for name, e in tight.items()},
            # every number that caps the principal, and whom it caps: the subuser alone
            # ("subuser"), the whole account ("account"), or each message ("message")
            "windows": [{"limit": e.name, **entry(e), "caps": e.scope} for e in found],
        })
        return
    table(ctx.out, ["LIMIT", "VALUE", "FROM", "CAPS"],
          [[LIMIT_WORDS[e.name], "none" if e.value is None else str(e.value), e.text(),
            caps(e, args.principal)] for e in found])


Effective = Callable[[str], tuple[EffectiveLimit, ...]]


def listed(ctx: Context, data: DirectoryData) -> Effective:
    """A function giving each principal's effective limits, with one snapshot for a whole
    listing."""
    snapshot, settings = Directory(data), EngineSettings.from_config(ctx.config)
    return lambda pid: effective_limits(snapshot, settings, pid)


def register(sub: Any) -> None:
    lim = group(sub, "limits", "show and set per-principal sending limits")
    lset = command(lim, "set", limits_set,
                   "change a principal's limits and quotas (counted in recipients); the "
                   "limits not given keep their values (an account's cap it and its subusers "
                   f"together; {INHERIT}: none of its own)")
    lset.add_argument("principal", metavar="PRINCIPAL")
    for name, option in OPTIONS.items():
        lset.add_argument(option, dest=name, type=limit_value, default=argparse.SUPPRESS,
                          metavar="N",
                          help=f"{LIMIT_WORDS[name]}: 1 to {LIMIT_MAXIMA[name]}, or {INHERIT}")
    command(lim, "show", limits_show,
            "show the limits and quotas a principal sends under, where each is set "
            "(subuser, account or configuration) and whom it caps", json=True).add_argument(
                "principal", metavar="PRINCIPAL")
