"""Admin operations on the directory: every rule about what a change may do, once.

Each function changes a ``DirectoryData`` inside a backend transaction and raises a
``UserError`` (``NotFound``/``Conflict``) with one line that tells the admin what to do, before
anything is written. The CLI and, later, other front ends (Ansible sync, import) call these.
"""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import date, datetime, timedelta

from . import keys, names, passwords
from . import limits as limits_module
from .directory.model import (
    LIMIT_FIELDS,
    Account,
    ApiKey,
    DirectoryData,
    Domain,
    DomainState,
    LegacyLogin,
    Limits,
    Pool,
    Selector,
    SelectorState,
    Sender,
    Status,
    Subuser,
)
from .errors import Conflict, NotFound, UserError
from .names import IPAddress
from .scopes import KNOWN_SCOPES

SCOPE_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")


# -- lookups ---------------------------------------------------------------------------------
def account(data: DirectoryData, name: str) -> Account:
    found = data.accounts.get(names.account_name(name))
    if found is None:
        raise NotFound(f"unknown account {name!r} (see: keyrelay account list)")
    return found


def principal(data: DirectoryData, pid: str) -> str:
    """Validate that ``pid`` (ACCOUNT or ACCOUNT/SUBUSER) exists; return it."""
    acc, sub = names.principal_id(pid)
    account(data, acc)
    if sub is not None and pid not in data.subusers:
        raise NotFound(f"unknown subuser {pid!r} (see: keyrelay subuser list {acc})")
    return pid


def key(data: DirectoryData, key_id: str) -> ApiKey:
    found = data.keys.get(key_id)
    if found is None:
        # a key where its id belongs, in whatever shape it was pasted: never echo it
        keys.refuse_if_key(key_id, "keyrelay key list")
        raise NotFound(f"unknown key id {key_id!r} (see: keyrelay key list)")
    return found


def domain(data: DirectoryData, name: str) -> Domain:
    normal = names.domain(name)
    found = data.domains.get(normal)
    if found is None:
        raise NotFound(f"unknown domain {normal!r} (see: keyrelay domain list)")
    return found


def pool(data: DirectoryData, name: str) -> Pool:
    found = data.pools.get(name)
    if found is None:
        raise NotFound(f"unknown pool {name!r} (see: keyrelay pool list)")
    return found


# -- accounts and subusers -------------------------------------------------------------------
def add_account(data: DirectoryData, name: str, now: datetime) -> Account:
    names.account_name(name)
    if name in data.accounts:
        raise Conflict(f"account {name!r} already exists")
    data.accounts[name] = Account(name=name, created=now)
    return data.accounts[name]


def set_status(data: DirectoryData, pid: str, status: Status) -> None:
    principal(data, pid)
    if "/" in pid:
        data.subusers[pid] = replace(data.subusers[pid], status=status)
    else:
        data.accounts[pid] = replace(data.accounts[pid], status=status)


def _drop_principal_records(data: DirectoryData, pid: str) -> None:
    owned = sorted(d.name for d in data.domains.values() if d.owner == pid)
    if owned:
        raise Conflict(
            f"{pid} still owns domain(s) {', '.join(owned)}; remove them first "
            "(keyrelay domain remove DOMAIN)"
        )
    for kid in [k.key_id for k in data.keys.values() if k.principal == pid]:
        del data.keys[kid]
    for sender_id in [s for s in data.senders if s[0] == pid]:
        del data.senders[sender_id]
    data.legacy.pop(pid, None)


def remove_account(data: DirectoryData, name: str) -> None:
    account(data, name)
    subusers = [s for s in data.subusers.values() if s.account == name]
    for sub in subusers:
        _drop_principal_records(data, sub.principal)
    _drop_principal_records(data, name)
    for sub in subusers:
        del data.subusers[sub.principal]
    del data.accounts[name]


