"""The LDAP directory backend (ldap3): the same records as the YAML file, one entry each.

Layout under ``directory.ldap.base_dn`` (the base entry carries the auxiliary class
``krDirectory`` with the change serial ``krSerial`` and the directory-wide ``krMonitor``)::

    ou=accounts   krName=ACCOUNT (krAccount)
                      krName=SUBUSER,krName=ACCOUNT (krSubuser)
    ou=keys       krKeyId=ID (krApiKey)
    ou=domains    krDomain=DOMAIN (krDomain)
                      krSelector=SELECTOR,krDomain=DOMAIN (krSelector)
    ou=senders    krAddress=ADDRESS+krPrincipal=PRINCIPAL (krSender)
    ou=pools      krName=POOL (krPool)

The schema (``ldap/keyrelay.schema`` and the cn=config ``ldap/keyrelay.ldif``) is generated
from ``ATTRIBUTES`` and ``OBJECT_CLASSES`` below (``python -m keyrelay.directory.ldapdir``).

Reads for the daemons: ``snapshot()`` never waits for LDAP once the first copy is loaded. A
background thread asks for the base entry's ``krSerial`` every ``refresh_interval`` (one
base-scope read). When it moved, the base entry's change log (``krChange`` values "SERIAL DN",
written by every keyrelay write) names the entries to fetch again, one base-scope read each;
the copy is rebuilt from memory. The whole directory is read again only when the log cannot
say (a write of more than ``CHANGE_LIST_LIMIT`` entries, a reader more than
``CHANGE_LOG_SERIALS`` behind), and every ``full_reload_interval`` to catch changes made
without the keyrelay CLI. A copy is served only
while the last successful contact is at most ``refresh_interval + timeout`` old (plus
``stale_grace`` when the admin allows stale answers); after that, ``snapshot()`` raises
``DirectoryUnavailable`` and every front end answers temporarily.

Read-through (``fresh_for_key``): a login with a key id that the copy lacks may be a key
created a moment ago, so that one key id is looked up in LDAP (one subtree search by
``krKeyId``). Found: the copy is refreshed at once (the change log brings the key and its
principal) and the login decided on it. Not found: the key id is remembered as absent for
``negative_cache`` seconds and the login refused. At most ``read_through_per_second`` such
searches run per second (a token bucket); past that, and whenever LDAP does not answer, the
lookup raises ``DirectoryUnavailable`` (a temporary answer), never "unknown key".

Writes (the CLI, the daemons' last-used times): ``transaction()`` reads everything, lets the
caller change the records, then writes only the difference, entry by entry. ``krSerial`` is a
compare-and-swap lock: the write starts by replacing the serial it read with serial+1 (an LDAP
modify that deletes the old value fails if someone else changed it) and ends with serial+2,
so a concurrent writer is refused ("run it again") instead of losing an update, and readers
take the change after the whole of it is written. Keys' last-used times are written to the key
entries alone (``record_key_use``): no decision reads them, so readers need not follow.
"""

from __future__ import annotations

import contextlib
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import ldap3
from ldap3.core.exceptions import (
    LDAPAttributeOrValueExistsResult,
    LDAPEntryAlreadyExistsResult,
    LDAPException,
    LDAPNoSuchAttributeResult,
    LDAPNoSuchObjectResult,
)
from ldap3.utils.conv import escape_filter_chars

from .. import names
from ..errors import DirectoryConflict, DirectoryUnavailable, KeyrelayError
from .model import (
    Account,
    Algorithm,
    ApiKey,
    Directory,
    DirectoryData,
    Domain,
    DomainState,
    Limits,
    Pool,
    Selector,
    SelectorState,
    Sender,
    Status,
    Subuser,
)

if TYPE_CHECKING:
    from ..config import LdapConfig

# -- the schema ------------------------------------------------------------------------------
# 2.25.<a UUID as an integer>: an OID arc that needs no registration (ITU-T X.667).
OID_ARC = "2.25.120329571994599312318798701806835401756"

_STRING = ("1.3.6.1.4.1.1466.115.121.1.15", "caseIgnoreMatch", "caseIgnoreSubstringsMatch")
_EXACT = ("1.3.6.1.4.1.1466.115.121.1.26", "caseExactIA5Match", None)
_TEXT = ("1.3.6.1.4.1.1466.115.121.1.15", "caseExactMatch", None)
_IA5 = ("1.3.6.1.4.1.1466.115.121.1.26", "caseIgnoreIA5Match", "caseIgnoreIA5SubstringsMatch")
_INT = ("1.3.6.1.4.1.1466.115.121.1.27", "integerMatch", None)
_BOOL = ("1.3.6.1.4.1.1466.115.121.1.7", "booleanMatch", None)
_TIME = ("1.3.6.1.4.1.1466.115.121.1.24", "generalizedTimeMatch", None)


@dataclass(frozen=True)
class Attribute:
    number: int
    name: str
    syntax: tuple[str, str, str | None]
    single: bool
    description: str


