"""``keyrelay suppression``: the recipients an account may no longer mail (hard bounces,
an admin's list, a SendGrid export), in Redis or the SQLite file beside the counters
(keyrelay/suppressions, docs/suppressions.md)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from .. import audit, names
from ..errors import KeyrelayError, UserError, printable
from ..output import dump_json, table
from ..suppressions import Suppression, SuppressionStore, make, open_suppressions
from ..suppressions import address as suppression_address
from ..suppressions.csvfile import parse, read_text, write, write_file
from .core import Context, command, group, path

_PAGE = 1000


def _account(ctx: Context, text: str, *, must_exist: bool) -> str:
    account = names.account_name(text)
    if must_exist and account not in ctx.read().accounts:
        raise UserError(f"no account {account}")
    return account


def _store(ctx: Context, *, writing: bool = True) -> SuppressionStore:
    """The store; a command that only reads or removes never creates the SQLite file."""
    return open_suppressions(ctx.config, create=writing)


def _since(created: int) -> str:
    return datetime.fromtimestamp(created, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _all(store: SuppressionStore, account: str) -> Iterator[Suppression]:
    after = ""
    while True:
        page = store.list(account, after, _PAGE)
        yield from page
        if len(page) < _PAGE:
            return
        after = page[-1].address


def suppression_list(ctx: Context, args: argparse.Namespace) -> None:
    account = _account(ctx, args.account, must_exist=False)
    store = _store(ctx, writing=False)
    try:
        found = store.list(account, "", args.limit)
        total = store.count(account) if len(found) == args.limit else len(found)
    finally:
        store.close()
    if ctx.json:
        dump_json(ctx.out, [each.to_json() for each in found])
        return
    if not found:
        ctx.out.write(f"Account {account} suppresses no address.\n")
        return
    table(ctx.out, ["ADDRESS", "SINCE", "SOURCE", "STATUS", "REASON"],
          [[each.address, _since(each.created), each.source, each.status or "-",
            each.reason or "-"] for each in found])
    if total > len(found):
        ctx.out.write(f"({len(found)} of {total}; --limit shows more, `keyrelay suppression "
                      f"export {account}` all of them)\n")


def suppression_add(ctx: Context, args: argparse.Namespace) -> None:
    account = _account(ctx, args.account, must_exist=True)
    suppression = make(args.address, args.reason, "", int(ctx.now.timestamp()), "manual")
    ctx.check_audit()
    store = _store(ctx)
    try:
        new = store.add(account, suppression, replace=True)
    finally:
        store.close()
    audit.record(ctx.config.logging.audit_log, ctx.now, "suppression.add", account=account,
                 address=suppression.address)
    if new:
        ctx.say(f"{suppression.address} is suppressed for account {account}: its mail to it "
                "is refused at RCPT (550 5.7.1).")
    else:
        ctx.say(f"{suppression.address} was already suppressed for account {account}; its "
                "reason is now the one given.")


def suppression_remove(ctx: Context, args: argparse.Namespace) -> None:
    account = _account(ctx, args.account, must_exist=False)
    address = suppression_address(args.address)
    ctx.check_audit()
    store = _store(ctx, writing=False)
    try:
        gone = store.remove(account, address)
    finally:
        store.close()
    audit.record(ctx.config.logging.audit_log, ctx.now, "suppression.remove", account=account,
                 address=address, removed=str(gone).lower())
    if gone:
        ctx.say(f"{address} is no longer suppressed for account {account}.")
    else:
        ctx.say(f"{address} was not suppressed for account {account}; nothing changed.")


def suppression_import(ctx: Context, args: argparse.Namespace) -> None:
    account = _account(ctx, args.account, must_exist=True)
    parsed = parse(read_text(args.file), int(ctx.now.timestamp()))
    shown = printable(args.file)
    for problem in parsed.problems:
        print(f"keyrelay: {shown}:{problem.line}: {problem.reason}", file=sys.stderr)
    new = 0
    if parsed.good:
        ctx.check_audit()
        store = _store(ctx)
        try:
            new = store.add_many(account, parsed.good)
        finally:
            store.close()
        audit.record(ctx.config.logging.audit_log, ctx.now, "suppression.import",
                     account=account, file=args.file, imported=str(len(parsed.good)),
                     new=str(new), bad_lines=str(len(parsed.problems)))
    ctx.say(f"Imported {len(parsed.good)} address(es) into the suppression list of account "
            f"{account} ({new} new, {len(parsed.good) - new} already there); "
            f"{len(parsed.problems)} bad line(s) skipped.")
    if parsed.problems:
        raise KeyrelayError(f"{len(parsed.problems)} line(s) of {shown} were not imported "
                            "(listed above); the others were")


def suppression_export(ctx: Context, args: argparse.Namespace) -> None:
    account = _account(ctx, args.account, must_exist=False)
    store = _store(ctx, writing=False)
    try:
        if args.file:
            rows = write_file(args.file, _all(store, account))
        else:
            rows = write(ctx.out, _all(store, account))
    finally:
        store.close()
    if args.file:
        ctx.say(f"Wrote {rows} suppression(s) of account {account} to {printable(args.file)}.")


def register(sub: Any) -> None:
    supp = group(sub, "suppression",
                 "manage the recipients an account may no longer mail (hard bounces)")
    listing = command(supp, "list", suppression_list,
                      "list an account's suppressed addresses, in address order", json=True)
    listing.add_argument("account", metavar="ACCOUNT")
    listing.add_argument("--limit", type=_limit, default=100, metavar="N",
                         help="show at most N addresses (default 100)")
    add = command(supp, "add", suppression_add,
                  "suppress an address for an account (mail to it is refused at RCPT)")
    add.add_argument("account", metavar="ACCOUNT")
    add.add_argument("address", metavar="ADDRESS")
    add.add_argument("--reason", default="added by an administrator", metavar="TEXT",
                     help="why (shown to the sender in the refusal)")
    remove = command(supp, "remove", suppression_remove,
                     "let an account mail a suppressed address again")
    remove.add_argument("account", metavar="ACCOUNT")
    remove.add_argument("address", metavar="ADDRESS")
    imp = command(supp, "import", suppression_import,
                  "add the addresses of a CSV in SendGrid's bounce-list layout "
                  "(email,created,status,reason)")
    imp.add_argument("account", metavar="ACCOUNT")
    imp.add_argument("file", type=path, metavar="FILE.csv")
    exp = command(supp, "export", suppression_export,
                  "write an account's list as CSV in SendGrid's bounce-list layout")
    exp.add_argument("account", metavar="ACCOUNT")
    exp.add_argument("file", type=path, nargs="?", metavar="FILE.csv",
                     help="the file to write (default: standard output)")


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError("N must be 1 to 1000000")
    return value