def add_subuser(data: DirectoryData, pid: str, now: datetime) -> Subuser:
    acc, sub = names.principal_id(pid)
    if sub is None:
        raise UserError(f"expected ACCOUNT/SUBUSER, got {pid!r}")
    account(data, acc)
    if pid in data.subusers:
        raise Conflict(f"subuser {pid!r} already exists")
    data.subusers[pid] = Subuser(account=acc, name=sub, created=now)
    return data.subusers[pid]


def remove_subuser(data: DirectoryData, pid: str) -> None:
    principal(data, pid)
    if "/" not in pid:
        raise UserError(f"expected ACCOUNT/SUBUSER, got {pid!r}")
    _drop_principal_records(data, pid)
    for dom in data.domains.values():
        if pid in dom.grants:
            data.domains[dom.name] = replace(dom, grants=tuple(g for g in dom.grants if g != pid))
    del data.subusers[pid]


# -- limits (bounds and effective values: keyrelay/limits.py) ------------------------------
def own_limits(data: DirectoryData, pid: str) -> Limits:
    """The limits set on the principal itself (``None``: inherited)."""
    principal(data, pid)
    return data.subusers[pid].limits if "/" in pid else data.accounts[pid].limits


def set_limits(data: DirectoryData, pid: str, limits: Limits) -> None:
    """Replace the principal's own limits, each from 1 to its maximum or ``None``."""
    principal(data, pid)
    for name in LIMIT_FIELDS:
        limits_module.check_limit(name, getattr(limits, name))
    if "/" in pid:
        data.subusers[pid] = replace(data.subusers[pid], limits=limits)
    else:
        data.accounts[pid] = replace(data.accounts[pid], limits=limits)


def change_limits(data: DirectoryData, pid: str, changes: dict[str, int | None]) -> Limits:
    """Change only the limits named in ``changes`` (a value, or ``None``: inherit); the
    others keep theirs. Returns the principal's own limits afterwards."""
    new = replace(own_limits(data, pid), **changes)
    set_limits(data, pid, new)
    return new


def set_monitor(data: DirectoryData, account_name: str | None, on: bool) -> None:
    if account_name is None:
        data.monitor = on
    else:
        data.accounts[account_name] = replace(account(data, account_name), monitor=on)


# -- API keys --------------------------------------------------------------------------------
def check_scopes(scopes: list[str]) -> tuple[str, ...]:
    """Scopes of ``KNOWN_SCOPES`` (keyrelay/scopes.py), each once, in the order given."""
    for scope in scopes:
        if not SCOPE_RE.match(scope):
            raise UserError(f"invalid scope {scope!r}: expected a dotted name like mail.send "
                            f"(known scopes: {', '.join(KNOWN_SCOPES)})")
        if scope not in KNOWN_SCOPES:
            raise UserError(f"unknown scope {scope!r}: known scopes are "
                            f"{', '.join(KNOWN_SCOPES)} (a key needs mail.send to send)")
    if not scopes:
        raise UserError("a key needs at least one scope (e.g. --scope mail.send)")
    return tuple(dict.fromkeys(scopes))


def create_key(
    data: DirectoryData,
    pid: str,
    name: str,
    scopes: tuple[str, ...],
    expires: datetime | None,
    now: datetime,
) -> keys.NewKey:
    principal(data, pid)
    if keys.holds_secret(name):  # a name is shown in every listing
        raise UserError("a key name must not hold an API key or its secret; name what the key "
                        "is for, e.g. crm-prod (the name was not stored)")
    if not name.strip() or len(name) > 64 or any(not c.isprintable() for c in name):
        raise UserError("a key name is 1-64 printable characters")
    if any(k.name == name and k.principal == pid for k in data.keys.values()):
        raise Conflict(f"{pid} already has a key named {name!r}")
    if expires is not None and expires <= now:
        raise UserError("the expiry must be in the future")
    new = keys.generate()
    while new.key_id in data.keys:  # 80 random bits: a collision is a curiosity, not a risk
        new = keys.generate()
    data.keys[new.key_id] = ApiKey(
        key_id=new.key_id,
        principal=pid,
        name=name,
        secret_hash=new.secret_hash,
        scopes=check_scopes(list(scopes)),
        created=now,
        expires=expires,
    )
    return new


