"""What the engine answers: an action, a reason from the catalogue and the reply text, plus
what the front end needs to carry on (identity, transport, DKIM plan).

Front ends render and log verdicts; they never build one (tests/test_import_rules.py). The
builders here are the engine's own, and ``temporary`` is the one way our own faults (a
directory we cannot read, a bug) become an answer, in every service. (A login's key missing
from this node's copy is answered 451 4.7.1 by the session check, checks.py: a copy that
lags, not a fault.)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from ..directory.model import Selector
from .facts import parse_identity
from .reasons import TEMPORARY_TEXTS, Reason


class Action(StrEnum):
    ALLOW = "allow"
    REFUSE = "refuse"  # permanent: the user must change something
    TEMPFAIL = "tempfail"  # temporary: retry later (limits, our own faults)
    # auth only: not keyrelay's login; the site's own auth service answers it unchanged
    # (auth.site_auth_socket, docs/coexistence.md)
    PASS = "pass"  # noqa: S105 - an action, not a password


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
    reason: Reason  # the stable tag for logs and tests (reasons.py, docs/answers.md)
    code: int = 0  # SMTP reply code; 0 when allowing
    status: str = ""  # enhanced status code (RFC 3463)
    text: str = ""  # what the client reads: says what to fix
    principal: str | None = None
    key_id: str | None = None
    identity: str | None = None  # login: the SASL user name Postfix carries from here on
    transport: str | None = None  # envelope: Postfix transport of the principal's IP pool
    signing: SigningPlan | None = None  # headers: the DKIM plan
    monitored: Verdict | None = None  # the refusal monitor mode let pass
    window: str = ""  # a rate or quota refusal: the full window (minute, hour, day, month)

    @property
    def allowed(self) -> bool:
        return self.action is Action.ALLOW

    @property
    def smtp_reply(self) -> str:
        return f"{self.code} {self.status} {self.text}"

    def log_fields(self) -> dict[str, str]:
        """Fields for the one log line of this decision; never contains a secret."""
        fields = {"verdict": str(self.action), "reason": str(self.reason)}
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
            fields["reason"] = str(self.monitored.reason)
        return fields


def allow(reason: Reason, principal: str | None = None, key_id: str | None = None) -> Verdict:
    return Verdict(Action.ALLOW, reason, principal=principal, key_id=key_id)


def refuse(
    code: int, status: str, reason: Reason, text: str,
    principal: str | None = None, key_id: str | None = None,
) -> Verdict:
    return Verdict(Action.REFUSE, reason, code, status, text, principal=principal, key_id=key_id)


def let_pass(verdict: Verdict, reason: Reason) -> Verdict:
    """An allow that carries the refusal it replaced (monitor mode, a check switched off),
    so that the log says what would have happened."""
    return Verdict(Action.ALLOW, reason, principal=verdict.principal, key_id=verdict.key_id,
                   transport=verdict.transport, monitored=verdict)


def temporary(reason: Reason, identity: str = "") -> Verdict:
    """Our own fault, in any service: always temporary (451 4.3.0; the auth service closes
    the connection, which Postfix answers with 454 4.7.0), so the client retries and nothing
    is lost. ``identity`` names the session's login, for the log."""
    parsed = parse_identity(identity) if identity else None
    principal, key_id = parsed if parsed else (None, None)
    return Verdict(Action.TEMPFAIL, reason, 451, "4.3.0", TEMPORARY_TEXTS[reason],
                   principal=principal, key_id=key_id)
