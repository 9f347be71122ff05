"""The decision engine (keyrelay.decisions) against docs/answers.md, question by question.

Every test builds its directory through the admin operations (testkit/factories.py), asks the
engine one question and checks the whole answer a client would hear: action, SMTP code,
enhanced status and the stable reason tag.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta

import pytest
from test_reasons import text_matches

from keyrelay import admin
from keyrelay.config import Duration, default_config
from keyrelay.decisions import (
    Action,
    EngineSettings,
    EnvelopeFacts,
    HeaderFacts,
    LockoutFacts,
    LoginFacts,
    QuotaFacts,
    RateFacts,
    Reason,
    Verdict,
    counts_against_key,
    counts_as_guess,
    decide_envelope,
    decide_headers,
    decide_lockout,
    decide_login,
    decide_quota,
    decide_rate,
    format_identity,
    limits_for,
    locked_out,
    parse_identity,
    temporary,
    windows_for,
    with_rate,
)
from keyrelay.decisions import envelope as envelope_module
from keyrelay.decisions import (
    minutes as lockout_minutes,
)
from keyrelay.decisions.reasons import TEMPORARY_TEXTS
from keyrelay.directory.model import DomainState, Limits, SelectorState
from testkit.factories import NOW, World, key_id

INSIDE = "203.0.113.5"  # a client address; only globex has IP access rules
DEFAULTS = EngineSettings()


# -- fixtures and helpers --------------------------------------------------------------------
@pytest.fixture
def world() -> World:
    """Three accounts: acme (two subusers), globex (IP rules), initech (no pool at all)."""
    w = World()
    w.pool("shared", "198.51.100.1")
    w.pool("acme-out", "198.51.100.2")
    w.pool("mkt-out", "198.51.100.3")
    w.account("acme", pool="acme-out")
    w.subuser("acme/marketing", pool="mkt-out")
    w.subuser("acme/billing")
    w.account("globex", ip_allow=("192.0.2.0/24", "2001:db8:1::/48"))
    w.account("initech")
    w.domain("acme", "acme.example")
    w.grant("acme.example", "acme/marketing")
    w.domain("acme", "corp.acme.example")  # the account's, granted to nobody
    w.domain("acme", "pending.acme.example", state=DomainState.PENDING)
    w.domain("acme", "nosign.acme.example", signing=False)
    w.domain("acme", "bücher.example")  # stored as xn--bcher-kva.example
    w.domain("acme/marketing", "news.acme.example")
    w.domain("acme/billing", "billing.example")
    w.domain("globex", "globex.example")
    w.domain("initech", "initech.example")
    w.sender("acme", "founder@freemail.example")
    w.sender("acme/marketing", "promo@freemail.example")
    return w


def secret_of(text: str) -> str:
    return text.rpartition(".")[2]


def identity(world: World, text: str) -> str:
    kid = key_id(text)
    return format_identity(world.data.keys[kid].principal, kid)


def login(
    world: World,
    password: str,
    *,
    username: str = "apikey",
    client: str = INSIDE,
    settings: EngineSettings = DEFAULTS,
) -> Verdict:
    return decide_login(world.snapshot(), settings, LoginFacts(username, password, client, NOW))


def envelope(
    world: World,
    ident: str,
    sender: str,
    *,
    submission: bool = True,
    client: str = INSIDE,
    settings: EngineSettings = DEFAULTS,
) -> Verdict:
    return decide_envelope(
        world.snapshot(), settings, EnvelopeFacts(ident, submission, client, sender, NOW)
    )


def headers(
    world: World,
    ident: str,
    from_values: tuple[str, ...],
    sender_values: tuple[str, ...] = (),
    *,
    client: str = INSIDE,
    settings: EngineSettings = DEFAULTS,
) -> Verdict:
    return decide_headers(
        world.snapshot(), settings, HeaderFacts(ident, from_values, sender_values, client, NOW)
    )


def rate(
    world: World,
    ident: str,
    minute: int = 1,
    hour: int = 1,
    recipients: int = 1,
    *,
    settings: EngineSettings = DEFAULTS,
) -> Verdict:
    """The policy service's answer for a message at DATA: recipients per message first
    (``decide_rate``), then the windows (``windows_for``), ``minute`` and ``hour`` being the
    messages in each sliding window including this one, as the counter store would answer."""
    snapshot = world.snapshot()
    verdict = decide_rate(snapshot, settings, RateFacts(ident, recipients, NOW))
    parsed = parse_identity(ident)
    if not verdict.allowed or verdict.monitored is not None or parsed is None:
        return verdict
    counts = {"minute": minute, "hour": hour}
    for window in windows_for(snapshot, settings, parsed[0]):
        count = counts.get(window.span, 1)
        if count > window.limit:
            return decide_quota(snapshot, settings, QuotaFacts(
                ident, 1, window, used=count - 1, resets_in=30.0, now=NOW))
    return decide_quota(snapshot, settings, QuotaFacts(ident, 1, None, now=NOW))


def assert_refused(verdict: Verdict, code: int, status: str, reason: str) -> None:
    assert (verdict.action, verdict.code, verdict.status, verdict.reason) == (
        Action.REFUSE if code >= 500 else Action.TEMPFAIL, code, status, reason
    ), verdict
    assert not verdict.allowed
    assert verdict.monitored is None
    assert verdict.smtp_reply == f"{code} {status} {verdict.text}"
    assert verdict.text, "every refusal tells the user what to fix"
    assert text_matches(reason, verdict.text), f"not in docs/answers.md: {verdict.text!r}"


# -- login -----------------------------------------------------------------------------------
@pytest.mark.parametrize("principal", ["acme", "acme/marketing"])
def test_login_with_active_key_returns_identity_of_principal_and_key_id(
    world: World, principal: str
) -> None:
    text = world.key(principal)
    verdict = login(world, text)
    kid = key_id(text)
    assert verdict.action is Action.ALLOW
    assert (verdict.principal, verdict.key_id) == (principal, kid)
    assert verdict.identity == f"{principal}:{kid}"
    assert verdict.code == 0 and verdict.monitored is None


def test_login_username_is_configurable(world: World) -> None:
    text = world.key("acme")
    settings = EngineSettings(username="relaykey")
    assert login(world, text, username="relaykey", settings=settings).allowed
    verdict = login(world, text, username="apikey", settings=settings)
    assert_refused(verdict, 535, "5.7.8", "bad_username")
    assert "relaykey" in verdict.text


# Each case: (reason, build(world) -> (username, password, client)). The key is always a
# real key of the world, so only the stated fault can cause the refusal.
LoginCase = Callable[[World], tuple[str, str, str]]


def _revoked(w: World) -> tuple[str, str, str]:
    text = w.key("acme")
    w.revoke(text)
    return "apikey", text, INSIDE


def _expired(w: World) -> tuple[str, str, str]:
    return "apikey", w.key("acme", expires=NOW - timedelta(seconds=1)), INSIDE


def _expires_now(w: World) -> tuple[str, str, str]:
    return "apikey", w.key("acme", expires=NOW), INSIDE


def _suspended(pid: str, suspend: str) -> LoginCase:
    def build(w: World) -> tuple[str, str, str]:
        text = w.key(pid)
        w.suspend(suspend)
        return "apikey", text, INSIDE

    return build


def _wrong_secret(w: World) -> tuple[str, str, str]:
    text = w.key("acme")
    other = secret_of(w.key("acme", "other"))
    return "apikey", text.rpartition(".")[0] + "." + other, INSIDE


def _unknown_id(w: World) -> tuple[str, str, str]:
    text = w.key("acme")
    return "apikey", "kr.aaaaaaaaaaaaaaaa." + secret_of(text), INSIDE


def _globex_from(client: str) -> LoginCase:
    return lambda w: ("apikey", w.key("globex"), client)


LOGIN_REFUSALS: dict[str, tuple[str, LoginCase]] = {
    "other username": ("bad_username", lambda w: ("acme", w.key("acme"), INSIDE)),
    "username case differs": ("bad_username", lambda w: ("APIKEY", w.key("acme"), INSIDE)),
    "empty username": ("bad_username", lambda w: ("", w.key("acme"), INSIDE)),
    "account password": ("malformed_key", lambda w: ("apikey", "hunter2", INSIDE)),
    "empty password": ("malformed_key", lambda w: ("apikey", "", INSIDE)),
    "other prefix": ("malformed_key", lambda w: ("apikey", "xx" + w.key("acme")[2:], INSIDE)),
    "truncated secret": ("malformed_key", lambda w: ("apikey", w.key("acme")[:-1], INSIDE)),
    "no secret": ("malformed_key", lambda w: ("apikey", w.key("acme").rpartition(".")[0], INSIDE)),
    "uppercase key id": ("malformed_key", lambda w: ("apikey", w.key("acme").upper(), INSIDE)),
    "unknown key id": ("unknown_key", _unknown_id),
    "wrong secret for a known id": ("wrong_secret", _wrong_secret),
    "revoked": ("revoked_key", _revoked),
    "expired": ("expired_key", _expired),
    "expires at this very moment": ("expired_key", _expires_now),
    "account suspended": ("principal_inactive", _suspended("acme", "acme")),
    "subuser suspended": ("principal_inactive", _suspended("acme/billing", "acme/billing")),
    "subuser of a suspended account": ("principal_inactive", _suspended("acme/billing", "acme")),
    "no mail.send scope": (
        "missing_scope", lambda w: ("apikey", w.key("acme", scopes=("stats.read",)), INSIDE)
    ),
    "IPv4 client outside the rules": ("ip_not_allowed", _globex_from("203.0.113.9")),
    "IPv6 client outside the rules": ("ip_not_allowed", _globex_from("2001:db8:2::1")),
    "IPv4-mapped IPv6 client outside": ("ip_not_allowed", _globex_from("::ffff:203.0.113.9")),
    "IPv6 client next to an IPv4 rule": ("ip_not_allowed", _globex_from("::c000:205")),
    "unreadable client address": ("ip_not_allowed", _globex_from("unknown")),
}


@pytest.mark.parametrize("case", LOGIN_REFUSALS.values(), ids=LOGIN_REFUSALS.keys())
def test_login_refusal_is_535_5_7_8_with_reason_and_never_the_secret(
    world: World, case: tuple[str, LoginCase]
) -> None:
    reason, build = case
    username, password, client = build(world)
    verdict = login(world, password, username=username, client=client)
    assert_refused(verdict, 535, "5.7.8", reason)
    assert verdict.identity is None
    secret = secret_of(password)
    if len(secret) >= 8:  # "hunter2" and "" are not keys, but check them too where sensible
        for shown in (verdict.text, repr(verdict), str(verdict.log_fields())):
            assert secret not in shown


def test_login_unknown_id_and_wrong_secret_give_the_same_answer(world: World) -> None:
    # no oracle: a guesser cannot tell a valid key id from an invalid one
    _, wrong, _ = _wrong_secret(world)
    _, unknown, _ = _unknown_id(world)
    a = login(world, wrong)
    b = login(world, unknown)
    assert (a.action, a.smtp_reply, a.principal) == (b.action, b.smtp_reply, None)
    # only the log tells them apart, for the admin: a wrong secret names the key it tried
    assert (a.reason, a.key_id) == ("wrong_secret", key_id(wrong))
    assert (b.reason, b.key_id) == ("unknown_key", None)
    assert counts_as_guess(a) and counts_as_guess(b)
    assert counts_against_key(a) and not counts_against_key(b)


def test_a_locked_out_login_is_535_and_says_for_how_many_minutes() -> None:
    verdict = locked_out(Reason.ADDRESS_LOCKED_OUT, "too many failed logins from 192.0.2.1",
                         61, None)
    assert verdict.smtp_reply == ("535 5.7.8 too many failed logins from 192.0.2.1; try again "
                                  "in 2 minutes")
    assert verdict.reason == "address_locked_out" and not counts_as_guess(verdict)
    assert lockout_minutes(1) == "1 minute" and lockout_minutes(900) == "15 minutes"


LOCKOUT_CASES: list[tuple[tuple[float, float, float | None], str | None, str]] = [
    # ((address locked, key locked, seconds since the key's last login here), reason, why)
    ((0, 0, None), None, "nothing locked: decided on the credentials"),
    ((0, 0, 3600), None, "nothing locked, a known client"),
    ((600, 0, None), "address_locked_out", "the address is locked"),
    ((600, 900, 60), "address_locked_out",
     "the address lock-out stops even the key's own client: the attacker's address stays locked"),
    ((0, 900, None), "key_locked_out", "the key id is locked, a client it never logged in from"),
    ((0, 900, 60), None, "the key id is locked, but it logged in from here a minute ago"),
    ((0, 900, 7 * 86400), None, "logged in from here exactly trusted_for ago"),
    ((0, 900, 7 * 86400 + 1), "key_locked_out", "its last login from here is too old"),
]


@pytest.mark.parametrize(("counts", "reason"), [c[:2] for c in LOCKOUT_CASES],
                         ids=[c[2] for c in LOCKOUT_CASES])
def test_a_locked_key_id_still_logs_in_where_it_recently_logged_in(
    counts: tuple[float, float, float | None], reason: str | None,
) -> None:
    address_locked, key_locked, since = counts
    verdict = decide_lockout(DEFAULTS, LockoutFacts("192.0.2.1", "a" * 16, address_locked,
                                                    key_locked, since))
    if reason is None:
        assert verdict is None
        return
    assert verdict is not None
    assert_refused(verdict, 535, "5.7.8", reason)
    assert verdict.key_id == "a" * 16 and not counts_as_guess(verdict)
    assert verdict.text == (
        "too many failed logins from 192.0.2.1; try again in 10 minutes"
        if reason == "address_locked_out" else
        f"too many failed logins for API key {'a' * 16}; try again in 15 minutes")


def test_trusted_for_0_locks_a_key_id_out_everywhere() -> None:
    settings = EngineSettings(trusted_for=0.0)
    verdict = decide_lockout(settings, LockoutFacts("192.0.2.1", "a" * 16, 0, 900, 0.0))
    assert verdict is not None and verdict.reason == "key_locked_out"


def test_a_password_that_is_no_key_meets_the_address_lockout_only() -> None:
    assert decide_lockout(DEFAULTS, LockoutFacts("192.0.2.1", None, 0, 900, None)) is None
    locked = decide_lockout(DEFAULTS, LockoutFacts("192.0.2.1", None, 30, 0, None))
    assert locked is not None and locked.reason == "address_locked_out"


def test_our_own_faults_are_one_temporary_answer_per_reason_in_every_service() -> None:
    for reason, text in TEMPORARY_TEXTS.items():
        verdict = temporary(reason, "acme/billing:" + "a" * 16)
        assert (verdict.action, verdict.code, verdict.status, verdict.text) == (
            Action.TEMPFAIL, 451, "4.3.0", text)
        assert (verdict.principal, verdict.key_id) == ("acme/billing", "a" * 16)
    assert temporary(Reason.INTERNAL_ERROR).principal is None


def test_login_refusal_of_a_known_key_names_principal_and_key_id(world: World) -> None:
    _, text, _ = _revoked(world)
    verdict = login(world, text)
    assert (verdict.principal, verdict.key_id) == ("acme", key_id(text))
    assert key_id(text) in verdict.text


def test_login_subuser_of_suspended_account_text_names_the_account(world: World) -> None:
    _, text, _ = _suspended("acme/billing", "acme")(world)
    assert "account acme is suspended" in login(world, text).text


def test_login_key_not_yet_expired_passes(world: World) -> None:
    text = world.key("acme", expires=NOW + timedelta(seconds=1))
    assert login(world, text).allowed


@pytest.mark.parametrize(
    "client",
    ["192.0.2.1", "192.0.2.255", "2001:db8:1::5", "2001:db8:1:ffff::1", "::ffff:192.0.2.77"],
)
def test_login_client_inside_ip_rules_passes(world: World, client: str) -> None:
    assert login(world, world.key("globex"), client=client).allowed


@pytest.mark.parametrize("client", ["203.0.113.9", "2001:db8:2::1", "unknown"])
def test_login_account_without_ip_rules_accepts_any_client(world: World, client: str) -> None:
    assert login(world, world.key("acme"), client=client).allowed


def test_login_success_never_shows_the_secret(world: World) -> None:
    text = world.key("acme/marketing")
    facts = LoginFacts("apikey", text, INSIDE, NOW)
    verdict = decide_login(world.snapshot(), DEFAULTS, facts)
    assert verdict.allowed
    for shown in (repr(verdict), str(verdict.log_fields()), str(verdict.identity), repr(facts)):
        assert secret_of(text) not in shown


def test_login_scope_removed_later_refuses_next_login(world: World) -> None:
    text = world.key("acme")
    assert login(world, text).allowed
    admin.set_scopes(world.data, key_id(text), ["stats.read"])
    assert_refused(login(world, text), 535, "5.7.8", "missing_scope")


# -- identity strings ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("acme:abcdefghijklmnop", ("acme", "abcdefghijklmnop")),
        ("acme/marketing:abcdefghijklmnop", ("acme/marketing", "abcdefghijklmnop")),
        ("apikey", None),
        ("", None),
        (":abcdefghijklmnop", None),
        ("acme:", None),
        ("acme:ABCDEFGHIJKLMNOP", None),
        ("acme:abcdefghijklmno", None),
    ],
)
def test_parse_identity_accepts_only_principal_colon_key_id(
    text: str, expected: tuple[str, str] | None
) -> None:
    assert parse_identity(text) == expected


# -- envelope: authentication ------------------------------------------------------------------
def test_envelope_without_auth_on_submission_is_530_5_7_0(world: World) -> None:
    verdict = envelope(world, "", "user@acme.example")
    assert_refused(verdict, 530, "5.7.0", "auth_required")
    assert verdict.text == "Authentication required"


def test_envelope_without_auth_on_port_25_is_left_to_postfix(world: World) -> None:
    verdict = envelope(world, "", "anyone@elsewhere.example", submission=False)
    assert verdict.action is Action.ALLOW
    assert verdict.reason == "unauthenticated"
    assert verdict.transport is None and verdict.principal is None


def test_envelope_authenticated_on_port_25_is_still_checked(world: World) -> None:
    ident = identity(world, world.key("acme"))
    verdict = envelope(world, ident, "x@globex.example", submission=False)
    assert_refused(verdict, 550, "5.7.1", "sender_not_owned")


# Each case changes the directory after login; the identity Postfix carries must then fail.
def _delete_key(w: World, text: str) -> None:
    del w.data.keys[key_id(text)]


def _drop_scope(w: World, text: str) -> None:
    admin.set_scopes(w.data, key_id(text), ["stats.read"])


def _drop_subuser_record(w: World, text: str) -> None:
    # the subuser vanished but its key record did not (e.g. an LDAP entry removed by hand)
    del w.data.subusers["acme/marketing"]


SINCE_LOGIN: dict[str, tuple[str, Callable[[World, str], None]]] = {
    "key revoked": ("revoked_key", lambda w, t: w.revoke(t)),
    "account suspended": ("principal_inactive", lambda w, t: w.suspend("acme")),
    "subuser suspended": ("principal_inactive", lambda w, t: w.suspend("acme/marketing")),
    "scope removed": ("missing_scope", _drop_scope),
    "subuser record gone": ("principal_inactive", _drop_subuser_record),
}


@pytest.mark.parametrize("case", SINCE_LOGIN.values(), ids=SINCE_LOGIN.keys())
def test_envelope_refuses_identity_that_became_invalid_since_login(
    world: World, case: tuple[str, Callable[[World, str], None]]
) -> None:
    reason, change = case
    text = world.key("acme/marketing")
    ident = identity(world, text)
    assert envelope(world, ident, "x@news.acme.example").allowed
    change(world, text)
    verdict = envelope(world, ident, "x@news.acme.example")
    assert_refused(verdict, 550, "5.7.1", reason)


def test_a_key_missing_from_the_copy_is_a_temporary_refusal(world: World) -> None:
    """A daemon whose copy lags (LDAP) must not refuse for good a key the login accepted."""
    text = world.key("acme/marketing")
    ident = identity(world, text)
    _delete_key(world, text)
    verdict = envelope(world, ident, "x@news.acme.example")
    assert_refused(verdict, 451, "4.7.1", "key_not_in_copy")
    assert "try again in a moment" in verdict.text


def test_envelope_refuses_key_expired_since_login(world: World) -> None:
    text = world.key("acme", expires=NOW + timedelta(minutes=5))
    ident = identity(world, text)
    directory = world.snapshot()
    facts = EnvelopeFacts(ident, True, INSIDE, "x@acme.example", NOW + timedelta(minutes=5))
    assert_refused(decide_envelope(directory, DEFAULTS, facts), 550, "5.7.1", "expired_key")


def test_envelope_refuses_identity_naming_another_principal_than_the_key(world: World) -> None:
    text = world.key("acme/billing")
    forged = format_identity("acme/marketing", key_id(text))
    verdict = envelope(world, forged, "x@news.acme.example")
    assert_refused(verdict, 550, "5.7.1", "key_of_other_principal")


def test_envelope_refuses_login_that_is_not_a_keyrelay_identity(world: World) -> None:
    verdict = envelope(world, "alice", "alice@acme.example")
    assert_refused(verdict, 550, "5.7.1", "foreign_login")


# -- envelope: IP rules ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("client", "allowed"),
    [
        ("192.0.2.10", True),
        ("::ffff:192.0.2.10", True),
        ("2001:db8:1::10", True),
        ("198.51.100.10", False),
        ("::ffff:198.51.100.10", False),
        ("2001:db8:ffff::10", False),
    ],
)
def test_envelope_client_outside_ip_rules_is_554_5_7_1(
    world: World, client: str, allowed: bool
) -> None:
    ident = identity(world, world.key("globex"))
    verdict = envelope(world, ident, "x@globex.example", client=client)
    if allowed:
        assert verdict.allowed, verdict
    else:
        assert_refused(verdict, 554, "5.7.1", "ip_not_allowed")


# -- envelope: sender ownership ------------------------------------------------------------------
SENDERS: list[tuple[str, str, bool, str]] = [
    # (principal, envelope sender, allowed, what it shows)
    ("acme", "user@acme.example", True, "own verified domain"),
    ("acme", "User@ACME.Example", True, "case does not matter"),
    ("acme", "x@nosign.acme.example", True, "verified domain without DKIM keys"),
    ("acme", "x@bücher.example", True, "IDN domain as U-label"),
    ("acme", "x@xn--bcher-kva.example", True, "IDN domain as A-label"),
    ("acme", "founder@freemail.example", True, "own single sender"),
    ("acme", "Founder@FreeMail.example", True, "own single sender, other case"),
    ("acme", "x@pending.acme.example", False, "own pending domain"),
    ("acme", "other@freemail.example", False, "other address of a single sender's domain"),
    ("acme", "x@sub.acme.example", False, "subdomain of own domain"),
    ("acme", "x@news.acme.example", False, "subuser's domain is not the parent's"),
    ("acme", "promo@freemail.example", False, "subuser's single sender is not the parent's"),
    ("acme", "x@globex.example", False, "another account's domain"),
    ("acme", "x@unknown.example", False, "a domain nobody has"),
    ("acme/marketing", "x@news.acme.example", True, "subuser's own domain"),
    ("acme/marketing", "x@acme.example", True, "account domain granted to the subuser"),
    ("acme/marketing", "promo@freemail.example", True, "subuser's own single sender"),
    ("acme/marketing", "x@corp.acme.example", False, "account domain not granted"),
    ("acme/marketing", "x@billing.example", False, "sibling subuser's domain"),
    ("acme/marketing", "founder@freemail.example", False, "account's single sender"),
    ("acme/billing", "x@billing.example", True, "subuser's own domain"),
    ("acme/billing", "x@acme.example", False, "account domain granted to a sibling only"),
    ("acme/billing", "x@news.acme.example", False, "sibling subuser's domain"),
    ("acme/billing", "promo@freemail.example", False, "sibling subuser's single sender"),
    ("globex", "x@acme.example", False, "another account's domain"),
]


@pytest.mark.parametrize(
    ("principal", "sender", "allowed"),
    [case[:3] for case in SENDERS],
    ids=[case[3] + f" ({case[0]})" for case in SENDERS],
)
def test_envelope_sender_must_be_principals_verified_domain_or_sender(
    world: World, principal: str, sender: str, allowed: bool
) -> None:
    ident = identity(world, world.key(principal))
    verdict = envelope(world, ident, sender, client="192.0.2.1")
    if allowed:
        assert verdict.action is Action.ALLOW, verdict
        assert verdict.reason == "ok" and verdict.principal == principal
    else:
        assert_refused(verdict, 550, "5.7.1", "sender_not_owned")
        assert verdict.principal == principal


def test_envelope_pending_domain_refusal_says_to_verify_it(world: World) -> None:
    ident = identity(world, world.key("acme"))
    verdict = envelope(world, ident, "x@pending.acme.example")
    assert "not verified" in verdict.text and "pending" in verdict.text


def test_envelope_granted_domain_that_is_not_verified_is_refused(world: World) -> None:
    world.grant("pending.acme.example", "acme/billing")
    ident = identity(world, world.key("acme/billing"))
    verdict = envelope(world, ident, "x@pending.acme.example")
    assert_refused(verdict, 550, "5.7.1", "sender_not_owned")


def test_envelope_grant_withdrawn_refuses_subuser_at_once(world: World) -> None:
    ident = identity(world, world.key("acme/marketing"))
    admin.ungrant_domain(world.data, "acme.example", "acme/marketing")
    verdict = envelope(world, ident, "x@acme.example")
    assert_refused(verdict, 550, "5.7.1", "sender_not_owned")


@pytest.mark.parametrize(
    ("verified_ago", "allowed"),
    [(timedelta(hours=1), True), (timedelta(hours=72), True), (timedelta(hours=73), False)],
)
def test_envelope_failing_domain_sends_only_within_grace_period(
    verified_ago: timedelta, allowed: bool
) -> None:
    w = World()
    w.account("acme")
    w.domain("acme", "acme.example", state=DomainState.FAILING, verified_at=NOW - verified_ago)
    verdict = envelope(w, identity(w, w.key("acme")), "x@acme.example")
    assert verdict.allowed is allowed, verdict


def test_envelope_failing_grace_period_comes_from_settings() -> None:
    w = World()
    w.account("acme")
    w.domain(
        "acme", "acme.example", state=DomainState.FAILING, verified_at=NOW - timedelta(hours=2)
    )
    settings = EngineSettings(failing_grace=timedelta(hours=1))
    verdict = envelope(w, identity(w, w.key("acme")), "x@acme.example",
                       settings=settings)
    assert_refused(verdict, 550, "5.7.1", "sender_not_owned")


def test_envelope_remembered_allow_ends_when_the_key_expires_on_the_same_snapshot(
    world: World,
) -> None:
    ident = identity(world, world.key("acme", expires=NOW + timedelta(minutes=5)))
    directory = world.snapshot()
    for minutes, allowed in [(0, True), (4, True), (5, False), (4, True), (6, False)]:
        facts = EnvelopeFacts(ident, True, INSIDE, "x@acme.example",
                              NOW + timedelta(minutes=minutes))
        assert decide_envelope(directory, DEFAULTS, facts).allowed is allowed, minutes


def test_envelope_remembered_allow_ends_with_the_failing_domains_grace_period() -> None:
    w = World()
    w.account("acme")
    w.domain("acme", "acme.example", state=DomainState.FAILING, verified_at=NOW)
    ident = identity(w, w.key("acme"))
    directory = w.snapshot()
    for hours, allowed in [(0, True), (72, True), (73, False), (1, True)]:
        facts = EnvelopeFacts(ident, True, INSIDE, "X@Acme.Example", NOW + timedelta(hours=hours))
        verdict = decide_envelope(directory, DEFAULTS, facts)
        assert verdict.allowed is allowed, hours


def test_envelope_remembered_allow_follows_other_settings_and_a_new_snapshot(
    world: World,
) -> None:
    text = world.key("acme")
    ident = identity(world, text)
    directory = world.snapshot()
    facts = EnvelopeFacts(ident, True, INSIDE, "x@acme.example", NOW)
    assert decide_envelope(directory, DEFAULTS, facts).transport == "kr-pool-acme-out"
    prefixed = replace(DEFAULTS, transport_prefix="out-")
    assert decide_envelope(directory, prefixed, facts).transport == "out-acme-out"
    assert decide_envelope(directory, DEFAULTS, facts).transport == "kr-pool-acme-out"
    admin.revoke_key(world.data, key_id(text), NOW)
    assert_refused(decide_envelope(world.snapshot(), DEFAULTS, facts), 550, "5.7.1",
                   "revoked_key")


def test_envelope_remembers_at_most_a_bounded_number_of_allows(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(envelope_module, "_ENVELOPE_MEMO_MAX", 3)
    ident = identity(world, world.key("acme"))
    directory = world.snapshot()
    for n in range(10):
        facts = EnvelopeFacts(ident, True, INSIDE, f"user{n}@acme.example", NOW)
        assert decide_envelope(directory, DEFAULTS, facts).allowed
        assert len(envelope_module._memo(directory, DEFAULTS, "envelope")) <= 3


def test_envelope_null_sender_from_an_application_is_refused(world: World) -> None:
    ident = identity(world, world.key("acme"))
    verdict = envelope(world, ident, "")
    assert_refused(verdict, 550, "5.7.1", "sender_not_owned")
    assert "null sender" in verdict.text


@pytest.mark.parametrize("sender", ["not an address", "@acme.example", "x@", '"a b"@acme.example'])
def test_envelope_invalid_sender_address_is_refused(world: World, sender: str) -> None:
    ident = identity(world, world.key("acme"))
    assert_refused(envelope(world, ident, sender), 550, "5.7.1", "sender_not_owned")


# -- envelope: routing ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("principal", "sender", "settings", "transport"),
    [
        ("acme/marketing", "x@news.acme.example", DEFAULTS, "kr-pool-mkt-out"),
        ("acme/billing", "x@billing.example", DEFAULTS, "kr-pool-acme-out"),
        ("acme", "x@acme.example", DEFAULTS, "kr-pool-acme-out"),
        ("initech", "x@initech.example", EngineSettings(default_pool="shared"), "kr-pool-shared"),
        ("initech", "x@initech.example", DEFAULTS, None),
        ("acme/marketing", "x@news.acme.example", EngineSettings(transport_prefix="out-"),
         "out-mkt-out"),
        ("acme/billing", "x@billing.example", EngineSettings(default_pool="shared"),
         "kr-pool-acme-out"),
    ],
    ids=[
        "subuser's own pool", "subuser without pool uses account pool", "account pool",
        "default pool", "no pool: Postfix default transport", "transport prefix",
        "account pool wins over default",
    ],
)
def test_envelope_routes_through_the_principals_pool_transport(
    world: World, principal: str, sender: str, settings: EngineSettings, transport: str | None
) -> None:
    ident = identity(world, world.key(principal))
    verdict = envelope(world, ident, sender, settings=settings)
    assert verdict.allowed, verdict
    assert verdict.transport == transport


@pytest.mark.parametrize("monitor", [False, True])
def test_envelope_missing_default_pool_is_temporary_451_4_3_0(world: World, monitor: bool) -> None:
    ident = identity(world, world.key("initech"))
    settings = EngineSettings(default_pool="gone", monitor_mode=monitor)
    verdict = envelope(world, ident, "x@initech.example", settings=settings)
    assert_refused(verdict, 451, "4.3.0", "routing_error")


def test_envelope_pool_missing_from_directory_is_temporary_451_4_3_0(world: World) -> None:
    ident = identity(world, world.key("acme/marketing"))
    del world.data.pools["mkt-out"]  # e.g. an LDAP entry removed by hand
    verdict = envelope(world, ident, "x@news.acme.example")
    assert_refused(verdict, 451, "4.3.0", "routing_error")
    assert "mkt-out" in verdict.text


# -- rate limits -------------------------------------------------------------------------------
def _limited_world() -> World:
    w = World()
    w.account("acme", limits=Limits(messages_per_minute=10, recipients_per_message=5))
    w.subuser("acme/marketing", limits=Limits(messages_per_minute=3, messages_per_hour=50))
    w.subuser("acme/billing")
    w.account("globex")
    return w


@pytest.mark.parametrize(
    ("principal", "expected"),
    [
        ("acme", Limits(10, 1000, 5)),
        ("acme/marketing", Limits(3, 50, 5)),
        ("acme/billing", Limits(10, 1000, 5)),
        ("globex", Limits(60, 1000, 20)),
        ("gone", Limits(60, 1000, 20)),
    ],
    ids=["account's own", "subuser's own over account", "subuser inherits account",
         "config defaults", "unknown principal gets defaults"],
)
def test_limits_for_inherits_subuser_then_account_then_config(
    principal: str, expected: Limits
) -> None:
    settings = EngineSettings(default_limits=Limits(60, 1000, 20))
    assert limits_for(_limited_world().snapshot(), settings, principal) == expected


RATE_CASES: list[tuple[str, tuple[int, int, int], str | None, str]] = [
    # (principal, (per minute, per hour, recipients), reason refused or None, what it shows)
    ("acme", (10, 1, 1), None, "account minute limit reached exactly"),
    ("acme", (11, 1, 1), "rate_limited", "account minute limit exceeded"),
    ("acme", (1, 1000, 1), None, "default hour limit reached exactly"),
    ("acme", (1, 1001, 1), "rate_limited", "default hour limit exceeded"),
    ("acme", (1, 1, 5), None, "account recipients limit reached exactly"),
    ("acme", (1, 1, 6), "too_many_recipients", "account recipients limit exceeded"),
    ("acme/marketing", (3, 1, 1), None, "subuser minute limit reached exactly"),
    ("acme/marketing", (4, 1, 1), "rate_limited",
     "subuser's own minute limit below the account's"),
    ("acme/marketing", (1, 51, 1), "rate_limited", "subuser's own hour limit"),
    ("acme/marketing", (1, 1, 6), "too_many_recipients",
     "subuser inherits account recipients limit"),
    ("acme/billing", (11, 1, 1), "rate_limited", "subuser inherits account minute limit"),
    ("globex", (60, 1000, 20), None, "defaults reached exactly"),
    ("globex", (61, 1, 1), "rate_limited", "default minute limit exceeded"),
    ("globex", (1, 1, 21), "too_many_recipients", "default recipients limit exceeded"),
    ("globex", (61, 1, 21), "too_many_recipients", "both: the recipients limit is named"),
]
# RFC 5321 section 4.5.3.1.10 and RFC 3463: "452 4.5.3" for too many recipients, as Postfix's
# own smtpd_recipient_limit answers; a message rate is a policy limit, "451 4.7.1"
RATE_ANSWERS = {"rate_limited": (451, "4.7.1"), "too_many_recipients": (452, "4.5.3")}


@pytest.mark.parametrize(
    ("principal", "counts", "refused"),
    [case[:3] for case in RATE_CASES],
    ids=[case[3] for case in RATE_CASES],
)
def test_rate_limit_is_451_4_7_1_and_too_many_recipients_452_4_5_3(
    principal: str, counts: tuple[int, int, int], refused: str | None
) -> None:
    w = _limited_world()
    ident = identity(w, w.key(principal))
    settings = EngineSettings(default_limits=Limits(60, 1000, 20))
    verdict = rate(w, ident, *counts, settings=settings)
    if refused is None:
        assert verdict.action is Action.ALLOW and verdict.principal == principal, verdict
    else:
        assert_refused(verdict, *RATE_ANSWERS[refused], refused)
        assert verdict.action is Action.TEMPFAIL and verdict.principal == principal


def test_too_many_recipients_names_the_limit_and_says_to_send_the_others_later() -> None:
    w = _limited_world()
    verdict = rate(w, identity(w, w.key("acme/marketing")), 1, 1, 6)
    assert verdict.smtp_reply == (
        "452 4.5.3 too many recipients: at most 5 per message for acme/marketing; send the "
        "others in another message")


def test_rate_refusal_names_the_limit_that_was_reached() -> None:
    w = _limited_world()
    verdict = rate(w, identity(w, w.key("acme/marketing")), 1, 51, 1)
    assert "50 messages per hour" in verdict.text


def test_rate_without_login_is_not_limited_here() -> None:
    assert rate(World(), "", 10**6, 10**6, 10**6).reason == "unauthenticated"


# -- headers -----------------------------------------------------------------------------------
def test_headers_without_login_are_left_unsigned(world: World) -> None:
    verdict = headers(world, "", ("x@globex.example",))
    assert verdict.action is Action.ALLOW and verdict.reason == "unauthenticated"
    assert verdict.signing is None


def test_headers_of_a_key_revoked_since_login_are_refused(world: World) -> None:
    text = world.key("acme")
    ident = identity(world, text)
    world.revoke(text)
    verdict = headers(world, ident, ("x@acme.example",))
    assert_refused(verdict, 550, "5.7.1", "revoked_key")


def test_headers_from_client_outside_ip_rules_are_554(world: World) -> None:
    ident = identity(world, world.key("globex"))
    verdict = headers(world, ident, ("x@globex.example",), client="203.0.113.9")
    assert_refused(verdict, 554, "5.7.1", "ip_not_allowed")


HEADER_CASES: list[tuple[str, tuple[str, ...], tuple[str, ...], str | None, str]] = [
    # (principal, From values, Sender values, signing domain or "refuse", what it shows)
    ("acme", ("user@acme.example",), (), "acme.example", "bare owned address"),
    ("acme", ("Acme Shop <shop@acme.example>",), (), "acme.example", "display name"),
    ("acme", ('"Shop, Acme" <shop@acme.example>',), (), "acme.example", "quoted comma"),
    ("acme", ("=?utf-8?q?J=C3=B6rg?= <j@acme.example>",), (), "acme.example", "encoded word"),
    ("acme", ("Jörg <j@bücher.example>",), (), "xn--bcher-kva.example", "IDN domain"),
    ("acme", ("Shop@ACME.example",), (), "acme.example", "case does not matter"),
    ("acme", ("x@nosign.acme.example",), (), None, "verified domain without selectors"),
    ("acme", ("founder@freemail.example",), (), None, "single sender: nothing to sign with"),
    ("acme", ("a@acme.example",), ("b@acme.example",), "acme.example", "owned Sender too"),
    ("acme", ("a@acme.example, b@acme.example",), ("b@acme.example",), "acme.example",
     "several authors with an owned Sender"),
    ("acme", ("a@acme.example, b@corp.acme.example",), ("me@corp.acme.example",),
     "corp.acme.example", "several authors: signs as the Sender's domain"),
    ("acme/marketing", ("x@news.acme.example",), (), "news.acme.example", "subuser's own domain"),
    ("acme/marketing", ("x@acme.example",), (), "acme.example", "granted domain signs"),
    ("acme", (), (), "refuse", "no From"),
    ("acme", ("a@acme.example", "a@acme.example"), (), "refuse", "two From headers"),
    ("acme", ("a@acme.example, b@acme.example",), (), "refuse", "several authors, no Sender"),
    ("acme", ("a@acme.example, ceo@globex.example",), ("a@acme.example",), "refuse",
     "several authors, one not owned, owned Sender"),
    ("acme", ("a@acme.example, b@acme.example",), ("x@globex.example",), "refuse",
     "several authors, Sender not owned"),
    ("acme", ("x@globex.example",), (), "refuse", "From not owned"),
    ("acme", ("a@acme.example",), ("x@globex.example",), "refuse", "Sender not owned"),
    ("acme", ("x@globex.example",), ("a@acme.example",), "refuse", "owned Sender, From not"),
    ("acme", ("a@acme.example",), ("a@acme.example", "a@acme.example"), "refuse",
     "two Sender headers"),
    ("acme", ("a@acme.example",), ("a@acme.example, b@acme.example",), "refuse",
     "Sender with two addresses"),
    ("acme", ("x@pending.acme.example",), (), "refuse", "own pending domain"),
    ("acme", ("x@news.acme.example",), (), "refuse", "subuser's domain is not the parent's"),
    ("acme", ("",), (), "refuse", "empty From"),
    ("acme", ("undisclosed-recipients:;",), (), "refuse", "From is an empty group"),
    ("acme", ('"unterminated <a@acme.example>',), (), "refuse", "unparseable From"),
    ("acme", ("a@acme.example\x00",), (), "refuse", "NUL in From"),
    ("acme", ('"a b"@acme.example',), (), "refuse", "quoted local part"),
    ("acme/marketing", ("x@corp.acme.example",), (), "refuse", "account domain not granted"),
    ("acme/marketing", ("x@billing.example",), (), "refuse", "sibling subuser's domain"),
    ("acme/billing", ("x@acme.example",), (), "refuse", "domain granted to a sibling only"),
]


@pytest.mark.parametrize(
    ("principal", "from_values", "sender_values", "signing"),
    [case[:4] for case in HEADER_CASES],
    ids=[case[4] for case in HEADER_CASES],
)
def test_headers_from_and_sender_must_be_the_principals(
    world: World,
    principal: str,
    from_values: tuple[str, ...],
    sender_values: tuple[str, ...],
    signing: str | None,
) -> None:
    ident = identity(world, world.key(principal))
    verdict = headers(world, ident, from_values, sender_values)
    if signing == "refuse":
        assert_refused(verdict, 550, "5.7.1", "header_from_not_owned")
        assert verdict.signing is None
    else:
        assert verdict.action is Action.ALLOW, verdict
        assert (verdict.signing.domain if verdict.signing else None) == signing


def test_headers_signing_plan_holds_the_domains_active_selectors(world: World) -> None:
    ident = identity(world, world.key("acme/marketing"))
    verdict = headers(world, ident, ("x@acme.example",))
    assert verdict.signing is not None
    assert verdict.signing.selectors == world.data.domains["acme.example"].selectors
    assert {s.state for s in verdict.signing.selectors} == {SelectorState.ACTIVE}


def test_headers_retiring_and_pending_selectors_do_not_sign(world: World) -> None:
    dom = world.data.domains["acme.example"]
    states = (SelectorState.RETIRING, SelectorState.PENDING)
    changed = tuple(replace(s, state=st) for s, st in zip(dom.selectors, states, strict=True))
    world.data.domains["acme.example"] = replace(dom, selectors=changed)
    verdict = headers(world, identity(world, world.key("acme")), ("x@acme.example",))
    assert verdict.allowed and verdict.signing is None


def test_headers_single_sender_in_own_unverified_domain_is_not_signed(world: World) -> None:
    # docs/milters.md, DKIM: sign only once the From domain is the principal's *verified* domain.
    world.sender("acme", "boss@pending.acme.example")
    ident = identity(world, world.key("acme"))
    verdict = headers(world, ident, ("boss@pending.acme.example",))
    assert verdict.allowed, verdict
    assert verdict.signing is None


def test_headers_refusal_says_what_to_fix(world: World) -> None:
    ident = identity(world, world.key("acme"))
    no_from = headers(world, ident, ())
    assert "no From: header" in no_from.text
    several = headers(world, ident, ("a@acme.example, b@acme.example",))
    assert "Sender:" in several.text
    foreign = headers(world, ident, ("x@globex.example",))
    assert "x@globex.example" in foreign.text and "acme" in foreign.text


# -- monitor mode --------------------------------------------------------------------------------
def _monitoring(world: World, *accounts: str | None) -> EngineSettings:
    """Monitor mode switched on in the directory (for each account, or directory-wide with
    None); the settings stay the defaults."""
    for account in accounts:
        world.monitor(account)
    return DEFAULTS


MONITORS: dict[str, Callable[[World], EngineSettings]] = {
    "config": lambda w: EngineSettings(monitor_mode=True),
    "directory-wide": lambda w: _monitoring(w, None),
    "per-account": lambda w: _monitoring(w, "acme", "globex"),
}

# Each: (build(world, settings) -> verdict, the refusal it would be)
MonitoredCase = Callable[[World, EngineSettings], Verdict]
MONITORED: dict[str, tuple[MonitoredCase, tuple[int, str, str]]] = {
    "envelope sender not owned": (
        lambda w, s: envelope(w, identity(w, w.key("acme")), "x@globex.example",
                              settings=s),
        (550, "5.7.1", "sender_not_owned"),
    ),
    "envelope null sender": (
        lambda w, s: envelope(w, identity(w, w.key("acme")), "", settings=s),
        (550, "5.7.1", "sender_not_owned"),
    ),
    "envelope client outside IP rules": (
        lambda w, s: envelope(w, identity(w, w.key("globex")), "x@globex.example",
                              client="203.0.113.9", settings=s),
        (554, "5.7.1", "ip_not_allowed"),
    ),
    "login client outside IP rules": (
        lambda w, s: login(w, w.key("globex"), client="203.0.113.9", settings=s),
        (535, "5.7.8", "ip_not_allowed"),
    ),
    "header From not owned": (
        lambda w, s: headers(w, identity(w, w.key("acme")), ("x@globex.example",),
                             settings=s),
        (550, "5.7.1", "header_from_not_owned"),
    ),
    "header From of sibling subuser": (
        lambda w, s: headers(w, identity(w, w.key("acme/billing")),
                             ("x@news.acme.example",), settings=s),
        (550, "5.7.1", "header_from_not_owned"),
    ),
    "headers from client outside IP rules": (
        lambda w, s: headers(w, identity(w, w.key("globex")), ("x@globex.example",),
                             client="203.0.113.9", settings=s),
        (554, "5.7.1", "ip_not_allowed"),
    ),
    "rate limit": (
        lambda w, s: rate(w, identity(w, w.key("acme")), 10**6, settings=s),
        (451, "4.7.1", "rate_limited"),
    ),
    "too many recipients": (
        lambda w, s: rate(w, identity(w, w.key("acme")), recipients=10**6, settings=s),
        (452, "4.5.3", "too_many_recipients"),
    ),
}


@pytest.mark.parametrize("mode", MONITORS.values(), ids=MONITORS.keys())
@pytest.mark.parametrize("case", MONITORED.values(), ids=MONITORED.keys())
def test_monitor_mode_lets_a_refusal_pass_and_keeps_it_in_monitored(
    world: World,
    mode: Callable[[World], EngineSettings],
    case: tuple[MonitoredCase, tuple[int, str, str]],
) -> None:
    build, (code, status, reason) = case
    refused = build(world, DEFAULTS)
    assert (refused.code, refused.status, refused.reason) == (code, status, reason)
    settings = mode(world)
    verdict = build(world, settings)
    assert verdict.action is Action.ALLOW, verdict
    assert verdict.monitored is not None
    assert (verdict.monitored.code, verdict.monitored.status, verdict.monitored.reason) == (
        code, status, reason
    )
    assert verdict.monitored.text == refused.text
    if reason == "header_from_not_owned":
        assert verdict.signing is None, "monitor mode signs nothing it could not vouch for"
    fields = verdict.log_fields()
    assert fields["verdict"] == "monitor-allow"
    assert fields["reason"] == reason
    assert fields["would_be"] == refused.smtp_reply


def test_monitor_mode_login_still_returns_the_identity(world: World) -> None:
    text = world.key("globex")
    verdict = login(world, text, client="203.0.113.9",
                    settings=EngineSettings(monitor_mode=True))
    assert verdict.identity == identity(world, text)


def test_monitor_mode_client_outside_ip_rules_with_owned_from_is_still_signed(
    world: World,
) -> None:
    world.monitor("globex")
    ident = identity(world, world.key("globex"))
    verdict = headers(world, ident, ("x@globex.example",), client="203.0.113.9")
    assert verdict.monitored is not None and verdict.monitored.reason == "ip_not_allowed"
    assert verdict.signing is not None and verdict.signing.domain == "globex.example"


def test_monitor_mode_keeps_the_first_refusal_when_several_apply(world: World) -> None:
    # the client would have heard the IP refusal; the sender was never looked at
    world.monitor("globex")
    ident = identity(world, world.key("globex"))
    sent = envelope(world, ident, "x@acme.example", client="203.0.113.9")
    assert sent.monitored is not None and sent.monitored.reason == "ip_not_allowed"
    signed = headers(world, ident, ("x@acme.example",), client="203.0.113.9")
    assert signed.monitored is not None and signed.monitored.reason == "ip_not_allowed"
    assert signed.signing is None, "a From that is not the principal's is never signed"


def test_policy_answer_with_a_rate_refusal_in_monitor_mode_keeps_the_route(
        world: World) -> None:
    world.monitor("acme")
    ident = identity(world, world.key("acme/marketing"))
    sent = envelope(world, ident, "x@news.acme.example")
    assert sent.allowed and sent.monitored is None
    over = rate(world, ident, minute=10**6)
    assert over.allowed and over.monitored is not None
    answer = with_rate(sent, over)
    assert (answer.reason, answer.transport) == ("monitor", "kr-pool-mkt-out")
    assert answer.monitored is not None and answer.monitored.reason == "rate_limited"
    # a refusal of the envelope is the one logged, not the rate's
    other = envelope(world, ident, "x@globex.example")
    assert with_rate(other, over).monitored == other.monitored
    # without monitor mode the rate's refusal is the answer
    admin.set_monitor(world.data, "acme", False)
    refused = rate(world, ident, minute=10**6)
    assert with_rate(sent, refused) is refused


def test_check_sender_off_lets_a_header_refusal_pass_unsigned_as_not_checked(
        world: World) -> None:
    ident = identity(world, world.key("acme/marketing"))
    unchecked = replace(DEFAULTS, check_sender=False)
    verdict = headers(world, ident, ("x@globex.example",), settings=unchecked)
    assert verdict.allowed and verdict.reason == "not_checked" and verdict.signing is None
    assert verdict.monitored is not None and verdict.monitored.reason == "header_from_not_owned"
    assert headers(world, ident, ("x@news.acme.example",), settings=unchecked).signing


def test_monitor_mode_envelope_still_routes_through_the_pool(world: World) -> None:
    world.monitor("acme")
    ident = identity(world, world.key("acme/marketing"))
    verdict = envelope(world, ident, "x@globex.example")
    assert verdict.monitored is not None and verdict.transport == "kr-pool-mkt-out"


def test_monitor_mode_of_one_account_does_not_cover_another(world: World) -> None:
    world.monitor("globex")
    ident = identity(world, world.key("acme"))
    verdict = envelope(world, ident, "x@globex.example")
    assert_refused(verdict, 550, "5.7.1", "sender_not_owned")


def test_monitor_mode_of_the_account_covers_its_subusers(world: World) -> None:
    world.monitor("acme")
    ident = identity(world, world.key("acme/billing"))
    verdict = headers(world, ident, ("x@news.acme.example",))
    assert verdict.allowed and verdict.monitored is not None


# Refusals monitor mode must never let pass: bad credentials and our own temporary faults.
def _login_case(build: LoginCase) -> MonitoredCase:
    def run(w: World, s: EngineSettings) -> Verdict:
        username, password, client = build(w)
        return login(w, password, username=username, client=client, settings=s)

    return run


def _after_login(change: Callable[[World, str], None], check: str) -> MonitoredCase:
    def run(w: World, s: EngineSettings) -> Verdict:
        text = w.key("acme")
        ident = identity(w, text)
        change(w, text)
        if check == "headers":
            return headers(w, ident, ("x@acme.example",), settings=s)
        return envelope(w, ident, "x@acme.example", settings=s)

    return run


def _pool_missing(w: World, s: EngineSettings) -> Verdict:
    ident = identity(w, w.key("initech"))
    return envelope(w, ident, "x@initech.example", settings=replace(s, default_pool="gone"))


NEVER_MONITORED: dict[str, MonitoredCase] = {
    **{
        f"login: {name}": _login_case(build)
        for name, (reason, build) in LOGIN_REFUSALS.items()
        if reason != "ip_not_allowed"
    },
    "envelope: no AUTH on submission": lambda w, s: envelope(w, "", "x@acme.example", settings=s),
    "envelope: foreign login": lambda w, s: envelope(w, "alice", "x@acme.example", settings=s),
    "envelope: key revoked since login": _after_login(lambda w, t: w.revoke(t), "envelope"),
    "envelope: key deleted since login": _after_login(_delete_key, "envelope"),
    "envelope: scope removed since login": _after_login(_drop_scope, "envelope"),
    "envelope: account suspended since login": _after_login(
        lambda w, t: w.suspend("acme"), "envelope"
    ),
    "envelope: pool missing": _pool_missing,
    "headers: key revoked since login": _after_login(lambda w, t: w.revoke(t), "headers"),
    "headers: account suspended since login": _after_login(
        lambda w, t: w.suspend("acme"), "headers"
    ),
}


@pytest.mark.parametrize("case", NEVER_MONITORED.values(), ids=NEVER_MONITORED.keys())
def test_monitor_mode_never_covers_credentials_or_temporary_faults(
    world: World, case: MonitoredCase
) -> None:
    world.monitor(None)
    world.monitor("acme")
    world.monitor("initech")
    verdict = case(world, EngineSettings(monitor_mode=True))
    assert not verdict.allowed, verdict
    assert verdict.monitored is None


# -- verdicts and settings -------------------------------------------------------------------------
def test_log_fields_of_an_allow_name_principal_key_transport_and_dkim_domain(
    world: World,
) -> None:
    text = world.key("acme/marketing")
    ident = identity(world, text)
    sent = envelope(world, ident, "x@news.acme.example")
    assert sent.log_fields() == {
        "verdict": "allow", "reason": "ok", "principal": "acme/marketing",
        "key_id": key_id(text), "transport": "kr-pool-mkt-out",
    }
    signed = headers(world, ident, ("x@news.acme.example",))
    assert signed.log_fields()["dkim_domain"] == "news.acme.example"


def test_log_fields_of_a_refusal_carry_the_smtp_reply(world: World) -> None:
    verdict = envelope(world, "", "x@acme.example")
    assert verdict.log_fields() == {
        "verdict": "refuse", "reason": "auth_required",
        "reply": "530 5.7.0 Authentication required",
    }


def test_settings_from_default_config_match_engine_defaults() -> None:
    assert EngineSettings.from_config(default_config()) == EngineSettings()


def test_settings_from_config_read_every_engine_setting() -> None:
    config = default_config()
    config = replace(
        config,
        auth=replace(config.auth, username="relay"),
        monitor_mode=True,
        domains=replace(config.domains, failing_grace=Duration(3600.0)),
        limits=replace(config.limits, messages_per_minute=1, messages_per_hour=2,
                       recipients_per_message=3),
        routing=replace(config.routing, default_pool="shared", transport_prefix="out-"),
        policyd=replace(config.policyd, bruteforce=replace(config.policyd.bruteforce,
                                                           trusted_for=Duration(3600.0))),
    )
    assert EngineSettings.from_config(config) == EngineSettings(
        username="relay",
        monitor_mode=True,
        failing_grace=timedelta(hours=1),
        default_limits=Limits(1, 2, 3),
        default_pool="shared",
        transport_prefix="out-",
        trusted_for=3600.0,
    )


def test_login_outside_tls_is_refused_even_with_a_good_key(world: World) -> None:
    text = world.key("acme")
    verdict = decide_login(
        world.snapshot(), DEFAULTS, LoginFacts("apikey", text, INSIDE, NOW, secured=False)
    )
    assert (verdict.action, verdict.code, verdict.status) == (Action.REFUSE, 535, "5.7.8")
    assert verdict.reason == "tls_required" and "over TLS" in verdict.text
    assert text not in verdict.text


def test_require_tls_off_accepts_a_login_outside_tls(world: World) -> None:
    text = world.key("acme")
    settings = replace(DEFAULTS, require_tls=False)
    facts = LoginFacts("apikey", text, INSIDE, NOW, secured=False)
    assert decide_login(world.snapshot(), settings, facts).allowed
