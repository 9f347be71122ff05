"""``keyrelay lockout``: the brute-force lock-outs keyrelay-policyd holds in memory, read and
lifted through its control socket (``policyd.control_listen``; keyrelay/control.py)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from .. import audit, control
from ..durations import format_duration
from ..output import dump_json, table, when
from .core import Context, command, group


def _socket(ctx: Context) -> str:
    return control.socket_path(ctx.config.policyd.control_listen, ctx.config_path)


def lockout_list(ctx: Context, args: argparse.Namespace) -> None:
    found = control.list_lockouts(_socket(ctx))
    if ctx.json:
        dump_json(ctx.out, [lockout.to_json() for lockout in found])
        return
    if not found:
        ctx.out.write("No address and no API key is locked out.\n")
        return
    now = datetime.now(UTC)
    rows = [
        [lockout.kind, lockout.subject, str(lockout.failures), when(lockout.since),
         when(lockout.until), _left(lockout.until, now),
         "-" if lockout.let_in_from is None else str(lockout.let_in_from)]
        for lockout in found
    ]
    table(ctx.out, ["KIND", "LOCKED OUT", "FAILURES", "SINCE", "UNTIL", "LEFT",
                    "STILL LET IN FROM"], rows)


def _left(until: datetime, now: datetime) -> str:
    seconds = max(1, round((until - now).total_seconds()))
    return format_duration(seconds)


def lockout_clear(ctx: Context, args: argparse.Namespace) -> None:
    if args.all:
        kind, subject, what = "all", "", "every address and API key"
    elif args.key is not None:
        kind, subject = "key", control.key_id(args.key)
        what = f"API key {subject}"
    else:
        kind, subject = "address", control.address(args.address)
        what = f"address {subject}"
    path = _socket(ctx)
    ctx.check_audit()
    lifted = control.clear(path, kind, subject)
    audit.record(ctx.config.logging.audit_log, ctx.now, "lockout.clear", kind=kind,
                 **({"subject": subject} if subject else {}), lifted=str(lifted))
    if lifted:
        ctx.say(f"Cleared {lifted} lock-out(s) of {what}, and forgot its failed logins; it "
                "may log in again at once.")
    else:
        ctx.say(f"No lock-out of {what} was in force; its failed logins are forgotten.")


def register(sub: Any) -> None:
    lockout = group(sub, "lockout",
                    "show and lift brute-force lock-outs held by keyrelay-policyd")
    command(lockout, "list", lockout_list,
            "list the addresses and API key ids locked out now (never a key)", json=True)
    clear = command(lockout, "clear", lockout_clear,
                    "lift a lock-out and forget the failed logins behind it")
    which = clear.add_mutually_exclusive_group(required=True)
    which.add_argument("--key", metavar="KEY_ID", help="an API key id (never the key)")
    which.add_argument("--address", metavar="IP",
                       help="a client address, or the IPv6 /64 that lockout list shows")
    which.add_argument("--all", action="store_true", help="every address and key id")
