"""The policy service's questions: may this session send with this envelope, through which
IP pool, and within which rate limits."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from typing import Any, NamedTuple

from ..directory.model import Directory, DomainState, Limits
from .checks import monitored, normal_address, sender_problem, session_principal
from .facts import LEGACY_KEY_ID, EngineSettings, EnvelopeFacts, RateFacts, parse_identity
from .reasons import Reason
from .verdict import Action, Verdict, allow, let_pass, refuse


def decide_envelope(
    directory: Directory, settings: EngineSettings, facts: EnvelopeFacts
) -> Verdict:
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
        return routable(known[0], settings, facts.transports)
    verdict = _decide_envelope(directory, settings, facts)
    if verdict.action is Action.ALLOW and verdict.monitored is None and verdict.key_id:
        if len(memo) >= _ENVELOPE_MEMO_MAX:
            memo.clear()  # bounded: an owned domain has any number of sender addresses
        memo[question] = (verdict, _allow_horizon(directory, settings, verdict, facts.sender))
    return routable(verdict, settings, facts.transports)


def routable(
    verdict: Verdict, settings: EngineSettings, transports: frozenset[str] | None
) -> Verdict:
    """An allow that routes through a pool transport Postfix does not have becomes
    ``pool_not_in_postfix`` (451 4.3.0): Postfix would accept the message and then defer it
    ("connect to transport private/...: No such file or directory") until `keyrelay postfix
    apply` writes the transport; answered now, the client keeps it and retries. Our
    configuration's fault, so never monitored. ``transports``: the unix services of Postfix's
    master.cf; None (not known) checks nothing."""
    transport = verdict.transport
    if transports is None or transport is None or transport in transports:
        return verdict
    if verdict.action is not Action.ALLOW:
        return verdict
    pool = transport.removeprefix(settings.transport_prefix)
    return Verdict(
        Action.TEMPFAIL, Reason.POOL_NOT_IN_POSTFIX, 451, "4.3.0",
        f"relay configuration incomplete (IP pool {pool!r} is not set up in Postfix yet); "
        "try again later",
        principal=verdict.principal, key_id=verdict.key_id, transport=transport,
    )


# Allowed envelopes remembered per snapshot (see decide_envelope); about 300 bytes each.
_ENVELOPE_MEMO_MAX = 65536
_FOREVER = datetime.max.replace(tzinfo=UTC)
_EnvelopeMemo = dict[tuple[str, bool, str, str], tuple[Verdict, datetime]]


class _SettingsMemo(NamedTuple):
    settings: EngineSettings  # compared by identity: hashing them would cost more than a lookup
    values: dict[Any, Any]


def _memo(directory: Directory, settings: EngineSettings, name: str) -> dict[Any, Any]:
    """Values derived from this snapshot and these settings, computed once (the snapshot
    never changes; other settings, after a reload, start a new memo)."""
    found = directory.derived.get(name)
    if isinstance(found, _SettingsMemo) and found.settings is settings:
        return found.values
    memo = directory.derived[name] = _SettingsMemo(settings, {})
    return memo.values


def _allow_horizon(
    directory: Directory, settings: EngineSettings, verdict: Verdict, sender: str
) -> datetime:
    """The first moment at which an envelope allowed now could be decided otherwise by time
    alone: the login's key expires, or the sender's domain, failing DNS checks, reaches the
    end of its grace period (``key_problem``, ``domain_may_send``). Allowed until then."""
    horizon = _FOREVER
    key = directory.keys.get(verdict.key_id or "")
    if key is not None and key.expires is not None:
        horizon = key.expires
    cred = (directory.legacy.get(verdict.principal or "")
            if verdict.key_id == LEGACY_KEY_ID else None)  # a key's session: no look-up
    if cred is not None:  # the day after its sunset
        horizon = min(horizon, datetime.combine(cred.sunset + timedelta(days=1), time(),
                                                tzinfo=UTC))
    address = normal_address(sender) or ""
    domain = directory.domains.get(address.rpartition("@")[2])
    if domain is not None and domain.state is DomainState.FAILING and domain.verified_at:
        horizon = min(horizon, domain.verified_at + settings.failing_grace)
    return horizon


def _pool_transport(
    directory: Directory, settings: EngineSettings, principal: str
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


def _decide_envelope(
    directory: Directory, settings: EngineSettings, facts: EnvelopeFacts
) -> Verdict:
    if not facts.identity:
        if facts.submission:
            return refuse(530, "5.7.0", Reason.AUTH_REQUIRED, "Authentication required")
        return allow(Reason.UNAUTHENTICATED)  # port 25: Postfix's own relay rules decide
    session = session_principal(
        directory, settings, facts.identity, facts.client_address, facts.now
    )
    if isinstance(session, Verdict):
        return session
    principal, key_id, verdict = session
    address = normal_address(facts.sender) if facts.sender else None
    if not facts.sender:
        problem: str | None = (
            "the null sender <> is not accepted from an application; use an address of your "
            "verified domain"
        )
    elif address is None:
        problem = f"{facts.sender!r} is not a valid address"
    else:
        problem = sender_problem(directory, settings, principal, address, facts.now)
    if problem and verdict.monitored is None:  # else: the first refusal is what is logged
        verdict = monitored(
            directory, settings,
            refuse(
                # Postfix puts "<rcpt>: Recipient address rejected:" in front at RCPT
                550, "5.7.1", Reason.SENDER_NOT_OWNED, f"envelope sender: {problem}",
                principal, key_id,
            ),
        )
        if not verdict.allowed:
            return verdict
    transport, routing_problem = _pool_transport(directory, settings, principal)
    if routing_problem:
        # our configuration's fault, not the sender's: temporary, so nothing is lost
        return Verdict(
            Action.TEMPFAIL, Reason.ROUTING_ERROR, 451, "4.3.0",
            f"relay configuration error ({routing_problem}); try again later",
            principal=principal, key_id=key_id,
        )
    if verdict.monitored is None:  # the common case, built directly: the hot path
        return Verdict(Action.ALLOW, Reason.OK, principal=principal, key_id=key_id,
                       transport=transport)
    return verdict._replace(transport=transport)


# -- rate limits -----------------------------------------------------------------------------
def limits_for(directory: Directory, settings: EngineSettings, principal: str) -> Limits:
    """The principal's effective limits: its own, else its account's, else the defaults."""
    memo = _memo(directory, settings, "limits")
    found = memo.get(principal)
    if found is None:
        found = memo[principal] = _limits_for(directory, settings, principal)
    assert isinstance(found, Limits)
    return found


def _limits_for(directory: Directory, settings: EngineSettings, principal: str) -> Limits:
    account_name, _, _ = principal.partition("/")
    account = directory.accounts.get(account_name)
    limits = settings.default_limits
    if account is not None:
        limits = account.limits.over(limits)
    sub = directory.subusers.get(principal)
    return sub.limits.over(limits) if sub else limits


def decide_rate(directory: Directory, settings: EngineSettings, facts: RateFacts) -> Verdict:
    """Recipients per message (``too_many_recipients``, 452 4.5.3), at RCPT and at DATA. The
    message rates and quotas are the counter store's and ``quotas.decide_quota``'s."""
    parsed = parse_identity(facts.identity)
    if parsed is None:
        return allow(Reason.SITE_LOGIN if facts.identity and settings.site_logins
                     else Reason.UNAUTHENTICATED)
    principal, key_id = parsed
    most = limits_for(directory, settings, principal).recipients_per_message
    if most is not None and facts.recipients > most:
        # RFC 5321 section 4.5.3.1.10 and RFC 3463 X.5.3, as Postfix's own
        # smtpd_recipient_limit answers: the client keeps the recipients accepted so far
        return monitored(directory, settings, Verdict(
            Action.TEMPFAIL, Reason.TOO_MANY_RECIPIENTS, 452, "4.5.3",
            f"too many recipients: at most {most} per message for {principal}; send the "
            "others in another message",
            principal, key_id,
        ))
    return allow(Reason.OK, principal, key_id)


# The answer at a stage the policy service does not check (CONNECT, HELO, VRFY...): DUNNO.
STAGE_NOT_CHECKED = allow(Reason.STAGE_NOT_CHECKED)


def with_rate(envelope: Verdict, rate: Verdict) -> Verdict:
    """The policy answer for an allowed envelope and its rate verdict: the rate's refusal,
    or the envelope's allow (carrying a rate refusal that monitor mode let pass, when the
    envelope itself carries none: the first refusal is the one logged)."""
    if not rate.allowed:
        return rate
    if rate.monitored is not None and envelope.monitored is None:
        return let_pass(envelope, Reason.MONITOR)._replace(monitored=rate.monitored)
    return envelope
