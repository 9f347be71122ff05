"""The shipped systemd units (postfix-conf/systemd/): they parse, name programs that exist,
and are hardened, as `systemd-analyze verify` and `systemd-analyze security --offline`
judge them (no running systemd needed). The installed copies are started by hand in
tests/test_ansible.py; there the daemons are seen running as the service user with no
capabilities left."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "postfix-conf" / "systemd"
ANALYZE = shutil.which("systemd-analyze")
DAEMONS = ["keyrelay-policyd.service", "keyrelay-milter.service", "keyrelay-events.service"]
SERVICES = [*DAEMONS, "keyrelay-domain-check.service"]

pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The units as the Ansible role installs them, pointing at this virtual environment."""
    folder = tmp_path_factory.mktemp("units")
    for unit in UNITS.iterdir():
        text = unit.read_text().replace("/opt/keyrelay", sys.prefix)
        (folder / unit.name).write_text(text)
    return folder


def test_every_unit_passes_systemd_analyze_verify(installed: Path) -> None:
    units = sorted(str(p) for p in installed.iterdir())
    assert len(units) == 5
    result = subprocess.run([str(ANALYZE), "verify", *units], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", SERVICES)
def test_every_service_is_rated_ok_by_systemd_analyze_security(installed: Path,
                                                                name: str) -> None:
    result = subprocess.run([str(ANALYZE), "security", "--offline=true", "--no-pager",
                             str(installed / name)], capture_output=True, text=True)
    level = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", result.stdout)
    assert level, result.stdout + result.stderr
    # 0 is locked down, 10 fully exposed; systemd calls up to 4.9 "OK"
    assert float(level.group(1)) < 5.0, result.stdout


@pytest.mark.parametrize("name", SERVICES)
def test_every_service_has_the_hardening_the_daemons_were_tested_with(name: str) -> None:
    settings = dict(line.split("=", 1) for line in (UNITS / name).read_text().splitlines()
                    if "=" in line and not line.startswith("#"))
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "PrivateTmp": "yes", "ProtectHome": "yes",
                       "ProtectKernelTunables": "yes", "RestrictNamespaces": "yes"}.items():
        assert settings.get(key) == value, (name, key)
    assert settings["ReadWritePaths"], name  # only where it writes
    assert "CAP_SYS_ADMIN" not in settings["CapabilityBoundingSet"]
