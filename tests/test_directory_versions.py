"""The directory file's format versions (keyrelay/directory/yamlfile.py, docs/directory.md
"Backups and upgrades").

The golden files under tests/golden/directory/ were written by the CLI of older revisions
(tests/golden/directory/make.sh says how): every file an older keyrelay wrote is read as it
is, and the next write turns it into today's form without losing anything. A newer version
is refused in one line by every program that reads the file. The upgrade path for a future
version 2 is exercised with a pretend step.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from keyrelay.directory import YamlDirectory, yamlfile
from keyrelay.directory.model import DomainState, SelectorState, Status
from keyrelay.errors import ConfigError

GOLDEN = Path(__file__).parent / "golden" / "directory"
OLD_FILES = sorted(GOLDEN.glob("v1-*.yaml"))
BIN = Path(sys.executable).parent


def test_the_golden_files_are_there() -> None:
    assert [p.name for p in OLD_FILES] == [
        "v1-41c91a7.yaml", "v1-59eca38.yaml", "v1-a32bf15.yaml"]


@pytest.mark.parametrize("golden", OLD_FILES, ids=lambda p: p.stem)
def test_a_file_an_older_keyrelay_wrote_is_read_as_it_is(golden: Path) -> None:
    data = YamlDirectory(str(golden)).load()
    assert set(data.accounts) == {"acme", "beta"}
    assert set(data.subusers) == {"acme/marketing"}
    assert data.accounts["beta"].status is Status.SUSPENDED and data.accounts["beta"].monitor
    assert [str(n) for n in data.accounts["acme"].ip_allow] == ["192.0.2.0/24"]
    assert data.accounts["acme"].limits.messages_per_minute == 60
    assert data.subusers["acme/marketing"].pool == "mkt"
    assert {k.principal for k in data.keys.values()} == {"acme", "acme/marketing"}
    assert [k.expires is None for k in sorted(data.keys.values(), key=lambda k: k.principal)] \
        == [True, False]
    assert set(data.senders) == {("acme", "alerts@example.net")}
    domain = data.domains["example.com"]
    assert domain.state is DomainState.VERIFIED and domain.verified_by == "manual"
    assert domain.grants == ("acme/marketing",) and domain.failed_checks == 0
    assert sorted(s.state for s in domain.selectors) == [
        SelectorState.ACTIVE, SelectorState.ACTIVE, SelectorState.PENDING, SelectorState.PENDING]
    assert all(s.retiring_since is None and s.key_file.startswith("/etc/keyrelay/dkim/")
               for s in domain.selectors)


@pytest.mark.parametrize("golden", OLD_FILES, ids=lambda p: p.stem)
def test_the_next_write_upgrades_an_older_file_without_losing_anything(
        golden: Path, tmp_path: Path) -> None:
    path = tmp_path / "directory.yaml"
    path.write_bytes(golden.read_bytes())
    before = YamlDirectory(str(path)).load()
    with YamlDirectory(str(path)).transaction():
        pass  # a change that changes nothing still writes the file in today's form
    assert path.read_text() == yamlfile.render(before)
    assert YamlDirectory(str(path)).load() == before


def _config(tmp_path: Path, directory: Path) -> Path:
    config = tmp_path / "keyrelay.yaml"
    config.write_text(yaml.safe_dump({
        "directory": {"path": str(directory)},
        "dkim": {"key_dir": str(tmp_path / "dkim")},
        "logging": {"audit_log": str(tmp_path / "audit.log")},
        "policyd": {"auth_listen": f"unix:{tmp_path}/auth.sock", "socket_group": "",
                    "user": "root"},
        "milter": {"listen": f"unix:{tmp_path}/milter.sock", "socket_group": "",
                   "user": "root"},  # root: the test folder is root's (0700)
    }))
    return config


def test_every_reader_refuses_a_newer_version_in_the_same_one_line(tmp_path: Path) -> None:
    directory = tmp_path / "directory.yaml"
    directory.write_text('{\n  "version": 2,\n  "accounts": {}\n}\n')
    config = _config(tmp_path, directory)
    reason = (f"{directory}:2: version: format version 2 is newer than this keyrelay (0.1.0) "
              "reads (format version 1): the file was written by a newer keyrelay; upgrade "
              "keyrelay on this host (every program that reads the file), or restore a backup "
              "this version made\n")
    for program, args in (("keyrelay", ["check-config"]), ("keyrelay", ["account", "add", "x"]),
                          ("keyrelay-policyd", ["--check-config"]),
                          ("keyrelay-milter", ["--check-config"])):
        result = subprocess.run([str(BIN / program), "--config", str(config), *args],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 1, (program, result.stdout)
        assert result.stderr == f"{program}: error: {reason}", result.stderr
    assert json.loads(directory.read_text()) == {"version": 2, "accounts": {}}  # untouched


@pytest.mark.parametrize(("text", "got"), [
    ("version: true\n", "got a boolean (true)"),
    ("version: '1'\n", "got a string ('1')"),
    ("version: 0\n", "got an integer (0)"),
    ("version: 1.5\n", "got a number (1.5)"),
])
def test_a_version_that_is_no_version_number_is_refused(
        tmp_path: Path, text: str, got: str) -> None:
    path = tmp_path / "directory.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        YamlDirectory(str(path)).load()
    assert str(caught.value) == (f"{path}:1: version: expected the format version, a whole "
                                 f"number from 1 (this keyrelay writes 1), {got}")


def test_a_file_without_a_version_is_version_1(tmp_path: Path) -> None:
    path = tmp_path / "directory.yaml"
    path.write_text("accounts:\n  acme: {}\n")
    assert set(YamlDirectory(str(path)).load().accounts) == {"acme"}


def test_a_future_version_reads_older_files_through_its_upgrade_steps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """How version 2 will work: FORMAT_VERSION 2 and a step 1 -> 2 in _UPGRADES. The pretend
    step here turns monitor mode on for the whole relay (the golden file has it off), so
    the test sees that it ran, and ran only on the version 1 file."""
    steps: list[int] = []

    def step(top: dict[str, Any]) -> dict[str, Any]:
        steps.append(top["version"])
        return {**top, "monitor": True}

    monkeypatch.setattr(yamlfile, "FORMAT_VERSION", 2)
    monkeypatch.setattr(yamlfile, "_UPGRADES", {1: step})
    path = tmp_path / "directory.yaml"
    path.write_bytes(OLD_FILES[0].read_bytes())
    assert YamlDirectory(str(path)).load().monitor is True
    with YamlDirectory(str(path)).transaction() as data:  # the next write: version 2
        data.monitor = False
    text = "".join(line for line in path.read_text().splitlines(True)
                   if not line.startswith("#"))
    assert json.loads(text)["version"] == 2
    assert YamlDirectory(str(path)).load().monitor is False  # no step for a version 2 file
    assert steps == [1, 1]  # the load, and the transaction's read; not the last load
