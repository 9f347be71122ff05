"""The decision engine: every "may this happen?" answered once, without I/O.

Each ``decide_*`` function takes a directory snapshot, the engine settings and the facts of one
event (a login, an envelope, a header set, a rate count) and returns one frozen ``Verdict``
exactly as DESIGN.md's decision table says. Front ends (policyd, milters) only render verdicts
into their protocol; they never decide.

Monitor mode (per account, directory-wide, or in the config) turns a *refusal* into an allow
that carries the verdict it replaced in ``monitored``, so front ends log what would have
happened. It never applies to credentials (wrong username, unknown/revoked/expired key: there
is no principal to trust) nor to temporary faults of ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import lru_cache
from typing import Any, NamedTuple

from . import keys, names
from .directory.model import (
    Account,
    ApiKey,
    Directory,
    Domain,
    DomainState,
    Limits,
    Selector,
    Status,
)
from .errors import UserError
from .headers import HeaderError, mailboxes

SEND_SCOPE = "mail.send"
# Compared against when the key id is unknown, so unknown and wrong keys take the same time.
_DUMMY_HASH = "0" * 64


class Action(StrEnum):
    ALLOW = "allow"
    REFUSE = "refuse"  # permanent: the user must change something
    TEMPFAIL = "tempfail"  # temporary: retry later (limits, our own faults)


@dataclass(frozen=True, slots=True)
class SigningPlan:
    """What the DKIM signer should do: sign as ``domain`` with these selectors."""

    domain: str
    selectors: tuple[Selector, ...]


class Verdict(NamedTuple):
    """One decision, ready for any front end to render and log.

    Immutable. A NamedTuple rather than a frozen dataclass because the daemons build several
    per request and a frozen dataclass's ``__init__`` costs about six times as much.
    """

    action: Action
    reason: str  # a stable tag for logs and tests, e.g. "sender_not_owned"
    code: int = 0  # SMTP reply code; 0 when allowing
    status: str = ""  # enhanced status code (RFC 3463)
    text: str = ""  # what the client reads: says what to fix
    principal: str | None = None
    key_id: str | None = None
    identity: str | None = None  # login: the SASL user name Postfix carries from here on
    transport: str | None = None  # envelope: Postfix transport of the principal's IP pool
    signing: SigningPlan | None = None  # headers: the DKIM plan
    monitored: Verdict | None = None  # the refusal monitor mode let pass

    @property
    def allowed(self) -> bool:
        return self.action is Action.ALLOW

    @property
    def smtp_reply(self) -> str:
        return f"{self.code} {self.status} {self.text}"

    def log_fields(self) -> dict[str, str]:
        """Fields for the one log line of this decision; never contains a secret."""
        fields = {"verdict": str(self.action), "reason": self.reason}
        if self.code:
            fields["reply"] = self.smtp_reply
        if self.principal:
            fields["principal"] = self.principal
        if self.key_id:
            fields["key_id"] = self.key_id
        if self.transport:
            fields["transport"] = self.transport
        if self.signing:
            fields["dkim_domain"] = self.signing.domain
        if self.monitored:
            fields["verdict"] = "monitor-allow"
            fields["would_be"] = self.monitored.smtp_reply
            fields["reason"] = self.monitored.reason
        return fields


@dataclass(frozen=True, slots=True)
class Settings:
    """The parts of the configuration the engine reads (built once from ``Config``)."""

    username: str = "apikey"
    require_tls: bool = True
    monitor_mode: bool = False
    failing_grace: timedelta = timedelta(hours=72)
    default_limits: Limits = field(default_factory=lambda: Limits(600, 20000, 100))
    default_pool: str | None = None
    transport_prefix: str = "kr-pool-"

    @classmethod
    def from_config(cls, config: object) -> Settings:
        c = config  # typed loosely so the engine does not import the config loader
        return cls(
            username=c.auth.username,  # type: ignore[attr-defined]
            require_tls=c.auth.require_tls,  # type: ignore[attr-defined]
            monitor_mode=c.monitor_mode,  # type: ignore[attr-defined]
            failing_grace=timedelta(seconds=c.domains.failing_grace),  # type: ignore[attr-defined]
            default_limits=Limits(
                c.limits.messages_per_minute,  # type: ignore[attr-defined]
                c.limits.messages_per_hour,  # type: ignore[attr-defined]
                c.limits.recipients_per_message,  # type: ignore[attr-defined]
            ),
            default_pool=c.routing.default_pool or None,  # type: ignore[attr-defined]
            transport_prefix=c.routing.transport_prefix,  # type: ignore[attr-defined]
        )


# -- facts -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LoginFacts:
    username: str
    password: str = field(repr=False)  # the API key: never in a repr or a log
    client_address: str
    now: datetime
    secured: bool = True  # the connection is under TLS (Dovecot protocol's "secured")


class EnvelopeFacts(NamedTuple):
    """Immutable; a NamedTuple like ``Verdict``: built for every policy request."""

    identity: str  # Postfix's sasl_username; "" for an unauthenticated session
    submission: bool  # a submission service (587/465/2525), where AUTH is required
    client_address: str
    sender: str  # envelope sender without brackets; "" is the null sender
    now: datetime


@dataclass(frozen=True, slots=True)
class HeaderFacts:
    identity: str  # milter {auth_authen}; "" for an unauthenticated session
    from_values: tuple[str, ...]  # every From: header value, in order
    sender_values: tuple[str, ...]  # every Sender: header value
    client_address: str
    now: datetime


class RateFacts(NamedTuple):
    """Immutable; a NamedTuple like ``Verdict``: built for every policy request."""

    identity: str
    messages_last_minute: int  # including the message being decided
    messages_last_hour: int
    recipients: int  # recipients of this message so far
    now: datetime


# -- identity --------------------------------------------------------------------------------
def format_identity(principal: str, key_id: str) -> str:
    """The SASL user name of a login: principal and key id, never the secret."""
    return f"{principal}:{key_id}"


@lru_cache(maxsize=4096)  # asked several times per policy request; logins are few
def parse_identity(identity: str) -> tuple[str, str] | None:
    principal, colon, key_id = identity.rpartition(":")
    if not colon or not principal or not keys.KEY_ID_RE.match(key_id):
        return None
    return principal, key_id


# -- verdict builders ------------------------------------------------------------------------
def _allow(reason: str, principal: str | None = None, key_id: str | None = None) -> Verdict:
    return Verdict(Action.ALLOW, reason, principal=principal, key_id=key_id)


def _refuse(
    code: int, status: str, reason: str, text: str,
    principal: str | None = None, key_id: str | None = None,
) -> Verdict:
    return Verdict(Action.REFUSE, reason, code, status, text, principal=principal, key_id=key_id)


def _monitor(directory: Directory, settings: Settings, verdict: Verdict) -> Verdict:
    """Let a refusal pass when the principal's account (or everyone) is in monitor mode."""
    if verdict.action is Action.ALLOW or not verdict.principal:
        return verdict
    account = directory.accounts.get(verdict.principal.partition("/")[0])
    if settings.monitor_mode or directory.monitor or (account is not None and account.monitor):
        return Verdict(
            Action.ALLOW,
            "monitor",
            principal=verdict.principal,
            key_id=verdict.key_id,
            monitored=verdict,
        )
    return verdict


