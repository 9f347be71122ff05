"""``keyrelay limits``: per-principal sending limits (and how accounts and subusers show them)."""

from __future__ import annotations

import argparse
from typing import Any

from .. import admin
from ..directory.model import Limits
from ..errors import UserError
from .core import Context, command, group


def limits_json(limits: Limits) -> dict[str, int | None]:
    return {
        "messages_per_minute": limits.messages_per_minute,
        "messages_per_hour": limits.messages_per_hour,
        "recipients_per_message": limits.recipients_per_message,
    }


def limits_text(limits: Limits) -> str:
    parts = [
        f"{limits.messages_per_minute}/min" if limits.messages_per_minute else "",
        f"{limits.messages_per_hour}/hour" if limits.messages_per_hour else "",
        f"{limits.recipients_per_message} rcpt/msg" if limits.recipients_per_message else "",
    ]
    return ", ".join(p for p in parts if p) or "defaults"


def limits_set(ctx: Context, args: argparse.Namespace) -> None:
    def value(number: int | None) -> int | None:
        if number is not None and number < 0:
            raise UserError("limits are positive numbers (0 means: inherit)")
        return number or None

    limits = Limits(value(args.per_minute), value(args.per_hour), value(args.recipients))
    with ctx.change("limits.set", principal=args.principal, limits=limits_text(limits)) as data:
        admin.set_limits(data, args.principal, limits)
    ctx.say(f"Limits of {args.principal}: {limits_text(limits)}.")


def register(sub: Any) -> None:
    lim = group(sub, "limits", "set per-principal sending limits")
    lset = command(lim, "set", limits_set,
                   "set limits (omitted or 0: inherit from account/config)")
    lset.add_argument("principal", metavar="PRINCIPAL")
    lset.add_argument("--per-minute", type=int, metavar="N", help="messages per minute")
    lset.add_argument("--per-hour", type=int, metavar="N", help="messages per hour")
    lset.add_argument("--recipients", type=int, metavar="N", help="recipients per message")
