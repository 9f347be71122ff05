"""The LDAP directory's records as entries and back: the same records as the YAML file, one
entry each.

Layout under ``directory.ldap.base_dn`` (the base entry carries the auxiliary class
``krDirectory`` with the change serial ``krSerial`` and the directory-wide ``krMonitor``)::

    ou=accounts   krName=ACCOUNT (krAccount)
                      krName=SUBUSER,krName=ACCOUNT (krSubuser)
    ou=keys       krKeyId=ID (krApiKey)
    ou=domains    krDomain=DOMAIN (krDomain)
                      krSelector=SELECTOR,krDomain=DOMAIN (krSelector)
    ou=senders    krAddress=ADDRESS+krPrincipal=PRINCIPAL (krSender)
    ou=pools      krName=POOL (krPool)

``entries_of`` turns records into entries (what a write compares and stores);
``records_of`` turns entries as a server returns them back into records, reporting and
skipping a broken entry. Nothing here talks to a server.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, date, datetime

from ... import names, passwords
from ...errors import KeyrelayError, UserError
from ..model import (
    Account,
    Algorithm,
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
    Webhook,
)

Entry = dict[str, tuple[str, ...]]  # attribute -> values (objectClass included)
Raw = tuple[str, dict[str, list[str]]]  # an entry as read: DN, lowercased attribute -> values
CONTAINERS = ("accounts", "keys", "domains", "senders", "pools")


def ldap_time(value: datetime | None) -> tuple[str, ...]:
    if value is None:
        return ()
    value = value.astimezone(UTC)
    text = value.strftime("%Y%m%d%H%M%S")
    if value.microsecond:
        text += f".{value.microsecond:06d}"
    return (text + "Z",)


_GENERALIZED_TIME = re.compile(r"(\d{4})(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)(?:\.(\d{1,6})\d*)?Z")


def parse_time(text: str) -> datetime:
    """GeneralizedTime in UTC as keyrelay writes it (``ldap_time``); ValueError otherwise.
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
            "krRecipientsPerMessage": _opt(limits.recipients_per_message),
            "krMessagesPerDay": _opt(limits.messages_per_day),
            "krMessagesPerMonth": _opt(limits.messages_per_month)}


def _legacy(cred: LegacyLogin | None) -> dict[str, tuple[str, ...]]:
    """A principal's legacy login (the password bridge) as attributes of its own entry."""
    if cred is None:
        return {}
    return {"krLegacyUsername": (cred.username,), "krLegacyPasswordHash": (cred.password_hash,),
            "krLegacySunset": (cred.sunset.isoformat(),),
            "krLegacyCreated": ldap_time(cred.created),
            "krLegacyLastUsed": ldap_time(cred.last_used)}


def _webhook(hook: Webhook | None) -> dict[str, tuple[str, ...]]:
    """An account's webhook as attributes of its entry; the secret as it signs."""
    if hook is None:
        return {}
    return {"krWebhookUrl": (hook.url,), "krWebhookSecret": (hook.secret,),
            "krWebhookCreated": ldap_time(hook.created),
            "krWebhookUpdated": ldap_time(hook.updated)}


def _bool(value: bool) -> tuple[str, ...]:
    return ("TRUE",) if value else ()