def _client_allowed(account: Account, client_address: str) -> bool:
    if not account.ip_allow:
        return True
    try:
        client = names.ip_address(client_address)
    except UserError:
        return False  # an unknown client address cannot prove it is inside the list
    return any(client in net for net in account.ip_allow if client.version == net.version)


def _principal_inactive(directory: Directory, principal: str) -> str | None:
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
    return _principal_inactive(directory, principal) is None


def key_usable(key: ApiKey, now: datetime) -> bool:
    """The key may send now: not revoked, not expired, with the mail.send scope."""
    return _key_problem(key, now) is None and SEND_SCOPE in key.scopes


def _key_problem(key: ApiKey, now: datetime) -> tuple[str, str] | None:
    if key.revoked is not None:
        return "revoked_key", f"API key {key.key_id} was revoked; create a new key"
    if key.expires is not None and key.expires <= now:
        return "expired_key", (
            f"API key {key.key_id} expired at {key.expires:%Y-%m-%d %H:%M UTC}; create a new key"
        )
    return None


# -- login -----------------------------------------------------------------------------------
def decide_login(directory: Directory, settings: Settings, facts: LoginFacts) -> Verdict:
    """SMTP AUTH: username ``apikey``, password an active key of an active principal."""

    def no(reason: str, text: str, key: ApiKey | None = None) -> Verdict:
        if key is None:
            return _refuse(535, "5.7.8", reason, text)
        return _refuse(535, "5.7.8", reason, text, key.principal, key.key_id)

    if settings.require_tls and not facts.secured:
        return no(
            "tls_required",
            "log in over TLS (STARTTLS, or port 465): API keys are not accepted on a "
            "plaintext connection",
        )
    if facts.username != settings.username:
        return no(
            "bad_username",
            f"log in with username {settings.username!r} and an API key as the password",
        )
    presented = keys.parse(facts.password)
    if presented is None:
        return no(
            "malformed_key",
            "the password is not a keyrelay API key (kr.<id>.<secret>); "
            "account passwords are not accepted",
        )
    key = directory.keys.get(presented.key_id)
    if not keys.secret_matches(presented, key.secret_hash if key else _DUMMY_HASH) or key is None:
        return no("unknown_key", "unknown API key; check that the whole key was copied")
    problem = _key_problem(key, facts.now)
    if problem:
        return no(*problem, key)
    inactive = _principal_inactive(directory, key.principal)
    if inactive:
        return no("principal_inactive", inactive, key)
    if SEND_SCOPE not in key.scopes:
        return no("missing_scope", f"API key {key.key_id} lacks the {SEND_SCOPE} scope", key)
    account = directory.accounts[key.account]
    verdict = _allow("ok", key.principal, key.key_id)
    if not _client_allowed(account, facts.client_address):
        refusal = no(
            "ip_not_allowed",
            f"client address {facts.client_address} is not in the IP access list of "
            f"account {account.name}",
            key,
        )
        verdict = _monitor(directory, settings, refusal)
        if not verdict.allowed:
            return verdict
    identity = format_identity(key.principal, key.key_id)
    if verdict.monitored is None:
        return Verdict(Action.ALLOW, "ok", principal=key.principal, key_id=key.key_id,
                       identity=identity)
    return verdict._replace(identity=identity)


