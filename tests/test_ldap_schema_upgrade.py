"""An LDAP base loaded with the schema of a release before the quotas (issue 21) keeps working
with this release, and ``ldap/keyrelay-upgrade.ldif`` upgrades it in place on a real slapd
(docs/ldap.md, "Upgrading the schema")."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from test_yaml_directory import build_rich_directory

from keyrelay import admin, passwords
from keyrelay.config import parse_config
from keyrelay.directory import DirectoryData, open_directory
from keyrelay.directory.ldap import schema
from keyrelay.directory.model import Limits
from keyrelay.errors import DirectoryUnavailable
from keyrelay.webhooks import records, sign
from testkit.slapd import KEYRELAY_INDEXES, SLAPD, Slapd

ROOT = Path(__file__).resolve().parent.parent
QUOTA_ATTRIBUTES = ("krMessagesPerDay", "krMessagesPerMonth")


LEGACY_ATTRIBUTES = ("krLegacyUsername", "krLegacyPasswordHash", "krLegacySunset",
                     "krLegacyCreated", "krLegacyLastUsed")
WEBHOOK_ATTRIBUTES = ("krWebhookUrl", "krWebhookSecret", "krWebhookCreated", "krWebhookUpdated")


def earlier_schema(left_out: tuple[str, ...] = (QUOTA_ATTRIBUTES + LEGACY_ATTRIBUTES
                                                + WEBHOOK_ATTRIBUTES)) -> str:
    """keyrelay.ldif as the release before the quotas wrote it: without their attributes
    (nor those of the password bridge, which came later)."""
    attributes = [a for a in schema.ATTRIBUTES if a.name not in left_out]
    classes = [replace(c, may=tuple(m for m in c.may if m not in left_out))
               for c in schema.OBJECT_CLASSES]
    text = schema.schema_ldif()
    lines = [line for line in text.splitlines() if not line.startswith(
        ("olcAttributeTypes:", "olcObjectClasses:"))]
    lines += [f"olcAttributeTypes: {schema._attribute_text(a)}" for a in attributes]
    lines += [f"olcObjectClasses: {schema._class_text(c)}" for c in classes]
    return "\n".join(lines) + "\n"


@pytest.fixture
def old_slapd(tmp_path: Path) -> Iterator[Slapd]:
    if not SLAPD.exists():
        pytest.skip("slapd is not installed (make test installs it)")
    ldif = tmp_path / "keyrelay-earlier.ldif"
    ldif.write_text(earlier_schema(), encoding="utf-8")
    assert "krMessagesPerDay" not in ldif.read_text(encoding="utf-8")
    with Slapd(schemas=[ldif], indexes=KEYRELAY_INDEXES) as server:
        yield server


def _without_quotas(data: DirectoryData) -> None:
    for pid in list(data.principals()):
        own = admin.own_limits(data, pid)
        admin.set_limits(data, pid, replace(own, messages_per_day=None, messages_per_month=None))


def test_an_earlier_schema_keeps_working_and_the_upgrade_ldif_adds_the_quotas(
        old_slapd: Slapd, tmp_path: Path) -> None:
    config = parse_config({"directory": old_slapd.directory_config()},
                          str(tmp_path / "keyrelay.yaml"))
    with open_directory(config).transaction() as data:
        build_rich_directory(data)
        _without_quotas(data)
    assert open_directory(config).load() == data  # read and written as before

    # a quota needs the new attribute: refused by slapd, nothing half-written
    with pytest.raises(DirectoryUnavailable, match=r"keyrelay-upgrade\.ldif"), \
            open_directory(config).transaction() as changed:
        admin.change_limits(changed, "acme", {"messages_per_day": 1000})
    assert open_directory(config).load() == data
    # so does a legacy login (the password bridge)
    with pytest.raises(DirectoryUnavailable, match=r"keyrelay-upgrade\.ldif"), \
            open_directory(config).transaction() as changed:
        admin.set_legacy_login(changed, "acme", "acme", passwords.hash_plaintext("pw"),
                               date(2027, 1, 31), datetime(2026, 12, 1, tzinfo=UTC))
    assert open_directory(config).load() == data
    # so does a webhook (issue 25)
    with pytest.raises(DirectoryUnavailable, match=r"keyrelay-upgrade\.ldif"), \
            open_directory(config).transaction() as changed:
        records.set_webhook(changed, "acme", "https://hooks.example.com/in",
                            datetime(2026, 12, 1, tzinfo=UTC), sign.new_secret())
    assert open_directory(config).load() == data

    # the upgrade, as docs/ldap.md gives it: the schema entry's DN found with ldapsearch, put
    # in the dn: line (there with sed), ldapmodify (here over ldaps as cn=config's admin
    # rather than as root over ldapi)
    bind = ["-x", "-H", old_slapd.ldaps_url, "-D", old_slapd.config_admin_dn,
            "-y", str(_password_file(tmp_path, old_slapd.admin_password))]
    env = {**os.environ, "LDAPTLS_CACERT": str(old_slapd.ca_file)}
    found = subprocess.run(
        ["ldapsearch", "-LLL", *bind, "-b", "cn=schema,cn=config", "(cn=*keyrelay)", "dn"],
        env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    (dn,) = [line.removeprefix("dn: ") for line in found.splitlines() if line.startswith("dn:")]
    assert dn.endswith("keyrelay,cn=schema,cn=config") and dn.startswith("cn={"), dn
    upgrade = (ROOT / "ldap" / "keyrelay-upgrade.ldif").read_text(encoding="utf-8")
    assert upgrade.count("\ndn: cn={N}keyrelay,cn=schema,cn=config\n") == 1
    done = subprocess.run(
        ["ldapmodify", *bind], input=upgrade.replace("cn={N}keyrelay,", dn.split(",")[0] + ","),
        env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr

    with open_directory(config).transaction() as changed:
        admin.change_limits(changed, "acme", {"messages_per_day": 1000})
        admin.change_limits(changed, "acme/marketing", {"messages_per_month": 30_000})
        # the password bridge's attributes (issue 24) come with the same upgrade
        admin.set_legacy_login(changed, "acme/marketing", "mkt", passwords.hash_plaintext("pw"),
                               date(2027, 1, 31), datetime(2026, 12, 1, tzinfo=UTC))
        # and the webhook's (issue 25)
        hook = records.set_webhook(changed, "acme", "https://hooks.example.com/in",
                                   datetime(2026, 12, 1, tzinfo=UTC), sign.new_secret())
    loaded = open_directory(config).load()
    assert loaded.accounts["acme"].webhook == hook
    assert loaded.legacy["acme/marketing"].username == "mkt"
    assert loaded.accounts["acme"].limits.messages_per_day == 1000
    assert loaded.subusers["acme/marketing"].limits == replace(
        data.subusers["acme/marketing"].limits, messages_per_month=30_000)
    assert loaded.accounts["beta"].limits == Limits()


def _password_file(folder: Path, password: str) -> Path:
    path = folder / "config-admin.pw"
    path.write_text(password, encoding="utf-8")  # -y reads the whole file, no newline
    path.chmod(0o600)
    return path