def revoke_key(data: DirectoryData, key_id: str, now: datetime) -> ApiKey:
    found = key(data, key_id)
    if found.revoked is not None:
        raise Conflict(f"key {key_id} was already revoked at {found.revoked:%Y-%m-%dT%H:%M:%SZ}")
    data.keys[key_id] = replace(found, revoked=now)
    return data.keys[key_id]


def set_scopes(data: DirectoryData, key_id: str, scopes: list[str]) -> ApiKey:
    found = key(data, key_id)
    data.keys[key_id] = replace(found, scopes=check_scopes(scopes))
    return data.keys[key_id]


def record_key_use(data: DirectoryData, used: dict[str, datetime]) -> None:
    """Store last-used times collected by a daemon (keys removed meanwhile are skipped).
    A legacy password login is reported by its identity, ``PRINCIPAL:legacy``."""
    legacy = {ident.rpartition(":")[0]: when for ident, when in used.items()
              if ident.endswith(":legacy")}
    record_legacy_use(data, legacy)
    for key_id, when in used.items():
        found = data.keys.get(key_id)
        if found is not None and (found.last_used is None or found.last_used < when):
            data.keys[key_id] = replace(found, last_used=when)


# -- legacy password logins (the password bridge, docs/migration.md) -------------------------
def set_legacy_login(data: DirectoryData, pid: str, username: str, password_hash: str,
                     sunset: date, now: datetime) -> LegacyLogin:
    """Give ``pid`` its imported login (a declaration's ``legacy_login``): the only way one is
    made. The same username and hash keep their last use."""
    principal(data, pid)
    stored = passwords.checked(password_hash)
    for other in data.legacy.values():
        if other.username == username and other.principal != pid:
            raise Conflict(f"legacy login {username!r} already belongs to {other.principal}")
    old = data.legacy.get(pid)
    same = old is not None and old.username == username and old.password_hash == stored
    cred = LegacyLogin(pid, username, stored, sunset,
                       old.created if old else now, old.last_used if same and old else None)
    data.legacy[pid] = cred
    return cred


def legacy_login(data: DirectoryData, pid: str) -> LegacyLogin:
    principal(data, pid)
    found = data.legacy.get(pid)
    if found is None:
        raise NotFound(f"{pid} has no legacy password login")
    return found


def set_legacy_sunset(data: DirectoryData, pids: list[str], sunset: date) -> list[LegacyLogin]:
    """Move the sunset of each named principal's legacy login (a past date ends it)."""
    changed = [replace(legacy_login(data, pid), sunset=sunset) for pid in pids]
    for cred in changed:
        data.legacy[cred.principal] = cred
    return changed


def remove_legacy_login(data: DirectoryData, pid: str) -> LegacyLogin:
    return data.legacy.pop(legacy_login(data, pid).principal)


def record_legacy_use(data: DirectoryData, used: dict[str, datetime]) -> None:
    """Last-used times of legacy logins, by principal (removed meanwhile: skipped)."""
    for pid, when in used.items():
        found = data.legacy.get(pid)
        if found is not None and (found.last_used is None or found.last_used < when):
            data.legacy[pid] = replace(found, last_used=when)


# -- IP access rules -------------------------------------------------------------------------
def ip_allow(data: DirectoryData, account_name: str, cidr: str) -> Account:
    acc = account(data, account_name)
    net = names.network(cidr)
    if net in acc.ip_allow:
        raise Conflict(f"{net} is already in the IP access list of {account_name}")
    data.accounts[account_name] = replace(acc, ip_allow=(*acc.ip_allow, net))
    return data.accounts[account_name]