# -- identity of an authenticated session -------------------------------------------------
def _session_principal(
    directory: Directory, settings: Settings, identity: str, client_address: str, now: datetime
) -> tuple[str, str, Verdict] | Verdict:
    """(principal, key id, allow) of a logged-in session, or the refusal that ends it.

    Checked again for every message: a key revoked or expired since login, a suspended
    principal or a client outside the IP list is refused at once (DESIGN.md, revocation).
    The allow carries the IP refusal that monitor mode let pass, so that it is logged.
    """
    parsed = parse_identity(identity)
    if parsed is None:
        return _refuse(
            550, "5.7.1", "foreign_login",
            f"login {identity!r} is not a keyrelay API key login; log in with an API key",
        )
    principal, key_id = parsed
    key = directory.keys.get(key_id)
    if key is None:
        # The login was checked against a key that this copy of the directory lacks: a key
        # created a moment ago that this daemon's copy (LDAP: refreshed every
        # refresh_interval) does not hold yet, or, rarely, one deleted since. Temporary, so a
        # stale copy never refuses good mail for good; a deleted key fails the next login.
        return Verdict(
            Action.TEMPFAIL, "unknown_key", 451, "4.7.1",
            f"API key {key_id} is not in this server's copy of the directory yet (or was "
            "deleted since login); try again in a moment", principal=principal, key_id=key_id,
        )
    if key.principal != principal:
        return _refuse(
            550, "5.7.1", "unknown_key", f"API key {key_id} does not belong to {principal}; "
            "log in again", principal, key_id,
        )
    problem = _key_problem(key, now)
    if problem:
        return _refuse(550, "5.7.1", *problem, principal, key_id)
    inactive = _principal_inactive(directory, principal)
    if inactive:
        return _refuse(550, "5.7.1", "principal_inactive", inactive, principal, key_id)
    if SEND_SCOPE not in key.scopes:
        return _refuse(
            550, "5.7.1", "missing_scope", f"API key {key_id} lacks the {SEND_SCOPE} scope",
            principal, key_id,
        )
    account = directory.accounts[key.account]
    verdict = _allow("ok", principal, key_id)
    if not _client_allowed(account, client_address):
        verdict = _monitor(
            directory, settings,
            _refuse(
                554, "5.7.1", "ip_not_allowed",
                f"client address {client_address} is not in the IP access list of account "
                f"{account.name}",
                principal, key_id,
            ),
        )
        if not verdict.allowed:
            return verdict
    return principal, key_id, verdict


