"""What the engine is asked about: the settings it reads and the facts of one event (a
login, an envelope, a header set, a rate count), and the SASL identity a login hands on."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from typing import NamedTuple

from .. import keys
from ..directory.model import Limits


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """The parts of the configuration the engine reads (built once from ``Config``)."""

    username: str = "apikey"
    require_tls: bool = True
    monitor_mode: bool = False
    failing_grace: timedelta = timedelta(hours=72)
    default_limits: Limits = field(default_factory=lambda: Limits(600, 20000, 100))
    default_pool: str | None = None
    transport_prefix: str = "kr-pool-"
    check_sender: bool = True  # milter.check_sender: off lets a header refusal pass, unsigned
    sign: bool = True  # milter.sign: off plans no DKIM signature
    # policyd.bruteforce.trusted_for: a locked-out key id still logs in from a client (address
    # or IPv6 /64) where it logged in successfully within this many seconds
    trusted_for: float = 7 * 86400.0
    # auth.site_auth_socket set: logins that are not keyrelay's are the site's (coexistence)
    site_logins: bool = False

    @classmethod
    def from_config(cls, config: object) -> EngineSettings:
        c = config  # typed loosely so the engine does not import the config loader
        return cls(
            username=c.auth.username,  # type: ignore[attr-defined]
            require_tls=c.auth.require_tls,  # type: ignore[attr-defined]
            monitor_mode=c.monitor_mode,  # type: ignore[attr-defined]
            failing_grace=timedelta(seconds=c.domains.failing_grace),  # type: ignore[attr-defined]
            default_limits=Limits(
                c.limits.messages_per_minute,  # type: ignore[attr-defined]
                c.limits.messages_per_hour,  # type: ignore[attr-defined]
                c.limits.recipients_per_message,  # type: ignore[attr-defined]
                c.limits.messages_per_day,  # type: ignore[attr-defined]
                c.limits.messages_per_month,  # type: ignore[attr-defined]
            ),
            default_pool=c.routing.default_pool or None,  # type: ignore[attr-defined]
            transport_prefix=c.routing.transport_prefix,  # type: ignore[attr-defined]
            check_sender=c.milter.check_sender,  # type: ignore[attr-defined]
            sign=c.milter.sign,  # type: ignore[attr-defined]
            trusted_for=float(c.policyd.bruteforce.trusted_for),  # type: ignore[attr-defined]
            site_logins=bool(c.auth.site_auth_socket),  # type: ignore[attr-defined]
        )


@dataclass(frozen=True, slots=True)
class LoginFacts:
    username: str
    password: str = field(repr=False)  # the API key: never in a repr or a log
    client_address: str
    now: datetime
    secured: bool = True  # the connection is under TLS (Dovecot protocol's "secured")


class LockoutFacts(NamedTuple):
    """What the auth service's counters say about one login attempt, before its credentials
    are looked at (docs/policyd.md, "Brute-force protection")."""

    client_address: str
    key_id: str | None  # the key id presented, if the password is shaped like a key
    address_locked: float  # seconds the client's address (IPv6: its /64) stays locked; 0: not
    key_locked: float  # seconds the key id stays locked; 0: not
    # seconds since the key id last logged in successfully from this client (address or
    # IPv6 /64); None when no such login is remembered
    since_login_here: float | None = None


class EnvelopeFacts(NamedTuple):
    """Immutable; a NamedTuple like ``Verdict``: built for every policy request."""

    identity: str  # Postfix's sasl_username; "" for an unauthenticated session
    submission: bool  # a submission service (587/465/2525), where AUTH is required
    client_address: str
    sender: str  # envelope sender without brackets; "" is the null sender
    now: datetime
    # the unix services of Postfix's master.cf (the transports it has); None: not known, the
    # pool transport is not checked
    transports: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class HeaderFacts:
    identity: str  # milter {auth_authen}; "" for an unauthenticated session
    from_values: tuple[str, ...]  # every From: header value, in order
    sender_values: tuple[str, ...]  # every Sender: header value
    client_address: str
    now: datetime


class RateFacts(NamedTuple):
    """Immutable; a NamedTuple like ``Verdict``: built for every policy request."""

    identity: str
    recipients: int  # recipients of this message so far
    now: datetime


# The key id a legacy password login carries in its SASL identity (``PRINCIPAL:legacy``): no
# key has it (a key id is 16 characters of a-z and 2-7), so it never names a key.
LEGACY_KEY_ID = "legacy"


def format_identity(principal: str, key_id: str) -> str:
    """The SASL user name of a login: principal and key id, never the secret."""
    return f"{principal}:{key_id}"


@lru_cache(maxsize=4096)  # asked several times per policy request; logins are few
def parse_identity(identity: str) -> tuple[str, str] | None:
    principal, colon, key_id = identity.rpartition(":")
    if not colon or not principal or not (keys.KEY_ID_RE.match(key_id)
                                          or key_id == LEGACY_KEY_ID):
        return None
    return principal, key_id