ATTRIBUTES = [
    Attribute(1, "krName", _STRING, True, "name of an account, subuser, pool or key"),
    Attribute(2, "krStatus", _IA5, True, "active or suspended"),
    Attribute(3, "krMonitor", _BOOL, True, "monitor mode: log would-be refusals, let mail pass"),
    Attribute(4, "krIpAllow", _IA5, False, "CIDR a principal may log in and send from"),
    Attribute(5, "krPool", _IA5, True, "name of the IP pool the mail of the principal leaves by"),
    Attribute(6, "krMessagesPerMinute", _INT, True, "messages per minute"),
    Attribute(7, "krMessagesPerHour", _INT, True, "messages per hour"),
    Attribute(8, "krRecipientsPerMessage", _INT, True, "recipients per message"),
    Attribute(9, "krCreated", _TIME, True, "when the record was created"),
    Attribute(10, "krAccount", _IA5, True, "account a subuser belongs to"),
    Attribute(11, "krPrincipal", _IA5, True, "principal: ACCOUNT or ACCOUNT/SUBUSER"),
    Attribute(12, "krKeyId", _IA5, True, "public id of an API key"),
    Attribute(13, "krSecretHash", _EXACT, True, "hash of the secret of an API key (never the key)"),
    Attribute(14, "krScope", _IA5, False, "scope granted to an API key, e.g. mail.send"),
    Attribute(15, "krExpires", _TIME, True, "when an API key expires"),
    Attribute(16, "krRevoked", _TIME, True, "when an API key was revoked"),
    Attribute(17, "krLastUsed", _TIME, True, "when an API key was last used"),
    Attribute(18, "krDomain", _IA5, True, "a sending domain (A-labels, lowercase)"),
    Attribute(19, "krDomainState", _IA5, True, "pending, verified or failing"),
    Attribute(20, "krGrant", _IA5, False, "subuser the owning account shares a domain with"),
    Attribute(21, "krVerifiedAt", _TIME, True, "last time the domain was verified"),
    Attribute(22, "krVerifiedBy", _IA5, True, "how: dns or manual"),
    Attribute(23, "krSelector", _IA5, True, "DKIM selector name"),
    Attribute(24, "krAlgorithm", _IA5, True, "rsa-sha256 or ed25519-sha256"),
    Attribute(25, "krSelectorState", _IA5, True, "pending, active or retiring"),
    Attribute(26, "krKeyFile", _EXACT, True, "private key file on each relay node"),
    Attribute(27, "krPublicKey", _EXACT, True, "public key, base64 as in the DNS p= tag"),
    Attribute(28, "krAddress", _IA5, True, "a verified single sender address"),
    Attribute(29, "krBind", _IA5, False, "outbound source address of an IP pool"),
    Attribute(30, "krHelo", _IA5, True, "HELO name of an IP pool"),
    Attribute(31, "krSerial", _INT, True, "change serial, raised by every keyrelay write"),
    Attribute(32, "krPosition", _INT, True, "place of a selector in the list of its domain"),
    Attribute(33, "krChange", _TEXT, False,
              "SERIAL DN: an entry a keyrelay write changed; readers fetch only these"),
    Attribute(34, "krFailedChecks", _INT, True, "DNS checks of a domain failed in a row"),
    Attribute(35, "krRetiringSince", _TIME, True, "when a DKIM selector stopped signing"),
]

_LIMITS = ("krMessagesPerMinute", "krMessagesPerHour", "krRecipientsPerMessage")


@dataclass(frozen=True)
class ObjectClass:
    number: int
    name: str
    kind: str  # STRUCTURAL | AUXILIARY
    must: tuple[str, ...]
    may: tuple[str, ...]
    description: str


OBJECT_CLASSES = [
    ObjectClass(1, "krDirectory", "AUXILIARY", ("krSerial",), ("krMonitor", "krChange"),
                "base entry of a keyrelay directory"),
    ObjectClass(2, "krAccount", "STRUCTURAL", ("krName", "krStatus"),
                ("krMonitor", "krIpAllow", "krPool", *_LIMITS, "krCreated"), "a tenant"),
    ObjectClass(3, "krSubuser", "STRUCTURAL", ("krName", "krAccount", "krStatus"),
                ("krPool", *_LIMITS, "krCreated"), "a subuser of an account"),
    ObjectClass(4, "krApiKey", "STRUCTURAL",
                ("krKeyId", "krPrincipal", "krName", "krSecretHash", "krCreated"),
                ("krScope", "krExpires", "krRevoked", "krLastUsed"), "an API key"),
    ObjectClass(5, "krDomain", "STRUCTURAL", ("krDomain", "krPrincipal", "krDomainState"),
                ("krGrant", "krCreated", "krVerifiedAt", "krVerifiedBy", "krFailedChecks"),
                "a sending domain"),
    ObjectClass(6, "krSelector", "STRUCTURAL",
                ("krSelector", "krAlgorithm", "krSelectorState", "krKeyFile", "krPublicKey",
                 "krCreated"), ("krPosition", "krRetiringSince"), "a DKIM selector of a domain"),
    ObjectClass(7, "krSender", "STRUCTURAL", ("krAddress", "krPrincipal"), ("krCreated",),
                "a verified single sender address"),
    ObjectClass(8, "krPool", "STRUCTURAL", ("krName", "krHelo"), ("krBind", "krCreated"),
                "an outbound IP pool"),
]

# Equality indexes slapd should keep (docs/ldap.md): the daemons load everything, the CLI
# looks entries up by these.
INDEXES = ["objectClass eq", "krKeyId eq", "krPrincipal eq", "krName eq,sub", "krDomain eq,sub",
           "krAddress eq"]


def _attribute_text(a: Attribute) -> str:
    syntax, equality, substr = a.syntax
    parts = [f"( {OID_ARC}.1.{a.number} NAME '{a.name}'", f"DESC '{a.description}'",
             f"EQUALITY {equality}"]
    if substr:
        parts.append(f"SUBSTR {substr}")
    parts.append(f"SYNTAX {syntax}")
    if a.single:
        parts.append("SINGLE-VALUE")
    return " ".join(parts) + " )"


def _class_text(c: ObjectClass) -> str:
    def names_of(items: tuple[str, ...]) -> str:
        return items[0] if len(items) == 1 else "( " + " $ ".join(items) + " )"

    text = (f"( {OID_ARC}.2.{c.number} NAME '{c.name}' DESC '{c.description}' SUP top "
            f"{c.kind} MUST {names_of(c.must)}")
    if c.may:
        text += f" MAY {names_of(c.may)}"
    return text + " )"


_SCHEMA_HEADER = (
    "keyrelay directory schema, generated by `python -m keyrelay.directory.ldapdir` from\n"
    "keyrelay/directory/ldapdir.py; docs/ldap.md explains loading it, indexes and ACLs.\n"
    f"OID arc {OID_ARC} (2.25 + a UUID: no registration needed).\n"
)


def schema_file() -> str:
    """The schema in slapd.conf form (``include``)."""
    lines = ["# " + line for line in _SCHEMA_HEADER.splitlines()] + [""]
    lines += [f"attributetype {_attribute_text(a)}" for a in ATTRIBUTES]
    lines += [f"objectclass {_class_text(c)}" for c in OBJECT_CLASSES]
    return "\n".join(lines) + "\n"


