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

from keyrelay import names
from keyrelay.decisions import domain_may_send, format_identity, key_usable, principal_active
from keyrelay.directory import Directory
from keyrelay.errors import DirectoryUnavailable, UserError

from . import netstring
from .context import Context

log = logging.getLogger("keyrelay.policyd.socketmap")

MAPS = ("sender_login",)


class SocketmapService:
    def __init__(self, context: Context) -> None:
        self.context = context

    def lookup(self, request: netstring.Lookup) -> tuple[bytes, str]:
        """The reply netstring and a short outcome for the log."""
        if request.map_name not in MAPS:
            return netstring.perm(f"unknown map {request.map_name[:40]!r}"), "unknown_map"
        try:
            directory = self.context.snapshot()
        except DirectoryUnavailable as exc:
            log.error("directory unavailable: %s", exc)
            return netstring.temp("account directory temporarily unavailable"), "unavailable"
        logins = self.sender_logins(directory, request.key.lower())
        if not logins:
            return netstring.not_found(), "notfound"
        value = ",".join(logins)
        if len(value.encode()) > netstring.MAX_REPLY - 8:
            # Postfix refuses longer replies; say why every message for it is deferred
            log.error("sender_login for %s lists %d logins, more than Postfix's 100000-byte "
                      "socketmap reply holds; answering TEMP", request.key[:256], len(logins))
            return netstring.temp("too many logins for one address"), "too_long"
        return netstring.ok(value), "ok"

    def sender_logins(self, directory: Directory, key: str) -> list[str]:
        try:
            address = names.address(key)
        except UserError:
            return []
        ctx = self.context
        now = ctx.clock()
        owners = set(directory.senders_of(address))
        domain = directory.domains.get(address.rpartition("@")[2])
        if domain is not None and domain_may_send(domain, ctx.settings, now):
            owners.add(domain.owner)
            owners.update(domain.grants)
        logins: list[str] = []
        for principal in sorted(owners):
            if not principal_active(directory, principal):
                continue
            logins.extend(
                format_identity(principal, k.key_id)
                for k in directory.keys_of(principal)
                if key_usable(k, now)
            )
        return logins

    def log(self, request: netstring.Lookup, outcome: str) -> None:
        fields = {"service": "socketmap", "map": request.map_name[:40], "key": request.key[:256],
                  "result": outcome}
        self.context.decisions.emit(log.name, "lookup", fields)
