"""The password bridge's credential (issue 24, section 2): the hash schemes keyrelay/passwords.py
verifies, the YAML directory format that carries a legacy login, a declaration that gives one,
and export/import that keep it. No plaintext password in a file, an error or a repr."""

from __future__ import annotations

import json
import re
import warnings
from datetime import UTC, date, datetime
from pathlib import Path

import argon2
import bcrypt
import pytest
from argon2.low_level import Type
from test_sync import declare, sync
from test_yaml_directory import run_cli, write_config

from keyrelay import admin, passwords
from keyrelay.directory import YamlDirectory
from keyrelay.directory.model import DirectoryData, LegacyLogin
from keyrelay.directory.yamlfile import parse_text, render
from keyrelay.errors import ConfigError, UserError

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from passlib.hash import sha256_crypt, sha512_crypt

__all__ = ["dovecot_hashes", "sha256_crypt", "sha512_crypt"]

SECRET = "Tr0ub4dor&3-old-app-password"
NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def dovecot_hashes(password: str) -> dict[str, str]:
    """The same password in each scheme, as Dovecot's ``doveadm pw`` writes them."""
    blf = bcrypt.hashpw(password.encode(), bcrypt.gensalt(5)).decode().replace("$2b$", "$2y$", 1)
    return {
        "SHA512-CRYPT": "{SHA512-CRYPT}" + sha512_crypt.using(rounds=5000).hash(password),
        "SHA256-CRYPT": "{SHA256-CRYPT}" + sha256_crypt.using(rounds=5000).hash(password),
        "BLF-CRYPT": "{BLF-CRYPT}" + blf,
        "ARGON2ID": "{ARGON2ID}" + argon2.PasswordHasher(type=Type.ID).hash(password),
        "ARGON2I": "{ARGON2I}" + argon2.PasswordHasher(type=Type.I).hash(password),
    }


@pytest.mark.parametrize("scheme", list(passwords.SCHEMES))
def test_each_dovecot_scheme_verifies_the_right_password_only(scheme: str) -> None:
    stored = dovecot_hashes(SECRET)[scheme]
    assert passwords.scheme_of(stored) == scheme
    assert passwords.verify(stored, SECRET)
    assert not passwords.verify(stored, SECRET + "x")
    assert not passwords.verify(stored, "")


def test_a_plaintext_secret_is_hashed_with_argon2id() -> None:
    stored = passwords.hash_plaintext(SECRET)
    assert stored.startswith("{ARGON2ID}$argon2id$") and SECRET not in stored
    assert passwords.verify(stored, SECRET) and not passwords.verify(stored, "wrong")


@pytest.mark.parametrize("stored", [
    "{PLAIN}" + SECRET, "{CRYPT}ab" + SECRET, SECRET, "{SHA512-CRYPT}" + SECRET,
])
def test_an_unusable_hash_is_refused_without_quoting_it(stored: str) -> None:
    with pytest.raises(UserError) as caught:
        passwords.checked(stored)
    assert SECRET not in str(caught.value)
    # never verified, and never taken for a wrong password: a hash that cannot be checked
    # is our fault (a temporary answer, no guess counted)
    with pytest.raises(passwords.HashUnusable) as unusable:
        passwords.verify(stored, SECRET)
    assert SECRET not in str(unusable.value)


@pytest.mark.parametrize("scheme", list(passwords.SCHEMES))
def test_a_damaged_stored_hash_is_unusable_not_a_wrong_password(scheme: str) -> None:
    stored = dovecot_hashes(SECRET)[scheme]
    damaged = stored[:-5] if scheme != "SHA512-CRYPT" else "{SHA512-CRYPT}$6$zz"
    if scheme.startswith("ARGON2"):  # parameters no machine can meet
        damaged = stored.replace("m=65536", "m=4294967295").replace("m=102400", "m=4294967295")
    with pytest.raises(passwords.HashUnusable) as caught:
        passwords.verify(damaged, SECRET)
    assert damaged.partition("}")[2] not in str(caught.value)
    assert not passwords.verify(stored, SECRET + "x")  # a real mismatch stays False


def _data_with_login() -> tuple[DirectoryData, str]:
    data = DirectoryData()
    admin.add_account(data, "acme", NOW)
    admin.add_subuser(data, "acme/app1", NOW)
    stored = dovecot_hashes(SECRET)["SHA512-CRYPT"]
    admin.set_legacy_login(data, "acme/app1", "app1@example.com", stored, date(2027, 3, 31), NOW)
    return data, stored


def test_the_yaml_directory_carries_a_legacy_login_and_its_repr_hides_the_hash() -> None:
    data, stored = _data_with_login()
    admin.record_legacy_use(data, {"acme/app1": NOW})
    text = render(data)
    assert stored in text and SECRET not in text
    back = parse_text(text, "directory.yaml")
    assert back == data
    cred = back.legacy["acme/app1"]
    assert (cred.username, cred.sunset, cred.last_used) == (
        "app1@example.com", date(2027, 3, 31), NOW)
    assert stored.partition("}")[2] not in repr(cred) and "$6$" not in repr(cred)
    assert cred.days_left(NOW) == 117


def test_a_directory_without_legacy_logins_is_written_as_before() -> None:
    data, _ = _data_with_login()
    del data.legacy["acme/app1"]
    assert "legacy_login" not in render(data)


def test_a_bad_hash_in_the_directory_file_is_one_line_without_the_hash() -> None:
    data, stored = _data_with_login()
    text = render(data).replace(stored, "{PLAIN}" + SECRET)
    with pytest.raises(ConfigError) as caught:
        parse_text(text, "directory.yaml")
    message = str(caught.value)
    assert "accounts.acme.subusers.app1.legacy_login.password_hash" in message
    assert "PLAIN" in message and SECRET not in message


