"""The Ansible role (ansible/roles/keyrelay) run for real with ansible-playbook against
localhost (connection: local), aimed by its variables at a private Postfix configuration
folder and a private keyrelay folder pre-seeded with a site's own settings: never the
machine's /etc/postfix or systemd. Packages and users are switched off; the systemd units
are written into a folder of the test and started by hand from their ExecStart lines.

The first tests take keyrelay from the project's virtual environment (keyrelay_source
empty); the deployment test installs it from the checkout into a new prefix, starts the
deployed instance with the site's own milter still in front and sends through it with swaks.
"""

from __future__ import annotations

import base64
import datetime
import grp
import hashlib
import json
import os
import pwd
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from email import message_from_bytes
from pathlib import Path
from typing import Any

import dkim
import pytest
import yaml

from keyrelay.demo import BASE_MASTER_CF, SMTP_SINK, greets, make_certificate, unix_accepts
from testkit.net import free_port, wait_until
from testkit.protocols import DovecotClient, PolicyClient, connect, policy_request
from testkit.redis import redis_server
from testkit.relay import as_sent
from testkit.scratchroot import scratch_root
from testkit.slapd import Slapd

REPO = Path(__file__).resolve().parent.parent
PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")
POSTFIX = Path("/usr/sbin/postfix")
SWAKS = shutil.which("swaks")
ANALYZE = shutil.which("systemd-analyze")

# setup.cfg's 300 s per test is too short here: a test runs ansible-playbook up to twice,
# each allowed 300 s (pip installs on a slow machine)
TIMEOUT = pytest.mark.timeout(1500)
pytestmark = [TIMEOUT, pytest.mark.skipif(not PLAYBOOK.exists() or not POSTFIX.exists(),
                                reason="ansible-core and Postfix come with make test")]

SITE_MILTER_PORT = free_port()
SITE_MAIN_CF = {  # the admin's own settings, which must survive
    "smtpd_milters": f"inet:127.0.0.1:{SITE_MILTER_PORT}",  # an existing OpenDKIM, say
    "non_smtpd_milters": "$smtpd_milters",
    "message_size_limit": "12345678",
    "smtpd_recipient_restrictions": "permit_mynetworks, reject_unauth_destination",
}
SITE_SERVICE = f"127.0.0.1:{free_port()} inet n - n - - smtpd -o syslog_name=site-own"
UNITS = ("keyrelay-policyd.service", "keyrelay-milter.service")
SERVICE_USER = "kr-ansible-test"


@contextmanager
def short_folder() -> Iterator[Path]:
    """A folder Postfix's unprivileged daemons can enter (pytest's tmp_path is 0700), with
    a path short enough for unix sockets inside the queue."""
    root = Path(tempfile.mkdtemp(prefix="kr-ans-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def site(root: Path, main_cf: dict[str, str] | None = None,
         **variables: Any) -> tuple[Path, Path]:
    """(Postfix configuration folder, playbook) of a host that runs Postfix already."""
    etc, queue, data = root / "postfix", root / "queue", root / "data"
    for folder in (etc, queue / "private", data):
        folder.mkdir(parents=True)
    for folder in (data, queue / "private"):  # as a Postfix host has them
        shutil.chown(folder, "postfix")
    main = {
        "compatibility_level": "3.6", "queue_directory": str(queue),
        "data_directory": str(data), "mail_owner": "postfix", "setgid_group": "postdrop",
        "inet_interfaces": "127.0.0.1", "inet_protocols": "ipv4",
        "myhostname": "relay.site.example", "mydestination": "", **SITE_MAIN_CF,
        **(main_cf or {}),
    }
    (etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main.items()))
    (etc / "master.cf").write_text(BASE_MASTER_CF + SITE_SERVICE + "\n")
    make_certificate(root / "tls", "relay.site.example")
    settings = {
        "ansible_python_interpreter": "/usr/bin/python3",  # the host's, as on a real target
        "keyrelay_manage_packages": False, "keyrelay_manage_user": False,
        "keyrelay_manage_systemd": False, "keyrelay_manage_services": False,
        "keyrelay_prefix": sys.prefix, "keyrelay_source": "",
        "keyrelay_user": "root", "keyrelay_group": "root",
        "keyrelay_etc_dir": str(root / "keyrelay"),
        "keyrelay_log_dir": str(root / "log"),
        "keyrelay_state_dir": str(root / "state"),
        "keyrelay_events_maillog": str(root / "mail.log"),
        "keyrelay_postfix_config_dir": str(etc),
        "keyrelay_socket_dir": str(queue / "private"),
        "keyrelay_smtp_service": f"127.0.0.1:{free_port()}",
        "keyrelay_submission_services": [f"127.0.0.1:{free_port()}"],
        "keyrelay_submissions_services": [],
        "keyrelay_tls_chain_files": f"{root / 'tls' / 'key.pem'}, {root / 'tls' / 'cert.pem'}",
        "keyrelay_limits": {"messages_per_minute": 60, "messages_per_hour": 1000,
                            "recipients_per_message": 10},
        **variables,
    }
    playbook = root / "site.yml"
    playbook.write_text(yaml.safe_dump([{
        "hosts": "localhost", "connection": "local", "gather_facts": False,
        "roles": ["keyrelay"], "vars": settings}]))
    return etc, playbook


