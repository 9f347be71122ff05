"""The change log on the base entry (``krChange`` values "SERIAL DN"): written by every
keyrelay write, read by the refresher to fetch only the entries a write changed.

A write lists every entry it added, changed or removed, or "SERIAL *" when it touched more
than ``CHANGE_LIST_LIMIT``; the values of the last ``CHANGE_LOG_SERIALS`` serials are kept (a
write moves the serial by 2). A reader further behind than that, or told "*", reads the whole
directory again.
"""

from __future__ import annotations

import ldap3

from .connection import Connection
from .searches import base_attributes

CHANGE_LIST_LIMIT = 500
CHANGE_LOG_SERIALS = 2000


def changed_since(conn: Connection, base: str, serial: int
                  ) -> tuple[int, bool, list[str]] | None:
    """(serial now, monitor, the DNs the writes after ``serial`` changed), serial and log
    read together; None when the log cannot say (a large write, ``serial`` too far
    behind or ahead, a base that is no keyrelay directory)."""
    conn.search(base, "(objectClass=*)", search_scope=ldap3.BASE,
                attributes=["krSerial", "krMonitor", "krChange"])
    attrs = base_attributes(conn)
    serials = attrs.get("krserial") or []
    if not serials:
        return None
    now = int(serials[0])
    # the log keeps every value newer than now - CHANGE_LOG_SERIALS (the writer prunes
    # relative to the serial it sets, and this is that serial, read with the log)
    if now < serial or now - serial >= CHANGE_LOG_SERIALS:
        return None
    changed: list[str] = []
    for value in attrs.get("krchange") or []:
        number, _, dn = value.partition(" ")
        if number.isdigit() and serial < int(number) <= now:
            if dn == "*":
                return None
            changed.append(dn)
    return now, (attrs.get("krmonitor") or ["FALSE"])[0] == "TRUE", changed


def log_update(conn: Connection, base: str, final: int, changed: list[str]
               ) -> list[tuple[str, list[str]]]:
    """The modification of ``krChange`` for a write that ends at serial ``final`` and
    changed the entries ``changed``: the values too old to keep out, the new ones in."""
    log: list[tuple[str, list[str]]] = []
    expired = _expired_changes(conn, base, final)
    if expired:
        log.append((ldap3.MODIFY_DELETE, expired))
    listed = ([f"{final} {dn}" for dn in changed] if len(changed) <= CHANGE_LIST_LIMIT
              else [f"{final} *"])
    if listed:
        log.append((ldap3.MODIFY_ADD, listed))
    return log


def _expired_changes(conn: Connection, base: str, final: int) -> list[str]:
    """Change-log values too old to keep once the serial is ``final``."""
    conn.search(base, "(objectClass=*)", search_scope=ldap3.BASE,
                attributes=["krChange"])
    values = base_attributes(conn).get("krchange") or []
    return [v for v in values
            if not v.partition(" ")[0].isdigit()
            or int(v.partition(" ")[0]) <= final - CHANGE_LOG_SERIALS]