def set_ip_rules(data: DirectoryData, account_name: str, cidrs: list[str]) -> Account:
    """Replace the account's IP access list (``[]``: from any address)."""
    acc = account(data, account_name)
    rules = tuple(dict.fromkeys(names.network(c) for c in cidrs))
    data.accounts[account_name] = replace(acc, ip_allow=rules)
    return data.accounts[account_name]


def ip_remove(data: DirectoryData, account_name: str, cidr: str) -> Account:
    acc = account(data, account_name)
    net = names.network(cidr)
    if net not in acc.ip_allow:
        raise NotFound(f"{net} is not in the IP access list of {account_name}")
    data.accounts[account_name] = replace(acc, ip_allow=tuple(n for n in acc.ip_allow if n != net))
    return data.accounts[account_name]


# -- domains ---------------------------------------------------------------------------------
def check_domain_free(data: DirectoryData, name: str) -> str:
    normal = names.domain(name)
    if normal in data.domains:
        raise Conflict(f"domain {normal} already belongs to {data.domains[normal].owner}")
    return normal


def add_domain(
    data: DirectoryData, pid: str, name: str, selectors: tuple[Selector, ...], now: datetime
) -> Domain:
    principal(data, pid)
    normal = check_domain_free(data, name)
    data.domains[normal] = Domain(name=normal, owner=pid, selectors=selectors, created=now)
    return data.domains[normal]


def grant_domain(data: DirectoryData, name: str, subuser: str) -> Domain:
    dom = domain(data, name)
    principal(data, subuser)
    if "/" in dom.owner:
        raise UserError(f"{dom.name} belongs to subuser {dom.owner}; only an account's own "
                        "domains can be granted")
    if subuser.partition("/")[0] != dom.owner or "/" not in subuser:
        raise UserError(f"{subuser} is not a subuser of {dom.owner}, which owns {dom.name}")
    if subuser in dom.grants:
        raise Conflict(f"{dom.name} is already granted to {subuser}")
    data.domains[dom.name] = replace(dom, grants=(*dom.grants, subuser))
    return data.domains[dom.name]


def ungrant_domain(data: DirectoryData, name: str, subuser: str) -> Domain:
    dom = domain(data, name)
    if subuser not in dom.grants:
        raise NotFound(f"{dom.name} is not granted to {subuser}")
    data.domains[dom.name] = replace(dom, grants=tuple(g for g in dom.grants if g != subuser))
    return data.domains[dom.name]


def remove_domain(data: DirectoryData, name: str) -> Domain:
    dom = domain(data, name)
    del data.domains[dom.name]
    return dom


def rotate_domain(data: DirectoryData, name: str, selectors: tuple[Selector, ...]) -> Domain:
    """Add new (pending) selectors; the active ones keep signing until the new are published."""
    dom = domain(data, name)
    if any(s.state is SelectorState.PENDING for s in dom.selectors):
        pending = ", ".join(s.name for s in dom.selectors if s.state is SelectorState.PENDING)
        raise Conflict(
            f"{dom.name} already has pending selectors ({pending}); publish them and verify "
            "the domain first"
        )
    data.domains[dom.name] = replace(dom, selectors=(*dom.selectors, *selectors))
    return data.domains[dom.name]


def activate_published(dom: Domain, now: datetime) -> tuple[Selector, ...]:
    """Pending selectors become active; those they replace (same algorithm) start retiring."""
    pending = {s.algorithm for s in dom.selectors if s.state is SelectorState.PENDING}
    result = []
    for sel in dom.selectors:
        if sel.state is SelectorState.PENDING:
            sel = replace(sel, state=SelectorState.ACTIVE)
        elif sel.state is SelectorState.ACTIVE and sel.algorithm in pending:
            sel = replace(sel, state=SelectorState.RETIRING, retiring_since=now)
        result.append(sel)
    return tuple(result)


def mark_verified(data: DirectoryData, name: str, now: datetime) -> Domain:
    """An admin vouches for the domain's DNS by hand (until DNS verification is in place)."""
    dom = domain(data, name)
    data.domains[dom.name] = replace(
        dom,
        state=DomainState.VERIFIED,
        verified_at=now,
        verified_by="manual",
        failed_checks=0,
        selectors=activate_published(dom, now),
    )
    return data.domains[dom.name]