# -- sender ownership ------------------------------------------------------------------------
def domain_may_send(domain: Domain, settings: Settings, now: datetime) -> bool:
    """Verified domains send; failing ones only within the grace period after last success."""
    if domain.state is DomainState.VERIFIED:
        return True
    return (
        domain.state is DomainState.FAILING
        and domain.verified_at is not None
        and now - domain.verified_at <= settings.failing_grace
    )


def _uses_domain(domain: Domain, principal: str) -> bool:
    # The owner, or a subuser its owning account granted it to; never a sibling subuser.
    return domain.owner == principal or principal in domain.grants


def sender_problem(
    directory: Directory, settings: Settings, principal: str, address: str, now: datetime
) -> str | None:
    """Why ``principal`` may not send as ``address`` (already normalised), or None.

    Allowed: a verified single sender of the principal, or an address in a domain the
    principal owns or was granted, while that domain may send.
    """
    if principal in directory.senders_of(address):
        return None
    domain = directory.domains.get(address.rpartition("@")[2])
    if domain is not None and _uses_domain(domain, principal):
        if domain_may_send(domain, settings, now):
            return None
        return (
            f"domain {domain.name} is not verified yet (state: {domain.state}); publish its DNS "
            "records (keyrelay domain dns) and have it verified"
        )
    return f"{address} is not a verified domain or sender of {principal}"


def _normal_address(text: str) -> str | None:
    try:
        return names.address(text)
    except UserError:
        return None


def _pool_transport(
    directory: Directory, settings: Settings, principal: str
) -> tuple[str | None, str | None]:
    """(transport, problem): the Postfix transport of the principal's IP pool."""
    account_name, _, _ = principal.partition("/")
    sub = directory.subusers.get(principal)
    pool = (sub.pool if sub else None) or directory.accounts[account_name].pool
    pool = pool or settings.default_pool
    if pool is None:
        return None, None
    if pool not in directory.pools:
        return None, f"IP pool {pool!r} is not defined"
    return settings.transport_prefix + pool, None


def decide_envelope(directory: Directory, settings: Settings, facts: EnvelopeFacts) -> Verdict:
    """MAIL FROM / RCPT TO on the policy service: login, IP rules, sender, routing.

    Postfix asks this at MAIL, at every RCPT and at DATA, nearly always with the same login,
    client and sender as the request before. A plain allow is remembered with the snapshot
    (which never changes: a changed directory is a new snapshot) until the first moment time
    alone could change it (``_allow_horizon``). Refusals and monitored allows are decided
    every time: they are rare, and some of them could turn back into an allow if the clock
    were set back.
    """
    memo: _EnvelopeMemo = _memo(directory, settings, "envelope")
    question = (facts.identity, facts.submission, facts.client_address, facts.sender)
    known = memo.get(question)
    if known is not None and facts.now < known[1]:
        return known[0]
    verdict = _decide_envelope(directory, settings, facts)
    if verdict.action is Action.ALLOW and verdict.monitored is None and verdict.key_id:
        if len(memo) >= _ENVELOPE_MEMO_MAX:
            memo.clear()  # bounded: an owned domain has any number of sender addresses
        memo[question] = (verdict, _allow_horizon(directory, settings, verdict, facts.sender))
    return verdict


# Allowed envelopes remembered per snapshot (see decide_envelope); about 300 bytes each.
_ENVELOPE_MEMO_MAX = 65536
_FOREVER = datetime.max.replace(tzinfo=UTC)
_EnvelopeMemo = dict[tuple[str, bool, str, str], tuple[Verdict, datetime]]


