"""The socketmap service: lookup tables for Postfix's own restrictions.

Map ``sender_login`` (for ``smtpd_sender_login_maps``): key an envelope sender address, value
every login allowed to use it, i.e. the identity (``principal:keyid``) of each usable key of
each active principal that owns the address (a verified single sender, or an address in a
domain the principal owns or was granted, while that domain may send). With it, admins can also use
``reject_authenticated_sender_login_mismatch``. Postfix compares the logins case-insensitively;
keys arrive lowercased but are lowercased again here (a socketmap is a pattern table).
"""

from __future__ import annotations

import logging

from keyrelay.decisions import LookupResult, sender_logins
from keyrelay.errors import DirectoryUnavailable
from keyrelay.metrics import NO_METRICS, Metrics

from . import netstring
from .context import ServiceContext

log = logging.getLogger("keyrelay.policyd.socketmap")

MAPS = ("sender_login",)


class SocketmapService:
    def __init__(self, context: ServiceContext, metrics: Metrics = NO_METRICS) -> None:
        self.context = context
        self.metrics = metrics

    def lookup(self, request: netstring.Lookup) -> tuple[bytes, LookupResult]:
        """The reply netstring and its outcome for the log (keyrelay/decisions/reasons.py)."""
        if request.map_name not in MAPS:
            return (netstring.perm(f"unknown map {request.map_name[:40]!r}"),
                    LookupResult.UNKNOWN_MAP)
        ctx = self.context
        try:
            directory = ctx.snapshot()
        except DirectoryUnavailable as exc:
            log.error("directory unavailable: %s", exc)
            return (netstring.temp("account directory temporarily unavailable"),
                    LookupResult.UNAVAILABLE)
        logins = sender_logins(directory, ctx.settings, request.key.lower(), ctx.clock())
        if not logins:
            return netstring.not_found(), LookupResult.NOTFOUND
        value = ",".join(logins)
        if len(value.encode()) > netstring.MAX_REPLY - 8:
            # Postfix refuses longer replies; say why every message for it is deferred
            log.error("sender_login for %s lists %d logins, more than Postfix's 100000-byte "
                      "socketmap reply holds; answering TEMP", request.key[:256], len(logins))
            return netstring.temp("too many logins for one address"), LookupResult.TOO_LONG
        return netstring.ok(value), LookupResult.OK

    def log(self, request: netstring.Lookup, outcome: LookupResult,
            seconds: float | None = None) -> None:
        if seconds is not None:
            self.metrics.lookup(seconds)
        fields = {"service": "socketmap", "map": request.map_name[:40], "key": request.key[:256],
                  "result": str(outcome)}
        self.context.decisions.emit(log.name, "lookup", fields)
