"""``keyrelay backup`` and ``keyrelay restore`` with the real CLI and the real daemons' checks.

A node is a configuration root under tmp_path (its own keyrelay.yaml, directory file,
dkim.key_dir and audit log). The main test backs one node up and restores it onto a fresh one
(no directory file, no key folder), then checks that the new node is the same node: the
directory, every key file's bytes, mode and owner, both daemons' ``--check-config``, and a
message the new node's signing code signs verifies against the DNS records the old node
published.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pwd
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from test_dkimsign import HEADERS, STAMP, DnsZone, body_hash, verified, wire
from test_yaml_directory import run_cli

from keyrelay import backup
from keyrelay.directory import DirectoryData, YamlDirectory
from milters.dkimsign import KeyStore, sign

BIN = Path(sys.executable).parent
BODY = b"Hello Bob,\r\n\r\nrestored on a new node.\r\n"


class Node:
    """A keyrelay node in a folder of its own."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.directory = root / "directory.yaml"
        self.key_dir = root / "dkim"
        self.audit = root / "audit.log"
        self.config = root / "keyrelay.yaml"
        self.config.write_text(yaml.safe_dump({
            "directory": {"path": str(self.directory)},
            "dkim": {"key_dir": str(self.key_dir)},
            "logging": {"audit_log": str(self.audit)},
            "policyd": {"auth_listen": f"unix:{root}/auth.sock", "policy_listen": "",
                        "socketmap_listen": "", "socket_group": "", "user": "root"},
            "milter": {"listen": f"unix:{root}/milter.sock", "socket_group": "",
                       "user": "root"},  # root: the test folder is root's (0700)
        }))

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(self.config, *args)

    def ok(self, *args: str) -> str:
        result = self.cli(*args)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def key_files(self) -> dict[str, tuple[bytes, int, int, int]]:
        return key_files(self.key_dir)


