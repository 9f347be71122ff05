"""The policy service's question at each RCPT of a keyrelay login: has the principal's
account suppressed this recipient (docs/suppressions.md, "The refusal")?

The look-up itself is the front end's (policyd/policy.py asks the suppression store); the
engine turns what was found into the answer: ``550 5.7.1`` naming the suppression, its date
and reason, or an allow. Monitor mode lets it pass (``would_be=``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ..directory.model import Directory
from .checks import monitored
from .facts import EngineSettings, parse_identity
from .reasons import Reason
from .verdict import Verdict, allow, refuse

if TYPE_CHECKING:
    from ..suppressions.model import Suppression

# SMTP replies are ASCII lines of at most 512 octets (RFC 5321 section 4.5.3.1.5); Postfix
# puts "<rcpt>: Recipient address rejected: " in front: this text stays well under it.
MAX_TEXT = 400
MAX_SHOWN_REASON = 120
_SOURCES = {"bounce": "hard bounce", "manual": "added by an administrator",
            "import": "imported"}


@dataclass(frozen=True, slots=True)
class RecipientFacts:
    identity: str  # the session's login (PRINCIPAL:KEYID)
    recipient: str  # the recipient in keyrelay's normal form (names.address)
    suppression: Suppression | None  # what the account's list holds for it


def account_of(identity: str) -> str | None:
    """The account whose suppression list applies to a login, or None (not keyrelay's)."""
    parsed = parse_identity(identity)
    return None if parsed is None else parsed[0].partition("/")[0]


def _ascii(text: str) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def suppressed_text(account: str, recipient: str, suppression: Suppression) -> str:
    """What the client reads: the suppression, its date, why, and how it is lifted."""
    since = datetime.fromtimestamp(suppression.created, UTC).strftime("%Y-%m-%d")
    why = _SOURCES.get(suppression.source, suppression.source)
    reason = _ascii(suppression.reason)
    if len(reason) > MAX_SHOWN_REASON:
        reason = reason[:MAX_SHOWN_REASON - 3].rstrip() + "..."
    if reason:
        why = f"{why}: {reason}"
    shown = _ascii(recipient)
    text = (f"recipient suppressed for account {account} since {since} ({why}); remove it "
            f"with keyrelay suppression remove {account} {shown}")
    if len(text) > MAX_TEXT:  # a very long address: name it once, in Postfix's prefix
        text = (f"recipient suppressed for account {account} since {since} ({why}); remove "
                f"it with keyrelay suppression remove {account} ADDRESS")
    return text


def decide_recipient(directory: Directory, settings: EngineSettings,
                     facts: RecipientFacts) -> Verdict:
    """``suppressed`` (550 5.7.1, or let pass in monitor mode) when the account's list holds
    the recipient; else an allow. Asked only for a keyrelay login whose envelope is allowed."""
    parsed = parse_identity(facts.identity)
    if parsed is None:
        return allow(Reason.SITE_LOGIN if settings.site_logins else Reason.UNAUTHENTICATED)
    principal, key_id = parsed
    if facts.suppression is None:
        return allow(Reason.OK, principal, key_id)
    account = principal.partition("/")[0]
    return monitored(directory, settings, refuse(
        550, "5.7.1", Reason.SUPPRESSED,
        suppressed_text(account, facts.recipient, facts.suppression), principal, key_id))

