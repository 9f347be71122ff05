"""``keyrelay domain verify`` and ``domain check`` against a real DNS server (dnsmasq on a
loopback port, testkit/dnsserver.py) serving the zone each test writes: no mocked resolver.

The tenant: account acme owns example.com, made with the real CLI (real DKIM keys), and its
mail leaves through pool "out" bound to 192.0.2.10.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from keyrelay import cli, domaincheck
from keyrelay.config import load_config
from keyrelay.decisions import EngineSettings, domain_may_send
from keyrelay.directory import open_directory
from keyrelay.directory.model import Domain, DomainState, SelectorState
from keyrelay.errors import DirectoryConflict
from testkit.dnsserver import DNSMASQ, DnsServer

DOMAIN = "example.com"
POOL_IP = "192.0.2.10"
GOOD_SPF = f"v=spf1 ip4:{POOL_IP} -all"
GOOD_DMARC = "v=DMARC1; p=none"

pytestmark = pytest.mark.skipif(DNSMASQ is None, reason="dnsmasq is not installed (make test)")


@dataclass
class Tenant:
    folder: Path
    zone: DnsServer | None = None
    port: int = 0
    published: dict[str, str] = field(default_factory=dict)

    @property
    def config(self) -> Path:
        return self.folder / "keyrelay.yaml"

    def cli(self, *args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = cli.main(["--config", str(self.config), *args])
        return status, out.getvalue(), err.getvalue()

    def ok(self, *args: str) -> str:
        status, out, err = self.cli(*args)
        assert status == 0, err
        return out

    def domain(self) -> Domain:
        return open_directory(load_config(str(self.config))).load().domains[DOMAIN]

    def records(self) -> dict[str, str]:
        """What ``keyrelay domain dns --json`` says to publish, by name (TXT)."""
        printed = json.loads(self.ok("domain", "dns", DOMAIN, "--json"))
        return {r["name"]: r["value"] for r in printed["records"]}

    def publish(self, records: dict[str, str], cnames: dict[str, str] | None = None) -> None:
        """Serve exactly ``records`` and ``cnames`` (nothing else under example.com and
        example.net) from now on."""
        self.stop()
        self.dns_timeout("30s")  # generous for answers on a loaded machine (dns_down: 2 s)
        self.zone = DnsServer(records or {"placeholder.example.com": "x"},
                              self.folder / "dnsmasq.log", [DOMAIN, "example.net"], cnames)
        self.zone.port = self.port
        self.zone.start()
        self.published = dict(records)

    def dns_timeout(self, value: str) -> None:
        config = json.loads(self.config.read_text())
        config["dns"]["timeout"] = value
        self.config.write_text(json.dumps(config))

    def stop(self) -> None:
        if self.zone is not None:
            self.zone.stop()
            self.zone = None

    def verify(self) -> tuple[int, dict[str, Any], str]:
        status, out, err = self.cli("domain", "verify", DOMAIN, "--json")
        return status, json.loads(out), err


def check_of(report: dict[str, Any], kind: str, state: str = "") -> list[dict[str, Any]]:
    return [c for c in report["checks"] if c["check"] == kind and state in c["name"]]


@pytest.fixture
def tenant(tmp_path: Path) -> Iterator[Tenant]:
    made = Tenant(tmp_path)
    made.port = DnsServer({}, tmp_path / "unused.log", []).port
    made.config.write_text(json.dumps({
        "directory": {"path": str(tmp_path / "directory.yaml")},
        "dkim": {"key_dir": str(tmp_path / "dkim")},
        "logging": {"audit_log": str(tmp_path / "audit.log")},
        # generous: a check of eleven SPF includes on a loaded machine must not time out;
        # the test of a DNS server that does not answer sets a short one (it waits it out)
        "dns": {"nameservers": ["127.0.0.1"], "port": made.port, "timeout": "30s"},
        "domains": {"fail_after": 3, "failing_grace": "1h"},
    }))
    made.ok("account", "add", "acme")
    made.ok("pool", "add", "out", "--bind", POOL_IP, "--helo", "out.relay.example")
    made.ok("pool", "assign", "acme", "out")
    made.ok("domain", "add", "acme", DOMAIN)
    yield made
    made.stop()


def dns_down(tenant: Tenant) -> None:
    """Stop the DNS server; a short DNS timeout from now on, since nothing will answer and
    each query waits it out (the 30 s of the fixture are for a loaded machine's answers)."""
    tenant.dns_timeout("2s")
    tenant.stop()


def all_good(tenant: Tenant) -> dict[str, str]:
    records = {name: value for name, value in tenant.records().items()
               if "._domainkey." in name}
    return {**records, DOMAIN: GOOD_SPF, f"_dmarc.{DOMAIN}": GOOD_DMARC}


# -- one verification ------------------------------------------------------------------------
def test_a_domain_with_every_record_published_is_verified(tenant: Tenant) -> None:
    tenant.publish(all_good(tenant))

    status, report, _ = tenant.verify()

    assert status == 0
    assert report["outcome"] == "passed" and report["state"] == "verified"
    assert {c["result"] for c in report["checks"]} == {"pass"}
    assert len(check_of(report, "dkim")) == 2 and len(check_of(report, "spf")) == 1
    dom = tenant.domain()
    assert (dom.state, dom.verified_by, dom.failed_checks) == (DomainState.VERIFIED, "dns", 0)
    audit = (tenant.folder / "audit.log").read_text().splitlines()
    assert json.loads(audit[-1])["action"] == "domain.check"


def test_the_text_report_says_what_to_do(tenant: Tenant) -> None:
    records = all_good(tenant)
    del records[f"_dmarc.{DOMAIN}"]
    records[DOMAIN] = "v=spf1 ip4:198.51.100.1 -all"
    tenant.publish(records)

    status, out, err = tenant.cli("domain", "verify", DOMAIN)

    assert status == 1
    rows = {line.split()[0] + " " + line.split()[1]: line.split()
            for line in out.splitlines()[1:] if line.startswith(("DKIM", "SPF", "DMARC"))}
    assert rows[f"SPF {POOL_IP}"][2:5] == ["(pool", "out)", "fail"]
    assert rows["DMARC (advice)"][3:] == ["warning", "no", "DMARC", "record"]
    assert f"authorise {POOL_IP} in the SPF record of {DOMAIN}" in out
    assert f'publish TXT _dmarc.{DOMAIN} "v=DMARC1; p=none; adkim=r; aspf=r"' in out
    assert out.rstrip().endswith(f"{DOMAIN}: pending (unchanged); 1 failed check(s) in a "
                                 "row, last success never; active selectors "
                                 + " ".join(s.name for s in tenant.domain().selectors))
    assert err == (f"keyrelay: error: {DOMAIN} did not pass: fix what failed above, then run "
                   f"keyrelay domain verify {DOMAIN} again\n")


def test_a_wrong_dkim_key_fails(tenant: Tenant) -> None:
    records = all_good(tenant)
    rsa = next(n for n, v in records.items() if "k=rsa;" in v)
    ed = next(n for n, v in records.items() if "k=ed25519;" in v)
    other = records[ed]
    records[ed] = other.replace(other.rpartition("p=")[2], "MCowBQYDK2VwAyEA" + "A" * 44)
    tenant.publish(records)

    status, report, _ = tenant.verify()

    assert status == 1 and report["outcome"] == "failed" and report["state"] == "pending"
    bad = check_of(report, "dkim", ed)[0]
    assert bad["result"] == "fail" and bad["found"].startswith("another key: p=")
    assert bad["advice"].startswith(f'publish TXT {ed} "v=DKIM1; k=ed25519; p=')
    assert check_of(report, "dkim", rsa)[0]["result"] == "pass"


def test_a_missing_selector_record_fails(tenant: Tenant) -> None:
    records = all_good(tenant)
    rsa = min(n for n in records if "._domainkey." in n)
    del records[rsa]
    tenant.publish(records)

    status, report, _ = tenant.verify()

    assert status == 1
    assert check_of(report, "dkim", rsa)[0]["found"] == "no TXT record"


def test_dkim_records_delegated_by_cname_are_followed(tenant: Tenant) -> None:
    """A customer may CNAME its selectors to a host the relay's admin controls."""
    records = all_good(tenant)
    cnames = {}
    for name in [n for n in records if "._domainkey." in n]:
        target = f"{name.split('.')[0]}.dkim.example.net"
        records[target] = records.pop(name)
        cnames[name] = target
    tenant.publish(records, cnames)

    status, report, _ = tenant.verify()

    assert status == 0
    assert [c["result"] for c in check_of(report, "dkim")] == ["pass", "pass"]


def test_whitespace_inside_a_dkim_record_is_tolerated(tenant: Tenant) -> None:
    records = all_good(tenant)
    rsa = next(n for n, v in records.items() if "k=rsa;" in v)
    key = records[rsa].rpartition("p=")[2]
    spaced = " ".join(key[i:i + 64] for i in range(0, len(key), 64))  # as zone files wrap it
    records[rsa] = f"v=DKIM1 ;  k=rsa;\tp={spaced} "
    tenant.publish(records)

    status, report, _ = tenant.verify()

    assert status == 0 and check_of(report, "dkim", rsa)[0]["result"] == "pass"


def test_a_bad_domain_name_gets_a_clear_error(tenant: Tenant) -> None:
    for bad in ("exa mple.com", "example..com", "a" * 64 + ".com"):
        status, out, err = tenant.cli("domain", "verify", bad)
        assert (status, out) == (1, "") and err.startswith("keyrelay: error: ")
        assert err.count("\n") == 1 and "Traceback" not in err
    status, _, err = tenant.cli("domain", "verify", "other.example")
    assert status == 1 and "other.example" in err and "keyrelay domain list" in err


def test_a_record_in_testing_mode_passes_with_advice(tenant: Tenant) -> None:
    records = all_good(tenant)
    ed = max(n for n in records if "._domainkey." in n)
    records[ed] = records[ed].replace("v=DKIM1;", "v=DKIM1; t=y;")
    tenant.publish(records)

    status, report, _ = tenant.verify()

    assert status == 0
    testing = check_of(report, "dkim", ed)[0]
    assert testing["result"] == "pass" and "testing mode" in testing["found"]
    assert "remove t=y" in testing["advice"]


def test_spf_without_the_pools_address_fails(tenant: Tenant) -> None:
    tenant.publish({**all_good(tenant), DOMAIN: "v=spf1 ip4:198.51.100.1 ~all"})

    status, report, _ = tenant.verify()

    assert status == 1
    spf = check_of(report, "spf")[0]
    assert spf["found"].startswith("softfail")
    assert f"ip4:{POOL_IP}" in spf["advice"]


def test_spf_with_too_many_lookups_is_a_permerror(tenant: Tenant) -> None:
    chain = {f"i{n}.{DOMAIN}": "v=spf1 -all" for n in range(11)}
    includes = " ".join(f"include:i{n}.{DOMAIN}" for n in range(11))
    tenant.publish({**all_good(tenant), **chain, DOMAIN: f"v=spf1 {includes} ip4:{POOL_IP} -all"})

    status, report, _ = tenant.verify()

    assert status == 1
    spf = check_of(report, "spf")[0]
    assert spf["found"].startswith("permerror") and "Too many DNS lookups" in spf["found"]
    assert "at most 10 DNS-querying mechanisms" in spf["advice"]


def test_missing_dmarc_is_only_a_warning(tenant: Tenant) -> None:
    records = all_good(tenant)
    del records[f"_dmarc.{DOMAIN}"]
    tenant.publish(records)

    status, report, _ = tenant.verify()

    assert status == 0 and report["state"] == "verified"
    dmarc = check_of(report, "dmarc")[0]
    assert (dmarc["result"], dmarc["required"]) == ("warning", False)


def test_dns_down_is_could_not_check_and_changes_nothing(tenant: Tenant) -> None:
    tenant.publish(all_good(tenant))
    assert tenant.verify()[0] == 0
    before = tenant.domain()
    dns_down(tenant)

    status, report, err = tenant.verify()

    assert status == 1 and report["outcome"] == "unknown"
    assert {c["result"] for c in report["checks"] if c["required"]} == {"could not check"}
    assert "DNS could not be checked" in err and "unchanged: try again later" in err
    assert tenant.domain() == before


# -- over time -------------------------------------------------------------------------------
def test_a_verified_domain_fails_after_repeated_checks_and_recovers(tenant: Tenant) -> None:
    good = all_good(tenant)
    tenant.publish(good)
    assert tenant.verify()[0] == 0
    verified_at = tenant.domain().verified_at
    assert verified_at is not None
    tenant.publish({**good, DOMAIN: "v=spf1 -all"})

    lines = [tenant.cli("domain", "check", "--all") for _ in range(3)]

    assert [status for status, _, _ in lines] == [0, 0, 0]
    assert lines[0][1].startswith(f"{DOMAIN}: verified (unchanged); 1 failed check(s)")
    assert lines[2][1].startswith(f"{DOMAIN}: verified -> failing; 3 failed check(s) in a "
                                  "row, last success")
    assert "verified -> failing" in lines[2][2]  # the state change, for the journal
    dom = tenant.domain()
    assert (dom.state, dom.verified_at) == (DomainState.FAILING, verified_at)
    settings = EngineSettings(failing_grace=timedelta(hours=1))
    assert domain_may_send(dom, settings, verified_at + timedelta(minutes=59))
    assert not domain_may_send(dom, settings, verified_at + timedelta(minutes=61))

    dns_down(tenant)  # no change, and the timer's run fails visibly
    status, _, err = tenant.cli("domain", "check", "--all")
    assert status == 1 and "could not be checked for example.com" in err
    assert tenant.domain() == dom

    tenant.publish(good)
    status, out, _ = tenant.cli("domain", "check", DOMAIN)
    assert status == 0 and out.startswith(f"{DOMAIN}: failing -> verified;")
    assert tenant.domain().failed_checks == 0


def test_a_domain_verified_by_hand_stays_verified_until_a_check_passes(tenant: Tenant) -> None:
    """Issue 20 item 16: the hourly check made a hand-verified (internal) domain failing,
    then stopped its mail. It stays verified until the admin runs a check that passes."""
    tenant.publish({DOMAIN: "v=spf1 -all"})  # nothing right: an internal domain, say
    tenant.ok("domain", "mark-verified", DOMAIN)
    marked = tenant.domain()
    assert (marked.state, marked.verified_by) == (DomainState.VERIFIED, "manual")

    for _ in range(4):  # more than fail_after (3): the timer does not even ask DNS
        status, out, err = tenant.cli("domain", "check", "--all")
        assert (status, err) == (0, "")
        assert out == (f"{DOMAIN}: verified by hand, not checked (keyrelay domain verify "
                       f"{DOMAIN} checks it; once a check passes, DNS decides)\n")
    status, out, _ = tenant.cli("domain", "check", "--all", "--json")
    assert status == 0 and json.loads(out) == [{
        "domain": DOMAIN, "outcome": "not checked", "state": "verified",
        "verified_by": "manual", "checks": []}]
    for _ in range(4):  # named, it is checked; a failure does not count against it
        status, out, _ = tenant.cli("domain", "check", DOMAIN)
        assert status == 0
        assert out.startswith(f"{DOMAIN}: verified by hand (unchanged: a failed DNS check "
                              "does not count)")
    status, report, err = tenant.verify()
    assert status == 1 and report["state"] == "verified"
    assert "it stays verified by hand and sends" in err
    assert tenant.domain() == marked
    settings = EngineSettings(failing_grace=timedelta(hours=1))
    assert marked.verified_at is not None
    assert domain_may_send(tenant.domain(), settings, marked.verified_at + timedelta(days=30))

    tenant.publish(all_good(tenant))  # the admin puts DNS in place: from now on DNS decides
    assert tenant.verify()[0] == 0
    assert tenant.domain().verified_by == "dns"
    tenant.publish({DOMAIN: "v=spf1 -all"})
    for _ in range(3):
        tenant.cli("domain", "check", "--all")
    assert tenant.domain().state is DomainState.FAILING


def test_rotation_switches_only_once_the_new_records_are_published(tenant: Tenant) -> None:
    old_records = all_good(tenant)
    tenant.publish(old_records)
    assert tenant.verify()[0] == 0
    old = [s.name for s in tenant.domain().selectors]

    tenant.ok("domain", "rotate", DOMAIN)
    new = [s.name for s in tenant.domain().selectors if s.state is SelectorState.PENDING]
    assert len(new) == 2

    status, report, _ = tenant.verify()  # new records not yet published: the old ones sign
    assert status == 0
    assert [c["result"] for c in report["checks"] if c["name"].split(".")[0] in new] == [
        "fail", "fail"]
    assert [s.name for s in tenant.domain().signing_selectors()] == old

    tenant.publish({**old_records, **all_good(tenant)})  # new and old published together
    assert tenant.verify()[0] == 0
    states = {s.name: s.state for s in tenant.domain().selectors}
    assert [s.name for s in tenant.domain().signing_selectors()] == new
    assert {states[n] for n in old} == {SelectorState.RETIRING}

    status, _, err = tenant.cli("domain", "retire-selector", DOMAIN, new[0])
    assert status == 1 and "still signs mail" in err
    # the old records deleted too early: a warning, since the old selectors no longer sign
    tenant.publish({n: v for n, v in all_good(tenant).items() if n.split(".")[0] not in old})
    status, report, _ = tenant.verify()
    early = [c for c in report["checks"] if c["name"].split(".")[0] in old]
    assert status == 0 and {c["result"] for c in early} == {"warning"}
    assert "keep " in early[0]["advice"] and "until keyrelay domain retire-selector" in early[0][
        "advice"]
    status, _, err = tenant.cli("domain", "retire-selector", DOMAIN, old[0])
    assert status == 1 and "may still be verified until" in err  # dkim.retiring_overlap
    for name in old:
        tenant.ok("domain", "retire-selector", DOMAIN, name, "--force")
    assert [s.name for s in tenant.domain().selectors] == new


def test_a_rotation_during_the_dns_check_is_checked_again_not_activated_unpublished(
        tenant: Tenant, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks take seconds: a change made meanwhile must not be recorded as checked."""
    tenant.publish(all_good(tenant))
    assert tenant.verify()[0] == 0
    real = domaincheck.verify_domain
    calls = []

    def rotated_meanwhile(*args: Any, **kwargs: Any) -> domaincheck.Report:
        report = real(*args, **kwargs)
        calls.append(report)
        if len(calls) == 1:  # another admin rotates while the first check runs
            tenant.ok("domain", "rotate", DOMAIN)
        return report

    monkeypatch.setattr(domaincheck, "verify_domain", rotated_meanwhile)
    status, report, _ = tenant.verify()

    assert len(calls) == 2  # checked again, with the new selectors
    assert status == 0 and report["state"] == "verified"
    pending = [s for s in tenant.domain().selectors if s.state is SelectorState.PENDING]
    assert len(pending) == 2  # not published: they must not sign
    assert [c["result"] for c in report["checks"] if c["name"].split(".")[0] in
            {s.name for s in pending}] == ["fail", "fail"]


def test_a_pool_changed_during_the_check_is_not_recorded_as_checked(
        tenant: Tenant, monkeypatch: pytest.MonkeyPatch) -> None:
    """domaincheck.check_and_record compares what it checked with what it would record."""
    tenant.publish(all_good(tenant))
    config = load_config(str(tenant.config))
    real = domaincheck.verify_domain

    def pool_changed_meanwhile(*args: Any, **kwargs: Any) -> domaincheck.Report:
        report = real(*args, **kwargs)
        tenant.ok("pool", "assign", "acme", "none")  # another admin, during the DNS check
        return report

    monkeypatch.setattr(domaincheck, "verify_domain", pool_changed_meanwhile)
    before = tenant.domain()
    with pytest.raises(DirectoryConflict,
                       match=f"^{DOMAIN} or its pools changed during the DNS check; nothing"):
        domaincheck.check_and_record(config, open_directory(config), DOMAIN,
                                     datetime.now(UTC).replace(microsecond=0))
    assert tenant.domain() == before  # still pending, no check counted
    audit = (tenant.folder / "audit.log").read_text(encoding="utf-8").splitlines()
    assert json.loads(audit[-1])["action"] == "pool.assign"


def test_a_rotation_completes_when_the_old_records_were_already_pulled(tenant: Tenant) -> None:
    """A key leaked: the admin rotates, pulls the old records and publishes the new ones."""
    tenant.publish(all_good(tenant))
    assert tenant.verify()[0] == 0
    old = {s.name for s in tenant.domain().selectors}
    tenant.ok("domain", "rotate", DOMAIN)
    tenant.publish({n: v for n, v in all_good(tenant).items() if n.split(".")[0] not in old})

    status, report, _ = tenant.verify()

    assert status == 0
    assert {s.name for s in tenant.domain().signing_selectors()}.isdisjoint(old)
    pulled = [c for c in report["checks"] if c["name"].split(".")[0] in old]
    assert {(c["result"], c["required"]) for c in pulled} == {("warning", False)}

