"""`keyrelay init` and the one directory check that `keyrelay check-config`,
`keyrelay-policyd --check-config` and `keyrelay-milter --check-config` share: a missing
directory file (a typo in directory.path, or a new install) fails all three the same way,
naming `keyrelay init`; `init` makes the file the daemons then accept, and changes nothing
on a second run. The real programs, as an admin runs them."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent
PROGRAMS = (("keyrelay", "check-config"), ("keyrelay-policyd", "--check-config"),
            ("keyrelay-milter", "--check-config"))


def write_config(folder: Path, directory: Path, **sections: object) -> Path:
    config = folder / "keyrelay.yaml"
    config.write_text(yaml.safe_dump({
        "directory": {"path": str(directory)},
        "dkim": {"key_dir": str(folder / "dkim")},
        "logging": {"audit_log": str(folder / "audit.log")},
        **sections,
    }), encoding="utf-8")
    return config


def run(program: str, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / program), "--config", str(config), *args],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder other users can reach (pytest's tmp_path is 0700 below root)."""
    root = Path(tempfile.mkdtemp(prefix="kr-init-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_missing_directory_file_fails_all_three_checks_alike_naming_keyrelay_init(
        tmp_path: Path) -> None:
    # the bug: `keyrelay check-config` said "OK ... 0 accounts" for a typo in directory.path,
    # while both daemons refused to start on it
    typo = tmp_path / "directoy.yaml"
    config = write_config(tmp_path, typo)
    error = (f"directory.path: {typo} does not exist; create an empty directory with "
             "`keyrelay init`, or correct the path")

    for program, check in PROGRAMS:
        result = run(program, config, check)
        assert (result.returncode, result.stdout) == (1, ""), result
        assert result.stderr == f"{program}: error: {error}\n", result
    assert not typo.exists()  # a check creates nothing


def test_init_creates_an_empty_versioned_directory_that_the_daemons_user_can_read(
        shared_folder: Path) -> None:
    # the folder as a deployment sets it up: the daemons' user's (here nobody's); the CLI
    # runs as root and gives the new file and its lock to the folder's owner and group
    etc = shared_folder / "etc"
    etc.mkdir(mode=0o750)
    nobody = pwd.getpwnam("nobody")
    os.chown(etc, nobody.pw_uid, nobody.pw_gid)
    directory = etc / "directory.yaml"
    config = write_config(shared_folder, directory, policyd={"user": "nobody"},
                          milter={"user": "nobody"})

    result = run("keyrelay", config, "init")

    assert (result.returncode, result.stderr) == (0, ""), result
    assert result.stdout.startswith(f"created an empty directory {directory} (nobody:")
    document = yaml.safe_load(directory.read_text(encoding="utf-8"))
    assert document == {"version": 1, "monitor": False, "pools": {}, "accounts": {},
                        "domains": {}}
    lock = Path(f"{directory}.lock")
    for path, mode in ((directory, 0o640), (lock, 0o660)):
        st = path.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (nobody.pw_uid, nobody.pw_gid,
                                                              mode), path
    for program, check in PROGRAMS:  # every check accepts it, the daemons as user nobody
        result = run(program, config, check)
        assert result.returncode == 0, result
    audited = [json.loads(line) for line in (shared_folder / "audit.log").read_text().splitlines()]
    assert [(a["action"], a["file"]) for a in audited] == [("directory.init", str(directory))]


def test_init_on_an_existing_directory_changes_nothing_and_says_so(tmp_path: Path) -> None:
    directory = tmp_path / "directory.yaml"
    # tmp_path is root's alone: daemons running as root could read the file (no warning)
    config = write_config(tmp_path, directory, policyd={"user": "root"},
                          milter={"user": "root"})
    assert run("keyrelay", config, "init").returncode == 0
    assert run("keyrelay", config, "account", "add", "acme").returncode == 0
    before, stat_before = directory.read_bytes(), directory.stat()
    audit_before = (tmp_path / "audit.log").read_text()

    result = run("keyrelay", config, "init")

    assert (result.returncode, result.stderr) == (0, ""), result
    assert result.stdout == f"{directory} exists (1 accounts); nothing changed\n"
    after = directory.stat()
    assert directory.read_bytes() == before
    assert (after.st_ino, after.st_mtime_ns) == (stat_before.st_ino, stat_before.st_mtime_ns)
    assert (tmp_path / "audit.log").read_text() == audit_before  # nothing to audit


def test_init_refuses_an_invalid_existing_directory_as_check_config_does(
        tmp_path: Path) -> None:
    directory = tmp_path / "directory.yaml"
    directory.write_text("acounts: {}\n", encoding="utf-8")
    config = write_config(tmp_path, directory)

    init, check = run("keyrelay", config, "init"), run("keyrelay", config, "check-config")

    assert init.returncode == check.returncode == 1
    assert init.stderr == check.stderr and "acounts: unknown key" in init.stderr
    assert directory.read_text(encoding="utf-8") == "acounts: {}\n"


def test_init_warns_when_the_daemons_user_could_not_read_the_new_file(
        shared_folder: Path) -> None:
    etc = shared_folder / "etc"
    etc.mkdir(mode=0o700)  # root's alone: the new file is root's too
    directory = etc / "directory.yaml"
    config = write_config(shared_folder, directory, policyd={"user": "nobody"},
                          milter={"user": "nobody"})

    result = run("keyrelay", config, "init")

    assert result.returncode == 0 and directory.exists(), result
    assert result.stderr == (
        f"keyrelay: warning: policyd.user and milter.user nobody cannot read {directory}: "
        f"give its folder {etc} to that user's group (mode 0770: the policy daemon writes "
        "keys' last-used times there), then chgrp the file and its .lock too\n")
    refused = run("keyrelay-policyd", config, "--check-config")  # as the warning said
    assert refused.returncode == 1 and "nobody cannot read" in refused.stderr


def test_init_with_the_ldap_backend_says_what_to_do_instead(tmp_path: Path) -> None:
    config = write_config(tmp_path, tmp_path / "directory.yaml")
    settings = yaml.safe_load(config.read_text())
    settings["directory"].update(backend="ldap", ldap={
        "urls": ["ldap://127.0.0.1:9"], "base_dn": "ou=keyrelay,dc=example,dc=net"})
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")

    result = run("keyrelay", config, "init")

    assert (result.returncode, result.stdout) == (1, ""), result
    assert result.stderr.startswith("keyrelay: error: directory.backend is ldap")
    assert "docs/ldap.md" in result.stderr and "keyrelay account add" in result.stderr
    assert not (tmp_path / "directory.yaml").exists()
