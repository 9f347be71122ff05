"""The LDAP directory's schema: one table of attributes and object classes, from which
``ldap/keyrelay.schema`` (slapd.conf) and the cn=config ``ldap/keyrelay.ldif`` are generated
(``python -m keyrelay.directory.ldap`` writes both; tests/test_ldap_mapping.py checks that
the files in the repository match). docs/ldap.md explains loading them, indexes and ACLs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
    Attribute(36, "krMessagesPerDay", _INT, True, "recipients per calendar day (a quota)"),
    Attribute(37, "krMessagesPerMonth", _INT, True, "recipients per calendar month (a quota)"),
    Attribute(38, "krLegacyUsername", _TEXT, True,
              "old login name of a principal (the password bridge), as applications send it"),
    Attribute(39, "krLegacyPasswordHash", _EXACT, True,
              "{SCHEME}hash of the old password of a principal (never the password)"),
    Attribute(40, "krLegacySunset", _IA5, True, "last day (YYYY-MM-DD, UTC) the old login works"),
    Attribute(41, "krLegacyCreated", _TIME, True, "when the old login was imported"),
    Attribute(42, "krLegacyLastUsed", _TIME, True, "when the old login was last used"),
    Attribute(43, "krWebhookUrl", _EXACT, True,
              "URL the delivery events of an account are POSTed to"),
    Attribute(44, "krWebhookSecret", _EXACT, True,
              "secret that signs the webhook deliveries of an account (keep it from readers)"),
    Attribute(45, "krWebhookCreated", _TIME, True, "when the webhook of an account was set"),
    Attribute(46, "krWebhookUpdated", _TIME, True,
              "when the URL or secret of the webhook of an account last changed"),
]

_WEBHOOK = ("krWebhookUrl", "krWebhookSecret", "krWebhookCreated", "krWebhookUpdated")

_LEGACY = ("krLegacyUsername", "krLegacyPasswordHash", "krLegacySunset", "krLegacyCreated",
           "krLegacyLastUsed")

_LIMITS = ("krMessagesPerMinute", "krMessagesPerHour", "krRecipientsPerMessage",
           "krMessagesPerDay", "krMessagesPerMonth")


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
                ("krMonitor", "krIpAllow", "krPool", *_LIMITS, "krCreated", *_LEGACY,
                 *_WEBHOOK),
                "a tenant"),
    ObjectClass(3, "krSubuser", "STRUCTURAL", ("krName", "krAccount", "krStatus"),
                ("krPool", *_LIMITS, "krCreated", *_LEGACY), "a subuser of an account"),
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
    "keyrelay directory schema, generated by `python -m keyrelay.directory.ldap` from\n"
    "keyrelay/directory/ldap/schema.py; docs/ldap.md explains loading it, indexes and ACLs.\n"
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


def schema_upgrade_ldif() -> str:
    """The schema as a change of a cn=config schema entry loaded before (``ldapmodify -Y
    EXTERNAL -H ldapi:/// -f``): every attribute type and object class replaced by this
    release's. Only ever adds (a new attribute, a new MAY): the entries stay valid. Checked
    on a real slapd by tests/test_ldap_schema_upgrade.py."""
    lines = ["# " + line for line in _SCHEMA_HEADER.splitlines()]
    lines += ["# Upgrades a keyrelay schema loaded from an earlier keyrelay.ldif in place.",
              "# slapd names the loaded entry cn={N}keyrelay: put its DN in the dn: line",
              "# (docs/ldap.md, \"Upgrading the schema\", does it with ldapsearch and sed).",
              "dn: cn={N}keyrelay,cn=schema,cn=config", "changetype: modify",
              "replace: olcAttributeTypes"]
    lines += [f"olcAttributeTypes: {_attribute_text(a)}" for a in ATTRIBUTES]
    lines += ["-", "replace: olcObjectClasses"]
    lines += [f"olcObjectClasses: {_class_text(c)}" for c in OBJECT_CLASSES]
    lines += ["-"]
    return "\n".join(lines) + "\n"


def write_files(folder: Path) -> list[Path]:
    """Write ``keyrelay.schema``, ``keyrelay.ldif`` and ``keyrelay-upgrade.ldif`` into
    ``folder``; the paths written."""
    folder.mkdir(exist_ok=True)
    written = [folder / "keyrelay.schema", folder / "keyrelay.ldif",
               folder / "keyrelay-upgrade.ldif"]
    written[0].write_text(schema_file())
    written[1].write_text(schema_ldif())
    written[2].write_text(schema_upgrade_ldif())
    return written