def key_files(key_dir: Path) -> dict[str, tuple[bytes, int, int, int]]:
    """Every file and folder below a key folder: bytes (b'' for a folder), mode, owner."""
    found = {}
    for path in [key_dir, *key_dir.rglob("*")]:
        st = path.lstat()
        content = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        found[str(path.relative_to(key_dir))] = (
            content, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    return found


def build_node(node: Node) -> None:
    """Every kind of record, with real key files: two domains (one rotated: a pending
    selector too), a verified one that signs, keys, senders, a pool, limits."""
    for line in ("pool add mkt --bind 192.0.2.10 --helo mkt.relay.example.net",
                 "account add acme", "subuser add acme/marketing",
                 "key create acme --name crm --expires 90d",
                 "pool assign acme/marketing mkt", "sender add acme alerts@example.net",
                 "limits set acme --per-minute 60", "domain add acme example.com",
                 "domain grant example.com acme/marketing",
                 "domain mark-verified example.com", "domain add acme/marketing news.example",
                 "domain rotate news.example"):
        node.ok(*line.split())


@pytest.fixture(scope="module")
def old(tmp_path_factory: pytest.TempPathFactory) -> Node:
    """The node backed up (read only: made once for the module, its keys take a while)."""
    node = Node(tmp_path_factory.mktemp("old"))
    build_node(node)
    # a mode and an owner the restore must keep: one key file given to nobody, group-readable
    news = sorted((node.key_dir / "news.example").iterdir())[0]
    news.chmod(0o640)
    nobody = pwd.getpwnam("nobody")
    if os.geteuid() == 0:
        os.chown(news, nobody.pw_uid, nobody.pw_gid)
    return node


@pytest.fixture(scope="module")
def archive(old: Node, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("archive") / "node.tar.gz"
    backed_up(old, path)
    return path


def backed_up(node: Node, archive: Path) -> subprocess.CompletedProcess[str]:
    result = node.cli("backup", str(archive))
    assert result.returncode == 0, result.stderr
    return result


def test_a_backup_restored_onto_a_fresh_node_is_the_same_node(old: Node, tmp_path: Path) -> None:
    archive = tmp_path / "node.tar.gz"
    made = backed_up(old, archive)
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    assert "mode 0600" in made.stdout and "atomically" in made.stdout
    assert "6 DKIM key files" in made.stdout, made.stdout

    new = Node(tmp_path / "new")
    assert not new.directory.exists() and not new.key_dir.exists()
    restored = new.ok("restore", str(archive))
    assert "Restored 1 accounts, 1 subusers, 1 keys, 2 domains" in restored
    assert f"named below {new.key_dir} now" in restored

    # the directory: equal, once the key files are named below the new dkim.key_dir
    before = YamlDirectory(str(old.directory)).load()
    after = YamlDirectory(str(new.directory)).load()
    assert after == backup.moved_key_files(before, str(old.key_dir), str(new.key_dir))
    assert all(str(s.key_file).startswith(f"{new.key_dir}/")
               for d in after.domains.values() for s in d.selectors)
    # every key file and folder: bytes, mode, owner and group
    assert new.key_files() == old.key_files()
    assert len([k for k, v in old.key_files().items() if v[0]]) == 6
    # the audit log says who restored what
    entry = json.loads(new.audit.read_text().splitlines()[-1])
    assert entry["action"] == "directory.restore" and entry["source"] == str(archive)

    # the daemons' own checks accept the new node
    policyd = subprocess.run([str(BIN / "keyrelay-policyd"), "--config", str(new.config),
                              "--check-config"], capture_output=True, text=True, timeout=60)
    assert policyd.returncode == 0, policyd.stderr
    milter = subprocess.run([str(BIN / "keyrelay-milter"), "--config", str(new.config),
                             "--check-config"], capture_output=True, text=True, timeout=60)
    assert milter.returncode == 0, milter.stderr
    assert "4 DKIM keys load, 0 do not" in milter.stdout, milter.stdout
    assert "OK" in new.ok("check-config")

    # the new node signs what the old node's DNS records verify
    zone = DnsZone()
    for record in json.loads(old.ok("domain", "dns", "example.com", "--json"))["records"]:
        zone.records[record["name"] + "."] = record["value"].encode("ascii")
    selectors = after.domains["example.com"].signing_selectors()
    assert len(selectors) == 2
    signatures = sign(HEADERS, body_hash(BODY), "example.com",
                      KeyStore().keys_for(selectors), STAMP)
    assert verified(wire(HEADERS, BODY, signatures), zone) == [True, True]


def test_backup_and_restore_never_show_a_private_key(old: Node, tmp_path: Path) -> None:
    archive = tmp_path / "node.tar.gz"
    outputs = [backed_up(old, archive), old.cli("backup", str(tmp_path / "j.tar.gz"), "--json")]
    new = Node(tmp_path / "new")
    outputs += [new.cli("restore", str(archive), "--dry-run", "--json"),
                new.cli("restore", str(archive), "--json")]
    shown = "".join(r.stdout + r.stderr for r in outputs)
    assert json.loads(outputs[1].stdout)["mode"] == "0600"
    assert json.loads(outputs[3].stdout)["key_files"] == 6
    assert "PRIVATE KEY" not in shown
    for pem in old.key_dir.rglob("*.pem"):
        body = "".join(pem.read_text().splitlines()[1:-1])
        assert body[:40] not in shown and body[-40:] not in shown


def test_the_archive_is_mode_0600_whatever_the_umask(old: Node, tmp_path: Path) -> None:
    archive = tmp_path / "node.tar.gz"
    result = subprocess.run([str(BIN / "keyrelay"), "--config", str(old.config), "backup",
                             str(archive)], capture_output=True, text=True, timeout=60,
                            preexec_fn=lambda: os.umask(0))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".keyrelay-backup.")]


def test_an_archive_in_a_missing_folder_is_refused_in_one_line(old: Node, tmp_path: Path) -> None:
    result = old.cli("backup", str(tmp_path / "missing" / "node.tar.gz"))
    assert result.returncode == 1
    assert result.stderr == (f"keyrelay: error: cannot write {tmp_path}/missing/node.tar.gz: "
                             f"cannot create a file in {tmp_path}/missing: No such file or "
                             "directory\n")


