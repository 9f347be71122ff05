"""The writes of the LDAP backend (the CLI, the daemons' last-used times).

``LdapDirectory.transaction()`` reads everything, lets the caller change the records, then
writes only the difference, entry by entry (``write_difference``). ``krSerial`` is a
compare-and-swap lock: the write starts by replacing the serial it read with serial+1 (an LDAP
modify that deletes the old value fails if someone else changed it) and ends with serial+2,
so a concurrent writer is refused ("run it again") instead of losing an update, and readers
take the change after the whole of it is written. Keys' last-used times are written to the key
entries alone (``write_key_use``): no decision reads them, so readers need not follow.

Each function takes a bound connection and raises what ldap3 raises;
``LdapDirectory._guarded`` turns that into ``DirectoryUnavailable``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import datetime

import ldap3
from ldap3.core.exceptions import (
    LDAPAttributeOrValueExistsResult,
    LDAPEntryAlreadyExistsResult,
    LDAPNoSuchAttributeResult,
    LDAPNoSuchObjectResult,
    LDAPObjectClassViolationResult,
    LDAPUndefinedAttributeTypeResult,
)
from ldap3.utils.conv import escape_filter_chars

from ...errors import DirectoryConflict
from . import changelog
from .connection import Changes, Connection, attributes_of, done, entries_in
from .mapping import CONTAINERS, Entry, escape_rdn, ldap_time, parse_time


def write_difference(conn: Connection, base: str, serial: int | None,
                     before: dict[str, Entry], after: dict[str, Entry], monitor: bool) -> None:
    """Write the entries that differ between ``before`` and ``after`` (and the monitor
    flag) under the serial lock; ``serial`` None: the base is no keyrelay directory yet."""
    if serial is None:
        initialise(conn, base)
        serial = 0
    try:  # compare-and-swap: fails when another writer moved the serial on
        done(conn, conn.modify(base, {
            "krSerial": [(ldap3.MODIFY_DELETE, [str(serial)]),
                         (ldap3.MODIFY_ADD, [str(serial + 1)])]}), "the write")
    except (LDAPNoSuchAttributeResult, LDAPAttributeOrValueExistsResult):
        raise DirectoryConflict(
            "the directory changed while this command ran (another keyrelay command or "
            "daemon wrote to it); nothing was written: run the command again") from None
    depth = lambda dn: dn.count(",")  # noqa: E731
    changed = sorted(set(before) - set(after), key=depth, reverse=True)
    for dn in changed:
        done(conn, conn.delete(dn), f"removing {dn}")
    for dn in sorted(after, key=depth):
        new, old = after[dn], before.get(dn)
        if old is None:
            done(conn, conn.add(dn, attributes={k: list(v) for k, v in new.items()}),
                 f"adding {dn}")
        elif new != old:
            changes: Changes = {name: [(ldap3.MODIFY_REPLACE, list(new.get(name, ())))]
                                for name in set(new) | set(old)
                                if name != "objectClass" and new.get(name) != old.get(name)}
            done(conn, conn.modify(dn, changes), f"changing {dn}")
        else:
            continue
        changed.append(dn)
    final = serial + 2
    log = changelog.log_update(conn, base, final, changed)
    update: Changes = {
        "krSerial": [(ldap3.MODIFY_REPLACE, [str(final)])],
        "krMonitor": [(ldap3.MODIFY_REPLACE, ["TRUE"] if monitor else [])]}
    if log:
        update["krChange"] = log
    done(conn, conn.modify(base, update), "the end of the write")


def initialise(conn: Connection, base: str) -> None:
    """Make the base entry a keyrelay directory and add the containers."""

    try:
        done(conn, conn.modify(base, {
            "objectClass": [(ldap3.MODIFY_ADD, ["krDirectory"])],
            "krSerial": [(ldap3.MODIFY_ADD, ["0"])]}), "creating the directory")
    except (LDAPAttributeOrValueExistsResult, LDAPNoSuchAttributeResult):
        raise DirectoryConflict("another keyrelay command created the directory at the "
                                "same time; nothing was written: run the command again"
                                ) from None
    for name in CONTAINERS:
        with contextlib.suppress(LDAPEntryAlreadyExistsResult):
            conn.add(f"ou={name},{base}", attributes={
                "objectClass": ["top", "organizationalUnit"], "ou": [name]})


def write_key_use(conn: Connection, base: str, used: dict[str, datetime],
                  give_up: Callable[[], bool] | None) -> set[str]:
    """Keys' last-used times, each moved forward only (see
    ``LdapDirectory.record_key_use``); the ids left when ``give_up()`` turned true."""
    ids = sorted(used)
    left = set(ids)
    for start in range(0, len(ids), 200):  # filters of a sensible size
        wanted = "".join(f"(krKeyId={escape_filter_chars(i)})" for i in ids[start:start + 200])
        conn.search(f"ou=keys,{base}", f"(&(objectClass=krApiKey)(|{wanted}))",
                    search_scope=ldap3.LEVEL, attributes=["krKeyId", "krLastUsed"])
        found = [(item["dn"], attributes_of(item)) for item in entries_in(conn)]
        left -= set(ids[start:start + 200])
        for dn, attrs in found:
            if give_up is not None and give_up():
                return left | {a["krkeyid"][0] for _, a in found}
            key_id = attrs["krkeyid"][0]
            when = used[key_id]
            values = attrs.get("krlastused") or []
            stored = values[0] if values else None
            try:
                if stored is not None and parse_time(stored) >= when:
                    continue
            except ValueError:
                pass  # not as keyrelay writes it: replace it
            # delete exactly the value read, add the new one: if another node wrote a
            # time meanwhile the modify fails and that (newer or equal) time stays
            change = [(ldap3.MODIFY_DELETE, [stored])] if stored is not None else []
            change.append((ldap3.MODIFY_ADD, list(ldap_time(when))))
            try:
                done(conn, conn.modify(dn, {"krLastUsed": change}), f"changing {dn}")
            except (LDAPNoSuchAttributeResult, LDAPAttributeOrValueExistsResult,
                    LDAPNoSuchObjectResult):
                continue  # another node wrote a time, or the key is gone
    return left


def write_legacy_use(conn: Connection, base: str, used: dict[str, datetime]) -> None:
    """Legacy logins' last-used times (``PRINCIPAL:legacy`` -> time) on their principals'
    entries; a principal gone meanwhile is skipped. Like keys' times, no serial is raised."""
    for ident, when in sorted(used.items()):
        account, _, sub = ident.removesuffix(":legacy").partition("/")
        dn = f"krName={escape_rdn(account)},ou=accounts,{base}"
        if sub:
            dn = f"krName={escape_rdn(sub)},{dn}"
        # gone meanwhile, or a schema older than this release: bookkeeping, never an error
        with contextlib.suppress(LDAPNoSuchObjectResult, LDAPObjectClassViolationResult,
                                 LDAPUndefinedAttributeTypeResult):
            done(conn, conn.modify(dn, {"krLegacyLastUsed": [
                (ldap3.MODIFY_REPLACE, list(ldap_time(when)))]}), f"changing {dn}")

