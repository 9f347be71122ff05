"""``keyrelay postfix``: keyrelay's settings merged into a Postfix configuration."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .. import audit, postfixconf, postfixsasl
from ..errors import UserError
from ..output import dump_json
from ..usage import error_line
from .core import Context, command, group, path


def _postfix_plan(
    ctx: Context, config_dir: Path | None
) -> tuple[postfixconf.Plan, postfixconf.Current | None]:
    pools = list(ctx.read().pools.values())
    if config_dir is None:
        return postfixconf.build_plan(ctx.config, pools, postfixconf.fresh_postfix()), None
    current = postfixconf.read_current(config_dir)
    return postfixconf.build_plan(ctx.config, pools, current), current


def _notes(plan: postfixconf.Plan) -> None:
    for note in plan.notes:
        print(f"keyrelay: note: {note}", file=sys.stderr)


def _conflicts(ctx: Context, plan: postfixconf.Plan,
               current: postfixconf.Current | None) -> list[postfixsasl.Conflict]:
    if current is None:
        return []
    return postfixsasl.find(ctx.config, plan.main, current)


def plan_json(plan: postfixconf.Plan, current: postfixconf.Current | None,
              conflicts: list[postfixsasl.Conflict] | None = None) -> dict[str, Any]:
    """What ``postfix show`` prints, as data: main.cf parameters, master.cf services."""
    services = []
    for spec in plan.services:
        existing = current is not None and spec.key in current.services
        services.append({
            "service": spec.name, "type": spec.type, "command": spec.command,
            "exists": existing,
            "entry": postfixconf.entry_line(spec, current),
            "settings": dict(spec.settings), "remove": list(spec.remove),
        })
    return {"main": dict(plan.main), "master": services, "drop_services": plan.drop_services,
            "notes": plan.notes,
            "conflicts": [conflict.line() for conflict in conflicts or []]}


def postfix_show(ctx: Context, args: argparse.Namespace) -> None:
    plan, current = _postfix_plan(ctx, Path(args.config_dir) if args.config_dir else None)
    if current is not None:
        plan = postfixsasl.coexist(ctx.config, plan, current)[0]
    conflicts = _conflicts(ctx, plan, current)
    if ctx.json:
        dump_json(ctx.out, plan_json(plan, current, conflicts))
        return
    ctx.out.write("# main.cf\n" + postfixconf.render_main(plan) + "\n# master.cf\n"
                  + postfixconf.render_master(plan, current))
    _notes(plan)
    for conflict in conflicts:
        print(f"keyrelay: conflict: {error_line(conflict.line())}", file=sys.stderr)


def postfix_apply(ctx: Context, args: argparse.Namespace) -> None:
    chosen = args.config_dir or ctx.config.postfix.config_dir
    if not chosen:
        raise UserError("give --config-dir DIR: postfix.config_dir is empty in the keyrelay "
                        "configuration")
    config_dir = Path(chosen)
    plan, current = _postfix_plan(ctx, config_dir)
    assert current is not None
    plan, kept = postfixsasl.coexist(ctx.config, plan, current)
    conflicts = _conflicts(ctx, plan, current)
    replaced: list[str] = []
    if conflicts and not args.replace_site_sasl:
        for conflict in conflicts:
            print(f"keyrelay: error: {error_line(conflict.line())}", file=sys.stderr)
        raise postfixconf.PostfixConfError(
            f"{config_dir}: {len(conflicts)} setting(s) of the site's own SASL set-up on "
            f"services keyrelay takes over (above); nothing was changed")
    if conflicts:
        plan, replaced = postfixsasl.take_over(ctx.config, plan, current, conflicts)
    postfixconf.check_certificates(plan, current)
    todo = postfixconf.changes(plan, current)
    if kept:
        ctx.say("auth.site_auth_socket: the site's own logins and sender rules stay beside "
                "keyrelay's on the services keyrelay takes over (docs/coexistence.md):")
        for line in kept:
            ctx.say(f"  {line}")
    if not todo:
        ctx.say(f"{config_dir}: keyrelay's Postfix settings are already in place; "
                "nothing changed.")
        _notes(plan)
        return
    if args.dry_run:
        ctx.say(f"{config_dir}: would make {len(todo)} change(s):")
        for change in todo:
            ctx.say(f"  {change.text}")
        _replaced(ctx, replaced, "would replace")
        _notes(plan)
        return
    ctx.check_audit()  # a change must not happen unaudited
    warnings = postfixconf.apply(config_dir, todo)
    _notes(plan)
    ctx.say(f"{config_dir}: made {len(todo)} change(s); postfix check passed before and "
            "after them.")
    for change in todo:
        ctx.say(f"  {change.text}")
    _replaced(ctx, replaced, "replaced")
    if warnings:
        ctx.say("postfix check said after the changes:\n" + warnings)
    audit.record(ctx.config.logging.audit_log, ctx.now, "postfix.apply",
                 config_dir=str(config_dir), changes=str(len(todo)),
                 **({"replaced_site_sasl": str(len(replaced))} if replaced else {}))
    if args.reload:
        ctx.say(postfixconf.reload(config_dir))
    else:
        ctx.say(f"Run `postfix -c {config_dir} reload` (or add --reload) to use them.")


def _replaced(ctx: Context, replaced: list[str], verb: str) -> None:
    if replaced:
        ctx.say(f"{postfixsasl.FLAG}: {verb} the site's own SASL settings on the services "
                "keyrelay takes over (its other services and main.cf keep theirs):")
        for line in replaced:
            ctx.say(f"  {line}")


def register(sub: Any) -> None:
    pfx = group(sub, "postfix", "merge keyrelay's settings into a Postfix configuration")
    show = command(pfx, "show", postfix_show,
                   "print keyrelay's main.cf parameters and master.cf services; with "
                   "--config-dir, merged with that configuration as apply would write them",
                   json=True)
    show.add_argument("--config-dir", metavar="DIR", type=path,
                      help="an existing Postfix configuration directory, e.g. /etc/postfix")
    papply = command(pfx, "apply", postfix_apply,
                     "write keyrelay's settings into an existing Postfix configuration with "
                     "postconf (idempotent; unrelated settings are kept), after checking its "
                     "TLS certificate files and running postfix check before and after; a "
                     "site's own SASL set-up on a service keyrelay takes over is refused "
                     "unless --replace-site-sasl")
    papply.add_argument("--config-dir", metavar="DIR", type=path,
                        help="the Postfix configuration directory (default: postfix.config_dir "
                        "of the keyrelay configuration, /etc/postfix)")
    papply.add_argument("--dry-run", action="store_true",
                        help="print the changes without making them")
    papply.add_argument("--reload", action="store_true",
                        help="run postfix reload afterwards when Postfix is running")
    papply.add_argument(postfixsasl.FLAG, action="store_true",
                        help="on the services keyrelay takes over, replace the site's own SASL "
                        "login (smtpd_sasl_path), sender-login map and "
                        "reject_*sender_login_mismatch restrictions, which apply otherwise "
                        "refuses; the report names each (passing the site's logins on to its "
                        "Dovecot is planned, not built yet)")