def test_an_owner_without_an_account_here_is_replaced_by_the_key_folders_owner(
        tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("owners are kept only when restoring as root")
    node = Node(tmp_path / "node")
    node.ok("account", "add", "acme")
    node.ok("domain", "add", "acme", "example.com")
    for path in [node.key_dir, *node.key_dir.rglob("*")]:
        os.chown(path, 54321, 54321)  # no such user or group on this host
    archive = tmp_path / "node.tar.gz"
    backed_up(node, archive)
    new = Node(tmp_path / "new")
    result = new.cli("restore", str(archive))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ("keyrelay: warning: the backup's owner 54321:54321 has no account "
                             "here: its key files and folders go to the owner of dkim.key_dir "
                             "(0:0)\n")
    assert {(st.st_uid, st.st_gid) for st in (p.lstat() for p in new.key_dir.rglob("*"))} == {
        (0, 0)}


def test_an_existing_archive_is_replaced_only_with_force(old: Node, tmp_path: Path) -> None:
    archive = tmp_path / "node.tar.gz"
    archive.write_text("an older backup")
    refused = old.cli("backup", str(archive))
    assert refused.returncode == 1
    assert refused.stderr == f"keyrelay: error: {archive} exists: name a new file, or run " \
                             "with --force to replace it\n"
    assert archive.read_text() == "an older backup"
    assert old.cli("backup", str(archive), "--force").returncode == 0
    assert tarfile.is_tarfile(archive)


def test_restore_refuses_a_directory_that_is_not_empty_without_force(
        old: Node, archive: Path, tmp_path: Path) -> None:
    new = Node(tmp_path / "new")
    new.ok("account", "add", "other")
    kept = new.directory.read_text()
    refused = new.cli("restore", str(archive))
    assert refused.returncode == 1
    assert "is not empty (1 accounts" in refused.stderr and "--force" in refused.stderr
    assert new.directory.read_text() == kept and not new.key_dir.exists()
    forced = new.ok("restore", str(archive), "--force")
    assert "remove" not in forced  # the listing of changes is for --json
    names = set(YamlDirectory(str(new.directory)).load().accounts)
    assert names == {"acme"}


def test_restore_refuses_existing_key_files_without_force(old: Node, archive: Path,
                                                           tmp_path: Path) -> None:
    new = Node(tmp_path / "new")
    first = sorted(old.key_files())[-1]
    (new.key_dir / first).parent.mkdir(parents=True)
    (new.key_dir / first).write_bytes(b"someone else's key")
    refused = new.cli("restore", str(archive))
    assert refused.returncode == 1
    assert "already holds 1 of the backup's key files" in refused.stderr
    assert not new.directory.exists()
    assert (new.key_dir / first).read_bytes() == b"someone else's key"
    new.ok("restore", str(archive), "--force")
    assert new.key_files() == old.key_files()


def test_restore_is_refused_before_anything_is_written_when_it_cannot_be_audited(
        old: Node, archive: Path, tmp_path: Path) -> None:
    new = Node(tmp_path / "new")
    config = yaml.safe_load(new.config.read_text())
    (tmp_path / "a-file").write_text("")
    config["logging"]["audit_log"] = str(tmp_path / "a-file" / "audit.log")
    new.config.write_text(yaml.safe_dump(config))
    refused = new.cli("restore", str(archive))
    assert refused.returncode == 1 and "audit log" in refused.stderr
    assert not new.directory.exists() and not new.key_dir.exists()


# -- archives restore must refuse -----------------------------------------------------------
def _archive(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, content in members:
            info.size = len(content) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(content) if info.isfile() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o600
    return info


def _rebuilt(source: Path, target: Path, extra: list[tuple[tarfile.TarInfo, bytes]],
             manifest: dict[str, object] | None = None) -> Path:
    """``source``'s members (its manifest changed by ``manifest``), then ``extra``."""
    members = []
    with tarfile.open(source) as tar:
        for info in tar.getmembers():
            content = tar.extractfile(info).read() if info.isfile() else b""  # type: ignore[union-attr]
            if info.name == backup.MANIFEST and manifest is not None:
                content = json.dumps({**json.loads(content), **manifest}).encode()
            members.append((info, content))
    return _archive(target, members + extra)


@pytest.mark.parametrize(("name", "extra", "says"), [
    ("absolute", [(_member("/etc/cron.d/evil"), b"* * * * * root sh\n")], "/etc/cron.d/evil"),
    ("dotdot", [(_member("dkim/../../evil.pem"), b"x")], "dkim/../../evil.pem"),
    ("symlink", [(_member("dkim/example.com/x.pem", tarfile.SYMTYPE, "/etc/shadow"), b"")],
     "link"),
    ("hardlink", [(_member("dkim/h.pem", tarfile.LNKTYPE, "../../etc/shadow"), b"")], "link"),
    ("device", [(_member("dkim/null", tarfile.CHRTYPE), b"")], "special"),
    ("stranger", [(_member("etc/passwd"), b"x")], "not part of a keyrelay backup"),
    ("unlisted", [(_member("dkim/extra.pem"), b"x")], "is not in manifest.json"),
])
def test_restore_refuses_an_unsafe_archive_and_writes_nothing(
        archive: Path, tmp_path: Path, name: str, extra: list[tuple[tarfile.TarInfo, bytes]],
        says: str) -> None:
    good = archive
    bad = _rebuilt(good, tmp_path / f"{name}.tar.gz", extra)
    new = Node(tmp_path / "new")
    result = new.cli("restore", str(bad))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and says in result.stderr, result.stderr
    assert "nothing was restored" in result.stderr and "Traceback" not in result.stderr
    assert not new.directory.exists() and not new.key_dir.exists()
    assert not (tmp_path / "evil.pem").exists()


def test_restore_refuses_a_directory_naming_a_key_file_outside_the_backup(
        archive: Path, tmp_path: Path) -> None:
    """A selector naming /etc/shadow would have the milter read it, and `domain remove`
    delete it."""
    members = []
    with tarfile.open(archive) as tar:
        for info in tar.getmembers():
            content = tar.extractfile(info).read() if info.isfile() else b""  # type: ignore[union-attr]
            if info.name == backup.MANIFEST:
                manifest = json.loads(content)
            members.append((info, content))
    for i, (info, content) in enumerate(members):
        if info.name == backup.DIRECTORY:
            text = content.decode().replace(f'"{manifest["key_dir"]}/example.com/',
                                            '"/etc/shadow-', 1).encode()
            members[i] = (info, text)
            manifest["directory"]["sha256"] = hashlib.sha256(text).hexdigest()
    members = [(i, json.dumps(manifest).encode() if i.name == backup.MANIFEST else c)
               for i, c in members]
    crafted = _archive(tmp_path / "crafted.tar.gz", members)
    new = Node(tmp_path / "new")
    result = new.cli("restore", str(crafted))
    assert result.returncode == 1
    assert "its key file /etc/shadow-" in result.stderr
    assert "is not below the backup's dkim.key_dir" in result.stderr
    assert not new.directory.exists() and not new.key_dir.exists()


def test_restore_refuses_a_newer_format_version_in_one_line(archive: Path, tmp_path: Path) -> None:
    good = archive
    future = _rebuilt(good, tmp_path / "future.tar.gz", [], {"version": 2, "keyrelay": "9.0"})
    new = Node(tmp_path / "new")
    result = new.cli("restore", str(future))
    assert result.returncode == 1
    assert result.stderr == (
        f"keyrelay: error: {future} is keyrelay backup format version 2 (written by keyrelay "
        "9.0); this keyrelay (0.1.0) reads version 1: restore it with a keyrelay at least as "
        "new as the one that wrote it\n")
    assert not new.directory.exists()


def test_restore_refuses_a_damaged_key_file_or_a_file_that_is_no_backup(
        old: Node, archive: Path, tmp_path: Path) -> None:
    good = archive
    members = []
    with tarfile.open(good) as tar:
        for info in tar.getmembers():
            content = tar.extractfile(info).read() if info.isfile() else b""  # type: ignore[union-attr]
            if info.name.endswith(".pem"):
                content = content.replace(b"A", b"B", 1)
            members.append((info, content))
    damaged = _archive(tmp_path / "damaged.tar.gz", members)
    new = Node(tmp_path / "new")
    result = new.cli("restore", str(damaged))
    assert result.returncode == 1 and "does not match its SHA-256" in result.stderr
    (tmp_path / "plain.tar.gz").write_text("not an archive")
    result = new.cli("restore", str(tmp_path / "plain.tar.gz"))
    assert result.stderr == (f"keyrelay: error: {tmp_path / 'plain.tar.gz'}: not a keyrelay "
                             "backup (not a gzip'd tar archive)\n")
    assert not new.directory.exists() and not new.key_dir.exists()


def test_backup_refuses_a_link_in_the_key_folder(tmp_path: Path) -> None:
    node = Node(tmp_path / "node")
    node.ok("account", "add", "acme")
    node.ok("domain", "add", "acme", "example.com")
    (node.key_dir / "stray.pem").symlink_to("/etc/hostname")
    result = node.cli("backup", str(tmp_path / "node.tar.gz"))
    assert result.returncode == 1 and "not a regular file" in result.stderr
    assert not (tmp_path / "node.tar.gz").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".keyrelay-backup.")]


