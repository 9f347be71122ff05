"""The scopes an API key may hold: the one list every part checks against.

``mail.send`` is what the login asks for (``keyrelay.decisions``' ``SEND_SCOPE``); a key
without it cannot log in to send. ``stats.read`` is reserved for reading sending statistics:
no keyrelay service reads it yet, and a key holding only it cannot send (a key for a
dashboard, not for mail). A scope not in this list is refused where a key is created or its
scopes are set (``keyrelay.admin.check_scopes``): a typo such as ``mail.sendd`` would make a
key that can never send.
"""

from __future__ import annotations

from .decisions import SEND_SCOPE

STATS_SCOPE = "stats.read"

KNOWN_SCOPES: tuple[str, ...] = (SEND_SCOPE, STATS_SCOPE)
"""Every scope a key may hold, in the order help texts list them."""
