"""``keyrelay postfix``: keyrelay's settings merged into a Postfix configuration."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .. import audit, postfixconf
from .core import Context, command, group, path


def _postfix_plan(
    ctx: Context, config_dir: str | None
) -> tuple[postfixconf.Plan, postfixconf.Current | None]:
    pools = list(ctx.read().pools.values())
    if config_dir is None:
        return postfixconf.build_plan(ctx.config, pools, postfixconf.fresh_postfix()), None
    current = postfixconf.read_current(Path(config_dir))
    return postfixconf.build_plan(ctx.config, pools, current), current


def _notes(plan: postfixconf.Plan) -> None:
    for note in plan.notes:
        print(f"keyrelay: note: {note}", file=sys.stderr)


def postfix_show(ctx: Context, args: argparse.Namespace) -> None:
    plan, current = _postfix_plan(ctx, args.config_dir)
    ctx.out.write("# main.cf\n" + postfixconf.render_main(plan) + "\n# master.cf\n"
                  + postfixconf.render_master(plan, current))
    _notes(plan)


def postfix_apply(ctx: Context, args: argparse.Namespace) -> None:
    config_dir = Path(args.config_dir)
    plan, current = _postfix_plan(ctx, args.config_dir)
    assert current is not None
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
    ctx.say(f"{config_dir}: made {len(todo)} change(s); postfix check passed.")
    for change in todo:
        ctx.say(f"  {change.text}")
    if warnings:
        ctx.say("postfix check said:\n" + warnings)
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
                   "--config-dir, merged with that configuration as apply would write them")
    show.add_argument("--config-dir", metavar="DIR", type=path,
                      help="an existing Postfix configuration directory, e.g. /etc/postfix")
    papply = command(pfx, "apply", postfix_apply,
                     "write keyrelay's settings into an existing Postfix configuration with "
                     "postconf (idempotent; unrelated settings are kept), then run postfix check")
    papply.add_argument("--config-dir", metavar="DIR", required=True, type=path,
                        help="the Postfix configuration directory, e.g. /etc/postfix")
    papply.add_argument("--dry-run", action="store_true",
                        help="print the changes without making them")
    papply.add_argument("--reload", action="store_true",
                        help="run postfix reload afterwards when Postfix is running")
