"""The policy service's question at MAIL and RCPT of a keyrelay login: has the reputation
guard paused the principal (docs/reputation.md, "The refusal")?

The look-up is the front end's (policyd/policy.py keeps the pauses in memory); the engine
turns what was found into the answer: ``451 4.7.1`` naming the pause, its rate and how it
ends, or an allow. A pause recorded in monitor mode, and an account in monitor mode, let the
mail pass (``would_be=`` in the log).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from ..directory.model import Directory
from ..reputation.model import Pause, percent, resume_command, span
from .checks import monitored
from .facts import EngineSettings, parse_identity
from .reasons import Reason
from .verdict import Action, Verdict, allow, let_pass


@dataclass(frozen=True, slots=True)
class PauseFacts:
    identity: str  # the session's login (PRINCIPAL:KEYID)
    pause: Pause | None  # the principal's pause, if any


def paused_text(pause: Pause) -> str:
    since = datetime.fromtimestamp(pause.since, UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (f"sending paused for {pause.principal} since {since}: bounce rate "
            f"{percent(pause.rate)} over {span(pause.window)} is above "
            f"{percent(pause.threshold)}; the account's admin resumes it with "
            f"{resume_command(pause.principal)}")


def decide_paused(directory: Directory, settings: EngineSettings, facts: PauseFacts) -> Verdict:
    """``paused`` (451 4.7.1, or let pass in monitor mode) when the principal is paused; else
    an allow. Asked only for a keyrelay login whose envelope is allowed."""
    parsed = parse_identity(facts.identity)
    if parsed is None:
        return allow(Reason.SITE_LOGIN if settings.site_logins else Reason.UNAUTHENTICATED)
    principal, key_id = parsed
    if facts.pause is None:
        return allow(Reason.OK, principal, key_id)
    refusal = Verdict(Action.TEMPFAIL, Reason.PAUSED, 451, "4.7.1", paused_text(facts.pause),
                      principal=principal, key_id=key_id)
    if facts.pause.monitor:
        return let_pass(refusal, Reason.MONITOR)
    return monitored(directory, settings, refusal)
