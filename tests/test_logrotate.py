"""postfix-conf/logrotate/keyrelay, run by the real logrotate on a copy whose path points at a
temporary folder (``logrotate -f -s STATEFILE CONF``).

The copy owns its files as the user and group running the test instead of root:keyrelay (this
host need not have a keyrelay group); tests/test_deb.py runs the installed file unchanged, at
its real path, in a scratch root where the package made that group.
"""

from __future__ import annotations

import grp
import gzip
import os
import pwd
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "postfix-conf" / "logrotate" / "keyrelay"
LOGROTATE = shutil.which("logrotate", path="/usr/sbin:/usr/bin:/sbin:/bin")

pytestmark = pytest.mark.skipif(LOGROTATE is None,
                                reason="logrotate is not installed (make test installs it)")


def copy_for(folder: Path) -> Path:
    """The shipped file with /var/log/keyrelay as ``folder`` and root:keyrelay as us."""
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    text = SHIPPED.read_text()
    assert "/var/log/keyrelay/*.log {" in text
    assert "create 0640 root keyrelay" in text and "su root keyrelay" in text
    text = (text.replace("/var/log/keyrelay/", f"{folder}/")
                .replace("root keyrelay", f"{user} {group}"))
    conf = folder.parent / "keyrelay.logrotate"
    conf.write_text(text)
    return conf


def rotate(conf: Path) -> None:
    assert LOGROTATE is not None
    result = subprocess.run([LOGROTATE, "-f", "-s", str(conf.parent / "state"), str(conf)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_audit_log_is_rotated_and_a_new_one_created_0640(tmp_path: Path) -> None:
    logs = tmp_path / "log"
    logs.mkdir(mode=0o750)
    conf = copy_for(logs)
    (logs / "audit.log").write_text("first change\n")
    rotate(conf)
    assert (logs / "audit.log.1").read_text() == "first change\n"  # delaycompress
    new = (logs / "audit.log").stat()
    assert (stat.S_IMODE(new.st_mode), new.st_size) == (0o640, 0)
    (logs / "audit.log").write_text("second change\n")
    rotate(conf)
    assert (logs / "audit.log.1").read_text() == "second change\n"
    assert gzip.decompress((logs / "audit.log.2.gz").read_bytes()) == b"first change\n"


def test_an_empty_or_missing_log_is_left_alone(tmp_path: Path) -> None:
    logs = tmp_path / "log"
    logs.mkdir(mode=0o750)
    conf = copy_for(logs)
    rotate(conf)  # missingok: no log at all is no error
    (logs / "audit.log").write_text("")
    rotate(conf)  # notifempty
    assert sorted(p.name for p in logs.iterdir()) == ["audit.log"]
