"""Errors of the wire protocols: the peer broke the protocol, so its connection is closed."""

from __future__ import annotations


class BadRequest(Exception):
    """Malformed or oversized input on one connection; logged, then that connection closes.

    The message says what was wrong in terms an admin can act on and never quotes a secret
    (auth lines are described, not echoed).
    """
