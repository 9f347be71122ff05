"""SMTP AUTH: who may log in, and the answers of the brute-force protection.

The counting itself (failures per address and per key id, lock-outs, each key's recent
successful logins) is state and lives in the counter store the auth service counts in
(policyd/auth.py, keyrelay/counters); what counts as a guess, who a lock-out stops and what a
locked-out client is told is decided here.
"""

from __future__ import annotations

import math

from .. import keys, passwords
from ..directory.model import ApiKey, Directory, LegacyLogin
from .checks import (
    SEND_SCOPE,
    client_allowed,
    key_problem,
    legacy_ended,
    monitored,
    principal_inactive,
)
from .facts import (
    LEGACY_KEY_ID,
    EngineSettings,
    LockoutFacts,
    LoginFacts,
    format_identity,
    parse_identity,
)
from .reasons import GUESSES, KEY_GUESSES, Reason
from .verdict import Action, Verdict, refuse

# Compared against when the key id is unknown, so unknown and wrong keys take the same time.
_DUMMY_HASH = "0" * 64
# What a client reads for an unknown key id and for a wrong secret alike: the reply must not
# tell a guesser which key ids exist (the log's reason does tell the admin).
_UNKNOWN_KEY_TEXT = "unknown API key; check that the whole key was copied"


def legacy_login_for(directory: Directory, settings: EngineSettings,
                     facts: LoginFacts) -> LegacyLogin | None:
    """The imported legacy login whose password ``decide_login`` would verify for this
    attempt, or None (then it needs no password hash verified). A front end verifies it off
    its event loop and passes the outcome as ``password_ok``."""
    if not facts.secured or facts.username == settings.username:
        return None
    # after the sunset too: the "ended" answer names the principal, so only to the password's
    # holder; a guesser gets the same answer as for any wrong password
    return directory.legacy_by_username.get(facts.username)


def site_login(directory: Directory, settings: EngineSettings, username: str) -> Verdict | None:
    """Coexistence (``auth.site_auth_socket``, docs/coexistence.md): ``pass`` for a login that
    is not keyrelay's (neither ``auth.username`` nor an imported legacy login), which the
    site's own auth service then answers; a refusal for one that keyrelay's policy service
    and milter would read as a keyrelay login (``PRINCIPAL:KEYID``); None for keyrelay's own
    logins, and always when coexistence is off. Decided before the lock-outs: the site's
    logins are the site's to count."""
    if (not settings.site_logins or username == settings.username
            or username in directory.legacy_by_username):
        return None
    if parse_identity(username) is not None:
        return _reserved(username)
    return Verdict(Action.PASS, Reason.SITE_LOGIN)


def site_answer(ok: bool, user: str) -> Verdict:
    """The site's answer to a login passed on: what is logged and counted. It goes back to
    Postfix unchanged, unless its ``user=`` has the form of a keyrelay login: that one is
    refused, since every later check would read it as keyrelay's."""
    if not ok:
        return Verdict(Action.REFUSE, Reason.SITE_LOGIN, 535, "5.7.8",
                       "the site's authentication refused the login")
    if parse_identity(user) is not None:
        return _reserved(user)
    return Verdict(Action.ALLOW, Reason.SITE_LOGIN, identity=user)


def _reserved(username: str) -> Verdict:
    return refuse(535, "5.7.8", Reason.RESERVED_USERNAME,
                  f"the username {username[:64]!r} has the form of a keyrelay login "
                  "(PRINCIPAL:KEYID) and cannot be a site login")


def decide_login(directory: Directory, settings: EngineSettings, facts: LoginFacts,
                 password_ok: bool | None = None) -> Verdict:
    """SMTP AUTH: username ``apikey``, password an active key of an active principal; or,
    until its sunset, an imported legacy login's username and old password (the password
    bridge), which ``password_ok`` says was verified (None: verified here, slowly)."""

    def no(reason: Reason, text: str, key: ApiKey | None = None) -> Verdict:
        if key is None:
            return refuse(535, "5.7.8", reason, text)
        return refuse(535, "5.7.8", reason, text, key.principal, key.key_id)

    passed = site_login(directory, settings, facts.username)
    if passed is not None:
        return passed
    if settings.require_tls and not facts.secured:
        return no(
            Reason.TLS_REQUIRED,
            "log in over TLS (STARTTLS, or port 465): API keys are not accepted on a "
            "plaintext connection",
        )
    if facts.username != settings.username and facts.username in directory.legacy_by_username:
        if not facts.secured:  # a password, unlike a key, is never sent in the clear
            return no(Reason.TLS_REQUIRED,
                      "log in over TLS (STARTTLS, or port 465): API keys are not accepted on "
                      "a plaintext connection")
        return _decide_legacy(directory, settings, facts,
                              directory.legacy_by_username[facts.username], password_ok)
    if facts.username != settings.username:
        return no(
            Reason.BAD_USERNAME,
            f"log in with username {settings.username!r} and an API key as the password",
        )
    presented = keys.parse(facts.password)
    if presented is None:
        return no(
            Reason.MALFORMED_KEY,
            "the password is not a keyrelay API key (kr.<id>.<secret>); "
            "account passwords are not accepted",
        )
    key = directory.keys.get(presented.key_id)
    matches = keys.secret_matches(presented, key.secret_hash if key else _DUMMY_HASH)
    if key is None:
        return no(Reason.UNKNOWN_KEY, _UNKNOWN_KEY_TEXT)
    if not matches:
        return refuse(535, "5.7.8", Reason.WRONG_SECRET, _UNKNOWN_KEY_TEXT,
                      key_id=key.key_id)  # not the principal's doing: no principal named
    problem = key_problem(key, facts.now)
    if problem:
        return no(*problem, key)
    inactive = principal_inactive(directory, key.principal)
    if inactive:
        return no(Reason.PRINCIPAL_INACTIVE, inactive, key)
    if SEND_SCOPE not in key.scopes:
        return no(Reason.MISSING_SCOPE, f"API key {key.key_id} lacks the {SEND_SCOPE} scope",
                  key)
    account = directory.accounts[key.account]
    identity = format_identity(key.principal, key.key_id)
    if not client_allowed(account, facts.client_address):
        refusal = no(
            Reason.IP_NOT_ALLOWED,
            f"client address {facts.client_address} is not in the IP access list of "
            f"account {account.name}",
            key,
        )
        verdict = monitored(directory, settings, refusal)
        return verdict._replace(identity=identity) if verdict.allowed else verdict
    return Verdict(Action.ALLOW, Reason.OK, principal=key.principal, key_id=key.key_id,
                   identity=identity)