def escape_rdn(value: str) -> str:
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
        put(f"krName={escape_rdn(acc.name)},{accounts}", ("top", "krAccount"), {
            "krName": (acc.name,), "krStatus": (str(acc.status),), "krMonitor": _bool(acc.monitor),
            "krIpAllow": tuple(str(n) for n in acc.ip_allow), "krPool": _opt(acc.pool),
            **_limits(acc.limits), "krCreated": ldap_time(acc.created),
            **_legacy(data.legacy.get(acc.name)), **_webhook(acc.webhook)})
    for sub in data.subusers.values():
        put(f"krName={escape_rdn(sub.name)},krName={escape_rdn(sub.account)},{accounts}",
            ("top", "krSubuser"), {
                "krName": (sub.name,), "krAccount": (sub.account,),
                "krStatus": (str(sub.status),), "krPool": _opt(sub.pool), **_limits(sub.limits),
                "krCreated": ldap_time(sub.created), **_legacy(data.legacy.get(sub.principal))})
    for key in data.keys.values():
        put(f"krKeyId={escape_rdn(key.key_id)},ou=keys,{base}", ("top", "krApiKey"), {
            "krKeyId": (key.key_id,), "krPrincipal": (key.principal,), "krName": (key.name,),
            "krSecretHash": (key.secret_hash,), "krScope": tuple(key.scopes),
            "krCreated": ldap_time(key.created), "krExpires": ldap_time(key.expires),
            "krRevoked": ldap_time(key.revoked), "krLastUsed": ldap_time(key.last_used)})
    for dom in data.domains.values():
        dn = f"krDomain={escape_rdn(dom.name)},ou=domains,{base}"
        put(dn, ("top", "krDomain"), {
            "krDomain": (dom.name,), "krPrincipal": (dom.owner,),
            "krDomainState": (str(dom.state),), "krGrant": tuple(dom.grants),
            "krCreated": ldap_time(dom.created), "krVerifiedAt": ldap_time(dom.verified_at),
            "krVerifiedBy": _opt(dom.verified_by),
            "krFailedChecks": (str(dom.failed_checks),) if dom.failed_checks else ()})
        for position, sel in enumerate(dom.selectors):
            put(f"krSelector={escape_rdn(sel.name)},{dn}", ("top", "krSelector"), {
                "krPosition": (str(position),),
                "krSelector": (sel.name,), "krAlgorithm": (str(sel.algorithm),),
                "krSelectorState": (str(sel.state),), "krKeyFile": (sel.key_file,),
                "krPublicKey": (sel.public_key,), "krCreated": ldap_time(sel.created),
                "krRetiringSince": ldap_time(sel.retiring_since)})
    for snd in data.senders.values():
        put(f"krAddress={escape_rdn(snd.address)}+krPrincipal={escape_rdn(snd.principal)},"
            f"ou=senders,{base}", ("top", "krSender"), {
                "krAddress": (snd.address,), "krPrincipal": (snd.principal,),
                "krCreated": ldap_time(snd.created)})
    for pool in data.pools.values():
        put(f"krName={escape_rdn(pool.name)},ou=pools,{base}", ("top", "krPool"), {
            "krName": (pool.name,), "krHelo": (pool.helo,),
            "krBind": tuple(str(a) for a in pool.bind), "krCreated": ldap_time(pool.created)})
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
        return None if value is None else parse_time(value)

    def limits(self, attrs: Mapping[str, list[str]]) -> Limits:
        def number(name: str) -> int | None:
            value = self.maybe(attrs, name)
            return None if value is None else int(value)

        return Limits(number("krMessagesPerMinute"), number("krMessagesPerHour"),
                      number("krRecipientsPerMessage"), number("krMessagesPerDay"),
                      number("krMessagesPerMonth"))

    def legacy(self, data: DirectoryData, principal: str,
               attrs: Mapping[str, list[str]]) -> None:
        """The principal's legacy login; a broken one is reported and left out (the
        principal itself stays)."""
        username = self.maybe(attrs, "krLegacyUsername")
        if username is None:
            return
        try:
            stored = passwords.checked(self.one(attrs, "krLegacyPasswordHash"))
            sunset = date.fromisoformat(self.one(attrs, "krLegacySunset"))
            data.legacy[principal] = LegacyLogin(
                principal, username, stored, sunset, self.time(attrs, "krLegacyCreated"),
                self.time(attrs, "krLegacyLastUsed"))
        except (ValueError, UserError) as exc:  # never quotes the hash
            self.problems.append(f"legacy login of {principal}: {exc}; left out")

    def webhook(self, name: str, attrs: Mapping[str, list[str]]) -> Webhook | None:
        """The account's webhook; a broken one is reported and left out (the account
        stays). A problem never quotes the secret."""
        from ...webhooks import sign, target  # here: keyrelay.webhooks imports this package

        url = self.maybe(attrs, "krWebhookUrl")
        if url is None:
            return None
        try:
            target.parse_url(url)
            secret = self.one(attrs, "krWebhookSecret")
            problem = sign.secret_problem(secret)
            if problem is not None:
                raise ValueError(f"krWebhookSecret: {problem}")
            return Webhook(url, secret, self.time(attrs, "krWebhookCreated"),
                           self.time(attrs, "krWebhookUpdated"))
        except (ValueError, UserError) as exc:
            self.problems.append(f"webhook of {name}: {exc}; left out")
            return None

    def read(self, entries: list[Raw]) -> DirectoryData:
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
                        created=self.time(attrs, "krCreated"), webhook=self.webhook(name, attrs))
                    self.legacy(data, name, attrs)
                elif "krsubuser" in classes:
                    sub = Subuser(
                        account=self.one(attrs, "krAccount"), name=self.one(attrs, "krName"),
                        status=Status(self.one(attrs, "krStatus")),
                        pool=self.maybe(attrs, "krPool"), limits=self.limits(attrs),
                        created=self.time(attrs, "krCreated"))
                    data.subusers[sub.principal] = sub
                    self.legacy(data, sub.principal, attrs)
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
                    owner = unescape_rdn(domain).lower()
                    selectors.setdefault(owner, []).append((position, Selector(
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


def records_of(entries: list[Raw], problems: list[str]) -> DirectoryData:
    """The records of ``entries`` as a server returns them (attribute names lowercased);
    each entry that cannot be read is appended to ``problems`` with its DN, and skipped."""
    return _Reader(problems).read(entries)


def unescape_rdn(value: str) -> str:
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


def dn_key(dn: str) -> str:
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
            rdns[-1].append(f"{attribute.strip().lower()}={unescape_rdn(value.strip()).lower()}")
            if char == ",":
                rdns.append([])
            part = ""
        else:
            part += char
        i += 1
    return ",".join("+".join(sorted(parts)) for parts in rdns if parts)
