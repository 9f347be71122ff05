"""README.md's deploy order ("Deploying onto an existing Postfix") run as written, as root,
in a scratch root of this host (testkit/scratchroot.py: this host's root under a tmpfs
overlay, so every write vanishes afterwards): the Debian packages, a virtual environment
from this checkout, the keyrelay user and folders, the configuration, `keyrelay init`, the
units copied and started with systemctl, `keyrelay postfix apply`; then the daemons answer.

What stands in, and why: `systemctl` is tests/systemctl_without_systemd.py (this machine has
no systemd as PID 1; it runs the units' ExecStartPre and ExecStart lines); the host's
Postfix is installed but not configured, so the test writes a site's main.cf first (the
README's precondition: an existing Postfix). Step 3's configuration is the example as it is
(every default: the daemons run as keyrelay).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from keyrelay.demo import make_certificate, unix_accepts
from testkit.net import wait_until
from testkit.protocols import DovecotClient, PolicyClient, connect, policy_request
from testkit.scratchroot import scratch_root

REPO = Path(__file__).resolve().parent.parent
STAND_IN = Path(__file__).with_name("systemctl_without_systemd.py")
DEBIAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
SOCKETS = "/var/spool/postfix/private"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1200),  # pip builds pymilter into a new virtual environment
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None
                       or not Path(SOCKETS).is_dir(),
                       reason="the scratch root needs root, unshare and Postfix's queue"),
]


def deploy_steps() -> list[str]:
    """The lines of the README's deploy block."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Deploying onto an existing Postfix\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```sh\n(.*?)```", section, re.S)
    return list(block.splitlines())


@contextmanager
def shared_folder() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="kr-readme-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_the_deploy_block_names_init_before_the_daemons_start() -> None:
    steps = deploy_steps()
    init = steps.index("keyrelay init")
    start = next(i for i, line in enumerate(steps) if line.startswith("systemctl enable --now"))
    assert init < start


def test_the_readmes_deploy_steps_work_as_written_on_a_fresh_host() -> None:
    with shared_folder() as shared, scratch_root({str(shared): shared}) as scratch:
        state, bin_dir = shared / "systemctl-state", shared / "bin"
        state.mkdir()
        bin_dir.mkdir()
        (bin_dir / "systemctl").write_text(f'#!/bin/sh\nexec {sys.executable} {STAND_IN} "$@"\n')
        (bin_dir / "systemctl").chmod(0o755)
        make_certificate(shared / "tls", "relay.site.example")
        Path(scratch.path("/etc/postfix/main.cf")).write_text(  # the site's own Postfix
            "compatibility_level = 3.6\nmyhostname = relay.site.example\n"
            "inet_interfaces = 127.0.0.1\ninet_protocols = ipv4\nmydestination =\n"
            f"smtpd_tls_chain_files = {shared / 'tls' / 'key.pem'}, "
            f"{shared / 'tls' / 'cert.pem'}\n")
        script = "\n".join(["set -e", f"cd {REPO}", *deploy_steps()])
        (shared / "deploy.sh").write_text(script + "\n")
        try:
            env = {"PATH": f"{bin_dir}:{DEBIAN_PATH}", "KR_STATE_DIR": str(state),
                   "KR_UNITS_DIR": "/etc/systemd/system", "DEBIAN_FRONTEND": "noninteractive",
                   "HOME": "/root", "LANG": "C.UTF-8"}
            deployed = scratch.run("env", "-i", *(f"{k}={v}" for k, v in env.items()),
                                   "bash", str(shared / "deploy.sh"), timeout=900)

            assert "created an empty directory /etc/keyrelay/directory.yaml" in deployed
            assert scratch.run("stat", "-c", "%U:%G %a", "/etc/keyrelay/directory.yaml") == (
                "root:keyrelay 640\n")
            sockets = Path(scratch.path(SOCKETS))
            wait_until(lambda: all(unix_accepts(sockets / f"keyrelay-{n}") for n in
                                   ("auth", "policy", "socketmap", "milter")),
                       60, "the daemons' sockets")
            with DovecotClient(connect(f"unix:{sockets}/keyrelay-auth", timeout=30)) as auth:
                assert "PLAIN" in auth.handshake()
            with PolicyClient(connect(f"unix:{sockets}/keyrelay-policy", timeout=30)) as policy:
                assert policy.ask(**policy_request(sender="a@b.example")) is not None
            uid = int(scratch.run("id", "-u", "keyrelay"))
            for unit in ("keyrelay-policyd.service", "keyrelay-milter.service"):
                pid = (state / f"{unit}.pid").read_text()
                status = Path(f"/proc/{pid}/status").read_text()
                assert re.search(rf"^Uid:\s+{uid}\s+{uid}\s+{uid}\s", status, re.M), status
            # step 6 merged keyrelay's services into the site's Postfix
            assert "keyrelay" in Path(scratch.path("/etc/postfix/main.cf")).read_text()
        finally:
            for pid_file in state.glob("*.pid"):
                scratch.run("env", f"KR_STATE_DIR={state}", "KR_UNITS_DIR=/etc/systemd/system",
                            str(bin_dir / "systemctl"), "stop", pid_file.name[:-len(".pid")])