# -- LDAP: read through the backend, as export does -------------------------------------------
def test_an_ldap_directory_is_backed_up_and_restored_into_yaml_and_into_ldap(
        request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The archive is the same whatever the backend: an LDAP node's backup restores into a
    YAML node, and that node's backup into a fresh LDAP base (the session's slapd)."""
    from test_directory_contract import CLI_SCRIPT, make_store

    source = make_store("ldap", tmp_path / "ldap", request)
    for command in CLI_SCRIPT:
        source.cli(*command)
    original = source.open().load()
    from_ldap = tmp_path / "from-ldap.tar.gz"
    source.cli("backup", str(from_ldap))

    node = make_store("yaml", tmp_path / "yaml", request)
    node.cli("restore", str(from_ldap))
    assert node.open().load() == backup.moved_key_files(
        original, str(tmp_path / "ldap" / "dkim"), str(tmp_path / "yaml" / "dkim"))
    from_yaml = tmp_path / "from-yaml.tar.gz"
    node.cli("backup", str(from_yaml))
    source.close()

    again = make_store("ldap", tmp_path / "ldap-new", request)  # the base emptied first
    try:
        assert again.open().load(missing_ok=True) == DirectoryData()
        again.cli("restore", str(from_yaml))
        assert again.open().load() == backup.moved_key_files(
            original, str(tmp_path / "ldap" / "dkim"), str(tmp_path / "ldap-new" / "dkim"))
        assert key_files(tmp_path / "ldap-new" / "dkim") == key_files(tmp_path / "ldap" / "dkim")
    finally:
        again.close()


def test_a_backup_never_replaces_a_file_keyrelay_uses_even_with_force(old: Node) -> None:
    """Found by tests/test_fuzz_cli.py: `keyrelay backup ../directory.yaml --force` put the
    archive where the directory file was, and every later command failed to read it."""
    before = old.directory.read_bytes()
    for target, what in ((old.directory, "the directory file (directory.path)"),
                         (old.config, "the configuration file")):
        refused = old.cli("backup", str(target), "--force")
        assert refused.returncode == 1
        assert refused.stderr == (f"keyrelay: error: {target} is {what}: a backup must not "
                                  "replace a file keyrelay uses; name another file\n")
    inside = old.key_dir / "node.tar.gz"
    refused = old.cli("backup", str(inside), "--force")
    assert refused.returncode == 1 and "is inside dkim.key_dir" in refused.stderr
    assert not inside.exists()
    assert old.directory.read_bytes() == before
    assert old.ok("account", "list")  # the directory still reads
