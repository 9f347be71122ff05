"""``keyrelay domain verify`` and ``domain check``: a domain's DNS records checked
(``keyrelay.domaincheck``), the result recorded and printed."""

from __future__ import annotations

import argparse
import sys
from functools import partial
from typing import Any

from .. import admin, domaincheck, names
from ..directory.model import Domain, DomainState
from ..errors import DirectoryUnavailable, NotFound, UserError
from ..output import dump_json, table, when
from .core import Context, command, retrying_conflicts


def _check(ctx: Context, name: str) -> domaincheck.Checked:
    return domaincheck.check_and_record(ctx.config, ctx.directory, name, ctx.now)


def _report_json(report: domaincheck.Report, dom: Domain) -> dict[str, Any]:
    return {
        "domain": report.domain, "outcome": str(report.outcome), "state": str(dom.state),
        "failed_checks": dom.failed_checks, "verified_at": when(dom.verified_at, "") or None,
        "checks": [{"check": c.kind, "name": c.subject, "result": str(c.status),
                    "required": c.required, "expected": c.expected, "found": c.found,
                    "advice": c.advice} for c in report.checks],
    }


def _print_report(ctx: Context, report: domaincheck.Report) -> None:
    rows = []
    for c in report.checks:
        what = c.kind.upper() + ("" if c.required else f" ({c.selector_state})"
                                 if c.selector_state else " (advice)")
        rows.append([what, c.subject, str(c.status), c.found])
    table(ctx.out, ["CHECK", "NAME", "RESULT", "FOUND"], rows)
    advice = [f"- {c.subject}: {c.advice}" for c in report.checks
              if c.advice and c.status is not domaincheck.CheckStatus.PASS]
    advice += [f"- {c.subject}: {c.advice}" for c in report.checks
               if c.advice and c.status is domaincheck.CheckStatus.PASS]
    if advice:
        ctx.out.write("\nTo do:\n" + "\n".join(advice) + "\n")


def _state_text(checked: domaincheck.Checked) -> str:
    before, after = checked.before, checked.after
    if after is None:
        return f"could not check; still {before.state}"
    text = (f"{before.state} -> {after.state}" if after.state is not before.state
            else f"{after.state} (unchanged)")
    if admin.is_hand_verified(after):
        text = f"{after.state} by hand (unchanged: a failed DNS check does not count)"
    if after.failed_checks:
        last = when(after.verified_at, "never")
        text += f"; {after.failed_checks} failed check(s) in a row, last success {last}"
    active = " ".join(s.name for s in after.signing_selectors())
    return text + (f"; active selectors {active}" if active else "")


def domain_verify(ctx: Context, args: argparse.Namespace) -> None:
    ctx.check_audit()  # the result is recorded: not without its audit line
    checked = _check(ctx, args.domain)  # run again by run_handler on a conflict
    report, dom = checked.report, checked.after or checked.before
    if ctx.json:
        dump_json(ctx.out, _report_json(report, dom))
    else:
        _print_report(ctx, report)
        ctx.out.write(f"\n{dom.name}: {_state_text(checked)}\n")
    if report.outcome is domaincheck.CheckOutcome.UNKNOWN:
        raise DirectoryUnavailable(
            f"{dom.name}: DNS could not be checked (see the results above); its state "
            f"({dom.state}) is unchanged: try again later")
    if report.outcome is not domaincheck.CheckOutcome.PASSED:
        still = " (it may still send: see failing in docs/domains.md)" if dom.state in (
            DomainState.VERIFIED, DomainState.FAILING) else ""
        if admin.is_hand_verified(dom):
            still = (" (it stays verified by hand and sends; DNS checks take over once one "
                     "passes)")
        raise UserError(f"{dom.name} did not pass{still}: fix what failed above, then run "
                        f"keyrelay domain verify {dom.name} again")


def domain_check(ctx: Context, args: argparse.Namespace) -> None:
    ctx.check_audit()  # the results are recorded: not without their audit lines
    data = ctx.read()
    wanted = sorted(data.domains) if args.all else [names.domain(d) for d in args.domains]
    if not wanted:
        raise UserError("name the domains to check, or --all")
    unknown = []
    results: list[dict[str, Any] | None] = []
    for name in wanted:
        if args.all and admin.is_hand_verified(data.domains[name]):
            ctx.say(f"{name}: verified by hand, not checked (keyrelay domain verify {name} "
                    "checks it; once a check passes, DNS decides)")
            results.append({"domain": name, "outcome": "not checked", "state": "verified",
                            "verified_by": "manual", "checks": []})
            continue
        try:
            # each domain retried on its own: running the whole command again would count
            # the domains already recorded twice
            checked = retrying_conflicts(partial(_check, ctx, name))
        except NotFound:
            if not args.all:
                raise
            ctx.say(f"{name}: removed while the others were checked")
            continue
        report, before, after = checked.report, checked.before, checked.after
        if after is None:
            unknown.append(name)
        results.append(_report_json(report, after or before) if ctx.json else None)
        line = f"{name}: {_state_text(checked)}"
        failed = [c.subject for c in report.checks
                  if c.required and c.status is not domaincheck.CheckStatus.PASS]
        if failed:
            line += f" ({', '.join(failed)}: {report.outcome})"
        if not ctx.json:
            ctx.out.write(line + "\n")
        if after is not None and after.state is not before.state:
            print(f"keyrelay: {line}", file=sys.stderr)  # state changes reach the journal
    if ctx.json:
        dump_json(ctx.out, results)
    if unknown:
        raise DirectoryUnavailable(f"DNS could not be checked for {', '.join(unknown)}; their "
                                   "states are unchanged: the next run tries again")


def register(dom: Any) -> None:
    """The two actions of ``keyrelay domain`` (``dom``) that ask DNS."""
    command(dom, "verify", domain_verify,
            "check the domain's DKIM, SPF and DMARC records over DNS and record the result "
            "(exit 0 only when every required check passed)", json=True).add_argument(
                "domain", metavar="DOMAIN")
    check = command(dom, "check", domain_check,
                    "re-check domains over DNS (for a timer): verified ones that fail "
                    "domains.fail_after times in a row become failing", json=True)
    check.add_argument("domains", nargs="*", metavar="DOMAIN")
    check.add_argument("--all", action="store_true", help="every domain in the directory")
