"""The directory's data model (docs/directory.md, "The model").

Records are frozen dataclasses. ``DirectoryData`` is the plain, mutable set of records that a
backend loads and the admin operations change inside a transaction; ``Directory`` is the frozen
snapshot, with the indexes the hot path needs, that the decision engine reads.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, date, datetime
from enum import StrEnum
from types import MappingProxyType

from ..names import IPAddress, IPNetwork


class Status(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"


class DomainState(StrEnum):
    PENDING = "pending"  # added, DNS not yet checked: may not send
    VERIFIED = "verified"  # DNS proves ownership (or an admin said so by hand)
    FAILING = "failing"  # was verified, records broke; may send within the grace period


class SelectorState(StrEnum):
    PENDING = "pending"  # created by rotation, not yet seen published: does not sign
    ACTIVE = "active"  # signs
    RETIRING = "retiring"  # replaced; stays published until retire-selector removes it


class Algorithm(StrEnum):
    RSA_SHA256 = "rsa-sha256"
    ED25519_SHA256 = "ed25519-sha256"


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-principal sending limits and quotas; ``None``: not set here.

    Counted in recipients (a message to N recipients counts N). An account's rates and
    quotas cap the account as a whole, its subusers included; a subuser's own ones cap it
    alone, within its account's (``keyrelay.decisions.quotas``, docs/policyd.md).
    ``recipients_per_message`` is per message: the subuser's, else its account's, else the
    configuration's (``over``)."""

    messages_per_minute: int | None = None
    messages_per_hour: int | None = None
    recipients_per_message: int | None = None
    messages_per_day: int | None = None
    messages_per_month: int | None = None

    def over(self, parent: Limits) -> Limits:
        def pick(own: int | None, inherited: int | None) -> int | None:
            return inherited if own is None else own

        return Limits(
            messages_per_minute=pick(self.messages_per_minute, parent.messages_per_minute),
            messages_per_hour=pick(self.messages_per_hour, parent.messages_per_hour),
            recipients_per_message=pick(self.recipients_per_message, parent.recipients_per_message),
            messages_per_day=pick(self.messages_per_day, parent.messages_per_day),
            messages_per_month=pick(self.messages_per_month, parent.messages_per_month),
        )


LIMIT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Limits))
"""The names of the limits, as the directory file and a declaration write them."""


@dataclass(frozen=True, slots=True)
class Webhook:
    """Where an account's delivery events are POSTed, and the secret that signs them
    (docs/webhooks.md). The secret is stored usable, as it signs: it never shows in a repr,
    a log, an error or a listing (``keyrelay webhook set`` prints it once)."""

    url: str
    secret: str = field(repr=False)
    created: datetime | None = None
    updated: datetime | None = None  # last change of the URL or the secret


