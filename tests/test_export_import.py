"""``keyrelay export`` / ``keyrelay import`` with the real CLI (YAML on both sides here;
the LDAP side of the mapping is in tests/test_ldap_mapping.py and tests/test_directory_ldap.py)."""

from __future__ import annotations

import json
from pathlib import Path

from test_yaml_directory import run_cli, write_config, write_rich

from keyrelay.directory import YamlDirectory


def _config_for(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(folder)


def test_export_then_import_into_an_empty_directory_is_lossless(tmp_path: Path) -> None:
    source = _config_for(tmp_path / "a")
    written = write_rich(tmp_path / "a" / "directory.yaml")
    exported = tmp_path / "export.yaml"
    result = run_cli(source, "export", "--output", str(exported))
    assert result.returncode == 0, result.stderr
    assert exported.stat().st_mode & 0o777 == 0o600
    assert "Exported 2 accounts, 2 subusers, 4 keys" in result.stdout

    target = _config_for(tmp_path / "b")
    dry = run_cli(target, "import", str(exported), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "Dry run: would make" in dry.stdout and "add account acme" in dry.stdout
    assert not (tmp_path / "b" / "directory.yaml").exists()

    done = run_cli(target, "import", str(exported))
    assert done.returncode == 0, done.stderr
    assert YamlDirectory(str(tmp_path / "b" / "directory.yaml")).load() == written
    again = run_cli(target, "import", str(exported))
    assert "Nothing to do" in again.stdout


def test_import_replaces_what_the_file_does_not_have(tmp_path: Path) -> None:
    config = _config_for(tmp_path)
    write_rich(tmp_path / "directory.yaml")
    exported = tmp_path / "export.yaml"
    assert run_cli(config, "export", "-o", str(exported)).returncode == 0
    assert run_cli(config, "account", "add", "extra").returncode == 0
    result = run_cli(config, "import", str(exported))
    assert result.returncode == 0, result.stderr
    assert "remove account extra" in result.stdout
    listed = json.loads(run_cli(config, "account", "list", "--json").stdout)
    assert "extra" not in {a["name"] for a in listed}


def test_export_to_stdout_never_contains_a_key_secret(tmp_path: Path) -> None:
    config = _config_for(tmp_path)
    assert run_cli(config, "account", "add", "acme").returncode == 0
    created = json.loads(run_cli(config, "key", "create", "acme", "--name", "x",
                                 "--json").stdout)
    secret = created["key"].split(".")[2]
    exported = run_cli(config, "export").stdout
    assert created["key_id"] in exported
    assert secret not in exported


def test_importing_a_broken_file_names_file_key_and_reason(tmp_path: Path) -> None:
    config = _config_for(tmp_path)
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\naccounts:\n  acme:\n    status: sleepy\n")
    result = run_cli(config, "import", str(broken))
    assert result.returncode == 1
    assert result.stderr.startswith("keyrelay: error: ")
    assert str(broken) in result.stderr and "status" in result.stderr
    assert "Traceback" not in result.stderr


def test_import_warns_when_the_key_files_it_names_are_not_on_this_node(tmp_path: Path) -> None:
    source = _config_for(tmp_path / "a")
    assert run_cli(source, "account", "add", "acme").returncode == 0
    assert run_cli(source, "domain", "add", "acme", "example.com").returncode == 0
    exported = tmp_path / "export.yaml"
    assert run_cli(source, "export", "-o", str(exported)).returncode == 0
    assert "PRIVATE KEY" not in exported.read_text()
    for pem in (tmp_path / "a" / "dkim" / "example.com").iterdir():
        pem.unlink()  # the new node has no copy of the old node's keys
    result = run_cli(_config_for(tmp_path / "b"), "import", str(exported))
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("keyrelay: warning: 2 DKIM key files the directory names "
                                     "do not exist on this node (e.g. ")
    assert "keyrelay backup and restore carry them" in result.stderr
