"""Living beside a site's own Dovecot SASL (issue 24, section 3; docs/coexistence.md): the real
keyrelay-policyd with ``auth.site_auth_socket`` pointing at a real private Dovecot (Debian's
dovecot-core, a passwd-file of SHA512-CRYPT hashes; testkit/dovecot.py).

Over the Dovecot auth protocol as Postfix speaks it: a login that is neither ``apikey`` nor an
imported legacy login is answered by the site's Dovecot, success or failure, with exactly the
fields Dovecot gives when asked directly (its passdb's extra fields too); keyrelay's own logins
stay keyrelay's even when Dovecot knows the same name; a name or an answer shaped like a
keyrelay login is refused; Dovecot away is a temporary answer and back is served again; the
site's logins are never counted towards keyrelay's lock-outs; their messages pass keyrelay's
policy service for the site's own rules to decide, while keyrelay's logins keep theirs.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from keyrelay import admin, passwords
from testkit import dovecot as dovecot_kit
from testkit.net import wait_until
from testkit.policyd import Policyd, add_verified_domain, fresh_address, now
from testkit.protocols import AuthReply, DovecotClient, PolicyClient, b64, connect

pytestmark = pytest.mark.skipif(not dovecot_kit.available(),
                                reason="dovecot-core is not installed (make test installs it)")

ALICE, ALICE_PASSWORD = "alice@site.example", "alice-mailbox-pw-1"
BOB, BOB_PASSWORD = "bob@site.example", "bob-mailbox-pw-2"
# Dovecot knows "crm" too, with another password: keyrelay's imported login wins
CRM_SITE_PASSWORD, CRM_LEGACY_PASSWORD = "crm-dovecot-pw-3", "crm-legacy-pw-4"
RENAMED = "renamed@site.example"  # passdb rewrites the user to a keyrelay-shaped login
SECRETS = (ALICE_PASSWORD, BOB_PASSWORD, CRM_SITE_PASSWORD, CRM_LEGACY_PASSWORD)


@pytest.fixture(scope="module")
def site() -> Iterator[dovecot_kit.Dovecot]:
    users = {ALICE: ALICE_PASSWORD, BOB: BOB_PASSWORD, "crm": CRM_SITE_PASSWORD,
             RENAMED: "renamed-pw-5"}
    # passwd-file extra fields: Dovecot returns "quota_class=gold" in its OK; "user=" renames
    extra = {BOB: "quota_class=gold", RENAMED: "user=acme/crm:legacy"}
    with dovecot_kit.private_dovecot(users, extra) as running:
        yield running


@pytest.fixture
def daemon(tmp_path: Path, site: dovecot_kit.Dovecot) -> Iterator[Policyd]:
    relay = Policyd(tmp_path, {
        "auth": {"site_auth_socket": str(site.socket)},
        "policyd": {"bruteforce": {"max_failures_per_address": 3}},
    })
    when = now()
    with relay.directory().transaction() as data:
        admin.add_account(data, "acme", when)
        admin.add_subuser(data, "acme/crm", when)
        add_verified_domain(data, "acme", "acme.example", grants=("acme/crm",))
        admin.set_legacy_login(data, "acme/crm", "crm",
                               passwords.hash_plaintext(CRM_LEGACY_PASSWORD),
                               (when + timedelta(days=30)).date(), when)
    relay.start()
    try:
        yield relay
    finally:
        assert relay.stop() == 0, relay.log()[-3000:]
    assert not relay.tracebacks(), relay.tracebacks()
    for secret in SECRETS:
        assert secret not in relay.log()


def ask(endpoint: str, username: str, password: str, *, rip: str = "",
        mechanism: str = "PLAIN") -> AuthReply:
    """One login as Postfix's Dovecot client sends it, to keyrelay or to Dovecot itself."""
    with DovecotClient(connect(endpoint)) as auth:
        auth.handshake()
        rip = rip or fresh_address()
        if mechanism == "LOGIN":
            first = auth.auth("LOGIN", rip=rip)
            assert first.status == "CONT", first
            assert auth.cont(b64(username)).status == "CONT"
            return auth.cont(b64(password))
        return auth.auth("PLAIN", rip=rip, resp=b64(f"\0{username}\0{password}"))