class _SettingsMemo(NamedTuple):
    settings: Settings  # compared by identity: hashing Settings would cost more than a lookup
    values: dict[Any, Any]


def _memo(directory: Directory, settings: Settings, name: str) -> dict[Any, Any]:
    """Values derived from this snapshot and these settings, computed once (the snapshot
    never changes; other settings, after a reload, start a new memo)."""
    found = directory.derived.get(name)
    if isinstance(found, _SettingsMemo) and found.settings is settings:
        return found.values
    memo = directory.derived[name] = _SettingsMemo(settings, {})
    return memo.values


def _allow_horizon(
    directory: Directory, settings: Settings, verdict: Verdict, sender: str
) -> datetime:
    """The first moment at which an envelope allowed now could be decided otherwise by time
    alone: the login's key expires, or the sender's domain, failing DNS checks, reaches the
    end of its grace period (``_key_problem``, ``domain_may_send``). Allowed until then."""
    horizon = _FOREVER
    key = directory.keys.get(verdict.key_id or "")
    if key is not None and key.expires is not None:
        horizon = key.expires
    address = _normal_address(sender) or ""
    domain = directory.domains.get(address.rpartition("@")[2])
    if domain is not None and domain.state is DomainState.FAILING and domain.verified_at:
        horizon = min(horizon, domain.verified_at + settings.failing_grace)
    return horizon


def _decide_envelope(directory: Directory, settings: Settings, facts: EnvelopeFacts) -> Verdict:
    if not facts.identity:
        if facts.submission:
            return _refuse(530, "5.7.0", "auth_required", "Authentication required")
        return _allow("unauthenticated")  # port 25: Postfix's own relay rules decide
    session = _session_principal(
        directory, settings, facts.identity, facts.client_address, facts.now
    )
    if isinstance(session, Verdict):
        return session
    principal, key_id, verdict = session
    address = _normal_address(facts.sender) if facts.sender else None
    if not facts.sender:
        problem: str | None = (
            "the null sender <> is not accepted from an application; use an address of your "
            "verified domain"
        )
    elif address is None:
        problem = f"envelope sender {facts.sender!r} is not a valid address"
    else:
        problem = sender_problem(directory, settings, principal, address, facts.now)
    if problem and verdict.monitored is None:  # else: the first refusal is what is logged
        verdict = _monitor(
            directory, settings,
            _refuse(
                # Postfix puts "<rcpt>: Recipient address rejected:" in front at RCPT
                550, "5.7.1", "sender_not_owned", f"envelope sender: {problem}",
                principal, key_id,
            ),
        )
        if not verdict.allowed:
            return verdict
    transport, routing_problem = _pool_transport(directory, settings, principal)
    if routing_problem:
        # our configuration's fault, not the sender's: temporary, so nothing is lost
        return Verdict(
            Action.TEMPFAIL, "routing_error", 451, "4.3.0",
            f"relay configuration error ({routing_problem}); try again later",
            principal=principal, key_id=key_id,
        )
    if verdict.monitored is None:  # the common case, built directly: the hot path
        return Verdict(Action.ALLOW, "ok", principal=principal, key_id=key_id,
                       transport=transport)
    return verdict._replace(transport=transport)


# -- rate limits -----------------------------------------------------------------------------
def limits_for(directory: Directory, settings: Settings, principal: str) -> Limits:
    """The principal's effective limits: its own, else its account's, else the defaults."""
    memo = _memo(directory, settings, "limits")
    found = memo.get(principal)
    if found is None:
        found = memo[principal] = _limits_for(directory, settings, principal)
    assert isinstance(found, Limits)
    return found


def _limits_for(directory: Directory, settings: Settings, principal: str) -> Limits:
    account_name, _, _ = principal.partition("/")
    account = directory.accounts.get(account_name)
    limits = settings.default_limits
    if account is not None:
        limits = account.limits.over(limits)
    sub = directory.subusers.get(principal)
    return sub.limits.over(limits) if sub else limits


