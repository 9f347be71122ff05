"""Sending limits and quotas: the bounds of a value, and the numbers that cap a principal as
the policy service applies them, with where each is set (its own, its account's, the
configuration's) and whom it caps (the subuser alone, or the whole account).

The windows come from the engine itself (``keyrelay.decisions.windows_for``: an account's
numbers cap the account and all its subusers together, a subuser's own ones cap it alone);
recipients per message from ``limits_for``. This module only adds where each is set, for
``keyrelay limits show``, the listings and the error lines.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .counters import Calendar, Sliding, Window
from .decisions import WINDOW_FIELDS, EngineSettings, RateWindow, account_limits, limits_for
from .directory.model import LIMIT_FIELDS, Directory, DirectoryData
from .errors import NotFound, UserError

LIMIT_WORDS = {
    "messages_per_minute": "messages per minute",
    "messages_per_hour": "messages per hour",
    "recipients_per_message": "recipients per message",
    "messages_per_day": "messages per day",
    "messages_per_month": "messages per month",
}
# The largest limit accepted: far above what one relay sends (a million messages a minute is
# 16,000 a second), low enough that a typo with too many digits is refused, not stored. A
# day holds 24 hours of the largest hourly rate, a month 31 such days.
LIMIT_MAXIMA = {
    "messages_per_minute": 1_000_000,
    "messages_per_hour": 60_000_000,
    "recipients_per_message": 100_000,
    "messages_per_day": 1_440_000_000,
    "messages_per_month": 44_640_000_000,
}


def store_window(window: RateWindow) -> Window:
    """The counter store's window (keyrelay/counters) for one of the engine's
    (``decisions.windows_for``): ``Sliding`` for a minute or an hour, ``Calendar`` for a day
    or a month. What the policy service charges and ``keyrelay usage`` reads."""
    if window.seconds is not None:
        return Sliding(window.subject, window.seconds, window.limit)
    assert window.span in ("day", "month")
    return Calendar(window.subject, window.span, window.limit)


def check_limit(name: str, value: int | None) -> int | None:
    """A limit's value (``None``: inherit), from 1 to its maximum (``LIMIT_MAXIMA``)."""
    if value is None:
        return None
    words, top = LIMIT_WORDS[name], LIMIT_MAXIMA[name]
    if value < 1:
        raise UserError(f"{words}: a limit is at least 1, got {value} (to take the account's "
                        "or the configuration's value instead, inherit it)")
    if value > top:
        raise UserError(f"{words}: {value} is above the maximum of {top} (keyrelay's bound "
                        "for a sane limit)")
    return value


@dataclass(frozen=True, slots=True)
class EffectiveLimit:
    """One number that caps a principal, where it is set and whom it caps."""

    name: str  # a LIMIT_FIELDS name
    value: int | None  # None: no such limit (a quota nobody set)
    source: str  # "subuser", "account", "config", or "none"
    origin: str  # the principal it is set on, or the configuration key
    # "subuser": caps that subuser alone; "account": the account and all its subusers
    # together; "message": recipients per message
    scope: str = "account"

    def text(self) -> str:
        """``subuser acme/app``, ``account acme``, ``config default limits.NAME``, ``not
        set``."""
        if self.source == "none":
            return "not set"
        return f"{'config default' if self.source == 'config' else self.source} {self.origin}"


def effective_limits(directory: Directory, settings: EngineSettings,
                     pid: str) -> tuple[EffectiveLimit, ...]:
    """The numbers that cap the principal, in ``LIMIT_FIELDS`` order: for a rate or quota of
    a subuser, its own window (``scope="subuser"``, value None when it sets none) and then
    its account's (``scope="account"``); for an account, its own, which are account-wide;
    recipients per message as the engine takes it (subuser, else account, else config)."""
    if not directory.has_principal(pid):
        raise NotFound(f"unknown principal {pid!r} (see: keyrelay account list)")
    account_name = pid.partition("/")[0]
    account_own = directory.accounts[account_name].limits
    sub = directory.subusers.get(pid)
    wide, sources = account_limits(directory, settings, account_name)
    found = []
    for name in LIMIT_FIELDS:
        if name not in WINDOW_FIELDS:
            levels = [("account", account_name, account_own)]
            if sub is not None:
                levels.insert(0, ("subuser", pid, sub.limits))
            source, origin = next(
                ((kind, who) for kind, who, own in levels if getattr(own, name) is not None),
                ("config", f"limits.{name}"))
            found.append(EffectiveLimit(name, getattr(limits_for(directory, settings, pid), name),
                                        source, origin, "message"))
            continue
        if sub is not None:
            own = getattr(sub.limits, name)
            found.append(EffectiveLimit(name, own, "subuser" if own is not None else "none",
                                        pid, "subuser"))
        value = getattr(wide, name)
        source = sources[name] if value is not None else "none"
        origin = f"limits.{name}" if source == "config" else account_name
        found.append(EffectiveLimit(name, value, source, origin, "account"))
    return tuple(found)


def tightest(found: Iterable[EffectiveLimit], name: str) -> EffectiveLimit | None:
    """Of the numbers named ``name`` that cap a principal, the smallest (the one that refuses
    first); None when none is set."""
    values = [e for e in found if e.name == name and e.value is not None]
    return min(values, key=lambda e: e.value or 0, default=None)


# (shorter, longer) windows: the shorter one's limit must not be above the longer one's
_ORDERED = (("messages_per_minute", "messages_per_hour"),
            ("messages_per_hour", "messages_per_day"),
            ("messages_per_day", "messages_per_month"))


def check_effective_limits(data: DirectoryData, settings: EngineSettings,
                           pids: Iterable[str]) -> None:
    """Refuse limits that contradict each other where they apply: for each principal in
    ``pids`` and each subuser of an account among them, a shorter window allowing more than
    a longer one (per minute above per hour, per hour above per day, per day above per
    month). A subuser's own number is compared with the tightest longer one that caps it
    (its own or its account's); an account's with the account's (a subuser's own longer
    limit caps only that subuser, no contradiction). A configuration default above a quota
    set on the principal or its account is no contradiction either: the quota simply refuses
    first (a daily quota of 1000 under the default 20000 per hour)."""
    directory = Directory(data)
    wanted = dict.fromkeys(pids)
    for pid in list(wanted):
        if "/" not in pid:
            wanted.update(dict.fromkeys(s.principal for s in directory.subusers_of(pid)))
    for pid in wanted:
        found = effective_limits(directory, settings, pid)
        for shorter_name, longer_name in _ORDERED:
            for shorter in found:
                if shorter.name != shorter_name or shorter.value is None:
                    continue
                # a subuser's own window against every longer one that caps it; an account's
                # against the account's only (it caps other subusers too)
                longer = tightest((e for e in found if shorter.scope == "subuser"
                                   or e.scope == shorter.scope), longer_name)
                if longer is None:
                    continue
                if longer.value is None or shorter.value <= longer.value:
                    continue
                if shorter.source == "config" and longer_name != "messages_per_hour":
                    continue
                _contradiction(pid, shorter, longer)


def _contradiction(pid: str, shorter: EffectiveLimit, longer: EffectiveLimit) -> None:
    per = {e.name: LIMIT_WORDS[e.name].removeprefix("messages ") for e in (shorter, longer)}
    raise UserError(
        f"{pid} would be allowed {shorter.value} {LIMIT_WORDS[shorter.name]} "
        f"({shorter.text()}) but only {longer.value} {per[longer.name]} "
        f"({longer.text()}): the {per[shorter.name].replace(' ', '-')} limit must not "
        f"be above the {per[longer.name].replace(' ', '-')} limit")
