"""Rate limits and quotas (docs/policyd.md, "What is counted"): which windows a message is
charged against, and the answer when one of them is full.

- The unit is the **recipient**: a message to N recipients counts N in every window, as SES
  ("recipients per 24 hours") and SendGrid (each recipient is an email) count. The fields
  keep their names (``messages_per_minute`` ...).
- An **account's** numbers cap the account as a whole: one shared window over the account
  and all its subusers (subject ``acme``). The configuration's ``limits:`` defaults stand in
  for an account that sets none.
- A **subuser's** own numbers cap that subuser alone (subject ``acme/app``), within its
  account's. A subuser that sets none has no window of its own: only the account's apply
  (a window of its own holding the account's number could never refuse first, its count
  being part of the account's).

``windows_for`` is pure and memoised per snapshot; the service charges what it returns to the
counter store (one atomic check-and-add over all of them, ``keyrelay.counters``) and asks
``decide_quota`` about the window that refused.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal, NamedTuple
from zoneinfo import ZoneInfo

from ..directory.model import Directory, Limits
from .checks import monitored
from .envelope import _memo
from .facts import EngineSettings, parse_identity
from .reasons import Reason
from .verdict import Action, Verdict, allow

Span = Literal["minute", "hour", "day", "month"]
# the window of each limit field; minute and hour slide, day and month follow the calendar
SPANS: dict[str, Span] = {
    "messages_per_minute": "minute",
    "messages_per_hour": "hour",
    "messages_per_day": "day",
    "messages_per_month": "month",
}
WINDOW_FIELDS: tuple[str, ...] = tuple(SPANS)
SLIDING_SECONDS: dict[Span, int] = {"minute": 60, "hour": 3600}
_ADJECTIVE: dict[Span, str] = {"day": "daily", "month": "monthly"}


class RateWindow(NamedTuple):
    """One window a message is charged against.

    ``subject`` is the counter's name: the account (``acme``) for an account-wide window, the
    subuser (``acme/app``) for its own; never a ``:``. The store's window is
    ``Sliding(subject, seconds, limit)`` when ``seconds`` is set, else
    ``Calendar(subject, span, limit)``."""

    field: str  # the limit field (messages_per_minute ...)
    span: Span
    scope: Literal["account", "subuser"]
    subject: str
    limit: int
    source: str  # where the number is set: "account", "subuser" or "config"

    @property
    def seconds(self) -> int | None:
        """A sliding window's length; None for a calendar window (day, month)."""
        return SLIDING_SECONDS.get(self.span)

    @property
    def calendar(self) -> bool:
        return self.seconds is None

    def owner(self) -> str:
        """``account acme`` or ``acme/app``: whom the window caps, for answers."""
        return f"account {self.subject}" if self.scope == "account" else self.subject


def account_limits(directory: Directory, settings: EngineSettings,
                   account: str) -> tuple[Limits, dict[str, str]]:
    """The account-wide numbers (the account's own, else the configuration's default) and
    where each is set (``account`` or ``config``)."""
    acc = directory.accounts.get(account)
    own = acc.limits if acc is not None else Limits()
    values: dict[str, int | None] = {}
    sources: dict[str, str] = {}
    for name in WINDOW_FIELDS:
        value = getattr(own, name)
        values[name], sources[name] = ((value, "account") if value is not None
                                       else (getattr(settings.default_limits, name), "config"))
    return Limits(**values), sources


def windows_for(directory: Directory, settings: EngineSettings,
                principal: str) -> tuple[RateWindow, ...]:
    """Every window a message of ``principal`` is charged against: the subuser's own ones
    first (those it sets), then its account's; minute, hour, day, month in each."""
    memo = _memo(directory, settings, "windows")
    found = memo.get(principal)
    if found is None:
        found = memo[principal] = _windows_for(directory, settings, principal)
    assert isinstance(found, tuple)
    return found


def _windows_for(directory: Directory, settings: EngineSettings,
                 principal: str) -> tuple[RateWindow, ...]:
    account, _, _ = principal.partition("/")
    found: list[RateWindow] = []
    sub = directory.subusers.get(principal)
    if sub is not None:
        for name in WINDOW_FIELDS:
            limit = getattr(sub.limits, name)
            if limit is not None:
                found.append(RateWindow(name, SPANS[name], "subuser", principal, limit,
                                        "subuser"))
    limits, sources = account_limits(directory, settings, account)
    for name in WINDOW_FIELDS:
        limit = getattr(limits, name)
        if limit is not None:
            found.append(RateWindow(name, SPANS[name], "account", account, limit,
                                    sources[name]))
    return tuple(found)


class QuotaFacts(NamedTuple):
    """What the counter store answered for one message: the window that refused (None: all
    charged), its count before this message (``used``), and the seconds until the amount
    would fit (``resets_in``)."""

    identity: str
    amount: int  # this message's recipients
    window: RateWindow | None
    used: float = 0.0  # the window's count before this message
    resets_in: float = 0.0
    now: datetime | None = None  # wall clock, for a quota's reset time
    zone: str = "UTC"  # counters.time_zone: calendar windows and reset times


def reset_text(now: datetime, resets_in: float, zone: str) -> str:
    """``2026-12-05 00:00 UTC``: when a window resets, in the counters' time zone, to the
    nearest minute (a day or a month ends on one; ``resets_in`` was measured a moment after
    ``now`` by the store's clock, so ``now + resets_in`` falls a little short of it)."""
    at = (now + timedelta(seconds=resets_in + 30)).astimezone(ZoneInfo(zone))
    return at.strftime("%Y-%m-%d %H:%M ") + (at.tzname() or zone)


def _wait_text(seconds: float) -> str:
    whole = max(1, int(seconds + 0.999))
    return f"{whole} seconds" if whole < 120 else f"{(whole + 59) // 60} minutes"


def decide_quota(directory: Directory, settings: EngineSettings, facts: QuotaFacts) -> Verdict:
    """The answer for a message the store charged (``window`` None: allowed) or refused.

    A full sliding window (minute, hour) is ``rate_limited``, a full calendar window (day,
    month) ``quota_exceeded``: both ``451 4.7.1``, temporary, naming the window, whom it caps
    and when it frees up. Monitor mode lets either pass (logged)."""
    parsed = parse_identity(facts.identity)
    if parsed is None:
        return allow(Reason.UNAUTHENTICATED)
    principal, key_id = parsed
    window = facts.window
    if window is None:
        return allow(Reason.OK, principal, key_id)
    counted = ("a message to N recipients counts N" if facts.amount <= window.limit else
               f"this message has {facts.amount} recipients, more than the whole "
               f"{window.span}'s limit: send fewer recipients per message")
    if window.calendar:
        now = facts.now if facts.now is not None else datetime.now(ZoneInfo("UTC"))
        refusal = Verdict(
            Action.TEMPFAIL, Reason.QUOTA_EXCEEDED, 451, "4.7.1",
            f"{_ADJECTIVE[window.span]} quota of {window.limit} messages for "
            f"{window.owner()} reached; it resets at "
            f"{reset_text(now, facts.resets_in, facts.zone)} ({counted})",
            principal, key_id, window=str(window.span),
        )
    else:
        refusal = Verdict(
            Action.TEMPFAIL, Reason.RATE_LIMITED, 451, "4.7.1",
            f"limit of {window.limit} messages per {window.span} reached for "
            f"{window.owner()} ({counted}); try again in {_wait_text(facts.resets_in)}",
            principal, key_id, window=str(window.span),
        )
    return monitored(directory, settings, refusal)