def run_playbook(playbook: Path, *options: str, systemd: dict[str, str] | None = None,
                 inside: list[str] | None = None, inventory: str = "localhost,"
                 ) -> tuple[int, int, str]:
    """(exit status, tasks changed on all hosts, output) of one ansible-playbook run;
    ``systemd``: the environment of ``systemd_stand_in``, its ``systemctl`` first on PATH;
    ``inside``: the command that runs it in a scratch root (``ScratchRoot.enter``);
    ``inventory``: ansible-playbook's ``-i``."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(REPO / "ansible" / "roles"),
           "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCALHOST_WARNING": "False",
           "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False", "PATH": path}
    if systemd is not None:
        env.update(systemd, PATH=f"{systemd['PATH']}{os.pathsep}{path}")
    result = subprocess.run([*(inside or []), str(PLAYBOOK), "-i", inventory, str(playbook),
                             *options], capture_output=True, text=True, env=env, timeout=300)
    output = result.stdout + result.stderr
    recaps = re.findall(r"^\S+\s+:\s+ok=\d+\s+changed=(\d+)", output, re.M)
    return result.returncode, sum(map(int, recaps)) if recaps else -1, output


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
    assert not (tmp_path / "keyrelay" / "directory.yaml").exists()

    status, changed, output = run_playbook(playbook)
    assert status == 0 and changed > 0, output
    config = yaml.safe_load((tmp_path / "keyrelay" / "keyrelay.yaml").read_text())
    assert config["limits"]["messages_per_minute"] == 60
    assert config["milter"]["workers"] == config["policyd"]["workers"] == "auto"
    assert config["policyd"]["metrics_listen"] == config["milter"]["metrics_listen"] == ""  # off
    assert config["events"]["metrics_listen"] == ""

    status, changed, output = run_playbook(playbook)
    assert (status, changed) == (0, 0), output
    status, changed, output = run_playbook(playbook, "--check")
    assert (status, changed) == (0, 0), output

    # the site's OpenDKIM stays first on keyrelay's services, keyrelay's milter comes after
    assert postconf(etc, "keyrelay_submission_milters") == (
        f"inet:127.0.0.1:{SITE_MILTER_PORT}, $keyrelay_milter")
    assert postconf(etc, "keyrelay_milter") == "unix:private/keyrelay-milter"
    assert postconf(etc, "smtpd_milters") == SITE_MAIN_CF["smtpd_milters"]  # as it was
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


def test_a_new_host_gets_an_empty_directory_and_a_wrong_directory_path_is_refused(
        tmp_path: Path) -> None:
    # the bug: with keyrelay_directory: {} nothing ever made the directory file, so the
    # daemons could never start; and check-config, the role's validation, said OK for a
    # directory.path with a typo
    _, playbook = site(tmp_path)
    status, _, output = run_playbook(playbook)
    assert status == 0, output
    directory = tmp_path / "keyrelay" / "directory.yaml"
    assert yaml.safe_load(directory.read_text())["version"] == 1
    config = tmp_path / "keyrelay" / "keyrelay.yaml"
    deployed = config.read_bytes()
    typo = tmp_path / "keyrelay" / "directoy.yaml"
    play = yaml.safe_load(playbook.read_text())
    play[0]["vars"]["keyrelay_extra_config"] = {"directory": {"path": str(typo)}}
    playbook.write_text(yaml.safe_dump(play))

    status, _, output = run_playbook(playbook)

    assert status != 0, output
    assert (f"directory.path: {typo} does not exist; create an empty directory with "
            "`keyrelay init`, or correct the path") in output
    assert config.read_bytes() == deployed and not typo.exists()


def test_the_worker_and_metrics_variables_reach_keyrelay_yaml_and_policyd_workers_need_redis(
        tmp_path: Path) -> None:
    # milter.workers and policyd.workers from the role's variables; a number given as a string
    # (as --extra-vars gives it) is written as the number
    _, playbook = site(tmp_path, keyrelay_milter_workers=2, keyrelay_policyd_workers="1",
                       keyrelay_policyd_metrics_listen="127.0.0.1:9464",
                       keyrelay_milter_metrics_listen="[::1]:9465",
                       keyrelay_events_metrics_listen="127.0.0.1:9466",
                       keyrelay_events_source="journal",
                       keyrelay_metrics_top_accounts="20")
    status, _, output = run_playbook(playbook)
    assert status == 0, output
    config = tmp_path / "keyrelay" / "keyrelay.yaml"
    deployed = config.read_bytes()
    written = yaml.safe_load(deployed)
    assert (written["milter"]["workers"], written["policyd"]["workers"]) == (2, 1)
    # the metrics endpoints and their bound, as the daemons read them
    assert written["policyd"]["metrics_listen"] == "127.0.0.1:9464"
    assert written["milter"]["metrics_listen"] == "[::1]:9465"
    assert written["events"]["metrics_listen"] == "127.0.0.1:9466"
    assert written["events"]["source"] == "journal"
    assert written["suppressions"]["replica"] == (
        written["suppressions"]["path"].rsplit("/", 1)[0] + "/suppressions-replica.db")
    assert written["metrics"] == {"top_accounts": 20}

    # four policyd workers with the memory counters would each count on their own: the
    # validation of keyrelay.yaml (check-config) refuses it with the daemons' own line, and
    # the deployed file stays as it was
    play = yaml.safe_load(playbook.read_text())
    play[0]["vars"]["keyrelay_policyd_workers"] = 4
    playbook.write_text(yaml.safe_dump(play))
    status, _, output = run_playbook(playbook)
    assert status != 0, output
    assert re.search(r"Write keyrelay\.yaml: keyrelay: error: \S+:\d+: policyd\.workers: 4 "
                     r"workers with counters\.backend memory would each count on their own, "
                     r"multiplying every rate limit, quota and lock-out threshold by 4: use "
                     r"counters\.backend redis to run several workers", output), output
    assert config.read_bytes() == deployed


def test_a_sites_own_sasl_login_stops_the_play_unless_the_role_may_replace_it(
        tmp_path: Path) -> None:
    # the site logs its mailbox users in through Dovecot on the services keyrelay takes over
    site_sasl = {"smtpd_sasl_auth_enable": "yes", "smtpd_sasl_type": "dovecot",
                 "smtpd_sasl_path": "private/auth"}
    etc, playbook = site(tmp_path, main_cf=site_sasl)
    status, _, output = run_playbook(playbook)
    assert status != 0, output
    assert "smtpd_sasl_path" in output and "--replace-site-sasl" in output, output
    assert postconf(etc, "keyrelay_milter") == ""  # nothing applied
    # the admin lets keyrelay take those services over
    play = yaml.safe_load(playbook.read_text())
    play[0]["vars"]["keyrelay_postfix_replace_site_sasl"] = True
    playbook.write_text(yaml.safe_dump(play))
    status, _, output = run_playbook(playbook)
    assert status == 0, output
    assert postconf(etc, "keyrelay_milter") == "unix:private/keyrelay-milter"
    assert postconf(etc, "smtpd_sasl_path") == "private/auth"  # main.cf keeps the site's


@contextmanager
def systemd_stand_in(root: Path, units: str = "") -> Iterator[dict[str, str]]:
    """The environment that puts tests/systemctl_without_systemd.py first on PATH as
    ``systemctl`` (this machine has no systemd as PID 1), for the units in ``units``
    (default: root/units, made here); on the way out it stops every unit it started."""
    bin_dir, state = root / "systemctl-bin", root / "systemctl-state"
    for folder in (bin_dir, state):
        folder.mkdir()
    if not units:
        units = str(root / "units")
        Path(units).mkdir()
    stand_in = Path(__file__).with_name("systemctl_without_systemd.py")
    (bin_dir / "systemctl").write_text(f'#!/bin/sh\nexec {sys.executable} {stand_in} "$@"\n')
    (bin_dir / "systemctl").chmod(0o755)
    env = {"PATH": str(bin_dir), "KR_UNITS_DIR": units, "KR_STATE_DIR": str(state)}
    try:
        yield env
    finally:
        for pid_file in state.glob("*.pid"):
            subprocess.run([str(bin_dir / "systemctl"), "stop", pid_file.name[:-len(".pid")]],
                           env={**os.environ, **env}, capture_output=True, timeout=60)


def wait_for_sockets(sockets: Path, state: Path) -> None:
    """Wait (60 s: a shared machine) until the daemons accept on all four sockets; else fail
    with what the started units wrote."""
    try:
        wait_until(lambda: all(unix_accepts(sockets / f"keyrelay-{n}") for n in
                               ("auth", "policy", "socketmap", "milter")),
                   60, "the daemons' sockets")
    except TimeoutError as exc:
        logs = "".join(f"--- {log.name}\n{log.read_text(errors='replace')}"
                       for log in sorted(state.glob("*.log")))
        pytest.fail(f"{exc}\n{logs}")


def daemons_answer(sockets: str) -> None:
    """keyrelay-policyd's auth service offers PLAIN, its policy service answers a request,
    keyrelay-milter answers a milter option negotiation (SMFIC_OPTNEG) with its own."""
    with DovecotClient(connect(f"unix:{sockets}/keyrelay-auth", timeout=30)) as auth:
        assert "PLAIN" in auth.handshake()
    with PolicyClient(connect(f"unix:{sockets}/keyrelay-policy", timeout=30)) as policy:
        assert policy.ask(**policy_request(sender="a@b.example")) is not None
    assert milter_negotiates(Path(sockets) / "keyrelay-milter")


def milter_negotiates(path: Path) -> bool:
    """Does keyrelay-milter answer a milter option negotiation (SMFIC_OPTNEG) with its own?"""
    body = b"O" + struct.pack(">III", 6, 0x1FF, 0x1FFFFF)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(30)
        conn.connect(str(path))
        conn.sendall(struct.pack(">I", len(body)) + body)
        header = conn.recv(5, socket.MSG_WAITALL)
    return len(header) == 5 and header[4:5] == b"O"


@pytest.mark.slow
def test_a_fresh_install_with_no_declared_directory_ends_with_daemons_that_answer(
        service_user: str) -> None:
    # the bug: the role started the units before anything made the directory file, so
    # their ExecStartPre (--check-config) failed on a new host; with keyrelay_directory: {}
    # nothing ever made it. The role's own service tasks run here, against a systemctl that
    # starts the installed units from their ExecStartPre and ExecStart lines.
    with short_folder() as root, systemd_stand_in(root) as systemd:
        _, playbook = site(
            root, keyrelay_manage_systemd=True, keyrelay_systemd_dir=str(root / "units"),
            keyrelay_manage_services=True, keyrelay_manage_user=True,
            keyrelay_user=service_user, keyrelay_group=service_user, keyrelay_directory={})

        status, changed, output = run_playbook(playbook, systemd=systemd)

        assert status == 0 and changed > 0, output
        directory = root / "keyrelay" / "directory.yaml"
        st = directory.stat()
        group = grp.getgrnam(service_user).gr_gid
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, group, 0o640)
        assert Path(f"{directory}.lock").exists()
        assert yaml.safe_load(directory.read_text())["accounts"] == {}
        sockets = root / "queue" / "private"
        wait_for_sockets(sockets, root / "systemctl-state")
        daemons_answer(str(sockets))
        uid = pwd.getpwnam(service_user).pw_uid
        for unit in UNITS:  # started by the role, as root, running as the service user
            pid = (root / "systemctl-state" / f"{unit}.pid").read_text()
            proc = Path(f"/proc/{pid}/status").read_text()
            assert re.search(rf"^Uid:\s+{uid}\s+{uid}\s+{uid}\s", proc, re.M), proc

        status, changed, output = run_playbook(playbook, systemd=systemd)
        assert (status, changed) == (0, 0), output  # running and enabled: nothing to do


# -- keyrelay_install_from: deb ------------------------------------------------------------------
DEBIAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
DPKG_BUILDPACKAGE = shutil.which("dpkg-buildpackage", path=DEBIAN_PATH)


@pytest.fixture(scope="module")
def deb_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``make deb`` into a temporary folder (its work folder too): the .deb it writes."""
    out = tmp_path_factory.mktemp("deb")
    result = subprocess.run(["make", "-C", str(REPO), "deb", f"DEB_DIST={out / 'dist'}",
                             f"DEB_WORK={out / 'work'}"], capture_output=True, text=True,
                            env={**os.environ, "PATH": DEBIAN_PATH}, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (package,) = (out / "dist").glob("keyrelay_*_all.deb")
    return package


@pytest.mark.slow
@pytest.mark.skipif(DPKG_BUILDPACKAGE is None or os.geteuid() != 0,
                    reason="debhelper comes with make test; the scratch root needs root")
def test_the_role_installs_the_debian_package_and_starts_its_units(deb_package: Path) -> None:
    # keyrelay_install_from: deb: apt installs the .deb (its postinst makes the keyrelay
    # user), the programs are /usr/bin/keyrelay*, the units the package's own; a new host
    # (the package's keyrelay.yaml is not the role's) gets its empty directory file, and
    # the role's service tasks start the package's units, which answer as user keyrelay
    with (short_folder() as root, scratch_root({str(root): root}) as scratch,
          systemd_stand_in(root, units="/lib/systemd/system") as systemd):
        shutil.copy(deb_package, root)
        _, playbook = site(
            root, keyrelay_install_from="deb", keyrelay_deb=str(root / deb_package.name),
            keyrelay_etc_dir="/etc/keyrelay", keyrelay_log_dir="/var/log/keyrelay",
            keyrelay_socket_dir="/var/spool/postfix/private", keyrelay_manage_user=True,
            keyrelay_user="keyrelay", keyrelay_group="keyrelay",
            keyrelay_manage_systemd=True, keyrelay_manage_services=True,
            keyrelay_directory={"accounts": {"deb": {}}})

        status, changed, output = run_playbook(playbook, systemd=systemd, inside=scratch.enter)

        assert status == 0 and changed > 0, output
        assert scratch.run("dpkg-query", "-W", "-f=${Status}", "keyrelay") == (
            "install ok installed")
        assert scratch.run("stat", "-c", "%U:%G %a", "/etc/keyrelay/directory.yaml") == (
            "root:keyrelay 640\n")
        listed = json.loads(scratch.run("/usr/bin/keyrelay", "account", "list", "--json"))
        assert [a["name"] for a in listed] == ["deb"]  # synced by the role
        sockets = scratch.path("/var/spool/postfix/private")
        wait_for_sockets(Path(sockets), root / "systemctl-state")
        daemons_answer(sockets)
        uid = int(scratch.run("id", "-u", "keyrelay"))
        for unit in UNITS:  # the package's units, their programs in /usr/bin
            pid = (root / "systemctl-state" / f"{unit}.pid").read_text()
            assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1].startswith(
                b"/usr/bin/keyrelay-"), unit
            proc = Path(f"/proc/{pid}/status").read_text()
            assert re.search(rf"^Uid:\s+{uid}\s+{uid}\s+{uid}\s", proc, re.M), proc

        status, changed, output = run_playbook(playbook, systemd=systemd, inside=scratch.enter)
        assert (status, changed) == (0, 0), output  # the same package: nothing to do


