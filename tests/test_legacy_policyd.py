"""The password bridge through keyrelay-policyd's real sockets (issue 24, section 2): an
imported login's old username and password over the Dovecot auth protocol as Postfix speaks
it, over TLS only; the session it gets passes the policy service's sender checks like a key's;
after the sunset (moved with the real ``keyrelay legacy sunset``) the 535 names the date and
the command that makes a key. The hash is verified in the daemon's worker pool."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from test_legacy_credential import dovecot_hashes

from keyrelay import admin, passwords
from testkit.net import wait_until
from testkit.policyd import Policyd, add_verified_domain, fresh_address, now
from testkit.protocols import DovecotClient, PolicyClient, b64, connect

PASSWORD = "billing-old-secret-9"
SASL_PASSWORD = "crm-sasldb-secret-3"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Policyd]:
    relay = Policyd(tmp_path, {"keys": {"last_used_flush_interval": "1s"}})
    when = now()
    with relay.directory().transaction() as data:
        admin.add_account(data, "acme", when)
        for sub in ("acme/billing", "acme/crm"):
            admin.add_subuser(data, sub, when)
        add_verified_domain(data, "acme", "acme.example", grants=("acme/billing",))
        sunset = (when + timedelta(days=30)).date()
        admin.set_legacy_login(data, "acme/billing", "billing@site.example",
                               dovecot_hashes(PASSWORD)["BLF-CRYPT"], sunset, when)
        admin.set_legacy_login(data, "acme/crm", "crm",
                               passwords.hash_plaintext(SASL_PASSWORD), sunset, when)
    relay.start()
    try:
        yield relay
    finally:
        assert relay.stop() == 0, relay.log()[-3000:]
    assert not relay.tracebacks(), relay.tracebacks()
    for secret in (PASSWORD, SASL_PASSWORD):
        assert secret not in relay.log()


def login(daemon: Policyd, username: str, password: str, *, secured: bool = True,
          rip: str | None = None) -> tuple[str, str]:
    """(status, user= on OK or reason= on FAIL) as Postfix's Dovecot client reads them."""
    with DovecotClient(connect(daemon.endpoint("auth"))) as auth:
        auth.handshake()
        reply = auth.auth("PLAIN", rip=rip or fresh_address(), secured=secured,
                          resp=b64(f"\0{username}\0{password}"))
    return reply.status, (reply.user or "") if reply.status == "OK" else reply.reason


def test_a_legacy_login_before_and_after_its_sunset(daemon: Policyd) -> None:
    mark = daemon.mark()
    assert login(daemon, "billing@site.example", PASSWORD) == ("OK", "acme/billing:legacy")
    line = daemon.wait_for_log(r"reason=legacy_password\b", since=mark)
    assert "principal=acme/billing" in line and "key_id=legacy" in line
    assert "days_left=29" in line or "days_left=30" in line
    assert login(daemon, "crm", SASL_PASSWORD)[0] == "OK"  # a sasldb2 secret, Argon2id

    # the session's identity passes the policy service's sender checks as a key's does
    with PolicyClient(connect(daemon.endpoint("policy"))) as policy:
        base = {"sasl_method": "PLAIN", "sasl_username": "acme/billing:legacy"}
        assert policy.ask(**base, sender="invoices@acme.example") == "DUNNO"
        refused = policy.ask(**base, sender="someone@other.example")
        assert refused is not None and refused.startswith("550 5.7.1")
        crm = policy.ask(sasl_method="PLAIN", sasl_username="acme/crm:legacy",
                         sender="invoices@acme.example")
        assert crm is not None and crm.startswith("550 5.7.1")  # crm has no grant

    # wrong password: refused, nothing about the account said
    assert login(daemon, "billing@site.example", "guess") == (
        "FAIL", "authentication failed: wrong username or password")
    # plaintext connection: refused before the password is looked at
    status, reason = login(daemon, "billing@site.example", PASSWORD, secured=False)
    assert status == "FAIL" and reason.startswith("log in over TLS")

    def recorded() -> bool:
        return daemon.directory().load().legacy["acme/billing"].last_used is not None

    wait_until(recorded, 30, "the legacy login's last use in the directory (flush every 1s)")

    # the sunset, moved into the past: the next login reads when it ended and what to do
    with daemon.directory().transaction() as data:
        admin.set_legacy_sunset(data, ["acme/billing"], (now() - timedelta(days=1)).date())
    ended = (now() - timedelta(days=1)).date().isoformat()

    def refused_now() -> bool:
        return login(daemon, "billing@site.example", PASSWORD)[0] == "FAIL"

    wait_until(refused_now, 30, "the daemon to read the changed directory")
    assert login(daemon, "billing@site.example", PASSWORD) == ("FAIL", (
        f"password logins for acme/billing ended on {ended}; the application must use an "
        "API key (keyrelay key create acme/billing)"))
    with PolicyClient(connect(daemon.endpoint("policy"))) as policy:
        after = policy.ask(sasl_method="PLAIN", sasl_username="acme/billing:legacy",
                           sender="invoices@acme.example")
    assert after is not None and after.startswith("550 5.7.1 password logins for acme/billing")


def test_a_damaged_stored_hash_is_a_temporary_answer_and_no_guess(daemon: Policyd) -> None:
    # a bcrypt hash cut short (a bad copy into the directory): the password cannot be
    # checked, which is ours to fix: the connection closes (Postfix answers 454 4.7.0) and
    # the client address is not counted a guesser, however often it retries
    with daemon.directory().transaction() as data:
        admin.set_legacy_login(data, "acme/billing", "billing@site.example",
                               dovecot_hashes(PASSWORD)["BLF-CRYPT"][:-5],
                               (now() + timedelta(days=30)).date(), now())
    mark = daemon.mark()
    rip = fresh_address()
    for _ in range(12):  # more than bruteforce.max_failures_per_address (10)
        assert login(daemon, "billing@site.example", PASSWORD, rip=rip)[0] == "CLOSED"
    line = daemon.wait_for_log(r"legacy login of acme/billing: the BLF-CRYPT hash cannot "
                               r"be checked", since=mark)
    assert PASSWORD not in line
    assert "locked out" not in daemon.log(since=mark)
    # mended: the same address logs in at once
    with daemon.directory().transaction() as data:
        admin.set_legacy_login(data, "acme/billing", "billing@site.example",
                               dovecot_hashes(PASSWORD)["BLF-CRYPT"],
                               (now() + timedelta(days=30)).date(), now())
    assert login(daemon, "billing@site.example", PASSWORD, rip=rip)[0] == "OK"
