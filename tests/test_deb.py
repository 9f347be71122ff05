"""The Debian package (debian/, docs/debian.md): built by ``make deb``, lintian-clean, installed
into a scratch root and started from its own files.

The scratch root is this host's own root filesystem under an overlay whose writable layer is
a tmpfs, in a private mount namespace (``unshare --mount``): ``dpkg -i`` really runs the
package's maintainer scripts (the keyrelay user, the folders' owners and modes, the conffile,
the units), the daemons start from the installed unit files' command lines, and every write
lands in the tmpfs, which vanishes with the namespace. The host keeps no keyrelay user, no
/etc/keyrelay, no dpkg record (checked). Debian 12's python3-* libraries the package depends
on are installed on the host by ``make test`` (Makefile DEB_BUILD_PACKAGES), so the install
needs no network. Needs root (mounting), as ``make test`` runs here.

The package's dependencies are Debian's own builds, older than the ones pip installs in the
virtual environment: ``test_the_tests_pass_with_debians_libraries`` runs the in-process tests
of the code that uses them against Debian's versions.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from testkit import scratchroot
from testkit.net import wait_until
from testkit.protocols import DovecotClient, PolicyClient, connect, policy_request

REPO = Path(__file__).resolve().parent.parent
DEBIAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# lintian warnings this package accepts, each with its reason in docs/debian.md; none today
ACCEPTED_WARNINGS: frozenset[str] = frozenset()
# the daemons' sockets, the configuration's defaults (under Postfix's queue, group postfix)
AUTH = "/var/spool/postfix/private/keyrelay-auth"
POLICY = "/var/spool/postfix/private/keyrelay-policy"
MILTER = "/var/spool/postfix/private/keyrelay-milter"
# generous: the first start of a daemon compiles nothing, but the machine is shared
START_SECONDS = 60.0
DEB_LIBRARIES = ("python3-yaml", "python3-cryptography", "python3-dnspython", "python3-idna",
                 "python3-dkim", "python3-spf", "python3-ldap3", "python3-milter",
                 "python3-uvloop", "python3-redis", "python3-prometheus-client",
                 "python3-argon2", "python3-bcrypt", "python3-passlib")

pytestmark = pytest.mark.skipif(not shutil.which("dpkg-buildpackage", path=DEBIAN_PATH),
                                reason="debhelper is not installed (make test installs it)")


def run(args: Sequence[str], env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``args`` with Debian's tools first on PATH (not a pyenv interpreter), output kept."""
    return subprocess.run(list(args), capture_output=True, text=True, check=False, cwd=cwd,
                          env=env or {**os.environ, "PATH": DEBIAN_PATH})


