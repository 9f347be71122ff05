"""DNS proof that a sending domain is set up: DKIM, SPF (pyspf) and DMARC checks.

``verify_domain`` asks the resolvers of the ``dns`` configuration section and returns a
``Report``: one ``Check`` per DKIM selector, per outbound address of every IP pool that may
carry the domain (SPF) and for DMARC, each with what was expected, what was found and what to
do. ``Report.outcome`` says what the checks prove:

- ``passed``: every active selector's key is published and SPF passes for every address;
- ``failed``: DNS answered and something required is wrong (the admin must fix it);
- ``unknown``: some required answer could not be had (timeout, SERVFAIL, no resolver):
  "could not check, try again". It never changes a domain's state.

DMARC is advice only (a warning with a suggested record). Pending selectors (made by
``keyrelay domain rotate``) are checked too; ``Report.published_pending`` is true when every
one of them is published, which is when rotation may switch to them.

``check_and_record`` checks a domain and records what the check proves in the directory
(``admin.record_check``), unless the domain or its pools changed during the check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum

import dkim.util
import dns.exception
import dns.resolver
import spf

from . import admin, audit
from .config import Config
from .directory import DirectoryBackend
from .directory.model import DirectoryData, Domain, Selector, SelectorState
from .dkimkeys import DNS_K, dkim_record, dmarc_record, spf_record
from .errors import DirectoryConflict, UserError


class CheckStatus(StrEnum):
    PASS = "pass"  # noqa: S105 - a check result, not a password
    FAIL = "fail"
    WARN = "warning"
    UNKNOWN = "could not check"


class CheckOutcome(StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Check:
    kind: str  # dkim | spf | dmarc
    subject: str  # the DNS name, or the address SPF was evaluated for
    status: CheckStatus
    expected: str
    found: str
    advice: str = ""
    required: bool = True  # counts for the outcome (DMARC, pending and retiring selectors not)
    selector_state: str = ""  # dkim: the selector's state


@dataclass(frozen=True, slots=True)
class Report:
    domain: str
    checks: tuple[Check, ...]

    @property
    def outcome(self) -> CheckOutcome:
        required = [c for c in self.checks if c.required]
        if any(c.status is CheckStatus.FAIL for c in required):
            return CheckOutcome.FAILED
        if any(c.status is CheckStatus.UNKNOWN for c in required):
            return CheckOutcome.UNKNOWN
        return CheckOutcome.PASSED

    @property
    def published_pending(self) -> bool:
        pending = [c for c in self.checks if c.selector_state == SelectorState.PENDING]
        return bool(pending) and all(c.status is CheckStatus.PASS for c in pending)


class CouldNotCheck(Exception):
    """DNS gave no usable answer (timeout, SERVFAIL, refused): try again later."""


def make_resolver(config: Config) -> dns.resolver.Resolver:
    cfg = config.dns
    try:
        resolver = dns.resolver.Resolver(configure=not cfg.nameservers)
    except dns.resolver.NoResolverConfiguration:
        raise UserError("no resolver to ask: /etc/resolv.conf lists none; set dns.nameservers "
                        "in the configuration") from None
    if cfg.nameservers:
        resolver.nameservers = list(cfg.nameservers)
    resolver.port = cfg.port
    resolver.lifetime = cfg.timeout
    resolver.timeout = min(cfg.timeout, 2.0)  # per try: a lost UDP answer is asked again
    return resolver


def txt_records(resolver: dns.resolver.Resolver, name: str) -> list[str]:
    """Every TXT record at ``name`` (CNAMEs followed), each record's strings joined; empty
    when the name or the type does not exist. Raises ``CouldNotCheck``."""
    try:
        answer = resolver.resolve(name, "TXT", search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.resolver.NoNameservers as exc:  # SERVFAIL, REFUSED, unreachable
        raise CouldNotCheck(f"no nameserver answered for {name}: {exc}") from None
    except dns.exception.Timeout:
        raise CouldNotCheck(f"no answer for {name} within {resolver.lifetime:g}s") from None
    except dns.exception.DNSException as exc:
        raise CouldNotCheck(f"{name}: {exc}") from None
    return [b"".join(rdata.strings).decode("utf-8", "replace") for rdata in answer]


# -- DKIM ------------------------------------------------------------------------------------
def check_dkim(resolver: dns.resolver.Resolver, domain: str, selector: Selector) -> Check:
    wanted = dkim_record(domain, selector)
    expected = f"k={DNS_K[selector.algorithm]}; p={selector.public_key[:24]}..."

    def result(status: CheckStatus, found: str, advice: str = "") -> Check:
        if status is CheckStatus.FAIL and not advice:
            advice = f"publish TXT {wanted.name} \"{wanted.value}\" (keyrelay domain dns {domain})"
        if status is CheckStatus.FAIL and selector.state is SelectorState.RETIRING:
            # no longer signs: only mail it signed before rotation depends on the record
            status, advice = CheckStatus.WARN, (
                f"keep {wanted.name} published until keyrelay domain retire-selector "
                f"{domain} {selector.name}: mail signed before the rotation is verified with "
                "it")
        return Check("dkim", wanted.name, status, expected, found, advice,
                     required=selector.state is SelectorState.ACTIVE,
                     selector_state=str(selector.state))

    try:
        records = txt_records(resolver, wanted.name)
    except CouldNotCheck as exc:
        return result(CheckStatus.UNKNOWN, str(exc), "try again later")
    keys = []
    for record in records:
        try:
            tags = {k.decode("ascii", "replace"): v.decode("ascii", "replace")
                    for k, v in dkim.util.parse_tag_value(record.encode()).items()}
        except dkim.util.InvalidTagValueList as exc:
            return result(CheckStatus.FAIL, f"unparseable record {record[:60]!r}: {exc}")
        if "p" in tags:
            keys.append(tags)
    if not keys:
        found = "no TXT record" if not records else f"no DKIM key record among {len(records)}"
        return result(CheckStatus.FAIL, found)
    if len(keys) > 1:
        return result(CheckStatus.FAIL, f"{len(keys)} DKIM key records: receivers may use any "
                      "of them", f"leave exactly one TXT record at {wanted.name}")
    tags = keys[0]
    public = "".join(tags["p"].split())
    algorithm = tags.get("k", "rsa").strip()
    if tags.get("v", "DKIM1").strip() != "DKIM1":
        return result(CheckStatus.FAIL, f"v={tags['v']} (must be DKIM1 or absent)")
    if not public:
        return result(CheckStatus.FAIL, "an empty p= (the key is revoked)")
    if algorithm != DNS_K[selector.algorithm]:
        return result(CheckStatus.FAIL, f"k={algorithm}")
    if public != selector.public_key:
        return result(CheckStatus.FAIL, f"another key: p={public[:24]}...")
    flags = set(tags.get("t", "").replace(" ", "").split(":")) - {""}
    if "y" in flags:
        return result(CheckStatus.PASS, f"the key, in testing mode (t={tags['t']})",
                      "remove t=y once signing works: receivers may ignore failures in "
                      "testing mode")
    return result(CheckStatus.PASS, "the key")


# -- SPF -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _spf_resolver(resolver: dns.resolver.Resolver) -> Iterator[None]:
    """pyspf asks dnspython's default resolver: point it at ours for the check. A process
    global: only the (single-threaded) keyrelay CLI checks domains, never a daemon."""
    saved = dns.resolver.default_resolver
    dns.resolver.default_resolver = resolver
    try:
        yield
    finally:
        dns.resolver.default_resolver = saved


_SPF_ADVICE = {
    "none": "publish an SPF record",
    "neutral": "the record does not authorise this address (?all or no match)",
    "softfail": "the record does not authorise this address (~all matched)",
    "fail": "the record forbids this address (-all matched)",
    "permerror": "the record is broken",
}


def check_spf(resolver: dns.resolver.Resolver, domain: str, address: str, helo: str,
              pool: str, suggestion: str) -> Check:
    subject = f"{address} (pool {pool})"
    with _spf_resolver(resolver):
        result, explanation = spf.check2(i=address, s=f"postmaster@{domain}", h=helo,
                                         querytime=resolver.lifetime)
    found = f"{result}: {explanation}" if explanation else result
    if result == "pass":
        return Check("spf", subject, CheckStatus.PASS, "pass", found)
    if result == "temperror":
        return Check("spf", subject, CheckStatus.UNKNOWN, "pass", found, "try again later")
    advice = (f"{_SPF_ADVICE.get(result, result)}: authorise {address} in the SPF record of "
              f"{domain}, e.g. \"{suggestion}\" (merge with what is there; keyrelay domain dns "
              f"{domain})")
    if result == "permerror":
        advice += "; RFC 7208 allows at most 10 DNS-querying mechanisms (include, a, mx, "\
                  "ptr, exists, redirect) in all"
    return Check("spf", subject, CheckStatus.FAIL, "pass", found, advice)


# -- DMARC -----------------------------------------------------------------------------------
def check_dmarc(resolver: dns.resolver.Resolver, domain: str, rua: str) -> Check:
    suggestion = dmarc_record(domain, rua)
    name = suggestion.name
    advice = f"publish TXT {name} \"{suggestion.value}\""
    try:
        records = [r for r in txt_records(resolver, name) if r.strip().startswith("v=DMARC1")]
    except CouldNotCheck as exc:
        return Check("dmarc", name, CheckStatus.UNKNOWN, "v=DMARC1; p=...", str(exc),
                     required=False)
    if not records:
        return Check("dmarc", name, CheckStatus.WARN, "v=DMARC1; p=...", "no DMARC record",
                     advice, required=False)
    if len(records) > 1:
        return Check("dmarc", name, CheckStatus.WARN, "one record", f"{len(records)} records "
                     "(receivers ignore them all)", "leave exactly one", required=False)
    try:
        tags = {k.decode(): v.decode().strip() for k, v in
                dkim.util.parse_tag_value(records[0].encode()).items()}
    except (dkim.util.InvalidTagValueList, UnicodeDecodeError) as exc:
        return Check("dmarc", name, CheckStatus.WARN, "v=DMARC1; p=...", f"unparseable: {exc}",
                     advice, required=False)
    if tags.get("p") not in ("none", "quarantine", "reject"):
        return Check("dmarc", name, CheckStatus.WARN, "p=none|quarantine|reject",
                     f"p={tags.get('p', '(missing)')}", advice, required=False)
    return Check("dmarc", name, CheckStatus.PASS, "v=DMARC1; p=...", f"p={tags['p']}",
                 required=False)


# -- the whole domain ------------------------------------------------------------------------
def verify_domain(config: Config, data: DirectoryData, dom: Domain,
                  resolver: dns.resolver.Resolver | None = None) -> Report:
    """Every check of ``dom``, with the pools of ``data`` (see the module doc)."""
    resolver = resolver or make_resolver(config)
    pending = [check_dkim(resolver, dom.name, s) for s in dom.selectors
               if s.state is SelectorState.PENDING]
    # When every new selector of a rotation is published, the selectors they replace are
    # judged as the retiring ones they become on success: a rotation made because an old
    # key leaked, with its record already pulled, can then complete.
    switching = bool(pending) and all(c.status is CheckStatus.PASS for c in pending)
    replaced = {s.algorithm for s in dom.selectors if s.state is SelectorState.PENDING}
    checks = []
    for sel in dom.selectors:
        if sel.state is SelectorState.PENDING:
            checks.append(pending.pop(0))
            continue
        if switching and sel.state is SelectorState.ACTIVE and sel.algorithm in replaced:
            sel = replace(sel, state=SelectorState.RETIRING)
        checks.append(check_dkim(resolver, dom.name, sel))
    if not dom.signing_selectors():
        checks.append(Check("dkim", dom.name, CheckStatus.FAIL, "an active selector", "none",
                            f"keyrelay domain rotate {dom.name} creates new selectors"))
    pools = admin.pools_for_domain(data, dom, config.routing.default_pool or None)
    suggestion = spf_record(dom.name, pools, config.dns.spf_include).value
    for pool in pools:
        for address in pool.bind:
            checks.append(check_spf(resolver, dom.name, str(address), pool.helo, pool.name,
                                    suggestion))
    if not pools:
        checks.append(Check("spf", dom.name, CheckStatus.WARN, "an IP pool", "no IP pool carries "
                            "this domain: mail leaves from this host's own address",
                            "assign a pool (keyrelay pool assign) so SPF can be checked",
                            required=False))
    checks.append(check_dmarc(resolver, dom.name, config.dns.dmarc_rua))
    return Report(dom.name, tuple(checks))



# -- checked and recorded --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Checked:
    report: Report
    before: Domain  # the domain as it was checked
    after: Domain | None  # as recorded; None when the outcome was unknown (nothing recorded)


def check_and_record(config: Config, directory: DirectoryBackend, name: str,
                     now: datetime) -> Checked:
    """Check a domain over DNS and record what the check proves (``admin.record_check``),
    audited as ``domain.check``; an unknown outcome records nothing.

    The DNS checks take seconds: if the domain or its pools changed meanwhile (a rotation,
    a pool assigned), what was checked is not what would be recorded, so nothing is written
    and ``DirectoryConflict`` asks for the check to be run again. Raises ``NotFound`` for a
    domain that is not (or no longer) in the directory.
    """
    default_pool = config.routing.default_pool or None
    data = directory.load(missing_ok=True)
    before = admin.domain(data, name)
    pools = admin.pools_for_domain(data, before, default_pool)
    report = verify_domain(config, data, before)
    if report.outcome is CheckOutcome.UNKNOWN:
        return Checked(report, before, None)
    with directory.transaction() as current:
        found = admin.domain(current, name)
        if found != before or admin.pools_for_domain(current, found, default_pool) != pools:
            raise DirectoryConflict(f"{name} or its pools changed during the DNS check; "
                                    "nothing was recorded: run the command again")
        after = admin.record_check(current, before.name, report.outcome is CheckOutcome.PASSED,
                                   report.published_pending, now, config.domains.fail_after)
    audit.record(config.logging.audit_log, now, "domain.check", domain=before.name,
                 result=str(report.outcome))
    return Checked(report, before, after)
