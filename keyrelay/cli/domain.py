"""``keyrelay domain``: sending domains, their DKIM keys and the DNS records to publish
(``verify`` and ``check``, which ask DNS, are in ``verify.py``)."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from datetime import timedelta
from typing import Any

from .. import admin, dkimkeys, names
from ..directory.model import DirectoryData, Domain, DomainState, Selector, SelectorState
from ..output import dump_json, table, when
from . import verify
from .core import Context, command, delete_key_files, group


def domain_json(dom: Domain) -> dict[str, Any]:
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


def selector_state(dom: Domain, sel: Selector) -> str:
    """What a selector does now: an active selector of a domain that is not verified yet
    signs nothing (the domain may not send) until the domain is verified."""
    if dom.state is DomainState.PENDING and sel.state is SelectorState.ACTIVE:
        return f"signs once {dom.name} is verified"
    return str(sel.state)


def dkim_record(dom: Domain, sel: Selector) -> dkimkeys.DnsRecord:
    """A selector's DNS record, its purpose saying what the selector does now."""
    record = dkimkeys.dkim_record(dom.name, sel)
    return replace(record, purpose=f"DKIM {sel.algorithm} selector {sel.name} "
                                   f"({selector_state(dom, sel)})")


def _records(ctx: Context, data: DirectoryData, dom: Domain) -> list[dkimkeys.DnsRecord]:
    records = [dkim_record(dom, s) for s in dom.selectors]
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
    with ctx.new_keys() as keys:
        selectors = keys.create(normal, picked, SelectorState.ACTIVE, ctx.now)
        with ctx.change("domain.add", keys=keys, principal=args.principal,
                        domain=normal) as data:
            dom = admin.add_domain(data, args.principal, normal, selectors, ctx.now)
            records = _records(ctx, data, dom)
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
        dump_json(ctx.out, [domain_json(d) for d in doms])
        return
    rows = [
        [d.name, d.owner, str(d.state), ", ".join(d.grants) or "-",
         " ".join(s.name for s in d.signing_selectors()
                  if d.state is not DomainState.PENDING) or "-"]
        for d in doms
    ]
    table(ctx.out, ["DOMAIN", "OWNER", "STATE", "GRANTED TO", "SIGNING SELECTORS"], rows)


def domain_show(ctx: Context, args: argparse.Namespace) -> None:
    dom = admin.domain(ctx.read(), args.domain)
    info = domain_json(dom)
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
        [[s.name, str(s.algorithm), selector_state(dom, s), s.key_file] for s in dom.selectors],
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
    delete_key_files([s.key_file for s in dom.selectors])
    ctx.say(f"Removed domain {dom.name} and its private keys; its DNS records can go too.")


def domain_rotate(ctx: Context, args: argparse.Namespace) -> None:
    existing = ctx.read()
    dom = admin.domain(existing, args.domain)
    admin.rotate_domain(existing, dom.name, ())  # refuse early, before generating keys
    taken = {s.name for s in dom.selectors}
    picked = dkimkeys.selector_names(ctx.config.dkim.selector_prefix, ctx.now, taken)
    with ctx.new_keys() as keys:
        selectors = keys.create(dom.name, picked, SelectorState.PENDING, ctx.now)
        with ctx.change("domain.rotate", keys=keys, domain=dom.name,
                        selectors=" ".join(s.name for s in selectors)) as data:
            dom = admin.rotate_domain(data, dom.name, selectors)
            records = [dkim_record(dom, s) for s in selectors]
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
    delete_key_files([sel.key_file])
    ctx.say(f"Retired selector {sel.name}; remove its DNS record "
            f"{sel.name}._domainkey.{names.domain(args.domain)} now.")


def domain_mark_verified(ctx: Context, args: argparse.Namespace) -> None:
    with ctx.change("domain.mark-verified", domain=names.domain(args.domain),
                    how="manual: marked verified by hand, DNS not checked") as data:
        dom = admin.mark_verified(data, args.domain, ctx.now)
    ctx.say(f"{dom.name} is marked verified by hand (DNS was not checked); it may send now. "
            f"Signing selectors: {' '.join(s.name for s in dom.signing_selectors())}.")


def register(sub: Any) -> None:
    dom = group(sub, "domain", "manage sending domains and their DKIM keys")
    add = command(dom, "add", domain_add,
                  "add a domain: create RSA-2048 and Ed25519 DKIM keys, print the DNS records",
                  json=True)
    add.add_argument("principal", metavar="PRINCIPAL")
    add.add_argument("domain", metavar="DOMAIN")
    command(dom, "dns", domain_dns, "print the DNS records to publish (zone-file form)",
            json=True).add_argument("domain", metavar="DOMAIN")
    for name, handler, text in [
        ("grant", domain_grant, "let a subuser send as its account's domain"),
        ("ungrant", domain_ungrant, "take a grant back"),
    ]:
        cmd = command(dom, name, handler, text)
        cmd.add_argument("domain", metavar="DOMAIN")
        cmd.add_argument("subuser", metavar="ACCOUNT/SUBUSER")
    command(dom, "list", domain_list, "list domains (of one principal: owned or granted)",
            json=True).add_argument("principal", nargs="?", metavar="PRINCIPAL")
    command(dom, "show", domain_show, "show a domain and its selectors", json=True).add_argument(
        "domain", metavar="DOMAIN")
    command(dom, "remove", domain_remove, "remove a domain and delete its private keys"
            ).add_argument("domain", metavar="DOMAIN")
    command(dom, "rotate", domain_rotate,
            "create new selectors; the current ones sign until the new ones are verified",
            json=True).add_argument("domain", metavar="DOMAIN")
    retire = command(dom, "retire-selector", domain_retire_selector,
                     "remove a selector that no longer signs (refused while it is active)")
    retire.add_argument("domain", metavar="DOMAIN")
    retire.add_argument("selector", metavar="SELECTOR")
    retire.add_argument("--force", action="store_true",
                        help="retire a replaced selector before dkim.retiring_overlap ends")
    verify.register(dom)  # verify, check
    command(dom, "mark-verified", domain_mark_verified,
            "mark a domain verified by hand, without checking DNS (audited as manual)"
            ).add_argument("domain", metavar="DOMAIN")