@dataclass(frozen=True)
class Built:
    deb: Path
    output: str  # what make deb printed, lintian's report included


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """``make deb`` into a temporary folder (its work folder too)."""
    out = tmp_path_factory.mktemp("deb")
    result = run(["make", "-C", str(REPO), "deb", f"DEB_DIST={out / 'dist'}",
                  f"DEB_WORK={out / 'work'}"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (package,) = (out / "dist").glob("keyrelay_*_all.deb")
    assert not (out / "work").exists(), "make deb leaves its work folder behind"
    return Built(package, result.stdout + result.stderr)


@pytest.fixture(scope="module")
def deb(built: Built) -> Path:
    return built.deb


def field(deb: Path, name: str) -> str:
    return run(["dpkg-deb", "--field", str(deb), name]).stdout.strip()


# -- the package -------------------------------------------------------------------------------
def test_the_package_is_named_for_this_version(deb: Path) -> None:
    import keyrelay

    assert deb.name == f"keyrelay_{keyrelay.__version__}_all.deb"
    assert field(deb, "Version") == keyrelay.__version__


def test_it_depends_on_debians_own_libraries_at_versions_debian_has(deb: Path) -> None:
    depends = field(deb, "Depends")
    names = {part.split()[0] for part in depends.split(", ")}
    assert set(DEB_LIBRARIES) <= names, depends
    assert "adduser" in names
    # every dependency is installable from this host's Debian: apt knows a version of it that
    # meets the package's floor (apt-get --simulate resolves the whole Depends line)
    result = run(["apt-get", "--simulate", "--no-install-recommends", "install", str(deb)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_build_tool_is_needed_to_run_it(deb: Path) -> None:
    depends = field(deb, "Depends")
    for tool in ("gcc", "libmilter-dev", "python3-dev", "python3-pip", "python3-venv"):
        assert tool not in depends


def test_lintian_finds_no_error_and_no_unaccepted_warning(built: Built) -> None:
    # make deb ends with lintian --fail-on error --info on the .deb (it succeeded: no error)
    assert re.search(r"^lintian --fail-on error --info \S+\.deb$", built.output, re.M)
    tags = [line for line in built.output.splitlines() if re.match(r"[EW]: keyrelay", line)]
    assert not [t for t in tags if t.startswith("E: ")], tags
    warnings = {t.split()[2] for t in tags if t.startswith("W: ")}
    assert warnings <= ACCEPTED_WARNINGS, tags


def test_make_deb_leaves_nothing_in_the_source_tree(deb: Path) -> None:
    # no untracked or ignored file in debian/ (what a build there leaves: debian/keyrelay/,
    # debian/.debhelper/, debian/files, ...); edits to tracked files are the developer's
    status = run(["git", "-C", str(REPO), "status", "--porcelain", "--ignored",
                  "--untracked-files=all", "debian"])
    leftovers = [line for line in status.stdout.splitlines() if line.startswith(("??", "!!"))]
    assert leftovers == [], leftovers


# -- installed into a scratch root -------------------------------------------------------------
class ScratchRoot(scratchroot.ScratchRoot):
    """This host's root, overlaid with a tmpfs, in a mount namespace of its own
    (testkit/scratchroot.py), with the built package at /srv/keyrelay-deb and an empty /tmp."""

    def __init__(self, dist: Path) -> None:
        try:
            super().__init__({"/srv/keyrelay-deb": dist}, tmpfs=("/run", "/tmp"))
        except RuntimeError as exc:
            pytest.fail(str(exc))
        self.daemons: list[subprocess.Popen[bytes]] = []

    def command(self, *args: str) -> list[str]:
        return ["nsenter", f"--target={self.holder.pid}", "--mount", "--", "chroot",
                str(self.root), "env", f"PATH={DEBIAN_PATH}", *args]

    def sh(self, script: str) -> subprocess.CompletedProcess[str]:
        return run(self.command("sh", "-c", script))

    def ok(self, script: str) -> str:
        result = self.sh(script)
        assert result.returncode == 0, f"{script}: {result.stdout}{result.stderr}"
        return result.stdout

    def start(self, args: Sequence[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        assigns = [f"{k}={v}" for k, v in env.items()]
        with log.open("ab") as out:
            process = subprocess.Popen(self.command(*assigns, *args), stdout=out, stderr=out,
                                       stdin=subprocess.DEVNULL)
        self.daemons.append(process)
        return process

    def close(self) -> None:
        for process in self.daemons:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        super().close()


def unit_settings(text: str) -> dict[str, str]:
    return {key: value for key, _, value in
            (line.partition("=") for line in text.splitlines() if "=" in line
             and not line.startswith("#"))}


def host_state() -> tuple[list[str], list[str], bool, bool, bool]:
    """What the install would change on the host: the keyrelay user and group (as they are,
    if the host has them: the lines, not the whole files, which other tests may change at
    the same time), /etc/keyrelay, /var/log/keyrelay and a dpkg record of the package."""
    def entries(path: str) -> list[str]:
        return [line for line in Path(path).read_text().splitlines()
                if line.startswith("keyrelay:")]
    return (entries("/etc/passwd"), entries("/etc/group"), Path("/etc/keyrelay").exists(),
            Path("/var/log/keyrelay").exists(),
            run(["dpkg-query", "-W", "keyrelay"]).returncode == 0)


@pytest.fixture(scope="module")
def installed(deb: Path) -> Iterator[ScratchRoot]:
    if os.geteuid() != 0:
        pytest.skip("installing into a scratch root mounts an overlay: needs root")
    if not Path("/var/spool/postfix/private").is_dir():
        pytest.skip("Postfix is not installed (make test installs it): the sockets' folder")
    before = host_state()
    scratch = ScratchRoot(deb.parent)
    try:
        # a keyrelay user this host may have (another install, a demo) is not the package's:
        # the scratch root starts without one, so the postinst must create it
        scratch.ok("if getent passwd keyrelay >/dev/null; then userdel keyrelay; fi; "
                   "if getent group keyrelay >/dev/null; then groupdel keyrelay; fi")
        scratch.ok(f"dpkg -i /srv/keyrelay-deb/{deb.name}")
        yield scratch
    finally:
        scratch.close()
        assert host_state() == before, "the scratch root install changed the host"


def test_install_creates_the_keyrelay_system_user(installed: ScratchRoot) -> None:
    user = installed.ok("getent passwd keyrelay").strip().split(":")
    group = installed.ok("getent group keyrelay").strip().split(":")
    assert 0 < int(user[2]) < 1000, user  # a system user
    assert user[3] == group[2]
    assert user[6] in ("/usr/sbin/nologin", "/bin/false"), user
    assert user[4].split(",")[0] == "keyrelay daemons"  # made by the package's postinst (debian/)


@pytest.mark.parametrize(("path", "owner", "mode"), [
    ("/etc/keyrelay", "root:keyrelay", "770"),
    ("/etc/keyrelay/dkim", "keyrelay:keyrelay", "700"),
    ("/var/log/keyrelay", "root:keyrelay", "750"),
    ("/etc/keyrelay/keyrelay.yaml", "root:root", "644"),
    ("/etc/logrotate.d/keyrelay", "root:root", "644"),
])
def test_install_sets_owners_and_modes(installed: ScratchRoot, path: str, owner: str,
                                       mode: str) -> None:
    assert installed.ok(f"stat -c '%U:%G %a' {path}").split() == [owner, mode]


def test_the_configuration_is_a_conffile_and_means_the_defaults(installed: ScratchRoot) -> None:
    conffiles = installed.ok("dpkg-query -W -f='${Conffiles}' keyrelay")
    assert "/etc/keyrelay/keyrelay.yaml" in conffiles
    assert "/etc/logrotate.d/keyrelay" in conffiles
    shown = installed.ok("keyrelay config example | head -1")
    assert shown  # the full example is one command away
    # every file the conffile and the units point the admin to is installed
    pointers = set()
    for path in ("/etc/keyrelay/keyrelay.yaml", "/lib/systemd/system/keyrelay-policyd.service"):
        text = installed.ok(f"cat {path}")
        pointers |= set(re.findall(r"/usr/share/doc/keyrelay/[\w./-]*\w", text))
    assert "/usr/share/doc/keyrelay/examples/keyrelay.yaml.example" in pointers
    assert "/usr/share/doc/keyrelay/debian.md" in pointers
    for pointer in pointers:
        assert installed.sh(f"test -f {pointer}").returncode == 0, pointer


def test_the_units_run_the_installed_programs_and_are_not_enabled(installed: ScratchRoot) -> None:
    for unit in ("keyrelay-policyd.service", "keyrelay-milter.service",
                 "keyrelay-events.service", "keyrelay-domain-check.service",
                 "keyrelay-domain-check.timer"):
        text = installed.ok(f"cat /lib/systemd/system/{unit}")
        assert "/opt/keyrelay" not in text, unit
        assert not installed.sh(f"ls /etc/systemd/system/*.wants/{unit}").stdout, unit
    settings = unit_settings(installed.ok("cat /lib/systemd/system/keyrelay-policyd.service"))
    assert settings["ExecStart"] == "/usr/bin/keyrelay-policyd"


def test_the_man_pages_are_installed_and_render(installed: ScratchRoot) -> None:
    for page in ("keyrelay.1", "keyrelay-policyd.8", "keyrelay-milter.8", "keyrelay-events.8"):
        section = page.rsplit(".", 1)[1]
        result = installed.sh(f"man --warnings -l /usr/share/man/man{section}/{page}.gz "
                              "2>&1 >/dev/null")
        assert result.returncode == 0 and result.stdout == "", (page, result.stdout)
    text = installed.ok("MANWIDTH=100 man -l /usr/share/man/man1/keyrelay.1.gz")
    assert "keyrelay key create" in text and "--expires" in text


def test_the_installed_daemons_start_from_their_units_and_answer(
        installed: ScratchRoot, tmp_path: Path) -> None:
    # the admin's steps (docs/debian.md): the daemons' user, then the directory and a key
    installed.ok("printf 'policyd:\\n  user: keyrelay\\nmilter:\\n  user: keyrelay\\n' "
                 ">> /etc/keyrelay/keyrelay.yaml")
    installed.ok("keyrelay account add acme && keyrelay domain add acme example.com "
                 "&& keyrelay domain mark-verified example.com")
    created = json.loads(installed.ok("keyrelay key create acme --name deb-test --json"))
    # the CLI, run as root, gives the directory file to the folder's group
    assert installed.ok("stat -c '%G' /etc/keyrelay/directory.yaml").strip() == "keyrelay"
    uid = int(installed.ok("id -u keyrelay"))
    for unit, probe in (("keyrelay-policyd", AUTH), ("keyrelay-milter", MILTER)):
        settings = unit_settings(installed.ok(f"cat /lib/systemd/system/{unit}.service"))
        env = dict([settings["Environment"].split("=", 1)])
        check = installed.sh(" ".join([*(f"{k}={v}" for k, v in env.items()),
                                        settings["ExecStartPre"]]))
        assert check.returncode == 0, check.stdout + check.stderr
        daemon = installed.start(settings["ExecStart"].split(), env, tmp_path / f"{unit}.log")

        def serving(path: str = installed.path(probe), daemon: subprocess.Popen[bytes] = daemon,
                    log: Path = tmp_path / f"{unit}.log") -> bool:
            try:
                connect(f"unix:{path}", timeout=2).close()
            except OSError:
                assert daemon.poll() is None, log.read_text()
                return False
            return True

        wait_until(serving, START_SECONDS, f"the installed {unit} to accept on {probe}")
        # after the bind it runs as the keyrelay user, as the unit and the config say
        status = Path(f"/proc/{daemon.pid}/status").read_text()
        assert re.search(rf"^Uid:\s+{uid}\s+{uid}\s", status, re.M), status

    with DovecotClient(connect(f"unix:{installed.path(AUTH)}")) as auth:
        auth.handshake()
        reply = auth.plain("apikey", created["key"], rip="192.0.2.1")
        assert reply.status == "OK", reply
    with PolicyClient(connect(f"unix:{installed.path(POLICY)}")) as policy:
        # decided from the installed directory: acme's own domain passes, another is refused
        own = policy.ask(**policy_request(sasl_method="PLAIN", sasl_username=reply.user or "",
                                          sender="app@example.com"))
        other = policy.ask(**policy_request(sasl_method="PLAIN", sasl_username=reply.user or "",
                                            sender="app@example.org"))
        assert own == "DUNNO", own
        assert other is not None and other.startswith("550 5.7.1 "), other
    milter = connect(f"unix:{installed.path(MILTER)}")
    try:
        milter.sendall(struct.pack(">I", 13) + b"O" + struct.pack(">III", 6, 0x1FF, 0x1FFFFF))
        answer = milter.recv(5)
        assert answer[4:5] == b"O", answer  # the milter's option negotiation
    finally:
        milter.close()


def test_logrotate_rotates_the_audit_log_with_the_installed_file(installed: ScratchRoot) -> None:
    # the shipped /etc/logrotate.d/keyrelay as it is, on the installed /var/log/keyrelay
    installed.ok("echo first change > /var/log/keyrelay/audit.log")
    installed.ok("logrotate -f -s /tmp/logrotate.state /etc/logrotate.d/keyrelay")
    assert installed.ok("cat /var/log/keyrelay/audit.log.1") == "first change\n"  # delaycompress
    assert installed.ok("stat -c '%U:%G %a %s' /var/log/keyrelay/audit.log").split() == [
        "root:keyrelay", "640", "0"]
    installed.ok("echo second change >> /var/log/keyrelay/audit.log")
    installed.ok("logrotate -f -s /tmp/logrotate.state /etc/logrotate.d/keyrelay")
    assert installed.ok("zcat /var/log/keyrelay/audit.log.2.gz") == "first change\n"
    assert installed.ok("cat /var/log/keyrelay/audit.log.1") == "second change\n"


def test_purge_removes_the_logs_and_keeps_the_admins_data(installed: ScratchRoot) -> None:
    installed.ok("mkdir -p /etc/keyrelay && touch /etc/keyrelay/directory.yaml")
    installed.ok("dpkg --purge keyrelay")
    assert installed.sh("test -e /var/log/keyrelay").returncode == 1
    assert installed.sh("test -e /usr/bin/keyrelay").returncode == 1
    assert installed.sh("test -e /etc/keyrelay/directory.yaml").returncode == 0


# -- Debian's library versions -----------------------------------------------------------------
def test_the_tests_pass_with_debians_libraries() -> None:
    """setup.cfg's floors are Debian 12's versions: the tests of the code that uses them (DKIM
    signing with dkimpy and cryptography, names with idna, the config with PyYAML, LDAP
    mapping with ldap3, the milter with pymilter, TLS files with cryptography, every CLI
    module imported) pass against Debian's packages."""
    dist = "/usr/lib/python3/dist-packages"
    probe = run([sys.executable, "-c",
                 "import cryptography, dkim, idna, yaml, ldap3, Milter, spf, dns\n"
                 "for m in (cryptography, dkim, idna, yaml, ldap3, Milter, spf, dns):"
                 " print(m.__file__)"], env={**os.environ, "PYTHONPATH": dist})
    assert probe.returncode == 0, probe.stderr
    assert all(line.startswith(dist) for line in probe.stdout.splitlines()), probe.stdout
    # test_docs_commands builds the whole CLI (every module imported); test_postfix_tls reads
    # certificates and keys with cryptography (a few seconds, no Postfix started)
    result = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                  "tests/test_dkimsign.py", "tests/test_milter.py", "tests/test_names.py",
                  "tests/test_headers.py", "tests/test_config.py", "tests/test_ldap_mapping.py",
                  "tests/test_docs_commands.py", "tests/test_postfix_tls.py"],
                 cwd=REPO, env={**os.environ, "PYTHONPATH": dist})
    assert result.returncode == 0, result.stdout[-5000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
