"""``keyrelay key``: API keys, shown once at creation, stored only as hashes."""

from __future__ import annotations

import argparse
import re
from datetime import datetime, timedelta
from typing import Any

from .. import admin, audit
from ..directory.model import ApiKey
from ..durations import format_duration, parse_duration
from ..errors import UserError
from ..output import dump_json, table, when
from ..scopes import KNOWN_SCOPES
from .core import Context, command, group


def key_state(key: ApiKey, now: datetime) -> str:
    if key.revoked:
        return "revoked"
    if key.expires and key.expires <= now:
        return "expired"
    return "active"


def key_json(key: ApiKey, now: datetime) -> dict[str, Any]:
    return {
        "key_id": key.key_id,
        "principal": key.principal,
        "name": key.name,
        "scopes": list(key.scopes),
        "state": key_state(key, now),
        "created": when(key.created, ""),
        "expires": when(key.expires, "") or None,
        "revoked": when(key.revoked, "") or None,
        "last_used": when(key.last_used, "") or None,
    }


# the units of keyrelay/durations.py, as --expires names them
UNITS = "s (seconds), m (minutes), h (hours), d (days) or w (weeks)"
_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")


def expiry(ctx: Context, text: str | None) -> datetime | None:
    """``--expires`` (a duration with its unit such as 90d, or ``never``), bounded by
    keys.max_expiry. A bare number is refused: ``--expires 90`` meant 90 days, not the 90
    seconds a bare number is elsewhere."""
    limits = ctx.config.keys
    seconds: float | None
    if text is None:
        seconds = limits.default_expiry
    elif text == "never":
        seconds = None
    else:
        given = text.strip()
        if given.startswith("-"):
            raise UserError(f"--expires must be a positive duration such as 90d, got {given!r}: "
                            "a key cannot expire in the past")
        if _NUMBER.fullmatch(given) and float(given) != 0:  # 0: not positive, below
            raise UserError(f"--expires {given} has no unit: write it with one of {UNITS}, "
                            f"e.g. {given}d")
        try:
            seconds = parse_duration(given)
        except ValueError as exc:
            raise UserError(f"--expires: {exc}") from None
        if seconds <= 0:
            raise UserError("--expires must be a positive duration such as 90d")
    if limits.max_expiry is not None and (seconds is None or seconds > limits.max_expiry):
        raise UserError(
            f"keys may live at most {format_duration(limits.max_expiry)} (keys.max_expiry); "
            "choose a shorter --expires"
        )
    if seconds is None:
        return None
    try:
        return ctx.now + timedelta(seconds=seconds)
    except OverflowError:  # beyond the year 9999
        raise UserError("--expires is too far in the future; use --expires never for a key "
                        "that does not expire") from None


def key_create(ctx: Context, args: argparse.Namespace) -> None:
    scopes = tuple(args.scope or ctx.config.keys.default_scopes)
    expires = expiry(ctx, args.expires)
    ctx.check_audit()
    with ctx.directory.transaction() as data:
        new = admin.create_key(data, args.principal, args.name, scopes, expires, ctx.now)
        created = data.keys[new.key_id]
    audit.record(
        ctx.config.logging.audit_log, ctx.now, "key.create",
        principal=args.principal, key_id=new.key_id, scopes=" ".join(created.scopes),
    )
    if ctx.json:
        dump_json(ctx.out, {**key_json(created, ctx.now), "key": new.text,
                            "smtp_username": ctx.config.auth.username})
        return
    ctx.out.write(
        f"Created key {new.key_id} ({args.name!r}) for {args.principal}\n"
        f"scopes:   {' '.join(created.scopes)}\n"
        f"expires:  {when(created.expires, 'never')}\n"
        f"SMTP username: {ctx.config.auth.username}\n"
        f"SMTP password (the API key, shown only now; store it safely):\n"
        f"{new.text}\n"
    )


def key_list(ctx: Context, args: argparse.Namespace) -> None:
    data = ctx.read()
    if args.principal:
        admin.principal(data, args.principal)
    found = sorted(
        (k for k in data.keys.values() if not args.principal or k.principal == args.principal),
        key=lambda k: (k.principal, k.created, k.key_id),
    )
    if ctx.json:
        dump_json(ctx.out, [key_json(k, ctx.now) for k in found])
        return
    rows = [
        [k.key_id, k.principal, k.name, " ".join(k.scopes), key_state(k, ctx.now),
         when(k.expires, "never"), when(k.last_used, "never")]
        for k in found
    ]
    table(ctx.out, ["KEY ID", "PRINCIPAL", "NAME", "SCOPES", "STATE", "EXPIRES", "LAST USED"], rows)


def key_show(ctx: Context, args: argparse.Namespace) -> None:
    info = key_json(admin.key(ctx.read(), args.key_id), ctx.now)
    if ctx.json:
        dump_json(ctx.out, info)
        return
    for label in ("key_id", "principal", "name", "scopes", "state", "created", "expires",
                  "revoked", "last_used"):
        value = info[label]
        text = " ".join(value) if isinstance(value, list) else (value or "-")
        ctx.out.write(f"{label.replace('_', ' ') + ':':<11} {text}\n")


def key_revoke(ctx: Context, args: argparse.Namespace) -> None:
    with ctx.change("key.revoke", key_id=args.key_id) as data:
        key = admin.revoke_key(data, args.key_id, ctx.now)
    ctx.say(f"Revoked key {key.key_id} of {key.principal}; it is refused from the next login "
            "or message on.")


def key_set_scopes(ctx: Context, args: argparse.Namespace) -> None:
    with ctx.change("key.set-scopes", key_id=args.key_id, scopes=" ".join(args.scopes)) as data:
        key = admin.set_scopes(data, args.key_id, args.scopes)
    ctx.say(f"Key {key.key_id} now has scopes: {' '.join(key.scopes)}.")


def register(sub: Any) -> None:
    key = group(sub, "key", "manage API keys")
    create = command(key, "create", key_create,
                     "create an API key and print it once (only its hash is stored)", json=True)
    create.add_argument("principal", metavar="PRINCIPAL")
    create.add_argument("--name", required=True, help="what the key is for, e.g. 'crm-prod'")
    create.add_argument("--scope", action="append", metavar="SCOPE",
                        help=f"grant SCOPE, one of {', '.join(KNOWN_SCOPES)} (repeatable; "
                             "default: keys.default_scopes)")
    create.add_argument("--expires", metavar="DURATION",
                        help="lifetime with its unit such as 90d, 12w, 24h, or 'never' "
                             "(default: keys.default_expiry)")
    command(key, "list", key_list, "list keys (never their secrets)", json=True).add_argument(
        "principal", nargs="?", metavar="PRINCIPAL")
    command(key, "show", key_show, "show one key", json=True).add_argument(
        "key_id", metavar="KEY_ID")
    command(key, "revoke", key_revoke, "revoke a key: refused from the next login or message on"
            ).add_argument("key_id", metavar="KEY_ID")
    scopes = command(key, "set-scopes", key_set_scopes,
                     f"replace a key's scopes (known: {', '.join(KNOWN_SCOPES)})")
    scopes.add_argument("key_id", metavar="KEY_ID")
    scopes.add_argument("scopes", nargs="+", metavar="SCOPE")
