"""Sending limits: the bounds of a value, and a principal's limits as the policy service
applies them, with where each comes from (its own, its account's, the configuration's).

The values come from the engine itself (``keyrelay.decisions.limits_for``); this module only
adds which level set each one, for ``keyrelay limits show`` and the error lines.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .decisions import EngineSettings, limits_for
from .directory.model import LIMIT_FIELDS, Directory, DirectoryData
from .errors import NotFound, UserError

LIMIT_WORDS = {
    "messages_per_minute": "messages per minute",
    "messages_per_hour": "messages per hour",
    "recipients_per_message": "recipients per message",
}
# The largest limit accepted: far above what one relay sends (a million messages a minute is
# 16,000 a second), low enough that a typo with too many digits is refused, not stored.
LIMIT_MAXIMA = {
    "messages_per_minute": 1_000_000,
    "messages_per_hour": 60_000_000,
    "recipients_per_message": 100_000,
}


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
    """One limit as the policy service applies it, and where its value comes from."""

    name: str  # a LIMIT_FIELDS name
    value: int | None
    source: str  # "subuser", "account" or "config"
    origin: str  # the principal it is set on, or the configuration key

    def text(self) -> str:
        """``subuser acme/app``, ``account acme``, ``config default limits.NAME``."""
        return f"{'config default' if self.source == 'config' else self.source} {self.origin}"


def effective_limits(directory: Directory, settings: EngineSettings,
                     pid: str) -> tuple[EffectiveLimit, ...]:
    """The principal's limits as the engine applies them (``decisions.limits_for``), each
    with the level that sets it: the subuser, its account, or the configuration."""
    if not directory.has_principal(pid):
        raise NotFound(f"unknown principal {pid!r} (see: keyrelay account list)")
    values = limits_for(directory, settings, pid)
    account_name = pid.partition("/")[0]
    levels = [("account", account_name, directory.accounts[account_name].limits)]
    if pid in directory.subusers:
        levels.insert(0, ("subuser", pid, directory.subusers[pid].limits))
    found = []
    for name in LIMIT_FIELDS:
        source, origin = next(
            ((kind, who) for kind, who, own in levels if getattr(own, name) is not None),
            ("config", f"limits.{name}"))
        found.append(EffectiveLimit(name, getattr(values, name), source, origin))
    return tuple(found)


def check_effective_limits(data: DirectoryData, settings: EngineSettings,
                           pids: Iterable[str]) -> None:
    """Refuse limits that contradict each other where they apply: for each principal in
    ``pids`` and each subuser of an account among them (they inherit its limits), more
    messages per minute than per hour."""
    directory = Directory(data)
    wanted = dict.fromkeys(pids)
    for pid in list(wanted):
        if "/" not in pid:
            wanted.update(dict.fromkeys(s.principal for s in directory.subusers_of(pid)))
    for pid in wanted:
        by_name = {e.name: e for e in effective_limits(directory, settings, pid)}
        minute, hour = by_name["messages_per_minute"], by_name["messages_per_hour"]
        if minute.value is not None and hour.value is not None and minute.value > hour.value:
            raise UserError(
                f"{pid} would be allowed {minute.value} messages per minute "
                f"({minute.text()}) but only {hour.value} per hour ({hour.text()}): the "
                "per-minute limit must not be above the per-hour limit")


