"""The checks every decision shares: is the key usable, is the principal active, is the
client inside the IP rules, may the principal use an address, and does monitor mode let a
refusal pass. Also the session check that every message of a logged-in session goes through
again (a key revoked since login is refused at once)."""

from __future__ import annotations

from datetime import datetime

from .. import names
from ..directory.model import (
    Account,
    ApiKey,
    Directory,
    Domain,
    DomainState,
    LegacyLogin,
    Status,
)
from ..errors import UserError
from .facts import LEGACY_KEY_ID, EngineSettings, parse_identity
from .reasons import Reason
from .verdict import Action, Verdict, allow, let_pass, refuse

SEND_SCOPE = "mail.send"


def monitored(directory: Directory, settings: EngineSettings, verdict: Verdict) -> Verdict:
    """Let a refusal pass when the principal's account (or everyone) is in monitor mode.

    Never for credentials (no principal to trust) nor for our own temporary faults (they
    carry no principal or are not refusals of the principal's doing)."""
    if verdict.action is Action.ALLOW or not verdict.principal:
        return verdict
    account = directory.accounts.get(verdict.principal.partition("/")[0])
    if settings.monitor_mode or directory.monitor or (account is not None and account.monitor):
        return let_pass(verdict, Reason.MONITOR)
    return verdict


def client_allowed(account: Account, client_address: str) -> bool:
    if not account.ip_allow:
        return True
    try:
        client = names.ip_address(client_address)
    except UserError:
        return False  # an unknown client address cannot prove it is inside the list
    return any(client in net for net in account.ip_allow if client.version == net.version)


def principal_inactive(directory: Directory, principal: str) -> str | None:
    """Why the principal may not act (suspended or gone), or None."""
    account_name, _, sub = principal.partition("/")
    account = directory.accounts.get(account_name)
    if account is None or (sub and principal not in directory.subusers):
        return f"{principal} no longer exists"
    if account.status is Status.SUSPENDED:
        return f"account {account_name} is suspended; contact your relay administrator"
    if sub and directory.subusers[principal].status is Status.SUSPENDED:
        return f"subuser {principal} is suspended; contact your relay administrator"
    return None


def principal_active(directory: Directory, principal: str) -> bool:
    """The principal exists and neither it nor its account is suspended."""
    return principal_inactive(directory, principal) is None


def key_usable(key: ApiKey, now: datetime) -> bool:
    """The key may send now: not revoked, not expired, with the mail.send scope."""
    return key_problem(key, now) is None and SEND_SCOPE in key.scopes


def key_problem(key: ApiKey, now: datetime) -> tuple[Reason, str] | None:
    if key.revoked is not None:
        return Reason.REVOKED_KEY, f"API key {key.key_id} was revoked; create a new key"
    if key.expires is not None and key.expires <= now:
        return Reason.EXPIRED_KEY, (
            f"API key {key.key_id} expired at {key.expires:%Y-%m-%d %H:%M UTC}; create a new key"
        )
    return None


def domain_may_send(domain: Domain, settings: EngineSettings, now: datetime) -> bool:
    """Verified domains send; failing ones only within the grace period after last success."""
    if domain.state is DomainState.VERIFIED:
        return True
    return (
        domain.state is DomainState.FAILING
        and domain.verified_at is not None
        and now - domain.verified_at <= settings.failing_grace
    )


def uses_domain(domain: Domain, principal: str) -> bool:
    # The owner, or a subuser its owning account granted it to; never a sibling subuser.
    return domain.owner == principal or principal in domain.grants


def sender_problem(
    directory: Directory, settings: EngineSettings, principal: str, address: str, now: datetime
) -> str | None:
    """Why ``principal`` may not send as ``address`` (already normalised), or None.

    Allowed: a verified single sender of the principal, or an address in a domain the
    principal owns or was granted, while that domain may send.
    """
    if principal in directory.senders_of(address):
        return None
    domain = directory.domains.get(address.rpartition("@")[2])
    if domain is not None and uses_domain(domain, principal):
        if domain_may_send(domain, settings, now):
            return None
        return (
            f"domain {domain.name} is not verified yet (state: {domain.state}); publish its DNS "
            "records (keyrelay domain dns) and have it verified"
        )
    return f"{address} is not a verified domain or sender of {principal}"


def normal_address(text: str) -> str | None:
    try:
        return names.address(text)
    except UserError:
        return None


