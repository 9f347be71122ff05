"""Accounts' webhooks: where delivery events are POSTed, signed (docs/webhooks.md).

- records.py: an account's webhook in the directory (``keyrelay webhook set/remove``);
- target.py: which URLs keyrelay sends to (the SSRF guard), checked at set time and at every
  delivery;
- sign.py: the ``X-Keyrelay-Signature`` header, a new secret, and ``verify`` for receivers;
- delivery.py: one batch POSTed once (``deliver`` -> ``Outcome``), and when to try again
  (``next_attempt``).

The outbox (which events wait, how often they were tried) is not here: it calls ``deliver``
and ``next_attempt`` and keeps their results.
"""

from .delivery import Outcome, Result, body_of, deliver, make_test_event, next_attempt, tls_context
from .sign import verify
from .target import Target, TargetRefused, TargetUnresolved, check, parse_url

__all__ = [
    "Outcome",
    "Result",
    "Target",
    "TargetRefused",
    "TargetUnresolved",
    "body_of",
    "check",
    "deliver",
    "make_test_event",
    "next_attempt",
    "parse_url",
    "tls_context",
    "verify",
]