# -- a real deployment: installed from the checkout, started, relaying and signing ---------------
DECLARED = {
    "accounts": {"site": {"ip_allow": ["127.0.0.0/8"], "subusers": {"app": {}}}},
    "domains": {"site.example": {"owner": "site", "grants": ["site/app"]}},
}


def unit_commands(unit: Path) -> tuple[list[str], list[str], dict[str, str]]:
    """(ExecStartPre, ExecStart, Environment) of an installed unit file."""
    values: dict[str, str] = {}
    for line in unit.read_text().splitlines():
        name, equals, value = line.partition("=")
        if equals and name in ("ExecStartPre", "ExecStart", "Environment"):
            values[name] = value
    variable, _, setting = values["Environment"].partition("=")
    return values["ExecStartPre"].split(), values["ExecStart"].split(), {variable: setting}


@contextmanager
def running(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[
        subprocess.Popen[bytes]]:
    with log.open("ab") as output:
        process = subprocess.Popen(argv, stdout=output, stderr=output, stdin=subprocess.DEVNULL,
                                   env={**os.environ, **(env or {})})
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def deployed_cli(prefix: Path, config: Path, *args: str) -> str:
    result = subprocess.run([str(prefix / "bin" / "keyrelay"), "--config", str(config), *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def service_user() -> Iterator[str]:
    """The role creates SERVICE_USER; it is removed afterwards (and before, if left over)."""
    def remove() -> None:
        subprocess.run(["userdel", SERVICE_USER], capture_output=True)
        subprocess.run(["groupdel", SERVICE_USER], capture_output=True)

    remove()
    yield SERVICE_USER
    remove()


@pytest.mark.slow
@pytest.mark.skipif(SWAKS is None, reason="swaks comes with make test")
def test_a_deployment_from_the_checkout_relays_and_dkim_signs_behind_the_sites_milter(
        service_user: str) -> None:
    with short_folder() as root:
        sink_port, outbox = free_port(), root / "outbox"
        outbox.mkdir()
        shutil.chown(outbox, "postfix")
        sink = f"[127.0.0.1]:{sink_port}"
        etc, playbook = site(
            root,
            {"relayhost": sink, "default_filter_nexthop": sink,
             "maillog_file": str(root / "maillog"), "maillog_file_prefixes": str(root)},
            keyrelay_source=str(REPO), keyrelay_prefix=str(root / "opt"),
            keyrelay_manage_systemd=True, keyrelay_systemd_dir=str(root / "units"),
            # the packages make test installed: apt reports them present, changes nothing
            keyrelay_manage_packages=True,
            # a service user of its own, removed afterwards: the daemons drop to it
            keyrelay_manage_user=True, keyrelay_user=SERVICE_USER, keyrelay_group=SERVICE_USER,
            keyrelay_directory=DECLARED)
        (root / "units").mkdir()
        submission = yaml.safe_load(playbook.read_text())[0]["vars"][
            "keyrelay_submission_services"][0]

        status, changed, output = run_playbook(playbook)
        assert status == 0 and changed > 0, output
        status, changed, output = run_playbook(playbook)  # pip, sync, units, Postfix: settled
        assert (status, changed) == (0, 0), output

        prefix, config = root / "opt", root / "keyrelay" / "keyrelay.yaml"
        key_files = [p for p in (root / "keyrelay" / "dkim").rglob("*") if p.is_file()]
        assert len(key_files) == 2  # the sync's new domain: RSA and Ed25519
        for key_file in key_files:
            assert key_file.owner() == service_user
            assert key_file.stat().st_mode & 0o777 == 0o600
        if ANALYZE is not None:  # the installed units name programs that exist, and parse
            units = sorted(str(p) for p in (root / "units").iterdir())
            assert len(units) == 5
            verified = subprocess.run([ANALYZE, "verify", *units], capture_output=True,
                                      text=True)
            assert verified.returncode == 0, verified.stdout + verified.stderr
        # keyrelay-events' own check: the role's events section and its state folder
        check, start, env = unit_commands(root / "units" / "keyrelay-events.service")
        assert start[0].startswith(str(prefix))
        events = subprocess.run(check, env={**os.environ, **env}, capture_output=True,
                                text=True)
        assert events.returncode == 0, events.stderr
        assert f"state file {root / 'state' / 'events.db'} is usable" in events.stdout
        assert "site.example" in deployed_cli(prefix, config, "domain", "list")
        deployed_cli(prefix, config, "domain", "mark-verified", "site.example")
        key = json.loads(deployed_cli(prefix, config, "key", "create", "site/app", "--name",
                                      "ansible-test", "--json"))["key"]
        logs, sockets = root / "log", root / "queue" / "private"
        with (running([SMTP_SINK, "-u", "postfix", "-d", f"{outbox}/%Y%m%d-%H%M%S.",
                       f"127.0.0.1:{sink_port}", "100"], logs / "sink.log"),
              running([sys.executable, str(Path(__file__).with_name("site_milter.py")),
                       f"inet:{SITE_MILTER_PORT}@127.0.0.1"], logs / "site-milter.log")):
            daemons = []
            for unit in UNITS:  # as systemd would start them
                check, start, env = unit_commands(root / "units" / unit)
                assert check[0].startswith(str(prefix)) and start[0].startswith(str(prefix))
                result = subprocess.run(check, env={**os.environ, **env}, capture_output=True,
                                        text=True)
                assert result.returncode == 0, result.stderr
                daemons.append(running(start, logs / f"{unit}.log", env))
            with daemons[0] as policyd, daemons[1] as milter:
                wait_until(lambda: all(unix_accepts(sockets / f"keyrelay-{n}") for n in
                                       ("auth", "policy", "socketmap", "milter")),
                           30, "the deployed daemons' sockets")
                uid = pwd.getpwnam(service_user).pw_uid
                for daemon in (policyd, milter):  # started as root, running as the user
                    proc = Path(f"/proc/{daemon.pid}/status").read_text()
                    assert re.search(rf"^Uid:\s+{uid}\s+{uid}\s+{uid}\s", proc, re.M), proc
                    # and with no capability left once the sockets are bound
                    for line in ("CapPrm", "CapEff", "CapBnd"):
                        assert re.search(rf"^{line}:\s+0+$", proc, re.M), proc
                started = subprocess.run([str(POSTFIX), "-c", str(etc), "start"],
                                         capture_output=True, text=True)
                maillog = root / "maillog"
                assert started.returncode == 0, started.stderr + (
                    maillog.read_text() if maillog.exists() else "")
                try:
                    host, port = submission.split(":")
                    wait_until(lambda: greets(host, int(port)), 30, "Postfix's submission port")
                    message_id = f"<{uuid.uuid4()}@site.example>"
                    sent = subprocess.run(
                        [str(SWAKS), "--server", submission, "--tls", "--auth", "PLAIN",
                         "--auth-user", "apikey", "--auth-password", key,
                         "--from", "app@site.example", "--to", "someone@elsewhere.example",
                         "--header", f"Message-Id: {message_id}"],
                        capture_output=True, text=True, timeout=60)
                    assert sent.returncode == 0, sent.stdout + sent.stderr
                    wait_until(lambda: any(message_id.encode() in p.read_bytes()
                                           for p in outbox.iterdir()), 30, "the sink")
                finally:
                    subprocess.run([str(POSTFIX), "-c", str(etc), "stop"], capture_output=True)
        assert key not in (root / "maillog").read_text()
        dumps = [p.read_bytes() for p in outbox.iterdir() if message_id.encode() in p.read_bytes()]
        assert len(dumps) == 1
        wire = as_sent(dumps[0])
        assert message_from_bytes(wire)["X-Site-Milter"] == "passed"  # the site's milter ran
        records = {r["name"].rstrip(".").lower(): r["value"].encode() for r in json.loads(
            deployed_cli(prefix, config, "domain", "dns", "site.example", "--json"))["records"]
            if r["type"] == "TXT"}
        signatures = [line for line in wire.split(b"\r\n") if line.startswith(b"DKIM-Signature:")]
        assert len(signatures) == 2
        for index in range(2):
            assert dkim.DKIM(wire).verify(
                idx=index, dnsfunc=lambda name, timeout=5: records.get(
                    name.decode().rstrip(".").lower())), f"signature {index}"


def test_ansible_lint_passes_on_the_role_and_the_example_playbook() -> None:
    lint = Path(sys.executable).with_name("ansible-lint")
    assert lint.exists(), "ansible-lint comes with the test extras (setup.cfg)"
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(REPO / "ansible" / "roles"),
           "NO_COLOR": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run([str(lint), "--offline", "--profile", "production", "ansible/"],
                            cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Passed" in result.stdout + result.stderr


def test_the_ldap_backend_variables_give_a_working_configuration_and_sync_into_ldap(
        tmp_path: Path, slapd: Slapd) -> None:
    account = f"ans{uuid.uuid4().hex[:8]}"
    _, playbook = site(
        tmp_path, keyrelay_backend="ldap", keyrelay_ldap_urls=[slapd.url],
        keyrelay_ldap_base_dn=slapd.base_dn, keyrelay_ldap_bind_dn=slapd.service_dn,
        keyrelay_ldap_bind_password_file=str(tmp_path / "keyrelay" / "ldap.secret"),
        keyrelay_ldap_bind_password=slapd.service_password,  # written by the role, not logged
        keyrelay_ldap_ca_file=str(slapd.ca_file),
        keyrelay_directory={"accounts": {account: {"ip_allow": ["192.0.2.0/24"],
                                                   "subusers": {"app": {}}}}})
    # the role's rule for LDAP: the base is a keyrelay directory already, as docs/ldap.md
    # sets it up (the first command that writes makes it one)
    admin = tmp_path / "admin.yaml"
    admin.write_text(yaml.safe_dump({"directory": slapd.directory_config(),
                                     "logging": {"audit_log": ""}}))
    deployed_cli(Path(sys.prefix), admin, "account", "add", f"{account}-first")
    deployed_cli(Path(sys.prefix), admin, "account", "remove", f"{account}-first")

    status, changed, output = run_playbook(playbook)  # the template is validated by
    assert status == 0 and changed > 0, output        # check-config, which reads LDAP
    assert slapd.service_password not in output
    secret = tmp_path / "keyrelay" / "ldap.secret"
    assert secret.read_text() == slapd.service_password + "\n"
    assert secret.stat().st_mode & 0o777 == 0o640
    status, changed, output = run_playbook(playbook)
    assert (status, changed) == (0, 0), output

    config = tmp_path / "keyrelay" / "keyrelay.yaml"
    assert yaml.safe_load(config.read_text())["directory"]["backend"] == "ldap"
    listed = json.loads(deployed_cli(Path(sys.prefix), config, "account", "list", "--json"))
    mine = [a for a in listed if a["name"] == account]
    assert mine and mine[0]["subusers"] == ["app"] and mine[0]["ip_allow"] == ["192.0.2.0/24"]


def test_check_mode_reports_a_declared_directory_change_without_making_it(
        tmp_path: Path) -> None:
    _, playbook = site(tmp_path, keyrelay_directory={"accounts": {"acme": {}}})
    assert run_playbook(playbook)[0] == 0
    directory = tmp_path / "keyrelay" / "directory.yaml"
    before = directory.read_bytes()
    play = yaml.safe_load(playbook.read_text())
    play[0]["vars"]["keyrelay_directory"]["accounts"]["acme"] = {"ip_allow": ["192.0.2.0/24"]}
    playbook.write_text(yaml.safe_dump(play))

    status, changed, output = run_playbook(playbook, "--check", "-v")  # -v: commands' output
    assert (status, changed) == (0, 1), output
    assert "change account acme" in output and directory.read_bytes() == before

    status, changed, output = run_playbook(playbook)
    assert (status, changed) == (0, 1), output  # the sync; Postfix has nothing new
    config = tmp_path / "keyrelay" / "keyrelay.yaml"
    shown = json.loads(deployed_cli(Path(sys.prefix), config, "account", "show", "acme",
                                    "--json"))
    assert shown["ip_allow"] == ["192.0.2.0/24"]


def test_the_redis_counter_variables_log_in_and_a_wrong_password_is_refused_and_put_back(
        tmp_path: Path) -> None:
    # a fleet shares its counters in one Redis: the role writes counters: from its variables
    # and the password into a file of its own (never into keyrelay.yaml or the output), and
    # its validation logs in with it, so a wrong password stops the play with keyrelay's line
    with redis_server() as server:
        redis = {"host": "127.0.0.1", "port": server.port, "username": server.user,
                 "prefix": server.prefix, "timeout": "10s"}  # a loaded machine's answer fits
        wrong = f"wrong-{uuid.uuid4().hex}"
        _, playbook = site(
            tmp_path, keyrelay_counters_backend="redis",
            keyrelay_counters_on_unavailable="local",
            keyrelay_counters_time_zone="Europe/Paris", keyrelay_counters_redis=redis,
            keyrelay_counters_redis_password=wrong, keyrelay_policyd_workers=2)
        config = tmp_path / "keyrelay" / "keyrelay.yaml"
        secret = tmp_path / "keyrelay" / "redis.secret"
        refused = f"counters.redis: authentication failed for user {server.user}: WRONGPASS"

        # a new host (validated with init, then check-config): nothing left in place
        status, _, output = run_playbook(playbook)
        assert status != 0 and refused in output, output
        assert wrong not in output
        assert not config.exists() and not secret.exists()

        play = yaml.safe_load(playbook.read_text())
        play[0]["vars"]["keyrelay_counters_redis_password"] = server.password
        playbook.write_text(yaml.safe_dump(play))
        status, changed, output = run_playbook(playbook)
        assert status == 0 and changed > 0, output
        assert server.password not in output
        deployed = config.read_text()
        assert server.password not in deployed
        assert yaml.safe_load(deployed)["counters"] == {
            "backend": "redis", "on_unavailable": "local", "time_zone": "Europe/Paris",
            "redis": {**redis, "password_file": str(secret)}}
        assert yaml.safe_load(deployed)["policyd"]["workers"] == 2  # counted in Redis
        assert secret.read_text() == server.password + "\n"
        assert secret.stat().st_mode & 0o777 == 0o640
        assert deployed_cli(Path(sys.prefix), config, "check-config").startswith(str(config))

        # only the password changes (keyrelay.yaml the same): check-config logs in with it,
        # and the refused password file is replaced by the one that worked
        play[0]["vars"]["keyrelay_counters_redis_password"] = wrong
        playbook.write_text(yaml.safe_dump(play))
        status, _, output = run_playbook(playbook)
        assert status != 0 and refused in output, output
        assert wrong not in output
        assert secret.read_text() == server.password + "\n"
        assert config.read_text() == deployed


def test_dkim_keys_made_on_one_node_reach_the_other_and_differing_files_stop_the_play(
        tmp_path: Path, slapd: Slapd) -> None:
    # the bug: with two nodes on one LDAP directory the sync made a new domain's private keys
    # on one node only, and the other answered that domain with a temporary failure; the
    # docs said the role copied them. Two inventory hosts on this machine, each with its own
    # folders (the role matches key files by DOMAIN/SELECTOR.pem below each dkim.key_dir).
    account, domain = f"dk{uuid.uuid4().hex[:8]}", f"dk{uuid.uuid4().hex[:8]}.example"
    owner = ("nobody", "nogroup")  # the milter's user: not the root running the play
    hosts: dict[str, dict[str, Any]] = {}
    for name in ("relay1", "relay2"):
        _, node_playbook = site(
            tmp_path / name, keyrelay_user=owner[0], keyrelay_group=owner[1],
            keyrelay_backend="ldap", keyrelay_ldap_urls=[slapd.url],
            keyrelay_ldap_base_dn=slapd.base_dn, keyrelay_ldap_bind_dn=slapd.service_dn,
            keyrelay_ldap_bind_password_file=str(tmp_path / name / "keyrelay" / "ldap.secret"),
            keyrelay_ldap_bind_password=slapd.service_password,
            keyrelay_ldap_ca_file=str(slapd.ca_file))
        hosts[name] = {"ansible_connection": "local",
                       **yaml.safe_load(node_playbook.read_text())[0]["vars"]}
    # declared on one node only, as inventory/cluster.yml does: the sync runs there
    hosts["relay1"]["keyrelay_directory"] = {"accounts": {account: {}},
                                             "domains": {domain: {"owner": account}}}
    inventory, playbook = tmp_path / "cluster.yml", tmp_path / "cluster-site.yml"
    inventory.write_text(yaml.safe_dump({"relays": {"hosts": hosts}}))
    playbook.write_text(yaml.safe_dump([{"hosts": "relays", "gather_facts": False,
                                         "roles": ["keyrelay"]}]))
    admin = tmp_path / "admin.yaml"  # the base is a keyrelay directory already (docs/ldap.md)
    admin.write_text(yaml.safe_dump({"directory": slapd.directory_config(),
                                     "logging": {"audit_log": ""}}))
    deployed_cli(Path(sys.prefix), admin, "account", "add", f"{account}-first")
    deployed_cli(Path(sys.prefix), admin, "account", "remove", f"{account}-first")
    dirs = {name: tmp_path / name / "keyrelay" / "dkim" for name in hosts}

    def keys(name: str) -> dict[str, str]:
        """DOMAIN/SELECTOR.pem: the SHA-256 of its bytes (a failing assert shows no key)"""
        return {str(p.relative_to(dirs[name])): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in dirs[name].glob("*/*.pem")}

    def never_shown(output: str, name: str) -> None:
        for path in dirs[name].glob("*/*.pem"):
            pem = path.read_bytes()
            body = pem.decode().splitlines()[1]  # a line of the key's base64
            shown = body in output or base64.b64encode(pem).decode()[:40] in output
            assert not shown, f"{path} shown in ansible-playbook's output"

    status, _, output = run_playbook(playbook, "--diff", "-v", inventory=str(inventory))

    assert status == 0, output
    made = keys("relay1")
    assert len(made) == 2 and all(n.startswith(f"{domain}/") for n in made)  # RSA, Ed25519
    assert keys("relay2") == made  # the same bytes under the same names
    for path in [dirs["relay2"] / domain, *(dirs["relay2"] / domain).iterdir()]:
        st = path.stat()
        assert (pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name) == owner
        assert st.st_mode & 0o777 == (0o700 if path.is_dir() else 0o600)
    never_shown(output, "relay2")

    # keys made by hand on the other node (a rotation) reach the first on the next run
    config2 = tmp_path / "relay2" / "keyrelay" / "keyrelay.yaml"
    deployed_cli(Path(sys.prefix), config2, "domain", "rotate", domain)
    rotated = keys("relay2")
    assert len(rotated) == 4
    status, changed, output = run_playbook(playbook, "--diff", inventory=str(inventory))
    assert (status, changed) == (0, 1), output  # the copies to relay1, nothing else
    assert keys("relay1") == rotated
    never_shown(output, "relay1")

    # two nodes holding different files under one name: the play stops with one line, before
    # anything is copied, and the files stay as they were
    clash = sorted(made)[0]
    (dirs["relay2"] / clash).write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n"
                                         b"-----END PRIVATE KEY-----\n")
    lacking = sorted(set(rotated) - set(made))[0]
    (dirs["relay1"] / lacking).unlink()
    before = {name: keys(name) for name in hosts}

    status, _, output = run_playbook(playbook, inventory=str(inventory))

    assert status != 0, output
    assert ("DKIM key files differ between nodes under one name (keys made twice under one "
            f"selector), nothing copied: {clash} (relay1, relay2) in dkim.key_dir; keep on "
            "every node the file whose public key `keyrelay domain dns DOMAIN` publishes"
            ) in output
    assert {name: keys(name) for name in hosts} == before


# -- keyrelay_migrate_postfix (docs/migration.md, "Ansible") -----------------------------------
MIGRATE_PASSWORDS = {"crm": "Crm-Old-Secret-4711", "billing": "Billing-Old-Secret-0815"}


def cyrus_site(root: Path, **variables: Any) -> tuple[Path, Path]:
    """A host whose Postfix logs its applications in with Cyrus SASL (a sasldb2 made by
    saslpasswd2) and binds them to senders with a hash map and reject_sender_login_mismatch;
    the role may take its services over (keyrelay_postfix_replace_site_sasl)."""
    etc, playbook = site(root, main_cf={
        "smtpd_sasl_type": "cyrus", "smtpd_sender_login_maps": f"hash:{root}/postfix/senders",
        "smtpd_sender_restrictions": "reject_sender_login_mismatch"},
        keyrelay_postfix_replace_site_sasl=True, **variables)
    (etc / "senders").write_text("@crm.example crm\n"
                                 "invoices@billing.example billing@site.example\n")
    subprocess.run(["postmap", "-c", str(etc), f"hash:{etc / 'senders'}"], check=True)
    for user, realm in (("crm", "relay.site.example"), ("billing", "site.example")):
        subprocess.run(["saslpasswd2", "-f", str(root / "sasldb2"), "-p", "-c", "-u", realm,
                        user], input=MIGRATE_PASSWORDS[user], text=True, check=True)
    return etc, playbook


def set_vars(playbook: Path, **variables: Any) -> None:
    play = yaml.safe_load(playbook.read_text())
    play[0]["vars"].update(variables)
    playbook.write_text(yaml.safe_dump(play))


@pytest.mark.skipif(not shutil.which("saslpasswd2") or not shutil.which("db_dump"),
                    reason="sasl2-bin and db-util come with make test")
def test_the_import_variables_run_migrate_postfix_once_and_sync_it_only_when_asked_once(
        tmp_path: Path) -> None:
    sunset = datetime.date.today() + datetime.timedelta(days=90)  # YAML: an unquoted date
    etc, playbook = cyrus_site(tmp_path, keyrelay_migrate_postfix={
        "account": "acme", "sasldb": str(tmp_path / "sasldb2"), "sunset": sunset})
    config = tmp_path / "keyrelay" / "keyrelay.yaml"
    out = tmp_path / "keyrelay" / "migrated.yaml"
    report = tmp_path / "keyrelay" / "migrated.report.md"

    status, changed, output = run_playbook(playbook, "--check")  # a new host: nothing written
    assert status == 0 and changed > 0, output
    assert not out.exists() and not report.exists()

    status, changed, output = run_playbook(playbook)
    assert status == 0 and changed > 0, output
    declared = yaml.safe_load(out.read_text())
    subusers = declared["accounts"]["acme"]["subusers"]
    assert {name: body["legacy_login"]["username"] for name, body in subusers.items()} == {
        "crm": "crm", "billing": "billing@site.example"}
    assert {body["legacy_login"]["sunset"] for body in subusers.values()} == {sunset.isoformat()}
    assert "`keyrelay key create acme/crm --name crm --scope mail.send`" in report.read_text()
    for path in (out, report):
        assert path.stat().st_mode & 0o777 == 0o600
        assert (path.stat().st_uid, path.stat().st_gid) == (0, 0)
    for password in MIGRATE_PASSWORDS.values():
        assert password not in output + out.read_text() + report.read_text()
    # nothing in the directory until the admin, having read the report, asks for the sync,
    # and no switch: postfix apply waits for it
    assert json.loads(deployed_cli(Path(sys.prefix), config, "account", "list",
                                   "--json")) == []
    assert "keyrelay postfix apply is held back" in output
    assert postconf(etc, "keyrelay_milter") == ""
    written = out.read_bytes()
    for options in ((), ("--check",)):
        status, changed, output = run_playbook(playbook, *options)
        assert (status, changed) == (0, 0), output
    assert out.read_bytes() == written  # not imported again (new salts would change it)

    set_vars(playbook, keyrelay_migrate_postfix_sync=True)
    status, changed, output = run_playbook(playbook, "--check", "-v")
    assert (status, changed) == (0, 3), output  # the sync (a dry run), its checksum, apply
    assert "add legacy login acme/crm" in output
    assert json.loads(deployed_cli(Path(sys.prefix), config, "legacy", "list",
                                   "--json")) == []
    assert postconf(etc, "keyrelay_milter") == ""
    status, changed, output = run_playbook(playbook)
    assert (status, changed) == (0, 3), output
    # the switch: keyrelay took the site's services over, main.cf keeps the site's own
    assert postconf(etc, "keyrelay_milter") == "unix:private/keyrelay-milter"
    assert postconf(etc, "smtpd_sasl_type") == "cyrus"
    legacy = json.loads(deployed_cli(Path(sys.prefix), config, "legacy", "list", "--json"))
    assert sorted((e["principal"], e["username"], e["sunset"]) for e in legacy) == [
        ("acme/billing", "billing@site.example", sunset.isoformat()),
        ("acme/crm", "crm", sunset.isoformat())]
    assert (tmp_path / "keyrelay" / "migrated.yaml.synced").stat().st_mode & 0o777 == 0o600

    # synced once per declaration: a legacy login ended by hand stays ended
    deployed_cli(Path(sys.prefix), config, "legacy", "remove", "acme/crm")
    status, changed, output = run_playbook(playbook)
    assert (status, changed) == (0, 0), output
    legacy = json.loads(deployed_cli(Path(sys.prefix), config, "legacy", "list", "--json"))
    assert [e["principal"] for e in legacy] == ["acme/billing"]


def test_a_wrong_import_variable_stops_the_play_before_anything_is_written(
        tmp_path: Path) -> None:
    _, playbook = site(tmp_path, keyrelay_migrate_postfix={"account": "acme",
                                                           "sasl_db": "/etc/sasldb2"})
    status, _, output = run_playbook(playbook)
    assert status != 0, output
    assert "keyrelay_migrate_postfix must be {} (no import) or a mapping with account" in output
    assert "'sasl_db'" in output
    assert not (tmp_path / "keyrelay").exists()
    # input the import cannot use stops the play with its one line; nothing is written
    not_a_sasldb = tmp_path / "postfix" / "main.cf"
    set_vars(playbook, keyrelay_migrate_postfix={"account": "acme",
                                                 "sasldb": str(not_a_sasldb)})
    status, _, output = run_playbook(playbook)
    assert status != 0, output
    assert f"keyrelay: error: {not_a_sasldb}: not a sasldb2" in output
    assert "Traceback" not in output
    assert sorted(p.name for p in (tmp_path / "keyrelay").glob("migrated*")) == []
