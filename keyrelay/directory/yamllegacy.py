"""A principal's legacy login (the password bridge, docs/migration.md) in the YAML directory
file: its ``legacy_login`` mapping, written only when the principal has one, so that a file
without one reads as before in any keyrelay (docs/directory.md, "The YAML file")."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

from .. import passwords, yamlread
from .model import DirectoryData, LegacyLogin

if TYPE_CHECKING:
    from .yamlfile import _Parser

FIELDS = ("username", "password_hash", "sunset", "created", "last_used")


def render(cred: LegacyLogin, ts: Callable[[datetime | None], str | None]) -> dict[str, Any]:
    return {"username": cred.username, "password_hash": cred.password_hash,
            "sunset": cred.sunset.isoformat(), "created": ts(cred.created),
            "last_used": ts(cred.last_used)}


def parse(parser: _Parser, data: DirectoryData, principal: str, value: object,
          key: str) -> None:
    """Read one ``legacy_login`` into ``data.legacy``; an error names the key, never the
    hash (passwords.checked names the scheme at most)."""
    doc = parser.mapping(value, key, FIELDS)
    username = parser.string(doc.get("username"), f"{key}.username")
    for other in data.legacy.values():
        if other.username == username:
            raise parser.fail(f"{key}.username",
                              f"{username!r} is also the legacy login of {other.principal}")
    stored = doc.get("password_hash")
    if not isinstance(stored, str):  # said without its value: it may be a password typed in
        raise parser.fail(f"{key}.password_hash", "expected a password hash written "
                          "{SCHEME}hash as a string")
    stored = parser.checked(passwords.checked, stored, f"{key}.password_hash")
    data.legacy[principal] = LegacyLogin(
        principal, username, stored, _day(parser, doc.get("sunset"), f"{key}.sunset"),
        parser.time(doc.get("created"), f"{key}.created"),
        parser.time(doc.get("last_used"), f"{key}.last_used"))


def _day(parser: _Parser, value: object, key: str) -> date:
    if isinstance(value, date) and not isinstance(value, datetime):
        return value  # YAML reads 2027-03-31 as a date
    if isinstance(value, str):
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
    raise parser.fail(key, f"expected a date like 2027-03-31, got {yamlread.got(value)}")
