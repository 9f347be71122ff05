"""``keyrelay migrate postfix`` and ``keyrelay migrate sendgrid``: an existing set-up as a
``keyrelay sync`` declaration plus a Markdown report (keyrelay/migrate/, docs/migration.md).

They read the site and write two files; they need no keyrelay configuration and change
neither the directory nor the site.
"""

from __future__ import annotations

import argparse
import re
import shlex
from datetime import date
from typing import Any

from .. import names
from ..errors import UserError
from ..migrate import Plan, write_outputs
from ..migrate import postfix as postfix_import
from ..migrate import sendgrid as sendgrid_import
from ..migrate.plan import render_declaration, render_report, report_path
from .core import command, group, path


def _account(text: str) -> str:
    try:
        return names.account_name(text)
    except UserError as exc:
        raise UserError(f"--account: {exc}") from None


def _write(args: argparse.Namespace, plan: Plan, command_line: str) -> None:
    report = args.report or report_path(args.out)
    if report == args.out:
        raise UserError("--report must name another file than --out")
    write_outputs([(args.out, render_declaration(plan, command_line)),
                   (report, render_report(plan, command_line, args.out))], args.force)
    senders = sum(len(s.senders) for s in plan.subusers.values()) + len(plan.account_senders)
    print(f"Wrote {args.out}: account {plan.account}, {len(plan.subusers)} subuser(s), "
          f"{len(plan.domains)} domain(s), {senders} single sender(s); nothing was changed in "
          "the directory.")
    print(f"Wrote {report}: {len(plan.problems)} item(s) could not be mapped; read it, then "
          f"keyrelay sync --dry-run {args.out}")


def migrate_postfix(args: argparse.Namespace) -> None:
    account = _account(args.account)
    sunset = None
    if args.sunset is not None:
        try:
            if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", args.sunset):
                raise ValueError
            sunset = date.fromisoformat(args.sunset)
        except ValueError:
            raise UserError(f"--sunset {args.sunset!r}: expected a date YYYY-MM-DD") from None
    plan = postfix_import.build(args.config_dir, account, args.sasldb, args.dovecot_passwd,
                                sunset)
    _write(args, plan, _command_line("postfix", args))


def migrate_sendgrid(args: argparse.Namespace) -> None:
    plan = sendgrid_import.build(args.source, _account(args.account))
    _write(args, plan, _command_line("sendgrid", args))


def _command_line(kind: str, args: argparse.Namespace) -> str:
    """The command, for the files' headers (none of its options takes a secret)."""
    given = {"postfix": (("--config-dir", "config_dir"), ("--sasldb", "sasldb"),
                         ("--dovecot-passwd", "dovecot_passwd")),
             "sendgrid": (("--from", "source"),)}[kind]
    words = [f"{flag} {shlex.quote(getattr(args, attr))}" for flag, attr in given
             if getattr(args, attr)]
    words += [f"--account {args.account}", f"--out {shlex.quote(args.out)}"]
    if getattr(args, "sunset", None):
        words.append(f"--sunset {shlex.quote(args.sunset)}")
    return f"keyrelay migrate {kind} " + " ".join(words)


def _outputs(parser: Any) -> None:
    parser.add_argument("--out", required=True, metavar="FILE", type=path,
                        help="the declaration to write (YAML, for keyrelay sync)")
    parser.add_argument("--report", metavar="FILE", type=path,
                        help="the Markdown report (default: beside --out, e.g. "
                             "migrated.yaml -> migrated.report.md)")
    parser.add_argument("--force", action="store_true",
                        help="replace --out and --report if they exist")


def register(sub: Any) -> None:
    mig = group(sub, "migrate",
                "import an existing Postfix SASL set-up or a SendGrid account as a sync "
                "declaration and a report; changes nothing else")
    pfx = command(mig, "postfix", None,
                  "read a Postfix site (main.cf via postconf, smtpd_sender_login_maps, "
                  "sasldb2 / Dovecot passwd-file logins, permit_mynetworks clients) and write "
                  "a declaration (one subuser per login) and a report; with --sunset, each "
                  "login's password hash (never a plaintext password) goes into the "
                  "declaration")
    pfx.set_defaults(without_config=migrate_postfix)
    pfx.add_argument("--config-dir", required=True, metavar="DIR", type=path,
                     help="the site's Postfix configuration folder, e.g. /etc/postfix")
    pfx.add_argument("--sasldb", metavar="FILE", type=path,
                     help="the Cyrus sasldb2 file (e.g. /etc/sasldb2)")
    pfx.add_argument("--dovecot-passwd", metavar="FILE", type=path,
                     help="a Dovecot passwd-file holding the SMTP logins")
    pfx.add_argument("--account", required=True, metavar="NAME",
                     help="the keyrelay account the logins become subusers of")
    pfx.add_argument("--sunset", metavar="YYYY-MM-DD",
                     help="keep each login's old username and password (as a hash) until "
                          "this day, UTC (the password bridge); without it, no login keeps "
                          "a password")
    _outputs(pfx)
    sgd = command(mig, "sendgrid", None,
                  "read JSON files saved from the SendGrid v3 API (subusers, IP access "
                  "allow-list, authenticated domains, verified senders, API keys) and write a "
                  "declaration and a report listing the keys to create")
    sgd.set_defaults(without_config=migrate_sendgrid)
    sgd.add_argument("--from", dest="source", required=True, metavar="DIR", type=path,
                     help="the folder of saved API answers (docs/migration.md names the files)")
    sgd.add_argument("--account", default="sendgrid", metavar="NAME",
                     help="the keyrelay account for the SendGrid parent account "
                          "(default: sendgrid)")
    _outputs(sgd)
