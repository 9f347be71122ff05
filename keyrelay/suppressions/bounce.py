"""What keyrelay-events does with a hard bounce: the recipient is suppressed for the
message's account (docs/suppressions.md, "Hard bounces")."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .. import names
from ..errors import UserError
from .model import Suppression, SuppressionStore, make


def hard_bounce(event: dict[str, Any], now: datetime) -> tuple[str, Suppression] | None:
    """(account, suppression) of a ``bounce`` event with ``type: hard`` (source ``bounce``,
    reason and status from the event, created at its ``timestamp``, else ``now``); None for
    any other event, one without an account (a message keyrelay did not attribute), with an
    account name or an address keyrelay cannot key."""
    if event.get("event") != "bounce" or event.get("type") != "hard":
        return None
    account = event.get("account")
    email = event.get("email")
    if not isinstance(account, str) or not account or not isinstance(email, str):
        return None
    stamp = event.get("timestamp")
    created = int(stamp) if isinstance(stamp, int | float) and not isinstance(
        stamp, bool) and stamp > 0 else int(now.timestamp())
    try:
        names.account_name(account)
        return account, make(email, str(event.get("reason", "")),
                             str(event.get("status", "")), created, "bounce")
    except UserError:
        return None


def suppress_hard_bounce(store: SuppressionStore, event: dict[str, Any],
                         now: datetime) -> bool:
    """Suppress the recipient of a ``bounce`` event with ``type: hard`` for its ``account``
    (source ``bounce``, reason and status from the event, created at its ``timestamp``, else
    ``now``). True when the address was not suppressed before; False for any other event,
    one without an account (a message keyrelay did not attribute), with an account name or
    an address keyrelay cannot key. Idempotent: a second bounce of an address already
    suppressed keeps its date and source and only refreshes the reason and status (the
    latest remote answer). Raises
    ``SuppressionsUnavailable`` when the store cannot answer (the caller retries the event).
    """
    found = hard_bounce(event, now)
    if found is None:
        return False
    account, suppression = found
    return store.add(account, suppression, replace=True)