def schema_ldif() -> str:
    """The schema as a cn=config entry (``ldapadd -Y EXTERNAL -H ldapi:/// -f``)."""
    lines = ["# " + line for line in _SCHEMA_HEADER.splitlines()]
    lines += ["dn: cn=keyrelay,cn=schema,cn=config", "objectClass: olcSchemaConfig",
              "cn: keyrelay"]
    lines += [f"olcAttributeTypes: {_attribute_text(a)}" for a in ATTRIBUTES]
    lines += [f"olcObjectClasses: {_class_text(c)}" for c in OBJECT_CLASSES]
    return "\n".join(lines) + "\n"


# -- records <-> entries ---------------------------------------------------------------------
Entry = dict[str, tuple[str, ...]]  # attribute -> values (objectClass included)
Raw = tuple[str, dict[str, list[str]]]  # an entry as read: DN, lowercased attribute -> values
# The change log on the base entry (krChange "SERIAL DN"): a write lists every entry it
# added, changed or removed, or "SERIAL *" when it touched more than CHANGE_LIST_LIMIT; the
# values of the last CHANGE_LOG_SERIALS serials are kept (a write moves the serial by 2).
CHANGE_LIST_LIMIT = 500
CHANGE_LOG_SERIALS = 2000
CONTAINERS = ("accounts", "keys", "domains", "senders", "pools")


def _time(value: datetime | None) -> tuple[str, ...]:
    if value is None:
        return ()
    value = value.astimezone(UTC)
    text = value.strftime("%Y%m%d%H%M%S")
    if value.microsecond:
        text += f".{value.microsecond:06d}"
    return (text + "Z",)


_GENERALIZED_TIME = re.compile(r"(\d{4})(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)(?:\.(\d{1,6})\d*)?Z")


def _parse_time(text: str) -> datetime:
    """GeneralizedTime in UTC as keyrelay writes it (``_time``); ValueError otherwise.
    A regex and ``datetime()``: ``strptime`` made a quarter of a full directory read."""
    match = _GENERALIZED_TIME.fullmatch(text)
    if match is None:
        raise ValueError(f"not a UTC GeneralizedTime: {text!r}")
    year, month, day, hour, minute, second, fraction = match.groups()
    return datetime(int(year), int(month), int(day), int(hour), int(minute), int(second),
                    int(fraction.ljust(6, "0")) if fraction else 0, tzinfo=UTC)


def _opt(value: object) -> tuple[str, ...]:
    return () if value is None else (str(value),)


def _limits(limits: Limits) -> dict[str, tuple[str, ...]]:
    return {"krMessagesPerMinute": _opt(limits.messages_per_minute),
            "krMessagesPerHour": _opt(limits.messages_per_hour),
            "krRecipientsPerMessage": _opt(limits.recipients_per_message)}


def _bool(value: bool) -> tuple[str, ...]:
    return ("TRUE",) if value else ()


def _rdn_value(value: str) -> str:
    """Escape a value for a DN (RFC 4514)."""
    out = []
    for i, char in enumerate(value):
        edge = i in (0, len(value) - 1)
        if char in ',+"\\<>;=' or (char == "#" and i == 0) or (char == " " and edge):
            out.append("\\" + char)
        else:
            out.append(char)
    return "".join(out)


def entries_of(data: DirectoryData, base: str) -> dict[str, Entry]:
    """Every record of ``data`` as an LDAP entry under ``base`` (without the base and the
    containers); attribute values as LDAP strings."""
    result: dict[str, Entry] = {}

    def put(dn: str, classes: tuple[str, ...], attrs: Mapping[str, tuple[str, ...]]) -> None:
        entry: Entry = {"objectClass": classes}
        entry.update({k: v for k, v in attrs.items() if v})
        result[dn] = entry

    accounts = f"ou=accounts,{base}"
    for acc in data.accounts.values():
        put(f"krName={_rdn_value(acc.name)},{accounts}", ("top", "krAccount"), {
            "krName": (acc.name,), "krStatus": (str(acc.status),), "krMonitor": _bool(acc.monitor),
            "krIpAllow": tuple(str(n) for n in acc.ip_allow), "krPool": _opt(acc.pool),
            **_limits(acc.limits), "krCreated": _time(acc.created)})
    for sub in data.subusers.values():
        put(f"krName={_rdn_value(sub.name)},krName={_rdn_value(sub.account)},{accounts}",
            ("top", "krSubuser"), {
                "krName": (sub.name,), "krAccount": (sub.account,),
                "krStatus": (str(sub.status),), "krPool": _opt(sub.pool), **_limits(sub.limits),
                "krCreated": _time(sub.created)})
    for key in data.keys.values():
        put(f"krKeyId={_rdn_value(key.key_id)},ou=keys,{base}", ("top", "krApiKey"), {
            "krKeyId": (key.key_id,), "krPrincipal": (key.principal,), "krName": (key.name,),
            "krSecretHash": (key.secret_hash,), "krScope": tuple(key.scopes),
            "krCreated": _time(key.created), "krExpires": _time(key.expires),
            "krRevoked": _time(key.revoked), "krLastUsed": _time(key.last_used)})
    for dom in data.domains.values():
        dn = f"krDomain={_rdn_value(dom.name)},ou=domains,{base}"
        put(dn, ("top", "krDomain"), {
            "krDomain": (dom.name,), "krPrincipal": (dom.owner,),
            "krDomainState": (str(dom.state),), "krGrant": tuple(dom.grants),
            "krCreated": _time(dom.created), "krVerifiedAt": _time(dom.verified_at),
            "krVerifiedBy": _opt(dom.verified_by),
            "krFailedChecks": (str(dom.failed_checks),) if dom.failed_checks else ()})
        for position, sel in enumerate(dom.selectors):
            put(f"krSelector={_rdn_value(sel.name)},{dn}", ("top", "krSelector"), {
                "krPosition": (str(position),),
                "krSelector": (sel.name,), "krAlgorithm": (str(sel.algorithm),),
                "krSelectorState": (str(sel.state),), "krKeyFile": (sel.key_file,),
                "krPublicKey": (sel.public_key,), "krCreated": _time(sel.created),
                "krRetiringSince": _time(sel.retiring_since)})
    for snd in data.senders.values():
        put(f"krAddress={_rdn_value(snd.address)}+krPrincipal={_rdn_value(snd.principal)},"
            f"ou=senders,{base}", ("top", "krSender"), {
                "krAddress": (snd.address,), "krPrincipal": (snd.principal,),
                "krCreated": _time(snd.created)})
    for pool in data.pools.values():
        put(f"krName={_rdn_value(pool.name)},ou=pools,{base}", ("top", "krPool"), {
            "krName": (pool.name,), "krHelo": (pool.helo,),
            "krBind": tuple(str(a) for a in pool.bind), "krCreated": _time(pool.created)})
    return result