def _decide_legacy(directory: Directory, settings: EngineSettings, facts: LoginFacts,
                   cred: LegacyLogin, password_ok: bool | None) -> Verdict:
    """The same rules as a key's: TLS (checked before, even with auth.require_tls off), the
    principal active, the account's
    IP list (monitor mode lets it pass); then the session is ``PRINCIPAL:legacy``."""
    principal = cred.principal
    if password_ok is None:
        password_ok = passwords.verify(cred.password_hash, facts.password)
    if not password_ok:
        # not the principal's doing: no principal named (as for a wrong key secret), also
        # after the sunset: the "ended" text below is for the password's holder only
        return refuse(535, "5.7.8", Reason.WRONG_LEGACY_PASSWORD,
                      "authentication failed: wrong username or password")
    ended = legacy_ended(cred, facts.now)
    if ended is not None:
        return refuse(535, "5.7.8", Reason.LEGACY_PASSWORD_ENDED, ended, principal,
                      LEGACY_KEY_ID)
    inactive = principal_inactive(directory, principal)
    if inactive:
        return refuse(535, "5.7.8", Reason.PRINCIPAL_INACTIVE, inactive, principal,
                      LEGACY_KEY_ID)
    identity = format_identity(principal, LEGACY_KEY_ID)
    account = directory.accounts[principal.partition("/")[0]]
    if not client_allowed(account, facts.client_address):
        refusal = refuse(
            535, "5.7.8", Reason.IP_NOT_ALLOWED,
            f"client address {facts.client_address} is not in the IP access list of "
            f"account {account.name}", principal, LEGACY_KEY_ID)
        verdict = monitored(directory, settings, refusal)
        return verdict._replace(identity=identity) if verdict.allowed else verdict
    return Verdict(Action.ALLOW, Reason.LEGACY_PASSWORD, principal=principal,
                   key_id=LEGACY_KEY_ID, identity=identity)


def counts_as_guess(verdict: Verdict) -> bool:
    """The refusal counts towards the client address's lock-out (policyd.bruteforce)."""
    return verdict.action is Action.REFUSE and verdict.reason in GUESSES


def counts_against_key(verdict: Verdict) -> bool:
    """The refusal also counts against its key id: a wrong secret for a key that exists
    (a wrong username with a good key is a client's mistake, not a guess at the key)."""
    return verdict.action is Action.REFUSE and verdict.reason in KEY_GUESSES


def decide_lockout(settings: EngineSettings, facts: LockoutFacts) -> Verdict | None:
    """The lock-out answer to a login attempt, or None: decide it on its credentials.

    A locked-out address is refused whatever it presents. A locked-out key id is refused,
    except from a client (address or IPv6 /64) where that key logged in successfully within
    ``trusted_for``: anyone who learns a key id (from a 535 reply, a log line) can lock it,
    but not out of the places its owner uses it (docs/policyd.md, "Brute-force protection").
    Such a client's attempt is then decided as usual, and a wrong secret from it still counts.
    """
    if facts.address_locked > 0:
        return locked_out(Reason.ADDRESS_LOCKED_OUT,
                          f"too many failed logins from {facts.client_address}",
                          facts.address_locked, facts.key_id)
    if facts.key_id and facts.key_locked > 0:
        since = facts.since_login_here
        if since is not None and 0 <= since <= settings.trusted_for and settings.trusted_for:
            return None
        return locked_out(Reason.KEY_LOCKED_OUT,
                          f"too many failed logins for API key {facts.key_id}",
                          facts.key_locked, facts.key_id)
    return None


def locked_out(reason: Reason, what: str, seconds: float, key_id: str | None) -> Verdict:
    """The answer to a login from a locked-out address or for a locked-out key id."""
    return refuse(535, "5.7.8", reason, f"{what}; try again in {minutes(seconds)}",
                  key_id=key_id)


def minutes(seconds: float) -> str:
    """A lock-out's length as a client and an admin read it: whole minutes, at least one."""
    count = max(1, math.ceil(seconds / 60))
    return f"{count} minute{'s' if count > 1 else ''}"
