"""``keyrelay``: the admin command line for accounts, subusers, keys, domains, senders and pools.

Exit codes: 0 done, 1 refused or failed (one line on stderr says why), 2 usage error.
Every change is written atomically to the directory and appended to the audit log.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO, TypeVar

from . import __version__, admin, audit, declare, dkimkeys, domaincheck, names, postfixconf
from .config import Config, load_config, render_example, resolve_config_path
from .directory import DirectoryBackend, YamlDirectory, open_directory
from .directory.model import (
    Account,
    ApiKey,
    DirectoryData,
    Domain,
    DomainState,
    Limits,
    Pool,
    SelectorState,
    Status,
    Subuser,
)
from .directory.yamlfile import render as render_directory
from .durations import format_duration, parse_duration
from .errors import (
    ConfigError,
    DirectoryConflict,
    DirectoryUnavailable,
    KeyrelayError,
    NotFound,
    UserError,
    one_line,
)
from .output import dump_json, table, when
from .usage import ArgumentParser, echo_undecodable_arguments

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# a command whose LDAP transaction met another writer's runs again, after a jittered pause
# that doubles each time (from 0.05 s up to 2 s), until CONFLICT_SECONDS have passed: many
# writers at once on a slow machine all get through, whatever their number (a fixed count of
# attempts gave up after ~6 s)
CONFLICT_SECONDS = 60.0
T = TypeVar("T")


@dataclass
class Context:
    config: Config
    config_path: str
    directory: DirectoryBackend
    now: datetime
    out: TextIO
    json: bool

    def read(self) -> DirectoryData:
        """A fresh read for listings; a directory not created yet (no file, an LDAP base
        without keyrelay's entries) is an empty directory."""
        return self.directory.load(missing_ok=True)

    @contextmanager
    def change(self, action: str, **details: str) -> Iterator[DirectoryData]:
        """A directory transaction, audited once it has been written."""
        with self.directory.transaction() as data:
            yield data
        audit.record(self.config.logging.audit_log, self.now, action, **details)

    def say(self, text: str) -> None:
        if not self.json:
            self.out.write(text + "\n")


Handler = Callable[[Context, argparse.Namespace], None]


# -- accounts --------------------------------------------------------------------------------
def _account_json(data: DirectoryData, acc: Account) -> dict[str, Any]:
    return {
        "name": acc.name,
        "status": str(acc.status),
        "monitor": acc.monitor,
        "pool": acc.pool,
        "ip_allow": [str(n) for n in acc.ip_allow],
        "limits": _limits_json(acc.limits),
        "created": when(acc.created, ""),
        "subusers": sorted(s.name for s in data.subusers.values() if s.account == acc.name),
        # keys not revoked, as the KEYS column of the text listing counts them
        "keys": sum(1 for k in data.keys.values() if k.account == acc.name and not k.revoked),
        "domains": sorted(d.name for d in data.domains.values() if d.owner == acc.name),
    }


def _limits_json(limits: Limits) -> dict[str, int | None]:
    return {
        "messages_per_minute": limits.messages_per_minute,
        "messages_per_hour": limits.messages_per_hour,
        "recipients_per_message": limits.recipients_per_message,
    }


def account_add(ctx: Context, args: argparse.Namespace) -> None:
    with ctx.change("account.add", account=args.name) as data:
        admin.add_account(data, args.name, ctx.now)
    ctx.say(f"Added account {args.name}.")


def account_list(ctx: Context, args: argparse.Namespace) -> None:
    data = ctx.read()
    accounts = sorted(data.accounts.values(), key=lambda a: a.name)
    if ctx.json:
        dump_json(ctx.out, [_account_json(data, a) for a in accounts])
        return
    rows = [
        [
            a.name,
            str(a.status),
            "on" if a.monitor else "off",
            a.pool or "-",
            str(len([s for s in data.subusers.values() if s.account == a.name])),
            str(sum(1 for k in data.keys.values() if k.account == a.name and not k.revoked)),
            str(len([d for d in data.domains.values() if d.owner == a.name])),
        ]
        for a in accounts
    ]
    table(ctx.out, ["ACCOUNT", "STATUS", "MONITOR", "POOL", "SUBUSERS", "KEYS", "DOMAINS"], rows)


def account_show(ctx: Context, args: argparse.Namespace) -> None:
    data = ctx.read()
    info = _account_json(data, admin.account(data, args.name))
    if ctx.json:
        dump_json(ctx.out, info)
        return
    for label, value in [
        ("account", info["name"]),
        ("status", info["status"]),
        ("monitor", "on" if info["monitor"] else "off"),
        ("pool", info["pool"] or "-"),
        ("ip allow", ", ".join(info["ip_allow"]) or "any address"),
        ("limits", _limits_text(data.accounts[args.name].limits)),
        ("subusers", ", ".join(info["subusers"]) or "-"),
        ("keys", str(info["keys"])),
        ("domains", ", ".join(info["domains"]) or "-"),
        ("created", info["created"] or "-"),
    ]:
        ctx.out.write(f"{label + ':':<10} {value}\n")


def _limits_text(limits: Limits) -> str:
    parts = [
        f"{limits.messages_per_minute}/min" if limits.messages_per_minute else "",
        f"{limits.messages_per_hour}/hour" if limits.messages_per_hour else "",
        f"{limits.recipients_per_message} rcpt/msg" if limits.recipients_per_message else "",
    ]
    return ", ".join(p for p in parts if p) or "defaults"


def _status_setter(status: Status, verb: str, *, subuser: bool) -> Handler:
    def handler(ctx: Context, args: argparse.Namespace) -> None:
        # `subuser suspend acme` must not silently suspend the whole account (nor the reverse)
        if subuser and "/" not in args.name:
            raise UserError(f"expected ACCOUNT/SUBUSER, got {args.name!r} "
                            f"(to {verb} an account: keyrelay account {verb} {args.name})")
        if not subuser and "/" in args.name:
            raise UserError(f"expected an account name, got {args.name!r} "
                            f"(to {verb} a subuser: keyrelay subuser {verb} {args.name})")
        with ctx.change(f"principal.{verb}", principal=args.name) as data:
            admin.set_status(data, args.name, status)
        ctx.say(f"{args.name} is {status}.")

    return handler


def account_remove(ctx: Context, args: argparse.Namespace) -> None:
    with ctx.change("account.remove", account=args.name) as data:
        admin.remove_account(data, args.name)
    ctx.say(f"Removed account {args.name} with its subusers, keys and senders.")


# -- subusers --------------------------------------------------------------------------------
def subuser_add(ctx: Context, args: argparse.Namespace) -> None:
    with ctx.change("subuser.add", principal=args.name) as data:
        admin.add_subuser(data, args.name, ctx.now)
    ctx.say(f"Added subuser {args.name}.")


def _subuser_json(data: DirectoryData, sub: Subuser) -> dict[str, Any]:
    return {
        "principal": sub.principal,
        "account": sub.account,
        "name": sub.name,
        "status": str(sub.status),
        "pool": sub.pool,
        "limits": _limits_json(sub.limits),
        "created": when(sub.created, ""),
        "keys": sum(
            1 for k in data.keys.values() if k.principal == sub.principal and not k.revoked
        ),
    }


def subuser_list(ctx: Context, args: argparse.Namespace) -> None:
    data = ctx.read()
    admin.account(data, args.account)
    subs = sorted(
        (s for s in data.subusers.values() if s.account == args.account), key=lambda s: s.name
    )
    if ctx.json:
        dump_json(ctx.out, [_subuser_json(data, s) for s in subs])
        return
    rows = [
        [s.principal, str(s.status), s.pool or "-", _limits_text(s.limits),
         str(sum(1 for k in data.keys.values() if k.principal == s.principal and not k.revoked))]
        for s in subs
    ]
    table(ctx.out, ["SUBUSER", "STATUS", "POOL", "LIMITS", "KEYS"], rows)


def subuser_remove(ctx: Context, args: argparse.Namespace) -> None:
    with ctx.change("subuser.remove", principal=args.name) as data:
        admin.remove_subuser(data, args.name)
    ctx.say(f"Removed subuser {args.name} with its keys and senders.")


# -- keys ------------------------------------------------------------------------------------
def _key_state(key: ApiKey, now: datetime) -> str:
    if key.revoked:
        return "revoked"
    if key.expires and key.expires <= now:
        return "expired"
    return "active"


def _key_json(key: ApiKey, now: datetime) -> dict[str, Any]:
    return {
        "key_id": key.key_id,
        "principal": key.principal,
        "name": key.name,
        "scopes": list(key.scopes),
        "state": _key_state(key, now),
        "created": when(key.created, ""),
        "expires": when(key.expires, "") or None,
        "revoked": when(key.revoked, "") or None,
        "last_used": when(key.last_used, "") or None,
    }


def _expiry(ctx: Context, text: str | None) -> datetime | None:
    """``--expires`` (a duration such as 90d, or ``never``), bounded by keys.max_expiry."""
    limits = ctx.config.keys
    seconds: float | None
    if text is None:
        seconds = limits.default_expiry
    elif text == "never":
        seconds = None
    else:
        try:
            seconds = parse_duration(text)
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
    expires = _expiry(ctx, args.expires)
    with ctx.directory.transaction() as data:
        new = admin.create_key(data, args.principal, args.name, scopes, expires, ctx.now)
        created = data.keys[new.key_id]
    audit.record(
        ctx.config.logging.audit_log, ctx.now, "key.create",
        principal=args.principal, key_id=new.key_id, scopes=" ".join(created.scopes),
    )
    if ctx.json:
        dump_json(ctx.out, {**_key_json(created, ctx.now), "key": new.text,
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
        dump_json(ctx.out, [_key_json(k, ctx.now) for k in found])
        return
    rows = [
        [k.key_id, k.principal, k.name, " ".join(k.scopes), _key_state(k, ctx.now),
         when(k.expires, "never"), when(k.last_used, "never")]
        for k in found
    ]
    table(ctx.out, ["KEY ID", "PRINCIPAL", "NAME", "SCOPES", "STATE", "EXPIRES", "LAST USED"], rows)


def key_show(ctx: Context, args: argparse.Namespace) -> None:
    info = _key_json(admin.key(ctx.read(), args.key_id), ctx.now)
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


# -- IP access rules -------------------------------------------------------------------------
def ip_allow(ctx: Context, args: argparse.Namespace) -> None:
    with ctx.change("ip.allow", account=args.account, cidr=args.cidr) as data:
        acc = admin.ip_allow(data, args.account, args.cidr)
    ctx.say(f"{args.account} may now log in and send from: "
            f"{', '.join(str(n) for n in acc.ip_allow)}.")


def ip_remove(ctx: Context, args: argparse.Namespace) -> None:
    with ctx.change("ip.remove", account=args.account, cidr=args.cidr) as data:
        acc = admin.ip_remove(data, args.account, args.cidr)
    rest = ", ".join(str(n) for n in acc.ip_allow) or "any address (no rules left)"
    ctx.say(f"{args.account} may now log in and send from: {rest}.")


def ip_list(ctx: Context, args: argparse.Namespace) -> None:
    acc = admin.account(ctx.read(), args.account)
    if ctx.json:
        dump_json(ctx.out, [str(n) for n in acc.ip_allow])
    elif acc.ip_allow:
        ctx.out.writelines(f"{n}\n" for n in acc.ip_allow)
    else:
        ctx.out.write(f"{acc.name} has no IP access rules: any client address may log in.\n")


# -- domains ---------------------------------------------------------------------------------
def _domain_json(dom: Domain) -> dict[str, Any]:
    return {
        "domain": dom.name,
        "owner": dom.owner,
        "state": str(dom.state),
        "grants": list(dom.grants),
        "verified_at": when(dom.verified_at, "") or None,
        "verified_by": dom.verified_by,
        "created": when(dom.created, ""),
        "selectors": [
            {"selector": s.name, "algorithm": str(s.algorithm), "state": str(s.state),
             "key_file": s.key_file, "created": when(s.created, ""),
             "retiring_since": when(s.retiring_since, "") or None}
            for s in dom.selectors
        ],
    }


def _records(ctx: Context, data: DirectoryData, dom: Domain) -> list[dkimkeys.DnsRecord]:
    records = [dkimkeys.dkim_record(dom.name, s) for s in dom.selectors]
    pools = admin.pools_for_domain(data, dom, ctx.config.routing.default_pool or None)
    if pools or ctx.config.dns.spf_include:
        records.append(dkimkeys.spf_record(dom.name, pools, ctx.config.dns.spf_include))
    records.append(dkimkeys.dmarc_record(dom.name, ctx.config.dns.dmarc_rua))
    return records


def _print_records(ctx: Context, dom: Domain, records: list[dkimkeys.DnsRecord]) -> None:
    if ctx.json:
        dump_json(ctx.out, {
            "domain": dom.name,
            "state": str(dom.state),
            "records": [
                {"name": r.name, "type": r.type, "value": r.value, "purpose": r.purpose}
                for r in records
            ],
        })
        return
    has_spf = any(r.value.startswith("v=spf1") for r in records)
    for record in records:
        if record.name.startswith("_dmarc.") and not has_spf:
            ctx.out.write(
                "; SPF: no IP pool carries this domain yet; assign one (keyrelay pool assign) "
                "and run keyrelay domain dns again\n"
            )
        ctx.out.write(f"; {record.purpose}\n{record.zone_line()}\n")


def domain_add(ctx: Context, args: argparse.Namespace) -> None:
    existing = ctx.read()
    admin.principal(existing, args.principal)
    normal = admin.check_domain_free(existing, args.domain)
    picked = dkimkeys.selector_names(ctx.config.dkim.selector_prefix, ctx.now, set())
    selectors = dkimkeys.create_selectors(
        ctx.config.dkim.key_dir, normal, picked, SelectorState.ACTIVE, ctx.now
    )
    try:
        with ctx.change("domain.add", principal=args.principal, domain=normal) as data:
            dom = admin.add_domain(data, args.principal, normal, selectors, ctx.now)
            records = _records(ctx, data, dom)
    except BaseException:
        for sel in selectors:  # nothing was recorded: leave no orphaned private key behind
            os.unlink(sel.key_file)
        raise
    if not ctx.json:
        ctx.out.write(
            f"Added domain {normal} for {args.principal} (state: pending).\n"
            f"Private keys: {os.path.dirname(selectors[0].key_file)}/ (mode 0600).\n"
            "Publish these DNS records, then have the domain verified:\n\n"
        )
    _print_records(ctx, dom, records)


def domain_dns(ctx: Context, args: argparse.Namespace) -> None:
    data = ctx.read()
    dom = admin.domain(data, args.domain)
    _print_records(ctx, dom, _records(ctx, data, dom))


def domain_list(ctx: Context, args: argparse.Namespace) -> None:
    data = ctx.read()
    if args.principal:
        admin.principal(data, args.principal)
    doms = sorted(
        (d for d in data.domains.values()
         if not args.principal or d.owner == args.principal or args.principal in d.grants),
        key=lambda d: d.name,
    )
    if ctx.json:
        dump_json(ctx.out, [_domain_json(d) for d in doms])
        return
    rows = [
        [d.name, d.owner, str(d.state), ", ".join(d.grants) or "-",
         " ".join(s.name for s in d.signing_selectors()) or "-"]
        for d in doms
    ]
    table(ctx.out, ["DOMAIN", "OWNER", "STATE", "GRANTED TO", "SIGNING SELECTORS"], rows)


def domain_show(ctx: Context, args: argparse.Namespace) -> None:
    info = _domain_json(admin.domain(ctx.read(), args.domain))
    if ctx.json:
        dump_json(ctx.out, info)
        return
    verified = info["verified_at"] or "never"
    if info["verified_by"]:
        verified += f" ({info['verified_by']})"
    for label, value in [
        ("domain", info["domain"]),
        ("owner", info["owner"]),
        ("state", info["state"]),
        ("granted to", ", ".join(info["grants"]) or "-"),
        ("verified", verified),
        ("created", info["created"] or "-"),
    ]:
        ctx.out.write(f"{label + ':':<11} {value}\n")
    table(
        ctx.out,
        ["SELECTOR", "ALGORITHM", "STATE", "KEY FILE"],
        [[s["selector"], s["algorithm"], s["state"], s["key_file"]] for s in info["selectors"]],
    )


def domain_grant(ctx: Context, args: argparse.Namespace) -> None:
    with ctx.change("domain.grant", domain=args.domain, subuser=args.subuser) as data:
        dom = admin.grant_domain(data, args.domain, args.subuser)
    ctx.say(f"{args.subuser} may now send as {dom.name}.")


def domain_ungrant(ctx: Context, args: argparse.Namespace) -> None:
    with ctx.change("domain.ungrant", domain=args.domain, subuser=args.subuser) as data:
        dom = admin.ungrant_domain(data, args.domain, args.subuser)
    ctx.say(f"{args.subuser} may no longer send as {dom.name}.")


def domain_remove(ctx: Context, args: argparse.Namespace) -> None:
    with ctx.change("domain.remove", domain=args.domain) as data:
        dom = admin.remove_domain(data, args.domain)
    _delete_key_files([s.key_file for s in dom.selectors])
    ctx.say(f"Removed domain {dom.name} and its private keys; its DNS records can go too.")


def _delete_key_files(paths: list[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            print(f"keyrelay: warning: cannot delete {path}: {exc.strerror}", file=sys.stderr)


def domain_rotate(ctx: Context, args: argparse.Namespace) -> None:
    existing = ctx.read()
    dom = admin.domain(existing, args.domain)
    admin.rotate_domain(existing, dom.name, ())  # refuse early, before generating keys
    taken = {s.name for s in dom.selectors}
    picked = dkimkeys.selector_names(ctx.config.dkim.selector_prefix, ctx.now, taken)
    selectors = dkimkeys.create_selectors(
        ctx.config.dkim.key_dir, dom.name, picked, SelectorState.PENDING, ctx.now
    )
    try:
        with ctx.change("domain.rotate", domain=dom.name,
                        selectors=" ".join(s.name for s in selectors)) as data:
            dom = admin.rotate_domain(data, dom.name, selectors)
            records = [dkimkeys.dkim_record(dom.name, s) for s in selectors]
    except BaseException:
        _delete_key_files([s.key_file for s in selectors])
        raise
    if not ctx.json:
        ctx.out.write(
            f"New selectors for {dom.name}: {', '.join(s.name for s in selectors)} (pending).\n"
            "The current selectors keep signing until the new records are published and the "
            "domain is verified again.\nPublish:\n\n"
        )
    _print_records(ctx, dom, records)


def domain_retire_selector(ctx: Context, args: argparse.Namespace) -> None:
    with ctx.change("domain.retire-selector", domain=args.domain, selector=args.selector) as data:
        sel = admin.retire_selector(
            data, args.domain, args.selector, ctx.now,
            timedelta(seconds=ctx.config.dkim.retiring_overlap), args.force)
    _delete_key_files([sel.key_file])
    ctx.say(f"Retired selector {sel.name}; remove its DNS record "
            f"{sel.name}._domainkey.{names.domain(args.domain)} now.")


def domain_mark_verified(ctx: Context, args: argparse.Namespace) -> None:
    with ctx.change("domain.mark-verified", domain=names.domain(args.domain),
                    how="manual: marked verified by hand, DNS not checked") as data:
        dom = admin.mark_verified(data, args.domain, ctx.now)
    ctx.say(f"{dom.name} is marked verified by hand (DNS was not checked); it may send now. "
            f"Signing selectors: {' '.join(s.name for s in dom.signing_selectors())}.")


def _checked(ctx: Context, name: str) -> tuple[domaincheck.Report, Domain, Domain | None]:
    """Check a domain over DNS and record what the check proves (an unknown outcome changes
    nothing): (report, the domain before, the domain after or None when unchanged).

    The DNS checks take seconds: if the domain or its pools changed meanwhile (a rotation,
    a pool assigned), what was checked is not what would be recorded, so the command is
    run again (DirectoryConflict)."""
    data = ctx.read()
    before = admin.domain(data, name)
    pools = admin.pools_for_domain(data, before, ctx.config.routing.default_pool or None)
    report = domaincheck.verify_domain(ctx.config, data, before)
    if report.outcome is domaincheck.Outcome.UNKNOWN:
        return report, before, None
    passed = report.outcome is domaincheck.Outcome.PASSED
    with ctx.change("domain.check", domain=before.name, result=str(report.outcome)) as now:
        current = admin.domain(now, name)
        if current != before or admin.pools_for_domain(
                now, current, ctx.config.routing.default_pool or None) != pools:
            raise DirectoryConflict(f"{name} or its pools changed during the DNS check; "
                                    "nothing was recorded: run the command again")
        after = admin.record_check(now, before.name, passed, report.published_pending,
                                   ctx.now, ctx.config.domains.fail_after)
    return report, before, after


def _checked_again(ctx: Context, name: str) -> tuple[domaincheck.Report, Domain, Domain | None]:
    """``_checked`` with its own retries: `domain check` records one domain at a time and
    must not run the whole command again (domains already recorded would count twice)."""
    return retrying_conflicts(lambda: _checked(ctx, name))


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
              if c.advice and c.status is not domaincheck.Status.PASS]
    advice += [f"- {c.subject}: {c.advice}" for c in report.checks
               if c.advice and c.status is domaincheck.Status.PASS]
    if advice:
        ctx.out.write("\nTo do:\n" + "\n".join(advice) + "\n")


def domain_verify(ctx: Context, args: argparse.Namespace) -> None:
    report, before, after = _checked(ctx, args.domain)
    dom = after or before
    if ctx.json:
        dump_json(ctx.out, _report_json(report, dom))
    else:
        _print_report(ctx, report)
        ctx.out.write(f"\n{dom.name}: {_state_text(before, after)}\n")
    if report.outcome is domaincheck.Outcome.UNKNOWN:
        raise DirectoryUnavailable(
            f"{dom.name}: DNS could not be checked (see the results above); its state "
            f"({dom.state}) is unchanged: try again later")
    if report.outcome is not domaincheck.Outcome.PASSED:
        still = " (it may still send: see failing in docs/domains.md)" if dom.state in (
            DomainState.VERIFIED, DomainState.FAILING) else ""
        raise UserError(f"{dom.name} did not pass{still}: fix what failed above, then run "
                        f"keyrelay domain verify {dom.name} again")


def _state_text(before: Domain, after: Domain | None) -> str:
    if after is None:
        return f"could not check; still {before.state}"
    text = (f"{before.state} -> {after.state}" if after.state is not before.state
            else f"{after.state} (unchanged)")
    if after.failed_checks:
        last = when(after.verified_at, "never")
        text += f"; {after.failed_checks} failed check(s) in a row, last success {last}"
    active = " ".join(s.name for s in after.signing_selectors())
    return text + (f"; active selectors {active}" if active else "")


def domain_check(ctx: Context, args: argparse.Namespace) -> None:
    data = ctx.read()
    wanted = sorted(data.domains) if args.all else [names.domain(d) for d in args.domains]
    if not wanted:
        raise UserError("name the domains to check, or --all")
    unknown = []
    results = []
    for name in wanted:
        try:
            report, before, after = _checked_again(ctx, name)
        except NotFound:
            if not args.all:
                raise
            ctx.say(f"{name}: removed while the others were checked")
            continue
        if after is None:
            unknown.append(name)
        results.append(_report_json(report, after or before) if ctx.json else None)
        line = f"{name}: {_state_text(before, after)}"
        failed = [c.subject for c in report.checks
                  if c.required and c.status is not domaincheck.Status.PASS]
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


# -- senders ---------------------------------------------------------------------------------
def sender_add(ctx: Context, args: argparse.Namespace) -> None:
    with ctx.change("sender.add", principal=args.principal, address=args.address) as data:
        sender = admin.add_sender(data, args.principal, args.address, ctx.now)
    ctx.say(f"{args.principal} may now send as {sender.address}.")


def sender_remove(ctx: Context, args: argparse.Namespace) -> None:
    with ctx.change("sender.remove", principal=args.principal, address=args.address) as data:
        admin.remove_sender(data, args.principal, args.address)
    ctx.say(f"{args.principal} may no longer send as {names.address(args.address)}.")


def sender_list(ctx: Context, args: argparse.Namespace) -> None:
    data = ctx.read()
    if args.principal:
        admin.principal(data, args.principal)
    found = sorted(
        (s for s in data.senders.values() if not args.principal or s.principal == args.principal),
        key=lambda s: (s.principal, s.address),
    )
    if ctx.json:
        dump_json(ctx.out, [
            {"address": s.address, "principal": s.principal, "created": when(s.created, "")}
            for s in found
        ])
        return
    table(ctx.out, ["ADDRESS", "PRINCIPAL"], [[s.address, s.principal] for s in found])


# -- pools -----------------------------------------------------------------------------------
def _pool_json(pool: Pool, config: Config) -> dict[str, Any]:
    return {
        "name": pool.name,
        "bind": [str(a) for a in pool.bind],
        "helo": pool.helo,
        "transport": config.routing.transport_prefix + pool.name,
        "created": when(pool.created, ""),
    }


def pool_add(ctx: Context, args: argparse.Namespace) -> None:
    if args.name == "none":  # `pool assign PRINCIPAL none` means "no pool of its own"
        raise UserError("'none' cannot name a pool: `keyrelay pool assign PRINCIPAL none` "
                        "means no pool")
    with ctx.change("pool.add", pool=args.name, bind=" ".join(args.bind), helo=args.helo) as data:
        pool = admin.add_pool(data, args.name, args.bind, args.helo, ctx.now)
    ctx.say(f"Added pool {pool.name}: {', '.join(map(str, pool.bind))}, HELO {pool.helo}, "
            f"Postfix transport {ctx.config.routing.transport_prefix}{pool.name}.")


def pool_list(ctx: Context, args: argparse.Namespace) -> None:
    data = ctx.read()
    pools = sorted(data.pools.values(), key=lambda p: p.name)
    if ctx.json:
        dump_json(ctx.out, [_pool_json(p, ctx.config) for p in pools])
        return
    prefix = ctx.config.routing.transport_prefix
    rows = [[p.name, " ".join(map(str, p.bind)), p.helo, prefix + p.name] for p in pools]
    table(ctx.out, ["POOL", "BIND", "HELO", "TRANSPORT"], rows)


def pool_remove(ctx: Context, args: argparse.Namespace) -> None:
    with ctx.change("pool.remove", pool=args.name) as data:
        admin.remove_pool(data, args.name)
    ctx.say(f"Removed pool {args.name}.")


def pool_assign(ctx: Context, args: argparse.Namespace) -> None:
    target = None if args.pool == "none" else args.pool
    with ctx.change("pool.assign", principal=args.principal, pool=args.pool) as data:
        admin.assign_pool(data, args.principal, target)
    if target is None:
        ctx.say(f"{args.principal} now uses its account's pool or the default route.")
    else:
        ctx.say(f"{args.principal} now sends through pool {target}.")


# -- limits and monitor mode ---------------------------------------------------------------
def limits_set(ctx: Context, args: argparse.Namespace) -> None:
    def value(number: int | None) -> int | None:
        if number is not None and number < 0:
            raise UserError("limits are positive numbers (0 means: inherit)")
        return number or None

    limits = Limits(value(args.per_minute), value(args.per_hour), value(args.recipients))
    with ctx.change("limits.set", principal=args.principal, limits=_limits_text(limits)) as data:
        admin.set_limits(data, args.principal, limits)
    ctx.say(f"Limits of {args.principal}: {_limits_text(limits)}.")


def monitor_set(on: bool) -> Handler:
    def handler(ctx: Context, args: argparse.Namespace) -> None:
        scope = args.account or "all accounts"
        with ctx.change("monitor.on" if on else "monitor.off", scope=scope) as data:
            admin.set_monitor(data, args.account, on)
        if on:
            ctx.say(f"Monitor mode on for {scope}: refusals are logged, and mail passes.")
        else:
            ctx.say(f"Monitor mode off for {scope}: refusals are enforced.")

    return handler


def monitor_status(ctx: Context, args: argparse.Namespace) -> None:
    data = ctx.read()
    accounts = sorted(a.name for a in data.accounts.values() if a.monitor)
    if ctx.json:
        dump_json(ctx.out, {
            "config": ctx.config.monitor_mode, "directory": data.monitor, "accounts": accounts,
        })
        return
    ctx.out.write(
        f"monitor_mode in {ctx.config_path}: {'on' if ctx.config.monitor_mode else 'off'}\n"
        f"directory-wide (keyrelay monitor on|off): {'on' if data.monitor else 'off'}\n"
        f"accounts in monitor mode: {', '.join(accounts) or '-'}\n"
    )


# -- config ----------------------------------------------------------------------------------
def check_config(ctx: Context, args: argparse.Namespace) -> None:
    data = ctx.read()  # the directory must parse too
    ctx.say(f"{ctx.config_path}: OK; directory {ctx.config.directory.location}: "
            f"{len(data.accounts)} accounts, {len(data.keys)} keys, {len(data.domains)} domains")


# -- export / import -------------------------------------------------------------------------
def export_directory(ctx: Context, args: argparse.Namespace) -> None:
    data = ctx.read()
    text = render_directory(data)
    if args.output in (None, "-"):
        ctx.out.write(text)
        return
    # it holds the keys' hashes: readable by the owner only
    fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    ctx.say(f"Exported {len(data.accounts)} accounts, {len(data.subusers)} subusers, "
            f"{len(data.keys)} keys, {len(data.domains)} domains, {len(data.senders)} senders "
            f"and {len(data.pools)} pools to {args.output}.")


def import_directory(ctx: Context, args: argparse.Namespace) -> None:
    new = YamlDirectory(args.file).load()  # ConfigError names the file, key and reason
    if args.dry_run:
        changes = admin.differences(ctx.read(), new)
    else:
        with ctx.change("directory.import", source=args.file) as data:
            changes = admin.differences(data, new)
            admin.replace_all(data, new)
    verb = "would make" if args.dry_run else "made"
    if not changes:
        ctx.say(f"Nothing to do: the directory already equals {args.file}.")
        return
    ctx.say(f"{'Dry run: ' if args.dry_run else ''}{verb} {len(changes)} change(s):")
    for line in changes:
        ctx.say(f"  {line}")


def sync_directory(ctx: Context, args: argparse.Namespace) -> None:
    declared = declare.load(args.file)  # ConfigError names the file, key and reason
    existing = ctx.read()
    trial = existing.copy()  # refuse a clash before any DKIM key is made
    declare.apply(trial, declared, ctx.now, {n: () for n in declared.new_domains(existing)})
    changes = admin.differences(existing, trial)
    if not changes:
        ctx.say(f"Nothing to do: the directory already holds what {args.file} declares.")
        return
    if args.dry_run:
        ctx.say(f"Dry run: would make {len(changes)} change(s):")
        for line in changes:
            ctx.say(f"  {line}")
        return
    made = {
        name: dkimkeys.create_selectors(
            ctx.config.dkim.key_dir, name,
            dkimkeys.selector_names(ctx.config.dkim.selector_prefix, ctx.now, set()),
            SelectorState.ACTIVE, ctx.now)
        for name in declared.new_domains(existing)
    }
    try:
        with ctx.change("directory.sync", source=args.file) as data:
            before = data.copy()
            removed = declare.apply(data, declared, ctx.now, made)
            changes = admin.differences(before, data)
    except BaseException:
        _delete_key_files([s.key_file for sels in made.values() for s in sels])
        raise
    _delete_key_files([s.key_file for dom in removed for s in dom.selectors])
    ctx.say(f"Made {len(changes)} change(s):")
    for line in changes:
        ctx.say(f"  {line}")
    for name in made:
        ctx.say(f"Domain {name} is pending: publish its records (keyrelay domain dns {name}), "
                f"then run keyrelay domain verify {name}.")


# -- postfix ---------------------------------------------------------------------------------
def _postfix_plan(
    ctx: Context, config_dir: str | None
) -> tuple[postfixconf.Plan, postfixconf.Current | None]:
    pools = list(ctx.read().pools.values())
    if config_dir is None:
        return postfixconf.build_plan(ctx.config, pools, postfixconf.fresh_postfix()), None
    current = postfixconf.read_current(Path(config_dir))
    return postfixconf.build_plan(ctx.config, pools, current), current


def postfix_show(ctx: Context, args: argparse.Namespace) -> None:
    plan, current = _postfix_plan(ctx, args.config_dir)
    ctx.out.write("# main.cf\n" + postfixconf.render_main(plan) + "\n# master.cf\n"
                  + postfixconf.render_master(plan, current))
    _notes(plan)


def _notes(plan: postfixconf.Plan) -> None:
    for note in plan.notes:
        print(f"keyrelay: note: {note}", file=sys.stderr)


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


# -- the parser ------------------------------------------------------------------------------
_DESCRIPTION = """\
Manage the keyrelay directory: accounts and their subusers, API keys, IP access
rules, sending domains with their DKIM keys, verified single senders, outbound IP
pools, sending limits and monitor mode.

Applications log in to Postfix over TLS with username "apikey" and an API key as
the password. Principals are named ACCOUNT or ACCOUNT/SUBUSER."""

_EPILOG = """\
examples:
  keyrelay account add acme
  keyrelay subuser add acme/marketing
  keyrelay key create acme/marketing --name newsletter --expires 90d
  keyrelay pool add mkt --bind 192.0.2.10 --helo mkt.relay.example.net
  keyrelay pool assign acme/marketing mkt
  keyrelay domain add acme example.com
  keyrelay domain grant example.com acme/marketing
  keyrelay key revoke <key id>
  keyrelay postfix apply --config-dir /etc/postfix --reload

files:
  /etc/keyrelay/keyrelay.yaml   configuration (--config, or $KEYRELAY_CONFIG)
  /etc/keyrelay/directory.yaml  the directory (directory.path in the configuration)
  /etc/keyrelay/dkim/           private DKIM keys (dkim.key_dir), mode 0600

exit status:
  0 done; 1 refused or failed (one line on stderr says why); 2 usage error"""


def _group(sub: Any, name: str, help_text: str) -> Any:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    return actions


def _cmd(
    group: Any, name: str, handler: Handler | None, help_text: str, *, json: bool = False
) -> Any:
    parser = group.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(handler=handler)
    if json:
        parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def _path(text: str) -> str:
    """A FILE or DIR argument. An empty one is a mistake (an unset shell variable), not the
    working directory that ``Path("")`` would make of it."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path names no file")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="keyrelay", description=_DESCRIPTION, epilog=_EPILOG)
    parser.add_argument("--config", metavar="PATH",
                        help="configuration file (default: $KEYRELAY_CONFIG or "
                             "/etc/keyrelay/keyrelay.yaml)")
    parser.add_argument("--version", action="version", version=f"keyrelay {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=ArgumentParser)

    _cmd(sub, "check-config", check_config,
         "validate the configuration and the directory; exit 1 on any error")
    config = _group(sub, "config", "show configuration help")
    _cmd(config, "example", None,
         "print the annotated example configuration with every key and its default")

    acc = _group(sub, "account", "manage accounts (tenants)")
    _cmd(acc, "add", account_add, "add an account").add_argument("name", metavar="ACCOUNT")
    _cmd(acc, "list", account_list, "list accounts", json=True)
    _cmd(acc, "show", account_show, "show one account", json=True).add_argument(
        "name", metavar="ACCOUNT")
    _cmd(acc, "suspend", _status_setter(Status.SUSPENDED, "suspend", subuser=False),
         "refuse every login and message of the account and its subusers"
         ).add_argument("name", metavar="ACCOUNT")
    _cmd(acc, "resume", _status_setter(Status.ACTIVE, "resume", subuser=False),
         "lift a suspension").add_argument("name", metavar="ACCOUNT")
    _cmd(acc, "remove", account_remove,
         "remove an account with its subusers, keys and senders (its domains first)"
         ).add_argument("name", metavar="ACCOUNT")

    subs = _group(sub, "subuser", "manage subusers (ACCOUNT/NAME)")
    _cmd(subs, "add", subuser_add, "add a subuser").add_argument("name", metavar="ACCOUNT/NAME")
    _cmd(subs, "list", subuser_list, "list an account's subusers", json=True).add_argument(
        "account", metavar="ACCOUNT")
    _cmd(subs, "remove", subuser_remove, "remove a subuser with its keys and senders"
         ).add_argument("name", metavar="ACCOUNT/NAME")
    _cmd(subs, "suspend", _status_setter(Status.SUSPENDED, "suspend", subuser=True),
         "refuse the subuser's logins and messages").add_argument("name", metavar="ACCOUNT/NAME")
    _cmd(subs, "resume", _status_setter(Status.ACTIVE, "resume", subuser=True),
         "lift a suspension").add_argument("name", metavar="ACCOUNT/NAME")

    key = _group(sub, "key", "manage API keys")
    create = _cmd(key, "create", key_create,
                  "create an API key and print it once (only its hash is stored)", json=True)
    create.add_argument("principal", metavar="PRINCIPAL")
    create.add_argument("--name", required=True, help="what the key is for, e.g. 'crm-prod'")
    create.add_argument("--scope", action="append", metavar="SCOPE",
                        help="grant SCOPE (repeatable; default: keys.default_scopes)")
    create.add_argument("--expires", metavar="DURATION",
                        help="lifetime such as 90d, 12w, 24h, or 'never' "
                             "(default: keys.default_expiry)")
    _cmd(key, "list", key_list, "list keys (never their secrets)", json=True).add_argument(
        "principal", nargs="?", metavar="PRINCIPAL")
    _cmd(key, "show", key_show, "show one key", json=True).add_argument("key_id", metavar="KEY_ID")
    _cmd(key, "revoke", key_revoke, "revoke a key: refused from the next login or message on"
         ).add_argument("key_id", metavar="KEY_ID")
    scopes = _cmd(key, "set-scopes", key_set_scopes, "replace a key's scopes")
    scopes.add_argument("key_id", metavar="KEY_ID")
    scopes.add_argument("scopes", nargs="+", metavar="SCOPE")

    ip = _group(sub, "ip", "manage IP access rules: where an account may log in and send from")
    for name, handler, text in [
        ("allow", ip_allow, "allow logins and mail from CIDR (the first rule closes all others)"),
        ("remove", ip_remove, "remove a rule (no rules left: any address)"),
    ]:
        cmd = _cmd(ip, name, handler, text)
        cmd.add_argument("account", metavar="ACCOUNT")
        cmd.add_argument("cidr", metavar="CIDR")
    _cmd(ip, "list", ip_list, "list an account's rules", json=True).add_argument(
        "account", metavar="ACCOUNT")

    dom = _group(sub, "domain", "manage sending domains and their DKIM keys")
    add = _cmd(dom, "add", domain_add,
               "add a domain: create RSA-2048 and Ed25519 DKIM keys, print the DNS records",
               json=True)
    add.add_argument("principal", metavar="PRINCIPAL")
    add.add_argument("domain", metavar="DOMAIN")
    _cmd(dom, "dns", domain_dns, "print the DNS records to publish (zone-file form)",
         json=True).add_argument("domain", metavar="DOMAIN")
    for name, handler, text in [
        ("grant", domain_grant, "let a subuser send as its account's domain"),
        ("ungrant", domain_ungrant, "take a grant back"),
    ]:
        cmd = _cmd(dom, name, handler, text)
        cmd.add_argument("domain", metavar="DOMAIN")
        cmd.add_argument("subuser", metavar="ACCOUNT/SUBUSER")
    _cmd(dom, "list", domain_list, "list domains (of one principal: owned or granted)",
         json=True).add_argument("principal", nargs="?", metavar="PRINCIPAL")
    _cmd(dom, "show", domain_show, "show a domain and its selectors", json=True).add_argument(
        "domain", metavar="DOMAIN")
    _cmd(dom, "remove", domain_remove, "remove a domain and delete its private keys"
         ).add_argument("domain", metavar="DOMAIN")
    _cmd(dom, "rotate", domain_rotate,
         "create new selectors; the current ones sign until the new ones are verified",
         json=True).add_argument("domain", metavar="DOMAIN")
    retire = _cmd(dom, "retire-selector", domain_retire_selector,
                  "remove a selector that no longer signs (refused while it is active)")
    retire.add_argument("domain", metavar="DOMAIN")
    retire.add_argument("selector", metavar="SELECTOR")
    retire.add_argument("--force", action="store_true",
                        help="retire a replaced selector before dkim.retiring_overlap ends")
    _cmd(dom, "verify", domain_verify,
         "check the domain's DKIM, SPF and DMARC records over DNS and record the result "
         "(exit 0 only when every required check passed)", json=True).add_argument(
             "domain", metavar="DOMAIN")
    check = _cmd(dom, "check", domain_check,
                 "re-check domains over DNS (for a timer): verified ones that fail "
                 "domains.fail_after times in a row become failing", json=True)
    check.add_argument("domains", nargs="*", metavar="DOMAIN")
    check.add_argument("--all", action="store_true", help="every domain in the directory")
    _cmd(dom, "mark-verified", domain_mark_verified,
         "mark a domain verified by hand, without checking DNS (audited as manual)"
         ).add_argument("domain", metavar="DOMAIN")

    snd = _group(sub, "sender", "manage verified single sender addresses")
    for name, handler, text in [
        ("add", sender_add, "let a principal send as one address"),
        ("remove", sender_remove, "take a sender address back"),
    ]:
        cmd = _cmd(snd, name, handler, text)
        cmd.add_argument("principal", metavar="PRINCIPAL")
        cmd.add_argument("address", metavar="ADDRESS")
    _cmd(snd, "list", sender_list, "list verified senders", json=True).add_argument(
        "principal", nargs="?", metavar="PRINCIPAL")

    pools = _group(sub, "pool", "manage outbound IP pools (bind addresses and HELO name)")
    padd = _cmd(pools, "add", pool_add, "add a pool")
    padd.add_argument("name", metavar="NAME")
    padd.add_argument("--bind", action="append", required=True, metavar="IP",
                      help="outbound source address (repeatable)")
    padd.add_argument("--helo", required=True, metavar="NAME",
                      help="HELO name; its forward and reverse DNS should match the addresses")
    _cmd(pools, "list", pool_list, "list pools", json=True)
    _cmd(pools, "remove", pool_remove, "remove an unused pool").add_argument("name", metavar="NAME")
    assign = _cmd(pools, "assign", pool_assign,
                  "route a principal's mail through a pool ('none' to inherit)")
    assign.add_argument("principal", metavar="PRINCIPAL")
    assign.add_argument("pool", metavar="POOL")

    lim = _group(sub, "limits", "set per-principal sending limits")
    lset = _cmd(lim, "set", limits_set, "set limits (omitted or 0: inherit from account/config)")
    lset.add_argument("principal", metavar="PRINCIPAL")
    lset.add_argument("--per-minute", type=int, metavar="N", help="messages per minute")
    lset.add_argument("--per-hour", type=int, metavar="N", help="messages per hour")
    lset.add_argument("--recipients", type=int, metavar="N", help="recipients per message")

    exp = _cmd(sub, "export", export_directory,
               "write the whole directory as a YAML directory file (from any backend)")
    exp.add_argument("--output", "-o", metavar="FILE", type=_path,
                     help="write to FILE (mode 0600: it holds the keys' hashes); default: stdout")
    imp = _cmd(sub, "import", import_directory,
               "make the directory equal to a YAML directory file (e.g. one `keyrelay export` "
               "wrote from another backend); a second run changes nothing")
    imp.add_argument("file", metavar="FILE", type=_path)
    imp.add_argument("--dry-run", action="store_true",
                     help="list what would be added, changed and removed; change nothing")

    syn = _cmd(sub, "sync", sync_directory,
               "make the directory hold what a declaration file says (pools, accounts, "
               "subusers, IP rules, senders, limits, domains; never API keys); objects it "
               "does not name are left alone; a second run changes nothing")
    syn.add_argument("file", metavar="FILE", type=_path,
                     help="the declaration (YAML); - reads standard input")
    syn.add_argument("--dry-run", action="store_true",
                     help="list what would be added, changed and removed; change nothing")

    pfx = _group(sub, "postfix", "merge keyrelay's settings into a Postfix configuration")
    show = _cmd(pfx, "show", postfix_show,
                "print keyrelay's main.cf parameters and master.cf services; with --config-dir, "
                "merged with that configuration as apply would write them")
    show.add_argument("--config-dir", metavar="DIR", type=_path,
                      help="an existing Postfix configuration directory, e.g. /etc/postfix")
    papply = _cmd(pfx, "apply", postfix_apply,
                  "write keyrelay's settings into an existing Postfix configuration with "
                  "postconf (idempotent; unrelated settings are kept), then run postfix check")
    papply.add_argument("--config-dir", metavar="DIR", required=True, type=_path,
                        help="the Postfix configuration directory, e.g. /etc/postfix")
    papply.add_argument("--dry-run", action="store_true",
                        help="print the changes without making them")
    papply.add_argument("--reload", action="store_true",
                        help="run postfix reload afterwards when Postfix is running")

    mon = _group(sub, "monitor", "monitor mode: log would-be refusals and let mail pass")
    for name, on in (("on", True), ("off", False)):
        _cmd(mon, name, monitor_set(on),
             f"switch monitor mode {name} for ACCOUNT, or directory-wide without ACCOUNT"
             ).add_argument("account", nargs="?", metavar="ACCOUNT")
    _cmd(mon, "status", monitor_status, "show where monitor mode is on", json=True)
    return parser


def run_handler(handler: Handler, ctx: Context, args: argparse.Namespace) -> None:
    """Run a command; again when another writer changed the directory under it.

    Only LDAP refuses a transaction that overlapped another writer's (the YAML file is
    locked instead), and it then wrote nothing; a command prints only after its one
    transaction, so running it again is what the admin would do by hand. (`domain check`
    writes once per domain and retries each one itself.)
    """
    retrying_conflicts(lambda: handler(ctx, args))


def retrying_conflicts(action: Callable[[], T], seconds: float = CONFLICT_SECONDS,
                       clock: Callable[[], float] = time.monotonic,
                       sleep: Callable[[float], None] = time.sleep) -> T:
    """``action()``, run again while it raises DirectoryConflict (nothing was written):
    after a random pause of 0.5-1.5 times 0.05 s, doubled at each conflict up to 2 s, for
    ``seconds``; the last conflict is raised after that."""
    deadline = clock() + seconds
    pause = 0.05
    while True:
        try:
            return action()
        except DirectoryConflict:
            if clock() >= deadline:
                raise
        sleep(pause * random.uniform(0.5, 1.5))  # noqa: S311 - jitter, not a secret
        pause = min(2.0, pause * 2)


def main(argv: Sequence[str] | None = None) -> int:
    echo_undecodable_arguments()
    parser = build_parser()
    args = parser.parse_args(argv)
    config_path = resolve_config_path(args.config)
    try:
        if args.command == "config":  # needs no configuration file
            sys.stdout.write(render_example())
            return EXIT_OK
        config = load_config(config_path)
        ctx = Context(
            config=config,
            config_path=config_path,
            directory=open_directory(config),
            now=datetime.now(UTC).replace(microsecond=0),
            out=sys.stdout,
            json=getattr(args, "json", False),
        )
        run_handler(args.handler, ctx, args)
    except (ConfigError, KeyrelayError) as exc:
        # one line, as promised: some messages quote multi-line parser errors (PyYAML's)
        print(f"keyrelay: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"keyrelay: error: {one_line(f'cannot access{where}: {exc.strerror}')}",
              file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
