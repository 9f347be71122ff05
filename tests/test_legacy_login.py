"""The password bridge's login (issue 24, section 2) in the decision engine: an imported
login's username and old password until its sunset, over TLS only, under a key's rules; the
session ``PRINCIPAL:legacy`` through the policy and milter checks; the 535 after the sunset."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest
from test_decisions import INSIDE, envelope, headers, login, world
from test_legacy_credential import dovecot_hashes
from test_policyd_services import Auth
from test_reasons import text_matches

from keyrelay import admin, passwords
from keyrelay.decisions import (
    LEGACY_KEY_ID,
    Action,
    EngineSettings,
    LoginFacts,
    Reason,
    Verdict,
    counts_as_guess,
    decide_login,
    legacy_login_for,
    parse_identity,
    sender_logins,
)
from policyd import dovecot
from policyd.auth import HASH_PENDING, render
from testkit.factories import NOW, World

__all__ = ["world"]  # the fixture, used by name

PASSWORD = "old-billing-pw-1"
SUNSET = (NOW + timedelta(days=10)).date()


@pytest.fixture
def legacy(world: World) -> World:
    admin.set_legacy_login(world.data, "acme/billing", "billing@site.example",
                           dovecot_hashes(PASSWORD)["SHA512-CRYPT"], SUNSET, NOW)
    return world


def test_the_old_username_and_password_log_in_as_principal_legacy(legacy: World) -> None:
    verdict = login(legacy, PASSWORD, username="billing@site.example")
    assert (verdict.action, verdict.reason) == (Action.ALLOW, Reason.LEGACY_PASSWORD)
    assert verdict.identity == "acme/billing:legacy"
    assert parse_identity(verdict.identity) == ("acme/billing", LEGACY_KEY_ID)
    assert legacy.snapshot().legacy["acme/billing"].days_left(NOW) == 10


def test_a_wrong_password_is_a_guess_that_names_nobody(legacy: World) -> None:
    verdict = login(legacy, PASSWORD + "x", username="billing@site.example")
    assert (verdict.action, verdict.reason, verdict.principal) == (
        Action.REFUSE, Reason.WRONG_LEGACY_PASSWORD, None)
    assert counts_as_guess(verdict) and PASSWORD not in verdict.text
    assert text_matches(str(verdict.reason), verdict.text)


def test_the_outcome_of_a_verification_done_elsewhere_is_used(legacy: World) -> None:
    facts = LoginFacts("billing@site.example", "anything", INSIDE, NOW)
    snapshot = legacy.snapshot()
    cred = legacy_login_for(snapshot, EngineSettings(), facts)
    assert cred is not None and cred.principal == "acme/billing"
    assert decide_login(snapshot, EngineSettings(), facts, password_ok=True).allowed
    assert not decide_login(snapshot, EngineSettings(), facts, password_ok=False).allowed


def test_only_over_tls(legacy: World) -> None:
    facts = LoginFacts("billing@site.example", PASSWORD, INSIDE, NOW, secured=False)
    snapshot = legacy.snapshot()
    assert legacy_login_for(snapshot, EngineSettings(), facts) is None
    assert decide_login(snapshot, EngineSettings(), facts).reason is Reason.TLS_REQUIRED
    # even where auth.require_tls lets keys in on a plaintext connection
    lax = EngineSettings(require_tls=False)
    assert legacy_login_for(snapshot, lax, facts) is None
    assert decide_login(snapshot, lax, facts).reason is Reason.TLS_REQUIRED


def test_after_the_sunset_the_client_reads_when_it_ended_and_what_to_do(legacy: World) -> None:
    later = NOW + timedelta(days=11)
    facts = LoginFacts("billing@site.example", PASSWORD, INSIDE, later)
    snapshot = legacy.snapshot()
    # still verified: only the password's holder reads when it ended and whose it was
    assert legacy_login_for(snapshot, EngineSettings(), facts) is not None
    guessed = decide_login(snapshot, EngineSettings(), facts, password_ok=False)
    assert (guessed.reason, guessed.principal) == (Reason.WRONG_LEGACY_PASSWORD, None)
    assert "acme" not in guessed.text
    verdict = decide_login(snapshot, EngineSettings(), facts)
    assert (verdict.action, verdict.code, verdict.status, verdict.reason) == (
        Action.REFUSE, 535, "5.7.8", Reason.LEGACY_PASSWORD_ENDED)
    assert verdict.text == (
        f"password logins for acme/billing ended on {SUNSET.isoformat()}; the application "
        "must use an API key (keyrelay key create acme/billing)")
    assert text_matches(str(verdict.reason), verdict.text)
    # the sunset day itself still logs in
    on_the_day = LoginFacts("billing@site.example", PASSWORD, INSIDE, NOW + timedelta(days=10))
    assert decide_login(snapshot, EngineSettings(), on_the_day).allowed


def test_a_suspended_principal_and_the_ip_rules_apply_as_to_a_key(legacy: World) -> None:
    legacy.suspend("acme/billing")
    assert login(legacy, PASSWORD, username="billing@site.example").reason is \
        Reason.PRINCIPAL_INACTIVE
    legacy.data.subusers.clear()  # start again: a globex subuser with IP rules
    legacy.subuser("globex/app")
    admin.set_legacy_login(legacy.data, "globex/app", "app", passwords.hash_plaintext("pw-2"),
                           SUNSET, NOW)
    outside = login(legacy, "pw-2", username="app", client="198.51.100.77")
    assert (outside.action, outside.reason) == (Action.REFUSE, Reason.IP_NOT_ALLOWED)
    assert login(legacy, "pw-2", username="app", client="192.0.2.8").allowed


def test_an_unknown_username_is_still_a_bad_username(legacy: World) -> None:
    assert login(legacy, PASSWORD, username="nobody").reason is Reason.BAD_USERNAME


def test_the_legacy_session_passes_the_same_sender_checks_as_a_key(legacy: World) -> None:
    ident = "acme/billing:legacy"
    assert envelope(legacy, ident, "invoices@billing.example").allowed
    refused = envelope(legacy, ident, "someone@acme.example")
    assert (refused.action, refused.reason) == (Action.REFUSE, Reason.SENDER_NOT_OWNED)
    assert headers(legacy, ident, ("invoices@billing.example",)).allowed
    assert headers(legacy, ident, ("x@acme.example",)).reason is Reason.HEADER_FROM_NOT_OWNED


def test_a_legacy_session_ends_with_its_sunset_or_its_removal(legacy: World) -> None:
    ident = "acme/billing:legacy"
    admin.set_legacy_sunset(legacy.data, ["acme/billing"], (NOW - timedelta(days=1)).date())
    ended = envelope(legacy, ident, "invoices@billing.example")
    assert (ended.action, ended.code, ended.reason) == (
        Action.REFUSE, 550, Reason.LEGACY_PASSWORD_ENDED)
    admin.remove_legacy_login(legacy.data, "acme/billing")
    removed = envelope(legacy, ident, "invoices@billing.example")
    assert removed.reason is Reason.LEGACY_PASSWORD_ENDED
    assert "have ended" in removed.text and text_matches(str(removed.reason), removed.text)


def test_a_login_use_is_recorded_by_its_identity(legacy: World) -> None:
    admin.record_key_use(legacy.data, {"acme/billing:legacy": NOW})
    assert legacy.data.legacy["acme/billing"].last_used == NOW


# -- the auth service: the hash verified off the event loop, in a bounded pool ---------------
def _attempt(username: str, password: str, client: str = INSIDE) -> dovecot.Attempt:
    return dovecot.Attempt("1", "PLAIN", username, password, client, True, "smtp")


def _settled(pending: object) -> Verdict:
    """The verdict of a login that had to wait (a coroutine: the hash checked in the pool)."""
    assert asyncio.iscoroutine(pending), pending
    verdict = asyncio.run(pending)
    assert isinstance(verdict, Verdict), verdict
    return verdict


def test_the_auth_service_verifies_off_the_loop_and_counts_wrong_passwords(
        tmp_path: Path, legacy: World) -> None:
    auth = Auth(tmp_path, legacy, {"max_failures_per_address": 2, "lockout": "1h"})
    verdict = _settled(auth.service.login(_attempt("billing@site.example", PASSWORD)))
    assert (verdict.reason, verdict.identity) == (Reason.LEGACY_PASSWORD, "acme/billing:legacy")
    assert auth.service.context.used_keys == {"acme/billing:legacy": NOW}
    for _ in range(2):
        wrong = auth.service.login(_attempt("billing@site.example", "nope", "192.0.2.50"))
        assert _settled(wrong).reason is Reason.WRONG_LEGACY_PASSWORD
    locked = auth.service.login(_attempt("billing@site.example", PASSWORD, "192.0.2.50"))
    assert isinstance(locked, Verdict) and locked.reason is Reason.ADDRESS_LOCKED_OUT


def test_a_saturated_pool_answers_temporarily(tmp_path: Path, legacy: World) -> None:
    auth = Auth(tmp_path, legacy, {})
    auth.service.hashing = HASH_PENDING  # every slot taken
    verdict = _settled(auth.service.login(_attempt("billing@site.example", PASSWORD)))
    assert (verdict.action, verdict.reason) == (Action.TEMPFAIL, Reason.LEGACY_BUSY)
    assert render("1", verdict) is None  # the connection drops: Postfix answers 454 4.7.0


def test_the_socketmap_lists_the_legacy_login_until_the_sunset(legacy: World) -> None:
    snapshot = legacy.snapshot()
    assert "acme/billing:legacy" in sender_logins(
        snapshot, EngineSettings(), "invoices@billing.example", NOW)
    assert "acme/billing:legacy" not in sender_logins(
        snapshot, EngineSettings(), "invoices@billing.example", NOW + timedelta(days=11))