def session_principal(
    directory: Directory, settings: EngineSettings, identity: str, client_address: str,
    now: datetime,
) -> tuple[str, str, Verdict] | Verdict:
    """(principal, key id, allow) of a logged-in session, or the answer that ends it.

    Checked again for every message: a key revoked or expired since login, a suspended
    principal or a client outside the IP list is refused at once (docs/ARCHITECTURE.md,
    "Revocation"). The allow carries the IP refusal that monitor mode let pass, so that it is
    logged.
    """
    parsed = parse_identity(identity)
    if parsed is None:
        if settings.site_logins:  # the site's own login (docs/coexistence.md): its rules decide
            return allow(Reason.SITE_LOGIN)
        return refuse(
            550, "5.7.1", Reason.FOREIGN_LOGIN,
            f"login {identity!r} is not a keyrelay API key login; log in with an API key",
        )
    principal, key_id = parsed
    if key_id == LEGACY_KEY_ID:
        return _legacy_session(directory, settings, principal, client_address, now)
    key = directory.keys.get(key_id)
    if key is None:
        # The login was checked against a key that this copy of the directory lacks: a key
        # created a moment ago that this daemon's copy (LDAP: refreshed every
        # refresh_interval) does not hold yet, or, rarely, one deleted since. Temporary, so a
        # stale copy never refuses good mail for good; a deleted key fails the next login.
        return Verdict(
            Action.TEMPFAIL, Reason.KEY_NOT_IN_COPY, 451, "4.7.1",
            f"API key {key_id} is not in this server's copy of the directory yet (or was "
            "deleted since login); try again in a moment", principal=principal, key_id=key_id,
        )
    if key.principal != principal:
        return refuse(
            550, "5.7.1", Reason.KEY_OF_OTHER_PRINCIPAL,
            f"API key {key_id} does not belong to {principal}; log in again", principal, key_id,
        )
    problem = key_problem(key, now)
    if problem:
        return refuse(550, "5.7.1", *problem, principal, key_id)
    inactive = principal_inactive(directory, principal)
    if inactive:
        return refuse(550, "5.7.1", Reason.PRINCIPAL_INACTIVE, inactive, principal, key_id)
    if SEND_SCOPE not in key.scopes:
        return refuse(
            550, "5.7.1", Reason.MISSING_SCOPE,
            f"API key {key_id} lacks the {SEND_SCOPE} scope", principal, key_id,
        )
    account = directory.accounts[key.account]
    verdict = allow(Reason.OK, principal, key_id)
    if not client_allowed(account, client_address):
        verdict = monitored(
            directory, settings,
            refuse(
                554, "5.7.1", Reason.IP_NOT_ALLOWED,
                f"client address {client_address} is not in the IP access list of account "
                f"{account.name}",
                principal, key_id,
            ),
        )
        if not verdict.allowed:
            return verdict
    return principal, key_id, verdict


def legacy_ended(cred: LegacyLogin | None, now: datetime) -> str | None:
    """The client's text when a legacy login may no longer be used, or None."""
    if cred is None:
        return None
    if cred.days_left(now) < 0:
        return (f"password logins for {cred.principal} ended on {cred.sunset.isoformat()}; "
                f"the application must use an API key (keyrelay key create {cred.principal})")
    return None


def legacy_removed(principal: str) -> str:
    return (f"password logins for {principal} have ended; the application must use an API "
            f"key (keyrelay key create {principal})")


def _legacy_session(directory: Directory, settings: EngineSettings, principal: str,
                    client_address: str, now: datetime) -> tuple[str, str, Verdict] | Verdict:
    """A session that logged in with a legacy password (``PRINCIPAL:legacy``): checked again
    for every message, as a key's session is: removed or past its sunset since the login,
    the principal suspended, the client outside the IP list."""
    cred = directory.legacy.get(principal)
    ended = legacy_removed(principal) if cred is None else legacy_ended(cred, now)
    if ended is not None:
        return refuse(550, "5.7.1", Reason.LEGACY_PASSWORD_ENDED, ended, principal,
                      LEGACY_KEY_ID)
    inactive = principal_inactive(directory, principal)
    if inactive:
        return refuse(550, "5.7.1", Reason.PRINCIPAL_INACTIVE, inactive, principal,
                      LEGACY_KEY_ID)
    account = directory.accounts[principal.partition("/")[0]]
    verdict = allow(Reason.OK, principal, LEGACY_KEY_ID)
    if not client_allowed(account, client_address):
        verdict = monitored(directory, settings, refuse(
            554, "5.7.1", Reason.IP_NOT_ALLOWED,
            f"client address {client_address} is not in the IP access list of account "
            f"{account.name}", principal, LEGACY_KEY_ID))
        if not verdict.allowed:
            return verdict
    return principal, LEGACY_KEY_ID, verdict
