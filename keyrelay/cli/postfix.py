"""``keyrelay postfix``: keyrelay's settings merged into a Postfix configuration."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .. import audit, postfixconf
from ..errors import UserError
from ..output import dump_json
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


def plan_json(plan: postfixconf.Plan, current: postfixconf.Current | None) -> dict[str, Any]:
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
            "notes": plan.notes}


def postfix_show(ctx: Context, args: argparse.Namespace) -> None:
    plan, current = _postfix_plan(ctx, Path(args.config_dir) if args.config_dir else None)
    if ctx.json:
        dump_json(ctx.out, plan_json(plan, current))
        return
    ctx.out.write("# main.cf\n" + postfixconf.render_main(plan) + "\n# master.cf\n"
                  + postfixconf.render_master(plan, current))
    _notes(plan)


def postfix_apply(ctx: Context, args: argparse.Namespace) -> None:
    chosen = args.config_dir or ctx.config.postfix.config_dir
    if not chosen:
        raise UserError("give --config-dir DIR: postfix.config_dir is empty in the keyrelay "
                        "configuration")
    config_dir = Path(chosen)
    plan, current = _postfix_plan(ctx, config_dir)
    assert current is not None
    postfixconf.check_certificates(plan, current)
    todo = postfixconf.changes(plan, current)
    if not todo:
        ctx.say(f"{config_dir}: keyrelay's Postfix settings are already in place; "
                "nothing changed.")
        _notes(plan)
        return
    if args.dry_run:
        ctx.say(f"{config_dir}: would make {len(todo)} change(s):")
        for change in todo:
            ctx.say(f"  {change.text}")
        _notes(plan)
        return
    ctx.check_audit()  # a change must not happen unaudited
    warnings = postfixconf.apply(config_dir, todo)
    _notes(plan)
    ctx.say(f"{config_dir}: made {len(todo)} change(s); postfix check passed before and "
            "after them.")
    for change in todo:
        ctx.say(f"  {change.text}")
    if warnings:
        ctx.say("postfix check said after the changes:\n" + warnings)
    audit.record(ctx.config.logging.audit_log, ctx.now, "postfix.apply",
                 config_dir=str(config_dir), changes=str(len(todo)))
    if args.reload:
        ctx.say(postfixconf.reload(config_dir))
    else:
        ctx.say(f"Run `postfix -c {config_dir} reload` (or add --reload) to use them.")


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
                     "TLS certificate files and running postfix check before and after")
    papply.add_argument("--config-dir", metavar="DIR", type=path,
                        help="the Postfix configuration directory (default: postfix.config_dir "
                        "of the keyrelay configuration, /etc/postfix)")
    papply.add_argument("--dry-run", action="store_true",
                        help="print the changes without making them")
    papply.add_argument("--reload", action="store_true",
                        help="run postfix reload afterwards when Postfix is running")