def is_hand_verified(dom: Domain) -> bool:
    """Verified by an admin's word (``mark_verified``), not by a passed DNS check."""
    return dom.state is DomainState.VERIFIED and dom.verified_by == "manual"


def record_check(data: DirectoryData, name: str, passed: bool, pending_published: bool,
                 now: datetime, fail_after: int) -> Domain:
    """The result of a DNS check that could be made (``keyrelay domain verify/check``).

    Passed: the domain is verified (again), its failures forgotten, and pending selectors
    whose records are all published start signing (rotation). Failed: a pending domain
    stays pending; a verified one counts the failure and becomes failing after
    ``fail_after`` in a row (it keeps ``verified_at``, the last success, for the grace
    period); a failing one stays failing. A domain verified by hand (``mark_verified``)
    stays verified whatever DNS says until a check passes (from then on DNS decides): an
    internal domain that public DNS cannot show must not stop sending.
    """
    dom = domain(data, name)
    if not passed and is_hand_verified(dom):
        return dom
    if passed:
        selectors = activate_published(dom, now) if pending_published else dom.selectors
        new = replace(dom, state=DomainState.VERIFIED, verified_at=now, verified_by="dns",
                      failed_checks=0, selectors=selectors)
    else:
        failures = dom.failed_checks + 1
        state = dom.state
        if state is DomainState.VERIFIED and failures >= fail_after:
            state = DomainState.FAILING
        new = replace(dom, state=state, failed_checks=failures)
    data.domains[dom.name] = new
    return new


def retire_selector(data: DirectoryData, name: str, selector: str, now: datetime,
                    overlap: timedelta, force: bool = False) -> Selector:
    dom = domain(data, name)
    found = next((s for s in dom.selectors if s.name == selector), None)
    if found is None:
        raise NotFound(f"{dom.name} has no selector {selector!r} (see: keyrelay domain show)")
    if found.state is SelectorState.ACTIVE:
        raise Conflict(
            f"selector {selector} still signs mail for {dom.name}; rotate (keyrelay domain "
            "rotate) and verify the new selectors before retiring it"
        )
    if (found.state is SelectorState.RETIRING and found.retiring_since is not None
            and now < found.retiring_since + overlap and not force):
        until = found.retiring_since + overlap
        raise Conflict(
            f"selector {selector} stopped signing at {found.retiring_since:%Y-%m-%d %H:%M} UTC; "
            f"mail it signed may still be verified until {until:%Y-%m-%d %H:%M} UTC "
            "(dkim.retiring_overlap): retire it then, or now with --force"
        )
    data.domains[dom.name] = replace(
        dom, selectors=tuple(s for s in dom.selectors if s.name != selector)
    )
    return found


# -- senders ---------------------------------------------------------------------------------
def add_sender(data: DirectoryData, pid: str, address: str, now: datetime) -> Sender:
    principal(data, pid)
    normal = names.address(address)
    if (pid, normal) in data.senders:
        raise Conflict(f"{normal} is already a verified sender of {pid}")
    data.senders[(pid, normal)] = Sender(address=normal, principal=pid, created=now)
    return data.senders[(pid, normal)]


def remove_sender(data: DirectoryData, pid: str, address: str) -> None:
    principal(data, pid)
    normal = names.address(address)
    if (pid, normal) not in data.senders:
        raise NotFound(f"{normal} is not a verified sender of {pid}")
    del data.senders[(pid, normal)]


# -- IP pools --------------------------------------------------------------------------------
def add_pool(
    data: DirectoryData, name: str, binds: list[str], helo: str, now: datetime
) -> Pool:
    names.account_name(name)
    if name in data.pools:
        raise Conflict(f"pool {name!r} already exists")
    addresses = _pool_addresses(data, name, binds)
    data.pools[name] = Pool(name=name, bind=addresses, helo=names.domain(helo), created=now)
    return data.pools[name]