def direct(site: dovecot_kit.Dovecot, username: str, password: str) -> AuthReply:
    return ask(f"unix:{site.socket}", username, password)


def test_a_site_login_gets_the_sites_answer_unchanged(daemon: Policyd,
                                                       site: dovecot_kit.Dovecot) -> None:
    auth = daemon.endpoint("auth")
    mark = daemon.mark()
    for username, password in ((ALICE, ALICE_PASSWORD), (BOB, BOB_PASSWORD),
                               (ALICE, "not-alices"), ("nobody@site.example", "x")):
        through = ask(auth, username, password)
        assert through.status in ("OK", "FAIL")
        assert (through.status, through.params) == (
            direct(site, username, password).status, direct(site, username, password).params)
    assert ask(auth, BOB, BOB_PASSWORD).params == {"user": BOB, "quota_class": "gold"}
    assert ask(auth, ALICE, "wrong").status == "FAIL"
    # the LOGIN mechanism too: keyrelay finishes the exchange, Dovecot is asked with PLAIN
    assert ask(auth, ALICE, ALICE_PASSWORD, mechanism="LOGIN").params == {"user": ALICE}
    line = daemon.wait_for_log(r"reason=site_login\b.*site_answer=OK", since=mark)
    assert f"username={ALICE}" in line or f"username={BOB}" in line
    daemon.wait_for_log(r"reason=site_login\b.*site_answer=FAIL", since=mark)


def test_keyrelays_own_logins_stay_keyrelays(daemon: Policyd) -> None:
    auth = daemon.endpoint("auth")
    key = daemon.create_key("acme/crm", "app")
    assert ask(auth, "apikey", key.text).params == {"user": key.identity}
    # "crm" is an imported legacy login: keyrelay checks it, though Dovecot knows "crm" too
    assert ask(auth, "crm", CRM_LEGACY_PASSWORD).params == {"user": "acme/crm:legacy"}
    refused = ask(auth, "crm", CRM_SITE_PASSWORD)
    assert refused.status == "FAIL"
    assert refused.reason == "authentication failed: wrong username or password"


def test_a_keyrelay_shaped_name_or_answer_is_never_let_in(daemon: Policyd) -> None:
    auth = daemon.endpoint("auth")
    mark = daemon.mark()
    shaped = ask(auth, "acme/crm:legacy", CRM_LEGACY_PASSWORD)
    assert shaped.status == "FAIL"
    assert shaped.reason == ("the username 'acme/crm:legacy' has the form of a keyrelay login "
                             "(PRINCIPAL:KEYID) and cannot be a site login")
    # Dovecot's passdb renames the user to a keyrelay login: its OK is not passed on
    renamed = ask(auth, RENAMED, "renamed-pw-5")
    assert renamed.status == "FAIL"
    assert renamed.reason.startswith("the username 'acme/crm:legacy' has the form")
    wait_until(lambda: len(daemon.log_lines(r"reason=reserved_username\b", since=mark)) == 2,
               60, "both refusals in the decision log")


def test_site_logins_are_not_counted_towards_keyrelays_lock_outs(daemon: Policyd) -> None:
    auth = daemon.endpoint("auth")
    rip = fresh_address()
    for _ in range(6):  # twice bruteforce.max_failures_per_address
        assert ask(auth, ALICE, "wrong", rip=rip).status == "FAIL"
    assert ask(auth, ALICE, ALICE_PASSWORD, rip=rip).status == "OK"
    key = daemon.create_key("acme/crm", "app")
    assert ask(auth, "apikey", key.text, rip=rip).status == "OK"
    assert "locked out" not in daemon.log()


