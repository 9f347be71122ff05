"""The Ansible role (ansible/roles/keyrelay) run for real with ansible-playbook against
localhost (connection: local), aimed by its variables at a private Postfix configuration
folder and a private keyrelay folder pre-seeded with a site's own settings: never the
machine's /etc/postfix or systemd. keyrelay itself comes from the project's virtual
environment (keyrelay_source empty), packages, users and units are switched off.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from policyd_harness import free_port

from keyrelay.demo import BASE_MASTER_CF, make_certificate

REPO = Path(__file__).resolve().parent.parent
PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")
POSTFIX = Path("/usr/sbin/postfix")

pytestmark = pytest.mark.skipif(not PLAYBOOK.exists() or not POSTFIX.exists(),
                                reason="ansible-core and Postfix come with make test")

SITE_MAIN_CF = {  # the admin's own settings, which must survive
    "smtpd_milters": "inet:127.0.0.1:8891",  # an existing OpenDKIM
    "non_smtpd_milters": "$smtpd_milters",
    "message_size_limit": "12345678",
    "smtpd_recipient_restrictions": "permit_mynetworks, reject_unauth_destination",
}
SITE_SERVICE = "127.0.0.1:10999 inet n - n - - smtpd -o syslog_name=site-own"


def site(tmp_path: Path) -> tuple[Path, Path]:
    """(Postfix configuration folder, playbook) of a host that runs Postfix already."""
    etc, queue, data = tmp_path / "postfix", tmp_path / "queue", tmp_path / "data"
    for folder in (etc, queue / "private", data):
        folder.mkdir(parents=True)
    main = {
        "compatibility_level": "3.6", "queue_directory": str(queue),
        "data_directory": str(data), "mail_owner": "postfix", "setgid_group": "postdrop",
        "inet_interfaces": "127.0.0.1", "inet_protocols": "ipv4",
        "myhostname": "relay.site.example", "mydestination": "", **SITE_MAIN_CF,
    }
    (etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main.items()))
    (etc / "master.cf").write_text(BASE_MASTER_CF + SITE_SERVICE + "\n")
    make_certificate(tmp_path / "tls", "relay.site.example")
    variables = {
        "ansible_python_interpreter": "/usr/bin/python3",  # the host's, as on a real target
        "keyrelay_manage_packages": False, "keyrelay_manage_user": False,
        "keyrelay_manage_systemd": False,
        "keyrelay_prefix": sys.prefix, "keyrelay_source": "",
        "keyrelay_user": "root", "keyrelay_group": "root",
        "keyrelay_etc_dir": str(tmp_path / "keyrelay"),
        "keyrelay_log_dir": str(tmp_path / "log"),
        "keyrelay_postfix_config_dir": str(etc),
        "keyrelay_socket_dir": str(queue / "private"),
        "keyrelay_smtp_service": f"127.0.0.1:{free_port()}",
        "keyrelay_submission_services": [f"127.0.0.1:{free_port()}"],
        "keyrelay_submissions_services": [],
        "keyrelay_tls_chain_files": f"{tmp_path / 'tls' / 'key.pem'}, "
                                    f"{tmp_path / 'tls' / 'cert.pem'}",
        "keyrelay_limits": {"messages_per_minute": 60, "messages_per_hour": 1000,
                            "recipients_per_message": 10},
    }
    playbook = tmp_path / "site.yml"
    playbook.write_text(yaml.safe_dump([{
        "hosts": "localhost", "connection": "local", "gather_facts": False,
        "roles": ["keyrelay"], "vars": variables}]))
    return etc, playbook


def run_playbook(playbook: Path, *options: str) -> tuple[int, int, str]:
    """(exit status, tasks changed, output) of one ansible-playbook run."""
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(REPO / "ansible" / "roles"),
           "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCALHOST_WARNING": "False",
           "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run([str(PLAYBOOK), "-i", "localhost,", str(playbook), *options],
                            capture_output=True, text=True, env=env, timeout=300)
    output = result.stdout + result.stderr
    recap = re.search(r"localhost\s+:\s+ok=\d+\s+changed=(\d+)", output)
    return result.returncode, int(recap.group(1)) if recap else -1, output


def postconf(etc: Path, name: str) -> str:
    return subprocess.run(["postconf", "-c", str(etc), "-h", name], capture_output=True,
                          text=True, check=True).stdout.strip()


def test_the_role_deploys_once_then_changes_nothing_and_keeps_the_sites_settings(
        tmp_path: Path) -> None:
    etc, playbook = site(tmp_path)
    before = (etc / "main.cf").read_bytes()

    status, changed, output = run_playbook(playbook, "--check")  # a host not yet deployed
    assert status == 0, output
    assert changed > 0 and (etc / "main.cf").read_bytes() == before
    assert not (tmp_path / "keyrelay" / "keyrelay.yaml").exists()

    status, changed, output = run_playbook(playbook)
    assert status == 0 and changed > 0, output
    config = yaml.safe_load((tmp_path / "keyrelay" / "keyrelay.yaml").read_text())
    assert config["limits"]["messages_per_minute"] == 60

    status, changed, output = run_playbook(playbook)
    assert (status, changed) == (0, 0), output
    status, changed, output = run_playbook(playbook, "--check")
    assert (status, changed) == (0, 0), output

    # the site's OpenDKIM stays first on keyrelay's services, keyrelay's milter comes after
    assert postconf(etc, "keyrelay_submission_milters") == "inet:127.0.0.1:8891, $keyrelay_milter"
    assert postconf(etc, "keyrelay_milter") == "unix:private/keyrelay-milter"
    assert postconf(etc, "smtpd_milters") == "inet:127.0.0.1:8891"  # the site's own, as it was
    assert postconf(etc, "message_size_limit") == "12345678"
    assert SITE_SERVICE.split()[0] in (etc / "master.cf").read_text()
    check = subprocess.run([str(POSTFIX), "-c", str(etc), "check"], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stderr


def test_a_changed_variable_is_applied_on_the_next_run(tmp_path: Path) -> None:
    _, playbook = site(tmp_path)
    assert run_playbook(playbook)[0] == 0
    play = yaml.safe_load(playbook.read_text())
    play[0]["vars"]["keyrelay_monitor_mode"] = True
    playbook.write_text(yaml.safe_dump(play))

    status, changed, output = run_playbook(playbook)

    assert status == 0 and changed == 1, output  # keyrelay.yaml only; Postfix unchanged
    config = yaml.safe_load((tmp_path / "keyrelay" / "keyrelay.yaml").read_text())
    assert config["monitor_mode"] is True