def change_pool(
    data: DirectoryData, name: str, binds: list[str] | None, helo: str | None
) -> Pool:
    """New bind addresses and/or HELO name for a pool (``None``: keep)."""
    old = pool(data, name)
    data.pools[name] = replace(
        old,
        bind=old.bind if binds is None else _pool_addresses(data, name, binds),
        helo=old.helo if helo is None else names.domain(helo),
    )
    return data.pools[name]


def _pool_addresses(data: DirectoryData, name: str, binds: list[str]) -> tuple[IPAddress, ...]:
    if not binds:
        raise UserError("a pool needs at least one --bind address")
    addresses = tuple(dict.fromkeys(names.ip_address(b) for b in binds))
    for other in data.pools.values():
        shared = set(addresses) & set(other.bind) if other.name != name else set()
        if shared:
            # one address in two pools would mix the pools' reputations
            raise Conflict(f"{', '.join(map(str, shared))} already belongs to pool {other.name}")
    return addresses


def remove_pool(data: DirectoryData, name: str) -> None:
    pool(data, name)
    users = sorted(
        [a.name for a in data.accounts.values() if a.pool == name]
        + [s.principal for s in data.subusers.values() if s.pool == name]
    )
    if users:
        raise Conflict(f"pool {name} is still assigned to {', '.join(users)}")
    del data.pools[name]


def assign_pool(data: DirectoryData, pid: str, pool_name: str | None) -> None:
    principal(data, pid)
    if pool_name is not None:
        pool(data, pool_name)
    if "/" in pid:
        data.subusers[pid] = replace(data.subusers[pid], pool=pool_name)
    else:
        data.accounts[pid] = replace(data.accounts[pid], pool=pool_name)


def effective_pool(data: DirectoryData, pid: str, default_pool: str | None) -> str | None:
    """The pool a principal's mail leaves through: its own, its account's, or the default."""
    sub = data.subusers.get(pid)
    acc = data.accounts.get(pid.partition("/")[0])
    return (sub.pool if sub else None) or (acc.pool if acc else None) or default_pool


def pools_for_domain(data: DirectoryData, dom: Domain, default_pool: str | None) -> list[Pool]:
    """Every pool that may carry mail of the domain (owner and grantees): SPF must cover all."""
    wanted = {effective_pool(data, p, default_pool) for p in (dom.owner, *dom.grants)}
    return [data.pools[n] for n in sorted(w for w in wanted if w) if n in data.pools]


_COLLECTIONS = ("accounts", "subusers", "keys", "domains", "senders", "pools", "legacy")
_KINDS = {"legacy": "legacy login"}


def differences(old: DirectoryData, new: DirectoryData) -> list[str]:
    """What turning ``old`` into ``new`` adds, changes and removes, one line per record."""
    lines = []
    for name in _COLLECTIONS:
        before, after = getattr(old, name), getattr(new, name)
        kind = _KINDS.get(name, name[:-1])
        for ident in sorted(set(after) - set(before), key=str):
            lines.append(f"add {kind} {_ident(ident)}")
        for ident in sorted(set(before) & set(after), key=str):
            if before[ident] != after[ident]:
                lines.append(f"change {kind} {_ident(ident)}")
        for ident in sorted(set(before) - set(after), key=str):
            lines.append(f"remove {kind} {_ident(ident)}")
    if old.monitor != new.monitor:
        lines.append(f"directory-wide monitor mode {'on' if new.monitor else 'off'}")
    return lines


def _ident(ident: object) -> str:
    return " ".join(ident) if isinstance(ident, tuple) else str(ident)


def replace_all(data: DirectoryData, new: DirectoryData) -> None:
    """Make ``data`` (a transaction's records) equal to ``new``."""
    for name in _COLLECTIONS:
        setattr(data, name, dict(getattr(new, name)))
    data.monitor = new.monitor