def test_the_site_away_is_a_temporary_answer_and_back_is_served(
    daemon: Policyd, site: dovecot_kit.Dovecot,
) -> None:
    auth = daemon.endpoint("auth")
    assert ask(auth, ALICE, ALICE_PASSWORD).status == "OK"  # a connection is open now
    mark = daemon.mark()
    site.stop()
    try:
        # the connection closes: Postfix answers 454 4.7.0 and the client retries
        assert ask(auth, ALICE, ALICE_PASSWORD).status == "CLOSED"
        line = daemon.wait_for_log(r"reason=site_auth_unavailable\b", since=mark)
        assert "verdict=tempfail" in line
        # keyrelay's own logins are not held up by the site's auth service
        key = daemon.create_key("acme/crm", "app")
        assert ask(auth, "apikey", key.text).status == "OK"
    finally:
        site.start()
    assert ask(auth, ALICE, ALICE_PASSWORD).params == {"user": ALICE}


def test_a_site_logins_messages_pass_the_policy_service_for_the_sites_rules(
    daemon: Policyd,
) -> None:
    key = daemon.create_key("acme/crm", "app")
    with PolicyClient(connect(daemon.endpoint("policy"))) as policy:
        site_user = {"sasl_method": "PLAIN", "sasl_username": ALICE}
        # keyrelay does not judge the site's senders: Postfix's own restrictions decide
        assert policy.ask(**site_user, sender=ALICE) == "DUNNO"
        assert policy.ask(**site_user, sender="invoices@acme.example") == "DUNNO"
        app = {"sasl_method": "PLAIN", "sasl_username": key.identity}
        assert policy.ask(**app, sender="invoices@acme.example") == "DUNNO"
        refused = policy.ask(**app, sender=ALICE)
        assert refused is not None and refused.startswith("550 5.7.1")


def test_check_config_says_whether_the_site_answers(tmp_path: Path,
                                                    site: dovecot_kit.Dovecot) -> None:
    relay = Policyd(tmp_path, {"auth": {"site_auth_socket": str(site.socket)}})
    with relay.directory().transaction() as data:
        admin.add_account(data, "acme", now())
    found = subprocess.run(relay.command("--check-config"), capture_output=True, text=True,
                           timeout=120)
    assert found.returncode == 0, found.stderr
    assert (f"keyrelay-policyd: the site's auth service at {site.socket} answers and offers "
            "PLAIN") in found.stdout
    # a socket nobody serves: a warning that names it, not a refusal (Dovecot may start later)
    relay.write_config({"auth": {"site_auth_socket": str(tmp_path / "nothing-here")}})
    away = subprocess.run(relay.command("--check-config"), capture_output=True, text=True,
                          timeout=120)
    assert away.returncode == 0, away.stderr
    assert (f"auth.site_auth_socket: cannot connect to {tmp_path / 'nothing-here'}: No such "
            "file or directory; the site's logins get 454 4.7.0 until it answers") in (
        away.stdout + away.stderr)
    assert "Traceback" not in away.stderr


def test_the_sites_temporary_failure_is_a_temporary_answer(tmp_path: Path) -> None:
    # a passdb that cannot decide (checkpassword exits 111): Dovecot 2.3 answers
    # FAIL ... code=temp_fail, which Postfix would turn into a permanent 535; keyrelay closes
    # the connection instead (Postfix answers 454 4.7.0, the client retries)
    with dovecot_kit.private_dovecot({}, checkpassword_exit=111) as broken:
        direct_answer = direct(broken, ALICE, ALICE_PASSWORD)
        assert direct_answer.status == "FAIL" and direct_answer.params.get("code") == "temp_fail"
        relay = Policyd(tmp_path, {"auth": {"site_auth_socket": str(broken.socket)}})
        with relay.directory().transaction() as data:
            admin.add_account(data, "acme", now())
        relay.start()
        try:
            mark = relay.mark()
            assert ask(relay.endpoint("auth"), ALICE, ALICE_PASSWORD).status == "CLOSED"
            line = relay.wait_for_log(r"reason=site_auth_unavailable\b", since=mark)
            assert "verdict=tempfail" in line
        finally:
            assert relay.stop() == 0
        assert ALICE_PASSWORD not in relay.log()