def test_two_principals_cannot_share_a_legacy_username() -> None:
    data, stored = _data_with_login()
    admin.add_subuser(data, "acme/app2", NOW)
    with pytest.raises(UserError, match="already belongs to acme/app1"):
        admin.set_legacy_login(data, "acme/app2", "app1@example.com", stored,
                               date(2027, 3, 31), NOW)


def test_removing_the_principal_removes_its_legacy_login() -> None:
    data, _ = _data_with_login()
    admin.remove_subuser(data, "acme/app1")
    assert data.legacy == {}


def test_a_declaration_gives_a_legacy_login_and_a_second_sync_keeps_its_last_use(
        tmp_path: Path) -> None:
    config = write_config(tmp_path)
    stored = dovecot_hashes(SECRET)["BLF-CRYPT"]
    content = {"accounts": {"acme": {"subusers": {"app1": {"legacy_login": {
        "username": "app1", "password_hash": stored, "sunset": "2027-03-31"}}}}}}
    path = declare(tmp_path, content)
    made = sync(config, path)
    assert "add legacy login acme/app1" in made and SECRET not in made
    directory = YamlDirectory(str(tmp_path / "directory.yaml"))
    with directory.transaction() as data:
        admin.record_legacy_use(data, {"acme/app1": NOW})
    assert sync(config, path).startswith("Nothing to do")
    cred = directory.load().legacy["acme/app1"]
    assert cred == LegacyLogin("acme/app1", "app1", stored, date(2027, 3, 31),
                               cred.created, NOW)


def test_a_declared_legacy_login_with_a_plaintext_password_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    content = {"accounts": {"acme": {"legacy_login": {
        "username": "acme", "password_hash": SECRET, "sunset": "2027-03-31"}}}}
    result = run_cli(config, "sync", str(declare(tmp_path, content)))
    assert result.returncode == 1
    assert "accounts.acme.legacy_login.password_hash" in result.stderr
    assert SECRET not in result.stderr + result.stdout
    assert not (tmp_path / "directory.yaml").exists()


def test_export_and_import_keep_the_legacy_login(tmp_path: Path) -> None:
    source = write_config(tmp_path)
    data, stored = _data_with_login()
    with YamlDirectory(str(tmp_path / "directory.yaml")).transaction() as written:
        admin.replace_all(written, data)
    exported = tmp_path / "export.yaml"
    assert run_cli(source, "export", "--output", str(exported)).returncode == 0
    assert stored in exported.read_text()
    target_dir = tmp_path / "b"
    target_dir.mkdir()
    target = write_config(target_dir)
    done = run_cli(target, "import", str(exported))
    assert done.returncode == 0, done.stderr
    assert YamlDirectory(str(target_dir / "directory.yaml")).load().legacy == data.legacy


def test_legacy_list_sunset_and_remove(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    stored = dovecot_hashes(SECRET)["ARGON2ID"]
    content = {"accounts": {"acme": {"subusers": {
        "app1": {"legacy_login": {"username": "app1@example.com", "password_hash": stored,
                                  "sunset": "2099-12-31"}},
        "app2": {"legacy_login": {"username": "app2", "password_hash": stored,
                                  "sunset": "2099-12-31"}}}}}}
    sync(config, declare(tmp_path, content))

    listed = run_cli(config, "legacy", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["PRINCIPAL", "USERNAME", "SUNSET", "DAYS", "LEFT", "LAST", "USED"]
    assert lines[1].split()[:3] == ["acme/app1", "app1@example.com", "2099-12-31"]
    assert lines[1].split()[-1] == "never"
    as_json = json.loads(run_cli(config, "legacy", "list", "--json").stdout)
    assert [(e["principal"], e["scheme"], e["last_used"]) for e in as_json] == [
        ("acme/app1", "ARGON2ID", None), ("acme/app2", "ARGON2ID", None)]
    assert as_json[0]["days_left"] > 20000
    assert stored not in listed.stdout + json.dumps(as_json)

    ended = run_cli(config, "legacy", "sunset", "acme/app1", "2020-01-01")
    assert (ended.returncode, ended.stderr) == (0, ""), ended
    assert "ended now: password logins are refused from now on" in ended.stdout
    assert "ended" in run_cli(config, "legacy", "list").stdout.splitlines()[1]
    moved = run_cli(config, "legacy", "sunset", "--all", "2098-01-31")
    assert "Sunset of 2 legacy login(s) set to 2098-01-31" in moved.stdout
    data = YamlDirectory(str(tmp_path / "directory.yaml")).load()
    assert {c.sunset for c in data.legacy.values()} == {date(2098, 1, 31)}

    removed = run_cli(config, "legacy", "remove", "acme/app2")
    assert removed.returncode == 0 and "keyrelay key create acme/app2" in removed.stdout
    again = run_cli(config, "legacy", "remove", "acme/app2")
    assert (again.returncode, again.stderr.strip()) == (
        1, "keyrelay: error: acme/app2 has no legacy password login")
    bad = run_cli(config, "legacy", "sunset", "acme/app1", "tomorrow")
    assert bad.returncode == 2 and "expected a date YYYY-MM-DD" in bad.stderr
    assert set(YamlDirectory(str(tmp_path / "directory.yaml")).load().legacy) == {"acme/app1"}


def test_a_password_hash_that_is_not_a_string_is_refused_without_its_value() -> None:
    data, _ = _data_with_login()
    text = re.sub(r'"password_hash": "[^"]*"', '"password_hash": 987654321', render(data))
    with pytest.raises(ConfigError) as caught:
        parse_text(text, "directory.yaml")
    assert "password_hash" in str(caught.value) and "987654321" not in str(caught.value)
