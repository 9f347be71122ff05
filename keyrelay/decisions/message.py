"""The milter's question at the end of a message: is the header From (and Sender) the
logged-in principal's, and with which domain and selectors is it signed."""

from __future__ import annotations

from datetime import datetime

from ..directory.model import Directory
from ..headers import HeaderError, mailboxes
from .checks import (
    domain_may_send,
    monitored,
    normal_address,
    sender_problem,
    session_principal,
    uses_domain,
)
from .facts import EngineSettings, HeaderFacts
from .reasons import Reason
from .verdict import Action, SigningPlan, Verdict, allow, let_pass, refuse


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


def decide_headers(directory: Directory, settings: EngineSettings, facts: HeaderFacts) -> Verdict:
    """The header From (and Sender) must belong to the logged-in principal; plan DKIM.

    With ``settings.check_sender`` off (milter.check_sender: false) the milter only signs:
    a refusal is let pass unsigned with the reason ``not_checked``, logged as monitor mode
    logs it (the policy service still checks the login and the envelope)."""
    verdict = _decide_headers(directory, settings, facts)
    if verdict.action is Action.REFUSE and not settings.check_sender:
        return let_pass(verdict, Reason.NOT_CHECKED)
    return verdict


def _decide_headers(directory: Directory, settings: EngineSettings, facts: HeaderFacts) -> Verdict:
    if not facts.identity:
        return allow(Reason.UNAUTHENTICATED)  # the policy service decided who may relay
    session = session_principal(
        directory, settings, facts.identity, facts.client_address, facts.now
    )
    if isinstance(session, Verdict):
        return session
    principal, key_id, verdict = session

    def owned(raw: str) -> str | None:
        address = normal_address(raw)
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
        # does not make someone else's From: address the principal's (docs/milters.md)
        issues = [issue for issue in map(owned, authors) if issue]
        problem = f"From: {issues[0]}" if issues else None
    if problem is not None:
        # in monitor mode this passes unsigned: we sign nothing we could not vouch for
        if verdict.monitored is not None:
            return verdict
        return monitored(
            directory, settings,
            refuse(550, "5.7.1", Reason.HEADER_FROM_NOT_OWNED, problem, principal, key_id),
        )
    if not settings.sign:
        return verdict  # milter.sign: false, the milter only checks
    signer = normal_address(authors[0] if len(authors) == 1 else responsible) or ""
    plan = _signing_plan(directory, settings, principal, signer, facts.now)
    return verdict._replace(signing=plan)


def _signing_plan(
    directory: Directory, settings: EngineSettings, principal: str, address: str, now: datetime
) -> SigningPlan | None:
    domain = directory.domains.get(address.rpartition("@")[2])
    if domain is None or not uses_domain(domain, principal):
        return None  # a verified single sender in someone else's domain: nothing to sign with
    if not domain_may_send(domain, settings, now):
        return None  # a single sender in the principal's unverified domain: do not vouch
    selectors = domain.signing_selectors()
    return SigningPlan(domain.name, selectors) if selectors else None