def decide_rate(directory: Directory, settings: Settings, facts: RateFacts) -> Verdict:
    """Per-principal message rate and recipients per message (counts kept by the caller)."""
    parsed = parse_identity(facts.identity)
    if parsed is None:
        return _allow("unauthenticated")
    principal, key_id = parsed
    limits = limits_for(directory, settings, principal)
    checks = (
        (facts.recipients, limits.recipients_per_message, "recipients per message"),
        (facts.messages_last_minute, limits.messages_per_minute, "messages per minute"),
        (facts.messages_last_hour, limits.messages_per_hour, "messages per hour"),
    )
    for count, limit, what in checks:
        if limit is not None and count > limit:
            refusal = Verdict(
                Action.TEMPFAIL, "rate_limited", 451, "4.7.1",
                f"limit of {limit} {what} reached for {principal}; try again later",
                principal, key_id,
            )
            return _monitor(directory, settings, refusal)
    return _allow("ok", principal, key_id)


# -- headers ---------------------------------------------------------------------------------
def _one_address(values: tuple[str, ...], name: str) -> tuple[tuple[str, ...], str | None]:
    """Addresses of the only ``name`` header, or a problem description."""
    if len(values) > 1:
        return (), f"the message has {len(values)} {name}: headers; RFC 5322 allows one"
    try:
        found = mailboxes(values[0])
    except HeaderError as exc:
        return (), f"the {name}: header {exc}"
    if not found:
        return (), f"the {name}: header has no address"
    return found, None


def decide_headers(directory: Directory, settings: Settings, facts: HeaderFacts) -> Verdict:
    """The header From (and Sender) must belong to the logged-in principal; plan DKIM."""
    if not facts.identity:
        return _allow("unauthenticated")  # the policy service decided who may relay
    session = _session_principal(
        directory, settings, facts.identity, facts.client_address, facts.now
    )
    if isinstance(session, Verdict):
        return session
    principal, key_id, verdict = session

    def owned(raw: str) -> str | None:
        address = _normal_address(raw)
        if address is None:
            return f"{raw!r} is not a valid address"
        return sender_problem(directory, settings, principal, address, facts.now)

    problem: str | None = None
    authors: tuple[str, ...] = ()
    if not facts.from_values:
        problem = "the message has no From: header; add one with an address of your domain"
    else:
        authors, problem = _one_address(facts.from_values, "From")
    responsible = ""
    if problem is None and facts.sender_values:
        found, problem = _one_address(facts.sender_values, "Sender")
        if problem is None and len(found) > 1:
            problem = "the Sender: header must hold exactly one address"
        elif problem is None:
            responsible = found[0]
            sender_issue = owned(responsible)
            if sender_issue:
                problem = f"Sender: {sender_issue}"
    if problem is None and len(authors) > 1 and not responsible:
        problem = (
            f"the From: header has {len(authors)} addresses; add a Sender: header with your "
            "own address (RFC 5322 section 3.6.2)"
        )
    if problem is None:
        # every author, not just one: mail programs show them all, and an owned Sender:
        # does not make someone else's From: address the principal's (DESIGN.md table)
        issues = [issue for issue in map(owned, authors) if issue]
        problem = f"From: {issues[0]}" if issues else None
    if problem is not None:
        # in monitor mode this passes unsigned: we sign nothing we could not vouch for
        if verdict.monitored is not None:
            return verdict
        return _monitor(
            directory, settings,
            _refuse(550, "5.7.1", "header_from_not_owned", problem, principal, key_id),
        )
    signer = _normal_address(authors[0] if len(authors) == 1 else responsible) or ""
    plan = _signing_plan(directory, settings, principal, signer, facts.now)
    return verdict._replace(signing=plan)


def _signing_plan(
    directory: Directory, settings: Settings, principal: str, address: str, now: datetime
) -> SigningPlan | None:
    domain = directory.domains.get(address.rpartition("@")[2])
    if domain is None or not _uses_domain(domain, principal):
        return None  # a verified single sender in someone else's domain: nothing to sign with
    if not domain_may_send(domain, settings, now):
        return None  # a single sender in the principal's unverified domain: do not vouch
    selectors = domain.signing_selectors()
    return SigningPlan(domain.name, selectors) if selectors else None