class _Reader:
    """Entries (attribute names lowercased) back into records; a broken entry is reported
    with its DN and skipped, so one bad entry cannot take the whole directory down."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems

    @staticmethod
    def one(attrs: Mapping[str, list[str]], name: str) -> str:
        values = attrs.get(name.lower(), [])
        if not values:
            raise ValueError(f"missing {name}")
        return values[0]

    @staticmethod
    def maybe(attrs: Mapping[str, list[str]], name: str) -> str | None:
        values = attrs.get(name.lower(), [])
        return values[0] if values else None

    def time(self, attrs: Mapping[str, list[str]], name: str) -> datetime | None:
        value = self.maybe(attrs, name)
        return None if value is None else _parse_time(value)

    def limits(self, attrs: Mapping[str, list[str]]) -> Limits:
        def number(name: str) -> int | None:
            value = self.maybe(attrs, name)
            return None if value is None else int(value)

        return Limits(number("krMessagesPerMinute"), number("krMessagesPerHour"),
                      number("krRecipientsPerMessage"))

    def read(self, entries: list[tuple[str, dict[str, list[str]]]]) -> DirectoryData:
        data = DirectoryData()
        selectors: dict[str, list[tuple[int, Selector]]] = {}
        for dn, attrs in entries:
            classes = {c.lower() for c in attrs.get("objectclass", [])}
            try:
                if "kraccount" in classes:
                    name = self.one(attrs, "krName")
                    data.accounts[name] = Account(
                        name=name, status=Status(self.one(attrs, "krStatus")),
                        monitor=self.maybe(attrs, "krMonitor") == "TRUE",
                        ip_allow=tuple(names.network(v) for v in attrs.get("kripallow", [])),
                        pool=self.maybe(attrs, "krPool"), limits=self.limits(attrs),
                        created=self.time(attrs, "krCreated"))
                elif "krsubuser" in classes:
                    sub = Subuser(
                        account=self.one(attrs, "krAccount"), name=self.one(attrs, "krName"),
                        status=Status(self.one(attrs, "krStatus")),
                        pool=self.maybe(attrs, "krPool"), limits=self.limits(attrs),
                        created=self.time(attrs, "krCreated"))
                    data.subusers[sub.principal] = sub
                elif "krapikey" in classes:
                    created = self.time(attrs, "krCreated")
                    assert created is not None
                    key = ApiKey(
                        key_id=self.one(attrs, "krKeyId"),
                        principal=self.one(attrs, "krPrincipal"), name=self.one(attrs, "krName"),
                        secret_hash=self.one(attrs, "krSecretHash"),
                        scopes=tuple(attrs.get("krscope", [])), created=created,
                        expires=self.time(attrs, "krExpires"),
                        revoked=self.time(attrs, "krRevoked"),
                        last_used=self.time(attrs, "krLastUsed"))
                    data.keys[key.key_id] = key
                elif "krdomain" in classes:
                    name = self.one(attrs, "krDomain")
                    data.domains[name] = Domain(
                        name=name, owner=self.one(attrs, "krPrincipal"),
                        state=DomainState(self.one(attrs, "krDomainState")),
                        grants=tuple(attrs.get("krgrant", [])),
                        created=self.time(attrs, "krCreated"),
                        verified_at=self.time(attrs, "krVerifiedAt"),
                        verified_by=self.maybe(attrs, "krVerifiedBy"),
                        failed_checks=int(self.maybe(attrs, "krFailedChecks") or 0))
                elif "krselector" in classes:
                    domain = dn.split(",", 2)[1].partition("=")[2]
                    created = self.time(attrs, "krCreated")
                    assert created is not None
                    position = int(self.maybe(attrs, "krPosition") or 1 << 30)
                    selectors.setdefault(_unescape(domain).lower(), []).append((position, Selector(
                        name=self.one(attrs, "krSelector"),
                        algorithm=Algorithm(self.one(attrs, "krAlgorithm")),
                        state=SelectorState(self.one(attrs, "krSelectorState")),
                        key_file=self.one(attrs, "krKeyFile"),
                        public_key=self.one(attrs, "krPublicKey"), created=created,
                        retiring_since=self.time(attrs, "krRetiringSince"))))
                elif "krsender" in classes:
                    snd = Sender(address=self.one(attrs, "krAddress"),
                                 principal=self.one(attrs, "krPrincipal"),
                                 created=self.time(attrs, "krCreated"))
                    data.senders[(snd.principal, snd.address)] = snd
                elif "krpool" in classes:
                    pool = Pool(name=self.one(attrs, "krName"),
                                bind=tuple(names.ip_address(v) for v in attrs.get("krbind", [])),
                                helo=self.one(attrs, "krHelo"),
                                created=self.time(attrs, "krCreated"))
                    data.pools[pool.name] = pool
            except (ValueError, AssertionError, UnicodeError, KeyrelayError) as exc:
                self.problems.append(f"{dn}: {exc or 'a required attribute is missing'}")
        for domain, found in selectors.items():
            if domain in data.domains:
                # LDAP keeps no order: krPosition does; entries made by hand without it go
                # last, oldest first, RSA before Ed25519 (as keyrelay creates them)
                found.sort(key=lambda p: (p[0], p[1].created,
                                          list(Algorithm).index(p[1].algorithm), p[1].name))
                dom = data.domains[domain]
                data.domains[domain] = replace(dom, selectors=tuple(sel for _, sel in found))
        return data


def _unescape(value: str) -> str:
    """An RDN value as written in a DN (RFC 4514: ``\\c`` or ``\\XX`` hex escapes) in clear:
    keyrelay escapes with ``\\c``, slapd answers with ``\\XX``."""
    out, i = bytearray(), 0
    while i < len(value):
        char = value[i]
        if char == "\\" and re.fullmatch(r"[0-9A-Fa-f]{2}", value[i + 1:i + 3]):
            out.append(int(value[i + 1:i + 3], 16))
            i += 3
        elif char == "\\" and i + 1 < len(value):
            out += value[i + 1].encode()
            i += 2
        else:
            out += char.encode()
            i += 1
    return out.decode("utf-8", "replace")


def _dn_key(dn: str) -> str:
    """One spelling of a DN however it was escaped or cased: the reader's copy and the
    change log meet on it. (ldap3's parse_dn refuses a ``#`` inside a value, which RFC 4514
    allows and slapd returns unescaped.)"""
    rdns: list[list[str]] = [[]]
    part, i = "", 0
    while i <= len(dn):
        char = dn[i] if i < len(dn) else ","
        if char == "\\":
            part += dn[i:i + 2]
            i += 2
            continue
        if char in ",+":
            attribute, _, value = part.partition("=")
            rdns[-1].append(f"{attribute.strip().lower()}={_unescape(value.strip()).lower()}")
            if char == ",":
                rdns.append([])
            part = ""
        else:
            part += char
        i += 1
    return ",".join("+".join(sorted(parts)) for parts in rdns if parts)


# -- the backend -----------------------------------------------------------------------------
log = logging.getLogger("keyrelay.directory.ldap")
_ABSENT_LIMIT = 100_000  # key ids remembered as absent; a flood of guesses stays bounded
_FILTER = "(|" + "".join(f"(objectClass={c.name})" for c in OBJECT_CLASSES[1:]) + ")"


class LdapDirectory:
    """The directory in LDAP; see the module docstring for caching and writing."""

    def __init__(self, config: LdapConfig, *, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.config = config
        self.base = config.base_dn
        self._clock = clock
        self._password: str | None = None
        self._snapshot: Directory | None = None
        self._serial: int | None = None
        self._loaded_at = 0.0
        self._contact = 0.0  # when LDAP last answered
        self._error = "not loaded yet"
        self._refresher: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._stop = threading.Event()
        self._poll_conn: Any = None  # the refresher's connection, reused between polls
        self._entries: dict[str, Raw] = {}  # the copy's entries by _dn_key
        self._refresh_lock = threading.Lock()  # one refresh at a time (refresher, lookups)
        self._gate = threading.Lock()  # the read-through budget and the absent key ids
        self._lookup_lock = threading.Lock()  # the read-through's own connection
        self._lookup_conn: Any = None
        self._tokens = float(config.read_through_per_second)
        self._tokens_at = clock()
        self._absent: dict[str, float] = {}  # key id -> until when LDAP's "no such key" holds
        self.problems: list[str] = []  # entries the last load skipped

    def __repr__(self) -> str:
        return f"LdapDirectory({', '.join(self.config.urls)!r}, base={self.base!r})"

    # -- connections ---------------------------------------------------------------------
    def _read_password(self) -> str:
        if self._password is None:
            path = self.config.bind_password_file
            try:
                with open(path, encoding="utf-8") as handle:
                    self._password = handle.read().rstrip("\r\n")
            except OSError as exc:
                raise DirectoryUnavailable(
                    f"{path}: cannot read the LDAP bind password (directory.ldap."
                    f"bind_password_file): {exc.strerror}") from None
        return self._password

    def connect(self) -> Any:
        """A bound ldap3 connection to the first of ``urls`` that answers (StartTLS first when
        configured). Raises ``DirectoryUnavailable`` naming every server's fault; callers go
        through ``_guarded``, which turns later LDAP and socket errors into the same.

        The servers are tried here, in order, rather than by an ldap3 ``ServerPool``: after a
        failed round the pool waits ``POOLING_LOOP_TIMEOUT`` (10 s) before giving up, which
        held a refresh, and every command of the CLI, for 10 s whenever LDAP was down.
        """
        cfg = self.config
        tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=cfg.ca_file or None,
                        version=ssl.PROTOCOL_TLS_CLIENT)
        password = self._read_password() if cfg.bind_dn else None
        timeout = max(1, round(cfg.timeout))  # ldap3 #1068: whole seconds
        faults = []
        for url in cfg.urls:
            server = ldap3.Server(url, use_ssl=url.startswith("ldaps://"), tls=tls,
                                  get_info=ldap3.NONE, connect_timeout=timeout)
            conn = ldap3.Connection(server, user=cfg.bind_dn or None, password=password,
                                    receive_timeout=timeout, raise_exceptions=True,
                                    auto_bind=ldap3.AUTO_BIND_NONE, read_only=False,
                                    # a replica's referral for a write: an error, never a
                                    # second bind elsewhere (ldap3 would skip StartTLS there)
                                    auto_referrals=False)
            try:
                conn.open()
                if cfg.start_tls and not server.ssl:
                    conn.start_tls()
                conn.bind()
            except (LDAPException, OSError) as exc:
                _unbind(conn)
                faults.append(f"{url}: {_reason(exc)}")
                continue
            return conn
        raise DirectoryUnavailable(f"LDAP {'; '.join(faults)}")

    # -- reading -------------------------------------------------------------------------
    def _serial_of(self, conn: Any) -> tuple[int | None, bool]:
        """(krSerial, monitor) of the base entry; serial None when not initialised."""

        conn.search(self.base, "(objectClass=*)", search_scope=ldap3.BASE,
                    attributes=["krSerial", "krMonitor", "objectClass"])
        if not conn.entries and not conn.response:
            raise DirectoryUnavailable(f"LDAP base {self.base} not found")
        attrs = _attrs(conn.response[0])
        serials = attrs.get("krserial") or []  # ldap3 lists an absent attribute as []
        return (int(serials[0]) if serials else None,
                (attrs.get("krmonitor") or ["FALSE"])[0] == "TRUE")

    def _read_all(self, conn: Any) -> tuple[DirectoryData, int | None]:
        entries, serial, monitor = self._read_entries(conn)
        return self._records(entries, monitor), serial

    def _read_entries(self, conn: Any) -> tuple[dict[str, Raw], int | None, bool]:
        """Every keyrelay entry by ``_dn_key``, the serial and the directory-wide monitor."""
        serial, monitor = self._serial_of(conn)
        if serial is not None:
            self._check_readable(conn)
        entries: dict[str, Raw] = {}
        for item in conn.extend.standard.paged_search(
                self.base, _FILTER, search_scope=ldap3.SUBTREE, attributes=["*"],
                paged_size=1000, generator=True):
            if item.get("type") == "searchResEntry":
                entries[_dn_key(item["dn"])] = (item["dn"], _attrs(item))
        # a size or time limit ends the search early without an exception: never serve half
        _done(conn, (conn.result or {}).get("result") == 0, "reading the whole directory "
              "(raise the service DN's olcLimits: docs/ldap.md)")
        return entries, serial, monitor

    def _check_readable(self, conn: Any) -> None:
        """A keyrelay directory always has its containers: when the bind DN cannot see
        them, ACLs hide the records, and what the search returns would look like an empty
        directory (every key refused as unknown, permanently). Unavailable instead."""
        conn.search(self.base, "(objectClass=organizationalUnit)", search_scope=ldap3.LEVEL,
                    attributes=["ou"])
        seen = {value.lower() for item in conn.response or ()
                if item.get("type") == "searchResEntry" for value in _attrs(item).get("ou", [])}
        hidden = [f"ou={name}" for name in CONTAINERS if name not in seen]
        if hidden:
            raise DirectoryUnavailable(
                f"LDAP base {self.base} is a keyrelay directory, but {', '.join(hidden)} "
                f"cannot be read as {self.config.bind_dn or 'anonymous'}: the server's ACLs "
                "hide the records (docs/ldap.md: The service DN, ACLs and limits)")

    def _records(self, entries: dict[str, Raw], monitor: bool) -> DirectoryData:
        problems: list[str] = []
        data = _Reader(problems).read(list(entries.values()))
        data.monitor = monitor
        self.problems = problems
        return data

    def _changed_since(self, conn: Any, serial: int) -> tuple[int, bool, list[str]] | None:
        """(serial now, monitor, the DNs the writes after ``serial`` changed), serial and log
        read together; None when the log cannot say (a large write, ``serial`` too far
        behind or ahead, a base that is no keyrelay directory)."""
        conn.search(self.base, "(objectClass=*)", search_scope=ldap3.BASE,
                    attributes=["krSerial", "krMonitor", "krChange"])
        attrs = _attrs(conn.response[0])
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

    def _fetch(self, conn: Any, dn: str) -> Raw | None:
        """One entry, read now; None when it no longer exists."""
        try:
            conn.search(dn, _FILTER, search_scope=ldap3.BASE, attributes=["*"])
        except LDAPNoSuchObjectResult:
            return None
        for item in conn.response or ():
            if item.get("type") == "searchResEntry":
                return item["dn"], _attrs(item)
        return None

    def load(self, missing_ok: bool = False) -> DirectoryData:
        """Everything, read now (the CLI's listings). With ``missing_ok``, a base that is not
        a keyrelay directory yet is an empty directory."""
        conn = self._guarded(self.connect)
        try:
            data: DirectoryData
            data, serial = self._guarded(lambda: self._read_all(conn))
        finally:
            _unbind(conn)
        if serial is None and missing_ok:
            return DirectoryData()
        if serial is None:
            raise DirectoryUnavailable(
                f"LDAP base {self.base} is not a keyrelay directory yet (no krDirectory "
                "class): create it with a keyrelay command such as `keyrelay account add` or "
                "`keyrelay import`")
        return data

    def _guarded(self, action: Callable[[], Any]) -> Any:

        try:
            return action()
        except LDAPException as exc:
            raise DirectoryUnavailable(f"LDAP {', '.join(self.config.urls)}: "
                                       f"{_reason(exc)}") from None
        except OSError as exc:
            raise DirectoryUnavailable(f"LDAP {', '.join(self.config.urls)}: {exc}") from None

    def snapshot(self) -> Directory:
        """The current copy; never waits for LDAP after the first load (see module doc)."""
        snapshot = self._snapshot
        if snapshot is None:
            with self._start_lock:
                if self._snapshot is None:
                    self._refresh(force=True)  # raises DirectoryUnavailable
                self._start_refresher()
            snapshot = self._snapshot
            assert snapshot is not None
        limit = self.config.refresh_interval + self.config.timeout + self.config.stale_grace
        if self._clock() - self._contact > limit:
            raise DirectoryUnavailable(f"LDAP unreachable for more than {limit:g}s: "
                                       f"{self._error}")
        return snapshot

    # -- read-through -------------------------------------------------------------------
    reads_through = True  # a key id missing from the copy may exist: ask (fresh_for_key)

    def fresh_for_key(self, key_id: str) -> Directory:
        """The copy, brought up to date first when it lacks ``key_id`` and LDAP has it.

        Blocks for at most one LDAP search and one refresh (call it off the event loop).
        The copy it returns still lacks ``key_id`` when LDAP has no such key (now, or
        within ``negative_cache``). Raises ``DirectoryUnavailable`` when LDAP cannot be
        asked: unreachable, or over the ``read_through_per_second`` budget.
        """
        snapshot = self.snapshot()
        if key_id in snapshot.keys:
            return snapshot
        now = self._clock()
        with self._gate:
            if self._absent.get(key_id, 0.0) > now:
                return snapshot
            rate = float(self.config.read_through_per_second)
            self._tokens = min(rate, self._tokens + (now - self._tokens_at) * rate)
            self._tokens_at = now
            if self._tokens < 1.0:
                raise DirectoryUnavailable(
                    f"more than {self.config.read_through_per_second} logins per second with "
                    "key ids not in this copy (directory.ldap.read_through_per_second); "
                    "answering temporarily")
            self._tokens -= 1.0
        if not self._key_in_ldap(key_id):
            with self._gate:
                if len(self._absent) >= _ABSENT_LIMIT:
                    now = self._clock()
                    self._absent = {k: t for k, t in self._absent.items() if t > now}
                    while len(self._absent) >= _ABSENT_LIMIT:  # the oldest go first
                        del self._absent[next(iter(self._absent))]
                self._absent[key_id] = self._clock() + self.config.negative_cache
            return self.snapshot()
        log.info("API key %s is in LDAP but not in this copy yet: refreshing now", key_id)
        self._refresh()
        if key_id not in self.snapshot().keys:
            # written without the keyrelay CLI (krSerial did not move): read everything
            self._refresh(force=True)
        return self.snapshot()

    def _key_in_ldap(self, key_id: str) -> bool:
        """One subtree search for the key's entry, on the read-through's own connection."""
        with self._lookup_lock:
            if self._lookup_conn is None:
                self._lookup_conn = self._guarded(self.connect)
            conn = self._lookup_conn
            try:
                return bool(self._guarded(lambda: self._search_key(conn, key_id)))
            except BaseException:
                self._lookup_conn = None
                _unbind(conn)
                raise

    def _search_key(self, conn: Any, key_id: str) -> bool:
        conn.search(f"ou=keys,{self.base}",
                    f"(&(objectClass=krApiKey)(krKeyId={escape_filter_chars(key_id)}))",
                    search_scope=ldap3.LEVEL, attributes=["krKeyId"], size_limit=1)
        return any(item.get("type") == "searchResEntry" for item in conn.response or ())

    def _refresh(self, force: bool = False) -> None:
        with self._refresh_lock:
            self._refresh_now(force)

    def _refresh_now(self, force: bool = False) -> None:
        """Poll krSerial, reload when it moved; the connection is kept between polls and
        opened again only after an error. The contact time recorded is the moment the serial
        was asked for, not its answer: the copy's age counts from the moment LDAP was asked,
        so a slow answer does not lengthen how long a change may go unseen."""
        if self._poll_conn is None:
            self._poll_conn = self._guarded(self.connect)
        conn = self._poll_conn
        try:
            asked = self._clock()
            serial, _ = self._guarded(lambda: self._serial_of(conn))
            now, known = self._clock(), self._serial
            stale = now - self._loaded_at > self.config.full_reload_interval
            if force or stale or known is None or serial is None:
                self._reload(conn, now)
            elif serial != known:
                log = self._guarded(lambda: self._changed_since(conn, known))
                if log is None:
                    self._reload(conn, now)
                else:
                    self._apply(conn, *log)
            self._contact = asked
        except BaseException:
            self._poll_conn = None
            _unbind(conn)
            raise

    def _reload(self, conn: Any, now: float) -> None:
        """Everything again: the first load, every full_reload_interval, and whenever the
        change log cannot say what changed."""
        entries, serial, monitor = self._guarded(lambda: self._read_entries(conn))
        if serial is None:
            raise DirectoryUnavailable(f"LDAP base {self.base} is not a keyrelay directory yet")
        self._snapshot = Directory(self._records(entries, monitor))
        self._entries = entries
        self._serial = serial
        self._loaded_at = now

    def _apply(self, conn: Any, serial: int, monitor: bool, changed: list[str]) -> None:
        """Fetch only the entries the change log names and rebuild the copy from memory."""
        entries = dict(self._entries)
        for dn in dict.fromkeys(changed):
            found = self._guarded(lambda: self._fetch(conn, dn))  # noqa: B023 - called now
            if found is None:
                entries.pop(_dn_key(dn), None)
            else:
                entries[_dn_key(found[0])] = found
        self._snapshot = Directory(self._records(entries, monitor))
        self._entries = entries
        self._serial = serial

    def _start_refresher(self) -> None:
        if self._refresher is not None:
            return
        self._refresher = threading.Thread(target=self._run, name="keyrelay-ldap-refresh",
                                           daemon=True)
        self._refresher.start()

    def _run(self) -> None:
        while not self._stop.wait(self.config.refresh_interval):
            try:
                self._refresh()
            except DirectoryUnavailable as exc:
                self._error = str(exc)
            except Exception as exc:  # noqa: BLE001 - keep refreshing; the copy ages out
                self._error = f"internal error: {exc!r}"

    def close(self) -> None:
        self._stop.set()
        if self._poll_conn is not None:
            _unbind(self._poll_conn)
        if self._lookup_conn is not None:
            _unbind(self._lookup_conn)

    # -- writing -------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self, create: bool = True) -> Iterator[DirectoryData]:
        """Read, let the caller change the records, write the difference (module doc)."""
        conn = self._guarded(self.connect)
        try:
            data, serial = self._guarded(lambda: self._read_all(conn))
            if serial is None and not create:
                raise DirectoryUnavailable(f"LDAP base {self.base} is not a keyrelay "
                                           "directory yet")
            before = entries_of(data, self.base)
            monitor_before = data.monitor
            yield data
            after = entries_of(data, self.base)
            if before == after and data.monitor == monitor_before and serial is not None:
                return
            self._guarded(lambda: self._write(conn, serial, before, after, data.monitor))
        finally:
            _unbind(conn)

    def _write(self, conn: Any, serial: int | None, before: dict[str, Entry],
               after: dict[str, Entry], monitor: bool) -> None:

        if serial is None:
            self._initialise(conn)
            serial = 0
        try:  # compare-and-swap: fails when another writer moved the serial on
            _done(conn, conn.modify(self.base, {
                "krSerial": [(ldap3.MODIFY_DELETE, [str(serial)]),
                             (ldap3.MODIFY_ADD, [str(serial + 1)])]}), "the write")
        except (LDAPNoSuchAttributeResult, LDAPAttributeOrValueExistsResult):
            raise DirectoryConflict(
                "the directory changed while this command ran (another keyrelay command or "
                "daemon wrote to it); nothing was written: run the command again") from None
        depth = lambda dn: dn.count(",")  # noqa: E731
        changed = sorted(set(before) - set(after), key=depth, reverse=True)
        for dn in changed:
            _done(conn, conn.delete(dn), f"removing {dn}")
        for dn in sorted(after, key=depth):
            new, old = after[dn], before.get(dn)
            if old is None:
                _done(conn, conn.add(dn, attributes={k: list(v) for k, v in new.items()}),
                      f"adding {dn}")
            elif new != old:
                changes = {name: [(ldap3.MODIFY_REPLACE, list(new.get(name, ())))]
                           for name in set(new) | set(old)
                           if name != "objectClass" and new.get(name) != old.get(name)}
                _done(conn, conn.modify(dn, changes), f"changing {dn}")
            else:
                continue
            changed.append(dn)
        final = serial + 2
        log: list[tuple[str, list[str]]] = []
        expired = self._expired_changes(conn, final)
        if expired:
            log.append((ldap3.MODIFY_DELETE, expired))
        listed = ([f"{final} {dn}" for dn in changed] if len(changed) <= CHANGE_LIST_LIMIT
                  else [f"{final} *"])
        if listed:
            log.append((ldap3.MODIFY_ADD, listed))
        update: dict[str, Any] = {
            "krSerial": [(ldap3.MODIFY_REPLACE, [str(final)])],
            "krMonitor": [(ldap3.MODIFY_REPLACE, ["TRUE"] if monitor else [])]}
        if log:
            update["krChange"] = log
        _done(conn, conn.modify(self.base, update), "the end of the write")

    def _expired_changes(self, conn: Any, final: int) -> list[str]:
        """Change-log values too old to keep once the serial is ``final``."""
        conn.search(self.base, "(objectClass=*)", search_scope=ldap3.BASE,
                    attributes=["krChange"])
        values = _attrs(conn.response[0]).get("krchange") or []
        return [v for v in values
                if not v.partition(" ")[0].isdigit()
                or int(v.partition(" ")[0]) <= final - CHANGE_LOG_SERIALS]

    def record_key_use(self, used: dict[str, datetime],
                       give_up: Callable[[], bool] | None = None) -> set[str]:
        """Keys' last-used times from a daemon, written to the key entries directly; the
        ids not recorded because ``give_up()`` turned true (a stopping daemon's deadline).

        No decision reads them, so ``krSerial`` is left alone: a flush would otherwise make
        every relay node read the whole directory again. A time is only ever moved forward
        (several nodes flush the same key); keys removed meanwhile are skipped. One modify
        per key (about 8 ms each against a local slapd that syncs every write): a stopping
        daemon gives up at its deadline rather than hold up its stop.
        """
        conn = self._guarded(self.connect)
        try:
            left: set[str] = self._guarded(lambda: self._write_key_use(conn, used, give_up))
        finally:
            _unbind(conn)
        return left

    def _write_key_use(self, conn: Any, used: dict[str, datetime],
                       give_up: Callable[[], bool] | None) -> set[str]:
        ids = sorted(used)
        left = set(ids)
        for start in range(0, len(ids), 200):  # filters of a sensible size
            wanted = "".join(f"(krKeyId={escape_filter_chars(i)})" for i in ids[start:start + 200])
            conn.search(f"ou=keys,{self.base}", f"(&(objectClass=krApiKey)(|{wanted}))",
                        search_scope=ldap3.LEVEL, attributes=["krKeyId", "krLastUsed"])
            found = [(item["dn"], _attrs(item)) for item in conn.response or ()
                     if item.get("type") == "searchResEntry"]
            left -= set(ids[start:start + 200])
            for dn, attrs in found:
                if give_up is not None and give_up():
                    return left | {a["krkeyid"][0] for _, a in found}
                key_id = attrs["krkeyid"][0]
                when = used[key_id]
                values = attrs.get("krlastused") or []
                stored = values[0] if values else None
                try:
                    if stored is not None and _parse_time(stored) >= when:
                        continue
                except ValueError:
                    pass  # not as keyrelay writes it: replace it
                # delete exactly the value read, add the new one: if another node wrote a
                # time meanwhile the modify fails and that (newer or equal) time stays
                change = [(ldap3.MODIFY_DELETE, [stored])] if stored is not None else []
                change.append((ldap3.MODIFY_ADD, list(_time(when))))
                try:
                    _done(conn, conn.modify(dn, {"krLastUsed": change}), f"changing {dn}")
                except (LDAPNoSuchAttributeResult, LDAPAttributeOrValueExistsResult,
                        LDAPNoSuchObjectResult):
                    continue  # another node wrote a time, or the key is gone
        return left

    def _initialise(self, conn: Any) -> None:
        """Make the base entry a keyrelay directory and add the containers."""

        try:
            _done(conn, conn.modify(self.base, {
                "objectClass": [(ldap3.MODIFY_ADD, ["krDirectory"])],
                "krSerial": [(ldap3.MODIFY_ADD, ["0"])]}), "creating the directory")
        except (LDAPAttributeOrValueExistsResult, LDAPNoSuchAttributeResult):
            raise DirectoryConflict("another keyrelay command created the directory at the "
                                    "same time; nothing was written: run the command again"
                                    ) from None
        for name in CONTAINERS:
            with contextlib.suppress(LDAPEntryAlreadyExistsResult):
                conn.add(f"ou={name},{self.base}", attributes={
                    "objectClass": ["top", "organizationalUnit"], "ou": [name]})


def _done(conn: Any, ok: bool, what: str) -> None:
    """Raise when an operation did not succeed without raising itself: ldap3 returns False
    for a referral (a read-only replica asked to write), a size or a time limit."""
    if ok:
        return
    result = conn.result or {}
    text = " ".join(str(p) for p in (result.get("description"), result.get("message")) if p)
    referrals = result.get("referrals")
    if referrals:
        text += (f" (referral to {', '.join(referrals)}: a read-only replica; give the "
                 "keyrelay CLI a configuration whose urls list the provider first)")
    raise DirectoryUnavailable(f"LDAP refused {what}: {text or 'no reason given'}")


def _attrs(item: Mapping[str, Any]) -> dict[str, list[str]]:
    """An ldap3 response item's raw attributes, names lowercased, values decoded."""
    raw = item.get("raw_attributes", {})
    return {name.lower(): [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]
            for name, values in raw.items()}


def _reason(exc: Exception) -> str:
    description = getattr(exc, "description", None)
    message = getattr(exc, "message", None)
    text = " ".join(str(p) for p in (description, message) if p) or str(exc) or type(exc).__name__
    return text.strip()


def _unbind(conn: Any) -> None:
    with contextlib.suppress(Exception):
        conn.unbind()


if __name__ == "__main__":
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "ldap"
    folder.mkdir(exist_ok=True)
    (folder / "keyrelay.schema").write_text(schema_file())
    (folder / "keyrelay.ldif").write_text(schema_ldif())
    print(f"wrote {folder / 'keyrelay.schema'} and {folder / 'keyrelay.ldif'}")
