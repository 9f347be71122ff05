"""The LDAP backend against a real slapd (fixture ``slapd``, tests/slapd_harness.py): the
same records come back, a failed transaction writes nothing, the daemons' copy follows the
CLI's changes, and a concurrent writer is refused instead of losing an update."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from policyd_harness import wait_until
from test_yaml_directory import build_rich_directory

from keyrelay import admin
from keyrelay.config import parse_config
from keyrelay.directory.ldapdir import DirectoryConflict, LdapDirectory
from keyrelay.directory.model import DirectoryData


@pytest.fixture
def ldap_dir(slapd: Any) -> LdapDirectory:
    config = parse_config({"directory": slapd.directory_config(refresh_interval=0.2)}, "t.yaml")
    directory = LdapDirectory(config.directory.ldap)
    with directory.transaction() as data:  # start every test from an empty directory
        admin.replace_all(data, DirectoryData())
    return directory


def test_every_record_round_trips_through_slapd(ldap_dir: LdapDirectory) -> None:
    with ldap_dir.transaction() as data:
        build_rich_directory(data)  # random keys: compare with what was written
    loaded = ldap_dir.load()
    assert loaded == data
    assert ldap_dir.problems == []
    assert len(loaded.keys) == 4


def test_an_exception_inside_a_transaction_writes_nothing(ldap_dir: LdapDirectory) -> None:
    with pytest.raises(RuntimeError), ldap_dir.transaction() as data:
        build_rich_directory(data)
        raise RuntimeError("stop")
    assert ldap_dir.load() == DirectoryData()


def test_the_snapshot_follows_changes_without_a_restart(ldap_dir: LdapDirectory) -> None:
    assert not ldap_dir.snapshot().has_principal("later")
    with ldap_dir.transaction() as data:
        admin.add_account(data, "later", datetime.now(UTC))
    wait_until(lambda: ldap_dir.snapshot().has_principal("later"), 10,
               "the new account in the daemons' copy")
    ldap_dir.close()


def test_a_concurrent_writer_is_refused_not_lost(ldap_dir: LdapDirectory) -> None:
    other = LdapDirectory(ldap_dir.config)
    with pytest.raises(DirectoryConflict), ldap_dir.transaction() as data:
        admin.add_account(data, "first", datetime.now(UTC))
        with other.transaction() as theirs:
            admin.add_account(theirs, "second", datetime.now(UTC))
    assert set(ldap_dir.load().accounts) == {"second"}
