"""The reads of the LDAP backend, one function per search: the base entry's serial, the
whole directory, one entry, one key id. Each takes a bound connection and raises what ldap3
raises; ``LdapDirectory._guarded`` turns that into ``DirectoryUnavailable``."""

from __future__ import annotations

import ldap3
from ldap3.core.exceptions import LDAPNoSuchObjectResult
from ldap3.utils.conv import escape_filter_chars

from ...errors import DirectoryUnavailable
from .connection import Connection, attributes_of, done, entries_in
from .mapping import CONTAINERS, Raw, dn_key
from .schema import OBJECT_CLASSES

# every keyrelay entry below the base (krDirectory is the base entry's auxiliary class)
FILTER = "(|" + "".join(f"(objectClass={c.name})" for c in OBJECT_CLASSES[1:]) + ")"


def base_attributes(conn: Connection) -> dict[str, list[str]]:
    """The attributes of the base entry, just read by a base-scope search."""
    return attributes_of((conn.response or [])[0])


def serial_of(conn: Connection, base: str) -> tuple[int | None, bool]:
    """(krSerial, monitor) of the base entry; serial None when not initialised."""

    conn.search(base, "(objectClass=*)", search_scope=ldap3.BASE,
                attributes=["krSerial", "krMonitor", "objectClass"])
    if not conn.entries and not conn.response:
        raise DirectoryUnavailable(f"LDAP base {base} not found")
    attrs = base_attributes(conn)
    serials = attrs.get("krserial") or []  # ldap3 lists an absent attribute as []
    return (int(serials[0]) if serials else None,
            (attrs.get("krmonitor") or ["FALSE"])[0] == "TRUE")


def read_entries(conn: Connection, base: str, bind_dn: str
                 ) -> tuple[dict[str, Raw], int | None, bool]:
    """Every keyrelay entry by ``dn_key``, the serial and the directory-wide monitor."""
    serial, monitor = serial_of(conn, base)
    if serial is not None:
        check_readable(conn, base, bind_dn)
    entries: dict[str, Raw] = {}
    for item in conn.extend.standard.paged_search(
            base, FILTER, search_scope=ldap3.SUBTREE, attributes=["*"],
            paged_size=1000, generator=True):
        if item.get("type") == "searchResEntry":
            entries[dn_key(item["dn"])] = (item["dn"], attributes_of(item))
    # a size or time limit ends the search early without an exception: never serve half
    done(conn, (conn.result or {}).get("result") == 0, "reading the whole directory "
         "(raise the service DN's olcLimits: docs/ldap.md)")
    return entries, serial, monitor


def check_readable(conn: Connection, base: str, bind_dn: str) -> None:
    """A keyrelay directory always has its containers: when the bind DN cannot see
    them, ACLs hide the records, and what the search returns would look like an empty
    directory (every key refused as unknown, permanently). Unavailable instead."""
    conn.search(base, "(objectClass=organizationalUnit)", search_scope=ldap3.LEVEL,
                attributes=["ou"])
    seen = {value.lower() for item in entries_in(conn)
            for value in attributes_of(item).get("ou", [])}
    hidden = [f"ou={name}" for name in CONTAINERS if name not in seen]
    if hidden:
        raise DirectoryUnavailable(
            f"LDAP base {base} is a keyrelay directory, but {', '.join(hidden)} "
            f"cannot be read as {bind_dn or 'anonymous'}: the server's ACLs "
            "hide the records (docs/ldap.md: The service DN, ACLs and limits)")


def fetch(conn: Connection, dn: str) -> Raw | None:
    """One entry, read now; None when it no longer exists."""
    try:
        conn.search(dn, FILTER, search_scope=ldap3.BASE, attributes=["*"])
    except LDAPNoSuchObjectResult:
        return None
    for item in entries_in(conn):
        return item["dn"], attributes_of(item)
    return None


def key_exists(conn: Connection, base: str, key_id: str) -> bool:
    """Whether LDAP has an API key ``key_id`` now (one search below ou=keys)."""
    conn.search(f"ou=keys,{base}",
                f"(&(objectClass=krApiKey)(krKeyId={escape_filter_chars(key_id)}))",
                search_scope=ldap3.LEVEL, attributes=["krKeyId"], size_limit=1)
    return bool(entries_in(conn))
