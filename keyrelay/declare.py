"""A declared directory: what ``keyrelay sync FILE`` makes the directory hold.

A declaration is a YAML file (the Ansible role writes it from ``keyrelay_directory``) that
names outbound IP pools, accounts with their subusers, IP access rules, single senders,
limits and monitor flags, and sending domains with their owner and grants. It never holds
API keys: keys are created with ``keyrelay key create`` and their secret is shown once.

Sync is additive and field by field, so that the directory can also be changed by hand:

- an object the file names is created, or changed to match the fields the file gives; a
  field the file leaves out keeps its value (a new object takes the default);
- a list the file gives (``ip_allow``, ``senders``, ``grants``, ``bind``) is exact: entries
  not in it are removed;
- an object the file does not name is left alone; ``state: absent`` removes one (an account
  or subuser with its keys and senders, a domain with its private keys);
- a new domain gets its DKIM keys (RSA-2048 and Ed25519) and starts pending: verification
  stays a DNS matter (``keyrelay domain verify``);
- ``legacy_login`` (username, password_hash, sunset), what ``keyrelay migrate postfix
  --sunset`` writes, gives a principal its old password login until the sunset (the password
  bridge, docs/migration.md): the only way one is made. A declaration without it leaves the
  principal's legacy login as it is (``keyrelay legacy sunset``/``remove`` change it).

A second run with the same file changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from . import admin, names, passwords, yamlread
from .directory.model import LIMIT_FIELDS, DirectoryData, Domain, Limits, Selector, Status
from .errors import ConfigError, Conflict, UserError

_ABSENT = "absent"
_PRESENT = "present"


@dataclass(frozen=True, slots=True)
class PoolDecl:
    name: str
    absent: bool = False
    bind: tuple[str, ...] | None = None
    helo: str | None = None


@dataclass(frozen=True, slots=True)
class PrincipalDecl:
    """An account (``pid`` without a slash) or a subuser; ``None``: the file leaves it out."""

    pid: str
    absent: bool = False
    status: Status | None = None
    pool: str | None = None
    pool_given: bool = False  # pool: null (no pool of its own) differs from no pool key
    limits: Limits | None = None
    monitor: bool | None = None  # accounts only
    ip_allow: tuple[str, ...] | None = None  # accounts only
    senders: tuple[str, ...] | None = None
    legacy_login: LegacyLoginDecl | None = None


@dataclass(frozen=True, slots=True)
class LegacyLoginDecl:
    username: str
    password_hash: str = field(repr=False)
    sunset: date


@dataclass(frozen=True, slots=True)
class DomainDecl:
    name: str
    absent: bool = False
    owner: str | None = None
    grants: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Declaration:
    path: str
    pools: tuple[PoolDecl, ...]
    principals: tuple[PrincipalDecl, ...]  # each account before its subusers
    domains: tuple[DomainDecl, ...]

    def new_domains(self, data: DirectoryData) -> list[str]:
        """Domains to be created: the ones that need DKIM keys made before the transaction."""
        return [d.name for d in self.domains if not d.absent and d.name not in data.domains]


# -- reading ---------------------------------------------------------------------------------
class _Reader:
    """Checks one loaded declaration; every error names the file, the key and the reason
    (yamlread adds the line)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.path, key, reason)

    def mapping(self, value: Any, key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping of keys, got {yamlread.got(value)}")
        for name in value:
            if name == "keys":
                raise self.fail(yamlread.join(key, "keys"),
                                "API keys are never declared; create them with "
                                "`keyrelay key create PRINCIPAL` (the secret is shown once)")
            if name not in allowed:
                raise self.fail(yamlread.join(key, str(name)),
                                yamlread.unknown_key(name, allowed))
        return value

    def entries(self, value: Any, key: str) -> dict[str, Any]:
        """A mapping of NAME -> settings (settings may be empty)."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping of names, got {yamlread.got(value)}")
        return {str(name): settings for name, settings in value.items()}

    def checked(self, check: Callable[[str], Any], text: Any, key: str) -> Any:
        if not isinstance(text, str):
            raise self.fail(key, f"expected a string, got {yamlread.got(text)}")
        try:
            return check(text)
        except UserError as exc:
            raise self.fail(key, str(exc)) from None

    def strings(self, check: Callable[[str], Any], value: Any, key: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail(key, f"expected a list, got {yamlread.got(value)}")
        found = [str(self.checked(check, item, f"{key}[{i}]")) for i, item in enumerate(value)]
        return tuple(dict.fromkeys(found))

    def boolean(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {yamlread.got(value)}")
        return value

    def state(self, settings: dict[str, Any], key: str) -> bool:
        """True when the entry says ``state: absent``."""
        state = settings.get("state", _PRESENT)
        if state not in (_PRESENT, _ABSENT):
            raise self.fail(f"{key}.state",
                            f"expected present or absent, got {yamlread.got(state)}")
        return bool(state == _ABSENT)

    def status(self, settings: dict[str, Any], key: str) -> Status | None:
        if "status" not in settings:
            return None
        try:
            return Status(settings["status"])
        except ValueError:
            raise self.fail(f"{key}.status", "expected active or suspended, got "
                            f"{yamlread.got(settings['status'])}") from None

    def limits(self, settings: dict[str, Any], key: str) -> Limits | None:
        if "limits" not in settings:
            return None
        given = self.mapping(settings["limits"], f"{key}.limits", LIMIT_FIELDS)
        values: dict[str, int | None] = {}
        for name in LIMIT_FIELDS:
            number = given.get(name)
            if number is None or number == "inherit":
                values[name] = None
                continue
            if isinstance(number, bool) or not isinstance(number, int) or number < 1:
                # as `keyrelay limits set`: 0 is not "no limit" and not "inherit" either
                raise self.fail(f"{key}.limits.{name}", "expected a whole number of at least 1, "
                                "or inherit (or null, or leave it out) to take the account's or "
                                f"the configuration's value; got {yamlread.got(number)}")
            values[name] = number
        return Limits(**values)

    def pool_ref(self, settings: dict[str, Any], key: str) -> tuple[str | None, bool]:
        if "pool" not in settings:
            return None, False
        if settings["pool"] is None:
            return None, True
        return self.checked(names.account_name, settings["pool"], f"{key}.pool"), True

    def principal(self, pid: str, settings: Any, key: str, account: bool) -> PrincipalDecl:
        allowed: tuple[str, ...] = ("state", "status", "pool", "limits", "senders",
                                    "legacy_login")
        if account:
            allowed += ("monitor", "ip_allow", "subusers")
        body = self.mapping(settings, key, allowed)
        pool, pool_given = self.pool_ref(body, key)
        return PrincipalDecl(
            pid=pid,
            absent=self.state(body, key),
            status=self.status(body, key),
            pool=pool,
            pool_given=pool_given,
            limits=self.limits(body, key),
            monitor=self.boolean(body["monitor"], f"{key}.monitor") if "monitor" in body else None,
            ip_allow=(self.strings(names.network, body["ip_allow"], f"{key}.ip_allow")
                      if "ip_allow" in body else None),
            senders=(self.strings(names.address, body["senders"], f"{key}.senders")
                     if "senders" in body else None),
            legacy_login=(self.legacy_login(body["legacy_login"], f"{key}.legacy_login")
                          if body.get("legacy_login") is not None else None),
        )

    def legacy_login(self, value: Any, key: str) -> LegacyLoginDecl:
        body = self.mapping(value, key, ("username", "password_hash", "sunset"))
        for name in ("username", "password_hash", "sunset"):
            if name not in body:
                raise self.fail(f"{key}.{name}", "missing (a legacy login needs username, "
                                "password_hash and sunset)")
        username = self.checked(_username, body["username"], f"{key}.username")
        stored = self.checked(passwords.checked, body["password_hash"],
                              f"{key}.password_hash")
        sunset = body["sunset"]
        if isinstance(sunset, str):
            sunset = self.checked(_day, sunset, f"{key}.sunset")
        if not isinstance(sunset, date) or isinstance(sunset, datetime):
            raise self.fail(f"{key}.sunset",
                            f"expected a date like 2027-03-31, got {yamlread.got(sunset)}")
        return LegacyLoginDecl(username, stored, sunset)


def load(path: str | Path) -> Declaration:
    """Read and check a declaration file (``-``: standard input, as the Ansible role gives it);
    ConfigError says where and why it is wrong (``FILE:LINE: KEY.PATH: reason``)."""
    where = str(path)
    return yamlread.load(where, stdin=True).build(lambda raw: _declaration(where, raw))


def _declaration(where: str, raw: object) -> Declaration:
    reader = _Reader(where)
    top = reader.mapping(raw, "", ("pools", "accounts", "domains"))

    pools = []
    for name, settings in reader.entries(top.get("pools"), "pools").items():
        key = f"pools.{name}"
        reader.checked(names.account_name, name, key)
        body = reader.mapping(settings, key, ("state", "bind", "helo"))
        pools.append(PoolDecl(
            name=name,
            absent=reader.state(body, key),
            bind=(reader.strings(names.ip_address, body["bind"], f"{key}.bind")
                  if "bind" in body else None),
            helo=reader.checked(names.domain, body["helo"], f"{key}.helo") if "helo" in body
            else None,
        ))

    principals = []
    for name, settings in reader.entries(top.get("accounts"), "accounts").items():
        key = f"accounts.{name}"
        reader.checked(names.account_name, name, key)
        principals.append(reader.principal(name, settings, key, account=True))
        subusers = settings.get("subusers") if isinstance(settings, dict) else None
        for sub, sub_settings in reader.entries(subusers, f"{key}.subusers").items():
            sub_key = f"{key}.subusers.{sub}"
            reader.checked(names.account_name, sub, sub_key)
            principals.append(reader.principal(f"{name}/{sub}", sub_settings, sub_key,
                                               account=False))

    domains = []
    for name, settings in reader.entries(top.get("domains"), "domains").items():
        key = f"domains.{name}"
        normal = reader.checked(names.domain, name, key)
        body = reader.mapping(settings, key, ("state", "owner", "grants"))
        absent = reader.state(body, key)
        if not absent and "owner" not in body:
            raise reader.fail(f"{key}.owner", "required: the account or subuser it belongs to")
        domains.append(DomainDecl(
            name=normal,
            absent=absent,
            owner=(reader.checked(_principal, body["owner"], f"{key}.owner")
                   if "owner" in body else None),
            grants=(reader.strings(_principal, body["grants"], f"{key}.grants")
                    if "grants" in body else None),
        ))
    return Declaration(where, tuple(pools), tuple(principals), tuple(domains))


def _username(text: str) -> str:
    if text == "apikey" or not text.isprintable() or not 0 < len(text) <= 255:
        raise UserError("expected the login name applications send (printable, not apikey)")
    return text


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise UserError(f"expected a date like 2027-03-31, got {text[:40]!r}") from None


def _principal(text: str) -> str:
    names.principal_id(text)
    return text


# -- applying --------------------------------------------------------------------------------
def apply(data: DirectoryData, declared: Declaration, now: datetime,
          new_selectors: Mapping[str, tuple[Selector, ...]]) -> list[Domain]:
    """Make ``data`` hold what ``declared`` says; return the domains it removed (whose
    private key files the caller deletes once the change is written).

    ``new_selectors`` holds the DKIM selectors (keys already made) of every domain that
    ``declared.new_domains`` named; a UserError says what clashes, before anything is written.
    """
    try:
        return _apply(data, declared, now, new_selectors)
    except UserError as exc:
        raise UserError(f"{declared.path}: {exc}") from None


def _apply(data: DirectoryData, declared: Declaration, now: datetime,
           new_selectors: Mapping[str, tuple[Selector, ...]]) -> list[Domain]:
    removed: list[Domain] = []
    # removals first, domains before their owners, principals before the pools they use
    for dom in declared.domains:
        if dom.absent and dom.name in data.domains:
            removed.append(admin.remove_domain(data, dom.name))
    for who in reversed(declared.principals):  # subusers before their account
        if who.absent and (who.pid in data.accounts or who.pid in data.subusers):
            if "/" in who.pid:
                admin.remove_subuser(data, who.pid)
            else:
                admin.remove_account(data, who.pid)

    for pool in declared.pools:
        if not pool.absent:
            _sync_pool(data, pool, now)
    for who in declared.principals:
        if not who.absent:
            _sync_principal(data, who, now)
    for pool in declared.pools:
        if pool.absent and pool.name in data.pools:
            admin.remove_pool(data, pool.name)
    for dom in declared.domains:
        if not dom.absent:
            _sync_domain(data, dom, now, new_selectors)
    return removed


def _sync_pool(data: DirectoryData, decl: PoolDecl, now: datetime) -> None:
    if decl.name in data.pools:
        admin.change_pool(data, decl.name, None if decl.bind is None else list(decl.bind),
                          decl.helo)
    elif decl.bind is None or decl.helo is None:
        raise UserError(f"pools.{decl.name}: a new pool needs bind and helo")
    else:
        admin.add_pool(data, decl.name, list(decl.bind), decl.helo, now)


def _sync_principal(data: DirectoryData, decl: PrincipalDecl, now: datetime) -> None:
    pid = decl.pid
    if "/" in pid:
        if pid not in data.subusers:
            admin.add_subuser(data, pid, now)
    elif pid not in data.accounts:
        admin.add_account(data, pid, now)
    if decl.status is not None:
        admin.set_status(data, pid, decl.status)
    if decl.pool_given:
        admin.assign_pool(data, pid, decl.pool)
    if decl.limits is not None:
        admin.set_limits(data, pid, decl.limits)
    if decl.monitor is not None:
        admin.set_monitor(data, pid, decl.monitor)
    if decl.ip_allow is not None:
        admin.set_ip_rules(data, pid, list(decl.ip_allow))
    if decl.legacy_login is not None:
        cred = decl.legacy_login
        admin.set_legacy_login(data, pid, cred.username, cred.password_hash, cred.sunset, now)
    if decl.senders is not None:
        wanted = set(decl.senders)
        for (owner, address) in list(data.senders):
            if owner == pid and address not in wanted:
                admin.remove_sender(data, pid, address)
        for address in decl.senders:
            if (pid, address) not in data.senders:
                admin.add_sender(data, pid, address, now)


def _sync_domain(data: DirectoryData, decl: DomainDecl, now: datetime,
                 new_selectors: Mapping[str, tuple[Selector, ...]]) -> None:
    assert decl.owner is not None  # load() requires it of a present domain
    dom = data.domains.get(decl.name)
    if dom is None:
        selectors = new_selectors.get(decl.name)
        if selectors is None:  # someone added it between the plan and this transaction
            raise Conflict(f"domain {decl.name} appeared while syncing; run sync again")
        admin.add_domain(data, decl.owner, decl.name, selectors, now)
    elif dom.owner != decl.owner:
        raise Conflict(f"domains.{decl.name}.owner: it belongs to {dom.owner}, not "
                       f"{decl.owner}; remove it (state: absent) and declare it again to move it")
    if decl.grants is not None:
        wanted = set(decl.grants)
        for grantee in data.domains[decl.name].grants:
            if grantee not in wanted:
                admin.ungrant_domain(data, decl.name, grantee)
        for grantee in decl.grants:
            if grantee not in data.domains[decl.name].grants:
                admin.grant_domain(data, decl.name, grantee)
