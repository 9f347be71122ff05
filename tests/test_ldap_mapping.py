"""The LDAP backend's mapping between records and entries, without a server; and the generated
schema files. (The backend against a real slapd: tests/test_directory_ldap.py.)"""

from __future__ import annotations

import re
from pathlib import Path

from test_yaml_directory import build_rich_directory

from keyrelay.directory.ldap import mapping, schema
from keyrelay.directory.ldap.mapping import entries_of, records_of
from keyrelay.directory.ldap.schema import ATTRIBUTES, OBJECT_CLASSES
from keyrelay.directory.model import DirectoryData

ROOT = Path(__file__).resolve().parent.parent
BASE = "ou=keyrelay,dc=example,dc=net"


def as_server_returns(entries: dict[str, dict[str, tuple[str, ...]]]
                      ) -> list[tuple[str, dict[str, list[str]]]]:
    """What a search returns: attribute names in any case (lowercased here), lists."""
    return [(dn, {name.lower(): list(values) for name, values in attrs.items()})
            for dn, attrs in entries.items()]


def test_every_record_survives_entries_and_back() -> None:
    data = DirectoryData()
    build_rich_directory(data)
    problems: list[str] = []
    back = records_of(as_server_returns(entries_of(data, BASE)), problems)
    back.monitor = data.monitor  # kept on the base entry, not in the records
    assert problems == []
    assert back == data
    assert len(back.keys) == 4 and len(back.domains["example.com"].selectors) == 3


def test_entries_never_hold_the_key_secret_and_dns_are_escaped() -> None:
    data = DirectoryData()
    build_rich_directory(data)
    entries = entries_of(data, BASE)
    hashes = {k.secret_hash for k in data.keys.values()}
    stored = {v for attrs in entries.values() for v in attrs.get("krSecretHash", ())}
    assert stored == hashes
    sender_dns = [dn for dn in entries if dn.startswith("krAddress=")]
    assert sender_dns and all("+krPrincipal=" in dn for dn in sender_dns)
    assert mapping.escape_rdn("a+b,c") == "a\\+b\\,c"
    assert mapping.unescape_rdn("a\\+b\\,c") == "a+b,c"


def test_a_broken_entry_is_reported_and_skipped_not_fatal() -> None:
    data = DirectoryData()
    build_rich_directory(data)
    found = as_server_returns(entries_of(data, BASE))
    broken_dn, broken = next((dn, a) for dn, a in found if "krapikey" in
                             {c.lower() for c in a["objectclass"]})
    del broken["krsecrethash"]
    problems: list[str] = []
    back = records_of(found, problems)
    assert len(back.keys) == len(data.keys) - 1
    assert problems == [f"{broken_dn}: missing krSecretHash"]


def test_times_keep_microseconds_and_time_zone() -> None:
    from datetime import UTC, datetime

    when = datetime(2026, 11, 28, 15, 4, 5, 123456, tzinfo=UTC)
    (text,) = mapping.ldap_time(when)
    assert text == "20261128150405.123456Z"
    assert mapping.parse_time(text) == when
    assert mapping.parse_time("20261128150405Z") == when.replace(microsecond=0)


def test_schema_files_are_generated_from_the_module(tmp_path: Path) -> None:
    assert (ROOT / "ldap" / "keyrelay.schema").read_text() == schema.schema_file()
    assert (ROOT / "ldap" / "keyrelay.ldif").read_text() == schema.schema_ldif()
    assert (ROOT / "ldap" / "keyrelay-upgrade.ldif").read_text() == schema.schema_upgrade_ldif()
    # what `python -m keyrelay.directory.ldap` writes (here into a scratch folder)
    written = schema.write_files(tmp_path / "ldap")
    assert [p.name for p in written] == ["keyrelay.schema", "keyrelay.ldif",
                                         "keyrelay-upgrade.ldif"]
    assert [p.read_text() for p in written] == [schema.schema_file(), schema.schema_ldif(),
                                                schema.schema_upgrade_ldif()]


def test_schema_oids_are_unique_and_classes_use_known_attributes() -> None:
    oids = re.findall(r"\( (2\.25\.\d+\.\d+\.\d+) ", schema.schema_file())
    assert len(oids) == len(set(oids)) == len(ATTRIBUTES) + len(OBJECT_CLASSES)
    known = {a.name for a in ATTRIBUTES}
    for cls in OBJECT_CLASSES:
        assert set(cls.must) | set(cls.may) <= known, cls.name
    # every attribute a record writes is in the schema
    data = DirectoryData()
    build_rich_directory(data)
    used = {name for attrs in entries_of(data, BASE).values() for name in attrs}
    assert used - {"objectClass"} <= known


def test_schema_descriptions_hold_no_quote_slapd_would_stop_at() -> None:
    for a in ATTRIBUTES:
        assert "'" not in a.description, a.name
    for c in OBJECT_CLASSES:
        assert "'" not in c.description, c.name
