"""Building directory snapshots for unit tests, through the admin operations.

``World`` wraps a ``DirectoryData`` and changes it only with ``keyrelay.admin`` functions (the
same rules the CLI follows), so a test cannot build a directory the admin could not. Where the
admin has no operation for a state (a failing domain, a domain without selectors) the record is
replaced with ``dataclasses.replace`` and the reason is said there.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from keyrelay import admin, keys
from keyrelay.directory.model import (
    Algorithm,
    Directory,
    DirectoryData,
    DomainState,
    Limits,
    Selector,
    SelectorState,
    Status,
)

NOW = datetime(2025, 6, 2, 12, 0, tzinfo=UTC)
CREATED = NOW - timedelta(days=30)


def selectors(domain: str, state: SelectorState = SelectorState.ACTIVE) -> tuple[Selector, ...]:
    """One RSA and one Ed25519 selector, as `keyrelay domain add` creates them."""
    return tuple(
        Selector(
            name=f"kr20250501-{suffix}",
            algorithm=algorithm,
            state=state,
            key_file=f"/etc/keyrelay/dkim/{domain}/kr20250501-{suffix}.pem",
            public_key="AAAA",
            created=CREATED,
        )
        for algorithm, suffix in ((Algorithm.RSA_SHA256, "rsa"), (Algorithm.ED25519_SHA256, "ed"))
    )


def key_id(text: str) -> str:
    parsed = keys.parse(text)
    assert parsed is not None, "not a key text"
    return parsed.key_id


class World:
    """A directory under construction; ``snapshot()`` freezes it for the engine."""

    def __init__(self) -> None:
        self.data = DirectoryData()
        self._keys_made = 0

    def snapshot(self) -> Directory:
        return Directory(self.data)

    # -- principals ----------------------------------------------------------------------
    def account(
        self,
        name: str,
        *,
        ip_allow: tuple[str, ...] = (),
        pool: str | None = None,
        limits: Limits | None = None,
    ) -> str:
        admin.add_account(self.data, name, CREATED)
        for cidr in ip_allow:
            admin.ip_allow(self.data, name, cidr)
        if pool is not None:
            admin.assign_pool(self.data, name, pool)
        if limits is not None:
            admin.set_limits(self.data, name, limits)
        return name

    def subuser(
        self, pid: str, *, pool: str | None = None, limits: Limits | None = None
    ) -> str:
        admin.add_subuser(self.data, pid, CREATED)
        if pool is not None:
            admin.assign_pool(self.data, pid, pool)
        if limits is not None:
            admin.set_limits(self.data, pid, limits)
        return pid

    def suspend(self, pid: str) -> None:
        admin.set_status(self.data, pid, Status.SUSPENDED)

    def monitor(self, account: str | None) -> None:
        """Monitor mode for one account, or directory-wide with ``None``."""
        admin.set_monitor(self.data, account, True)

    def pool(self, name: str, bind: str) -> str:
        admin.add_pool(self.data, name, [bind], f"{name}.relay.example", CREATED)
        return name

    # -- keys ----------------------------------------------------------------------------
    def key(
        self,
        pid: str,
        name: str | None = None,
        *,
        scopes: tuple[str, ...] = ("mail.send",),
        expires: datetime | None = None,
    ) -> str:
        """Create a key and return its full text (what the application uses as password)."""
        self._keys_made += 1
        name = name or f"app-{self._keys_made}"
        return admin.create_key(self.data, pid, name, scopes, expires, CREATED).text

    def revoke(self, text: str, when: datetime = NOW - timedelta(minutes=1)) -> None:
        admin.revoke_key(self.data, key_id(text), when)

    # -- domains and senders ---------------------------------------------------------------
    def domain(
        self,
        pid: str,
        name: str,
        *,
        state: DomainState = DomainState.VERIFIED,
        signing: bool = True,
        verified_at: datetime = NOW - timedelta(days=1),
    ) -> str:
        """A domain as `keyrelay domain add` leaves it (active selectors), then verified."""
        dom = admin.add_domain(self.data, pid, name, selectors(name) if signing else (), CREATED)
        if state is DomainState.PENDING:
            return dom.name
        admin.mark_verified(self.data, dom.name, verified_at)
        if state is DomainState.FAILING:
            # DNS re-verification (which marks a domain failing) has no admin operation yet
            self.data.domains[dom.name] = replace(
                self.data.domains[dom.name], state=DomainState.FAILING
            )
        return dom.name

    def grant(self, domain: str, subuser: str) -> None:
        admin.grant_domain(self.data, domain, subuser)

    def sender(self, pid: str, address: str) -> str:
        return admin.add_sender(self.data, pid, address, CREATED).address
