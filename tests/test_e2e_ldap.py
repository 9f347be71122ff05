"""The relay with its accounts and keys in LDAP: the real private Postfix, keyrelay-policyd and
keyrelay-milter (keyrelay.demo's relay) reading a real slapd. A login and a signed delivery, a
revocation, and slapd stopped mid-run: temporary answers, then the same daemons serve again
when it is back, without a restart.
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest

from keyrelay.demo import Relay
from testkit.net import wait_until
from testkit.relay import (
    as_sent,
    connect,
    kr,
    message,
    never_delivered,
    new_key,
    new_tenant,
    private_relay,
    published_records,
    reply_of,
    send,
    wait_delivered,
)
from testkit.slapd import KEYRELAY_INDEXES, SLAPD, Slapd

# the relay's LDAP settings: short, so the test waits little (defaults: docs/ldap.md)
REFRESH, TIMEOUT = 0.5, 1
BOUND = REFRESH + TIMEOUT  # a change, or LDAP's absence, is seen by the daemons within this


@pytest.fixture(scope="module")
def slapd_for_relay() -> Iterator[Slapd]:
    """The module's own slapd: one test stops it."""
    if not SLAPD.exists():
        pytest.skip("slapd is not installed (make test installs it)")
    with Slapd(indexes=KEYRELAY_INDEXES) as server:
        yield server


@pytest.fixture(scope="module")
def ldap_relay(slapd_for_relay: Slapd) -> Iterator[Relay]:
    if not Path("/usr/sbin/postfix").exists():
        pytest.skip("Postfix is not installed (make test installs it)")
    section = slapd_for_relay.directory_config(refresh_interval=REFRESH, timeout=TIMEOUT)
    with private_relay("127.0.0.3", section) as relay:
        yield relay


def test_the_directory_is_in_ldap_not_in_a_file(ldap_relay: Relay,
                                                slapd_for_relay: Slapd) -> None:
    assert not (ldap_relay.settings.run_dir / "directory.yaml").exists()
    conn = slapd_for_relay.admin()
    try:
        conn.search(slapd_for_relay.base_dn, f"(krKeyId={ldap_relay.key_id})",
                    attributes=["krPrincipal"])
        assert [str(e.krPrincipal) for e in conn.entries] == ["demo/app"]
    finally:
        conn.unbind()


def test_a_key_held_in_ldap_logs_in_and_the_mail_leaves_signed(ldap_relay: Relay) -> None:
    tenant = new_tenant(ldap_relay)  # made with the keyrelay CLI, written to LDAP
    mid, text = message(tenant.sender, "rcpt@example.net", "keys in LDAP")
    # sent at once: a key that a daemon's copy lacks is read from LDAP (read-through); only a
    # temporary answer is retried, which this module's 1 s LDAP timeout may give on a loaded
    # machine (the first-try guarantee itself: test_e2e_readthrough.py, generous timeouts)
    send_until_accepted(ldap_relay, tenant.key, tenant.sender, text)

    dump, parsed = wait_delivered(ldap_relay, mid)
    assert parsed["X-Client-Addr"] == "127.0.0.3"  # through the demo pool
    records = published_records(ldap_relay, tenant.domain)
    wire = as_sent(dump)
    for index in range(2):  # rsa-sha256 and ed25519-sha256, with keys found through LDAP
        assert dkim.DKIM(wire).verify(
            idx=index, dnsfunc=lambda name, timeout=5: records.get(
                name.decode().rstrip(".").lower())), f"signature {index}"


def test_a_key_revoked_in_ldap_is_refused_at_the_next_login(ldap_relay: Relay) -> None:
    tenant = new_tenant(ldap_relay)

    def login() -> tuple[int, str]:
        with connect(ldap_relay, "submission") as client:
            try:
                return client.login("apikey", tenant.key)[0], ""
            except smtplib.SMTPAuthenticationError as exc:
                return exc.smtp_code, (exc.smtp_error.decode() if isinstance(exc.smtp_error, bytes)
                                   else exc.smtp_error)

    # a new key works without a 535, whatever the daemons' copy holds (read-through); a
    # temporary 454 (this module's 1 s LDAP timeout on a loaded machine) is waited out
    answers: list[tuple[int, str]] = []

    def accepted() -> bool:
        answers.append(login())
        assert answers[-1][0] in (235, 454), answers
        return answers[-1][0] == 235

    wait_until(accepted, BOUND + 60, "the new key accepted")
    kr(ldap_relay, "key", "revoke", tenant.key_id)
    wait_until(lambda: login() == (535, f"5.7.8 Error: authentication failed: API key "
                                        f"{tenant.key_id} was revoked; create a new key"),
               BOUND + 30, "the revoked key refused with 535")  # generous: a slow machine


def test_ldap_stopped_gives_temporary_answers_then_the_relay_recovers_by_itself(
        ldap_relay: Relay, slapd_for_relay: Slapd) -> None:
    tenant = new_tenant(ldap_relay)
    spare_key, _ = new_key(ldap_relay, tenant.principal)
    mid, text = message(tenant.sender, "rcpt@example.net", "LDAP down")
    with connect(ldap_relay, "submission") as logged_in:
        logged_in.login("apikey", tenant.key)
        slapd_for_relay.stop()
        try:
            time.sleep(BOUND + 1)  # the daemons' copy is too old to serve from now on
            logged_in.mail(tenant.sender)
            rcpt = reply_of(lambda: logged_in.rcpt("rcpt@example.net"))
            with connect(ldap_relay, "submission") as client:
                auth = reply_of(lambda: client.login("apikey", spare_key))
        finally:
            slapd_for_relay.start()
    assert rcpt[0] == 451 and rcpt[1].startswith("4.3.0"), rcpt
    assert auth[0] == 454 and auth[1].startswith("4.7.0"), auth
    never_delivered(ldap_relay, mid)

    send_until_accepted(ldap_relay, spare_key, tenant.sender, text)
    wait_delivered(ldap_relay, mid)  # exactly once
    assert "LDAP unreachable" in (ldap_relay.settings.logs / "policyd.log").read_text()


def send_until_accepted(relay: Relay, key: str, sender: str, text: str) -> None:
    """Send as a client does: again after a temporary refusal, never after a permanent one."""

    def sends() -> bool:
        try:
            send(relay, "submission", key, sender, text)
        except smtplib.SMTPResponseException as exc:
            assert 400 <= exc.smtp_code < 500, exc
            return False
        return True

    wait_until(sends, BOUND + 60, "the mail accepted")  # generous: a slow machine reconnects
