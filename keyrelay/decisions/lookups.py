"""The socketmap's table: which logins may use an envelope sender address
(``smtpd_sender_login_maps``), derived from the same rules as the policy decision."""

from __future__ import annotations

from datetime import datetime

from .. import names
from ..directory.model import Directory
from ..errors import UserError
from .checks import domain_may_send, key_usable, legacy_ended, principal_active
from .facts import LEGACY_KEY_ID, EngineSettings, format_identity


def sender_logins(directory: Directory, settings: EngineSettings, key: str,
                  now: datetime) -> list[str]:
    """Every login (``principal:keyid``) that may send as the address ``key``: each usable
    key of each active principal that owns the address (a verified single sender, or an
    address in a domain the principal owns or was granted, while that domain may send),
    and its legacy password login (``principal:legacy``) until the sunset."""
    try:
        address = names.address(key)
    except UserError:
        return []
    owners = set(directory.senders_of(address))
    domain = directory.domains.get(address.rpartition("@")[2])
    if domain is not None and domain_may_send(domain, settings, now):
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
        cred = directory.legacy.get(principal)
        if cred is not None and legacy_ended(cred, now) is None:
            logins.append(format_identity(principal, LEGACY_KEY_ID))
    return logins