@dataclass(frozen=True, slots=True)
class Account:
    name: str
    status: Status = Status.ACTIVE
    monitor: bool = False
    ip_allow: tuple[IPNetwork, ...] = ()
    pool: str | None = None
    limits: Limits = Limits()
    created: datetime | None = None
    webhook: Webhook | None = None  # account configuration shared by every node

    @property
    def principal(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class Subuser:
    account: str
    name: str
    status: Status = Status.ACTIVE
    pool: str | None = None
    limits: Limits = Limits()
    created: datetime | None = None

    @property
    def principal(self) -> str:
        return f"{self.account}/{self.name}"


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_id: str
    principal: str
    name: str
    secret_hash: str = field(repr=False)  # a hash, but still nothing to show anyone
    scopes: tuple[str, ...]
    created: datetime
    expires: datetime | None = None
    revoked: datetime | None = None
    last_used: datetime | None = None

    @property
    def account(self) -> str:
        return self.principal.partition("/")[0]


@dataclass(frozen=True, slots=True)
class LegacyLogin:
    """An imported login's old username and password hash, usable until ``sunset`` (the
    password bridge, docs/migration.md): one per principal, at most."""

    principal: str
    username: str  # the login name applications send, as the old site knew it
    password_hash: str = field(repr=False)  # {SCHEME}hash (keyrelay/passwords.py)
    sunset: date  # the last day it logs in (UTC)
    created: datetime | None = None
    last_used: datetime | None = None

    def days_left(self, now: datetime) -> int:
        """Whole days from ``now`` (UTC) to the sunset; 0 on the sunset day, negative after."""
        return (self.sunset - now.astimezone(UTC).date()).days


@dataclass(frozen=True, slots=True)
class Selector:
    name: str
    algorithm: Algorithm
    state: SelectorState
    key_file: str
    public_key: str  # base64 of the DNS p= value
    created: datetime
    retiring_since: datetime | None = None  # when it stopped signing (replaced by rotation)


@dataclass(frozen=True, slots=True)
class Domain:
    name: str
    owner: str  # principal id
    state: DomainState = DomainState.PENDING
    grants: tuple[str, ...] = ()  # subuser principal ids the owning account shares it with
    selectors: tuple[Selector, ...] = ()
    created: datetime | None = None
    verified_at: datetime | None = None  # last time the domain was (re)verified
    verified_by: str | None = None  # "manual" or "dns"
    failed_checks: int = 0  # DNS checks failed in a row since the last success

    def signing_selectors(self) -> tuple[Selector, ...]:
        return tuple(s for s in self.selectors if s.state is SelectorState.ACTIVE)


@dataclass(frozen=True, slots=True)
class Sender:
    address: str
    principal: str
    created: datetime | None = None


@dataclass(frozen=True, slots=True)
class Pool:
    name: str
    bind: tuple[IPAddress, ...]
    helo: str
    created: datetime | None = None


@dataclass
class DirectoryData:
    """All records, keyed by their identity; what a transaction reads and changes."""

    accounts: dict[str, Account] = field(default_factory=dict)
    subusers: dict[str, Subuser] = field(default_factory=dict)  # by principal id
    keys: dict[str, ApiKey] = field(default_factory=dict)  # by key id
    domains: dict[str, Domain] = field(default_factory=dict)
    senders: dict[tuple[str, str], Sender] = field(default_factory=dict)  # (principal, address)
    pools: dict[str, Pool] = field(default_factory=dict)
    legacy: dict[str, LegacyLogin] = field(default_factory=dict)  # by principal id
    monitor: bool = False  # directory-wide monitor mode, switched at run time by the CLI

    def principals(self) -> Iterator[str]:
        yield from self.accounts
        yield from self.subusers

    def copy(self) -> DirectoryData:
        """A copy whose collections can change without touching these (records are frozen)."""
        return replace(
            self, accounts=dict(self.accounts), subusers=dict(self.subusers),
            keys=dict(self.keys), domains=dict(self.domains), senders=dict(self.senders),
            pools=dict(self.pools), legacy=dict(self.legacy),
        )


class Directory:
    """A frozen snapshot of the directory with O(1) lookups for the hot path."""

    __slots__ = (
        "_domains_of",
        "_keys_of",
        "_senders",
        "_subusers_of",
        "accounts",
        "derived",
        "domains",
        "keys",
        "legacy",
        "legacy_by_username",
        "monitor",
        "pools",
        "subusers",
    )

    def __init__(self, data: DirectoryData) -> None:
        self.accounts: Mapping[str, Account] = MappingProxyType(dict(data.accounts))
        self.subusers: Mapping[str, Subuser] = MappingProxyType(dict(data.subusers))
        self.keys: Mapping[str, ApiKey] = MappingProxyType(dict(data.keys))
        self.domains: Mapping[str, Domain] = MappingProxyType(dict(data.domains))
        self.pools: Mapping[str, Pool] = MappingProxyType(dict(data.pools))
        self.legacy: Mapping[str, LegacyLogin] = MappingProxyType(dict(data.legacy))
        self.legacy_by_username: Mapping[str, LegacyLogin] = MappingProxyType(
            {cred.username: cred for cred in data.legacy.values()})
        self.monitor = data.monitor
        # Values the engine derives from this snapshot (effective limits...), computed once
        # per snapshot: the snapshot never changes, so they never go stale.
        self.derived: dict[Hashable, object] = {}
        senders: dict[str, set[str]] = {}
        for sender in data.senders.values():
            senders.setdefault(sender.address, set()).add(sender.principal)
        self._senders = {a: frozenset(p) for a, p in senders.items()}
        keys_of: dict[str, list[ApiKey]] = {}
        for key in data.keys.values():
            keys_of.setdefault(key.principal, []).append(key)
        self._keys_of = {p: tuple(k) for p, k in keys_of.items()}
        subusers_of: dict[str, list[Subuser]] = {}
        for sub in data.subusers.values():
            subusers_of.setdefault(sub.account, []).append(sub)
        self._subusers_of = {a: tuple(s) for a, s in subusers_of.items()}
        domains_of: dict[str, list[Domain]] = {}
        for dom in data.domains.values():
            domains_of.setdefault(dom.owner, []).append(dom)
        self._domains_of = {p: tuple(d) for p, d in domains_of.items()}

    @classmethod
    def empty(cls) -> Directory:
        return cls(DirectoryData())

    def has_principal(self, principal: str) -> bool:
        return principal in self.accounts or principal in self.subusers

    def senders_of(self, address: str) -> frozenset[str]:
        """Principals that verified this single sender address."""
        return self._senders.get(address, frozenset())

    def keys_of(self, principal: str) -> tuple[ApiKey, ...]:
        return self._keys_of.get(principal, ())

    def subusers_of(self, account: str) -> tuple[Subuser, ...]:
        return self._subusers_of.get(account, ())

    def domains_owned_by(self, principal: str) -> tuple[Domain, ...]:
        return self._domains_of.get(principal, ())

    def sender_addresses_of(self, principal: str) -> tuple[str, ...]:
        return tuple(sorted(a for a, owners in self._senders.items() if principal in owners))
