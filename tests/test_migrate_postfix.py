"""``keyrelay migrate postfix`` (issue 24, part 1) on a real site: a private Postfix
configuration folder with maps made by the real ``postmap`` (hash, lmdb, texthash), a real
Cyrus sasldb2 made by ``saslpasswd2 -f``, a real Dovecot passwd-file. The real CLI writes
the declaration and the report; the real ``keyrelay sync`` puts it into a fresh YAML
directory, whose principals, senders and grants must be exactly what the maps allowed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from test_legacy_credential import sha512_crypt
from test_yaml_directory import KEYRELAY, run_cli, write_config

from keyrelay import names, passwords
from keyrelay.directory import YamlDirectory
from keyrelay.migrate.plan import subuser_names

needs_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("postconf", "postmap", "saslpasswd2", "db_dump")),
    reason="needs postfix, sasl2-bin and db-util (make test installs them)")
pytestmark = needs_tools

# every password the site holds: none may appear in anything the import writes or prints
SECRETS = ("Crm-Secret-4711", "Billing-Secret-0815", "plain-monitoring-pw",
           "$6$rounds=5000$saltsalt$")


def saslpasswd(db: Path, user: str, realm: str, password: str) -> None:
    subprocess.run(["saslpasswd2", "-f", str(db), "-p", "-c", "-u", realm, user],
                   input=password, text=True, check=True, timeout=60)


def postmap(site: Path, table: str) -> None:
    subprocess.run(["postmap", "-c", str(site), table], check=True, timeout=60)


def make_site(tmp_path: Path, *, maps: str | None = None,
              mynetworks: str = "127.0.0.0/8 [::1]/128 192.0.2.0/24",
              sender_restrictions: str = "reject_sender_login_mismatch") -> Path:
    site = tmp_path / "postfix"
    site.mkdir()
    if maps is None:
        maps = (f"hash:{site / 'by_hash'}, lmdb:{site / 'by_lmdb'} "
                f"texthash:{site / 'by_text'} regexp:{site / 'by_regexp'}")
    (site / "main.cf").write_text(
        "compatibility_level = 3.6\n"
        "myhostname = mail.site.example\n"
        f"mynetworks = {mynetworks}\n"
        f"smtpd_sender_login_maps = {maps}\n"
        "smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, "
        "reject_unauth_destination\n"
        f"smtpd_sender_restrictions = {sender_restrictions}\n", encoding="utf-8")
    (site / "master.cf").write_text(
        "submission inet n - y - - smtpd\n"
        "  -o smtpd_sasl_auth_enable=yes\n"
        "  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject\n", encoding="utf-8")
    (site / "by_hash").write_text(
        "# classic sender-login map\n"
        "@crm.site.example        crm@site.example\n"
        "invoices@site.example    billing\n"  # billing: a sasldb login in the default realm
        "@news.example            newsletter@site.example\n"
        "noreply@news.example     crm@site.example\n", encoding="utf-8")
    postmap(site, f"hash:{site / 'by_hash'}")
    (site / "by_lmdb").write_text(
        "alerts@site.example      monitoring, crm@site.example\n"
        "invoices@site.example    newsletter@site.example\n",  # shadowed by by_hash
        encoding="utf-8")
    postmap(site, f"lmdb:{site / 'by_lmdb'}")
    (site / "by_text").write_text(
        "postmaster               ghost\n"
        "ops@site.example         ghost\n", encoding="utf-8")
    (site / "by_regexp").write_text("/^(.*)@legacy\\.example$/ crm@site.example\n",
                                    encoding="utf-8")
    return site


def make_sasldb(tmp_path: Path) -> Path:
    db = tmp_path / "sasldb2"
    saslpasswd(db, "crm", "site.example", SECRETS[0])
    saslpasswd(db, "billing", "mail.site.example", SECRETS[1])  # the default realm
    return db


def make_passwd(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "dovecot.passwd"
    path.write_text(
        "# Dovecot passwd-file\n"
        f"newsletter@site.example:{{SHA512-CRYPT}}{SECRETS[3]}hash:::\n"
        f"monitoring:{{PLAIN}}{SECRETS[2]}::::\n" + extra, encoding="utf-8")
    return path


def migrate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(KEYRELAY), "migrate", "postfix", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def test_a_site_is_imported_exactly_as_its_maps_allowed(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    out = tmp_path / "migrated.yaml"
    done = migrate("--config-dir", str(site), "--sasldb", str(make_sasldb(tmp_path)),
                   "--dovecot-passwd", str(make_passwd(tmp_path)), "--account", "acme",
                   "--out", str(out))
    assert (done.returncode, done.stderr) == (0, ""), done
    report = (tmp_path / "migrated.report.md").read_text(encoding="utf-8")
    written = out.read_text(encoding="utf-8")
    for secret in SECRETS:
        assert secret not in written + report + done.stdout

    declared = yaml.safe_load(written)
    assert declared == {
        "accounts": {"acme": {"subusers": {
            "billing": {"senders": ["invoices@site.example"]},
            "crm": {"senders": ["alerts@site.example", "noreply@news.example"]},
            "monitoring": {"senders": ["alerts@site.example"]},
            "newsletter": {"senders": []},
        }}},
        "domains": {"crm.site.example": {"owner": "acme", "grants": ["acme/crm"]},
                    "news.example": {"owner": "acme", "grants": []}},
    }
    # what could not be mapped is said, with what to do
    assert "`regexp:" in report and "holds patterns" in report
    assert "/^(.*)@legacy\\.example$/" in report
    assert "`invoices@site.example` in `lmdb:" in report and "is shadowed by `hash:" in report
    assert "`postmaster` in `texthash:" in report and "keyrelay has no such rule" in report
    assert "`ops@site.example` in `texthash:" in report and "names login `ghost`" in report
    assert ("`@news.example` → `newsletter@site.example` not granted: Postfix gave "
            "noreply@news.example to other logins only") in report
    assert "login `newsletter@site.example` has no sender-map entry" in report
    assert "`alerts@site.example` is owned by 2 logins" in report
    assert "Each domain is owned by the account `acme`" in report
    # permit_mynetworks clients, each to get a key
    assert "`permit_mynetworks` is in `smtpd_relay_restrictions`" in report
    assert "| `192.0.2.0/24` | give each application there a key" in report
    assert "| `::1/128` | this host's own programs" in report
    # passwords: found, not imported; the keys to create; DNS per domain
    assert "4 login(s) were found. Their old passwords are **not** imported" in report
    assert "`keyrelay key create acme/crm --name crm --scope mail.send`" in report
    assert "`crm.site.example`, `news.example`" in report and "keyrelay domain dns" in report

    # nothing touched the directory; keyrelay sync makes it so, exactly
    config = write_config(tmp_path)
    assert not (tmp_path / "directory.yaml").exists()
    synced = run_cli(config, "sync", str(out))
    assert (synced.returncode, synced.stderr) == (0, ""), synced
    data = YamlDirectory(str(tmp_path / "directory.yaml")).load()
    assert set(data.accounts) == {"acme"}
    assert set(data.subusers) == {"acme/billing", "acme/crm", "acme/monitoring",
                                  "acme/newsletter"}
    assert set(data.senders) == {
        ("acme/billing", "invoices@site.example"), ("acme/crm", "alerts@site.example"),
        ("acme/crm", "noreply@news.example"), ("acme/monitoring", "alerts@site.example")}
    assert {d: (v.owner, v.grants) for d, v in data.domains.items()} == {
        "crm.site.example": ("acme", ("acme/crm",)), "news.example": ("acme", ())}
    assert data.keys == {}  # keys are made by the admin, one per application
    again = run_cli(config, "sync", str(out))
    assert again.stdout.startswith("Nothing to do"), again


def test_an_existing_out_is_refused_unless_force(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    out = tmp_path / "migrated.yaml"
    out.write_text("mine\n", encoding="utf-8")
    args = ("--config-dir", str(site), "--dovecot-passwd", str(make_passwd(tmp_path)),
            "--account", "acme", "--out", str(out))
    done = migrate(*args)
    assert done.returncode == 1 and done.stderr == (
        f"keyrelay: error: {out} exists: name a new file, or run with --force to replace it\n")
    assert out.read_text(encoding="utf-8") == "mine\n"
    assert not (tmp_path / "migrated.report.md").exists()  # nothing half-written
    done = migrate(*args, "--force")
    assert done.returncode == 0, done
    assert "accounts:" in out.read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".keyrelay")) == []


@pytest.mark.parametrize("make_bad, reason", [
    (lambda site: site / "by_hash.db", "not a sasldb2 (its entries are not USER, REALM and "
                                       "PROPERTY separated by NUL bytes"),
    (lambda site: site / "main.cf", "not a sasldb2 (not a Berkeley DB file that db_dump can "
                                    "read: "),
    (lambda site: site / "missing", "cannot read: No such file or directory"),
])
def test_a_sasldb_that_is_not_one_is_one_line_and_nothing_is_written(
        tmp_path: Path, make_bad: object, reason: str) -> None:
    site = make_site(tmp_path)
    bad = make_bad(site)  # type: ignore[operator]
    out = tmp_path / "migrated.yaml"
    done = migrate("--config-dir", str(site), "--sasldb", str(bad), "--account", "acme",
                   "--out", str(out))
    assert done.returncode == 1, done
    assert done.stderr.startswith(f"keyrelay: error: {bad}: {reason}"), done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["postfix"]


def test_maps_that_cannot_be_read_are_lines_of_the_report(tmp_path: Path) -> None:
    folder = tmp_path / "maps"
    folder.mkdir()
    (folder / "corrupt.db").write_bytes(b"not a Berkeley DB\n")
    (folder / "corrupt.lmdb").write_bytes(b"not an LMDB file\n")
    site = make_site(tmp_path, maps=(
        f"texthash:{folder / 'missing'}, hash:{folder / 'corrupt'}, "
        f"lmdb:{folder / 'corrupt'}, texthash:{folder}"))
    out = tmp_path / "migrated.yaml"
    done = migrate("--config-dir", str(site), "--account", "acme", "--out", str(out))
    assert (done.returncode, done.stderr) == (0, ""), done
    report = (tmp_path / "migrated.report.md").read_text(encoding="utf-8")
    for table, reason in (
            (f"texthash:{folder / 'missing'}", "No such file or directory"),
            (f"hash:{folder / 'corrupt'}", f"open database {folder / 'corrupt.db'}"),
            (f"lmdb:{folder / 'corrupt'}", "File is not an LMDB file"),
            (f"texthash:{folder}", "Is a directory")):
        line = next((text for text in report.splitlines() if f"map `{table}`:" in text), "")
        assert "cannot be read (" in line and reason in line and "not imported" in line, (
            table, report)
    assert yaml.safe_load(out.read_text(encoding="utf-8")) == {
        "accounts": {"acme": {"subusers": {}}}}  # nothing imported from them


def test_a_passwd_file_that_is_a_database_is_one_line_and_nothing_is_written(
        tmp_path: Path) -> None:
    site = make_site(tmp_path)
    bad = tmp_path / "sasldb2-by-mistake"
    bad.write_bytes(b"\0\x05\x31\x15user\0realm\0userPassword\0")
    out = tmp_path / "migrated.yaml"
    done = migrate("--config-dir", str(site), "--dovecot-passwd", str(bad), "--account",
                   "acme", "--out", str(out))
    assert (done.returncode, done.stderr) == (1, (
        f"keyrelay: error: {bad}: not a Dovecot passwd-file (it holds NUL bytes: a database "
        "file? --sasldb reads a sasldb2)\n"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["postfix", "sasldb2-by-mistake"]


def test_a_report_that_cannot_be_written_leaves_no_declaration_behind(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    out = tmp_path / "migrated.yaml"
    report = tmp_path / "no-such-folder" / "report.md"
    done = migrate("--config-dir", str(site), "--sasldb", str(make_sasldb(tmp_path)),
                   "--account", "acme", "--sunset", "2027-03-01", "--out", str(out),
                   "--report", str(report))
    assert (done.returncode, done.stderr) == (1, (
        f"keyrelay: error: cannot write {report}: cannot create a file in {report.parent}: "
        "No such file or directory\n"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["postfix", "sasldb2"]


def test_bad_maps_and_logins_are_lines_of_the_report(tmp_path: Path) -> None:
    site = make_site(tmp_path, maps=(
        f"hash:{tmp_path / 'never-postmapped'}, nosuchtype:/etc/whatever, "
        f"pcre:{tmp_path / 'p'}, texthash:{tmp_path / 'postfix' / 'by_text'}"))
    sasldb = make_sasldb(tmp_path)
    passwd = make_passwd(tmp_path, extra=(
        "monitoring:{PLAIN}another-pw::::\n"  # the same login again
        "crm@site.example:{PLAIN}x::::\n"  # also in the sasldb2
        "a line without a colon and a-secret-pw\n"))
    out = tmp_path / "migrated.yaml"
    done = migrate("--config-dir", str(site), "--sasldb", str(sasldb), "--dovecot-passwd",
                   str(passwd), "--account", "acme", "--out", str(out))
    assert (done.returncode, done.stderr) == (0, ""), done
    report = (tmp_path / "migrated.report.md").read_text(encoding="utf-8")
    assert f"map `hash:{tmp_path / 'never-postmapped'}`: cannot be read (open database " in report
    assert "map `nosuchtype:/etc/whatever`: unknown map type `nosuchtype`" in report
    assert f"map `pcre:{tmp_path / 'p'}` holds patterns" in report
    assert f"{passwd} line 4: login `monitoring` again" in report
    assert (f"login `crm@site.example` is in both sasldb2 {sasldb} and passwd-file {passwd}: "
            "imported once") in report
    assert f"{passwd} line 6: not `user:password:...`" in report
    for secret in (*SECRETS, "another-pw", "a-secret-pw"):
        assert secret not in report + out.read_text(encoding="utf-8")
    for login in ("crm@site.example", "billing@mail.site.example", "monitoring",
                  "newsletter@site.example"):
        assert f"login `{login}` has no sender-map entry" in report


def test_proxy_and_unionmap_maps_are_read_and_mynetworks_tables_are_named(
        tmp_path: Path) -> None:
    folder = tmp_path / "postfix"
    site = make_site(tmp_path, maps=(
        f"proxy:hash:{folder / 'by_hash'} unionmap:{{texthash:{folder / 'by_text'}, "
        f"lmdb:{folder / 'by_lmdb'}}}"),
        mynetworks=f"!192.0.2.9 192.0.2.0/24 cidr:{folder / 'nets'} /etc/relay-clients",
        sender_restrictions="reject_known_sender_login_mismatch")
    out = tmp_path / "migrated.yaml"
    done = migrate("--config-dir", str(site), "--sasldb", str(make_sasldb(tmp_path)),
                   "--dovecot-passwd", str(make_passwd(tmp_path)), "--account", "acme",
                   "--out", str(out))
    assert (done.returncode, done.stderr) == (0, ""), done
    subusers = yaml.safe_load(out.read_text(encoding="utf-8"))["accounts"]["acme"]["subusers"]
    assert subusers["crm"] == {"senders": ["alerts@site.example", "noreply@news.example"]}
    assert subusers["monitoring"] == {"senders": ["alerts@site.example"]}
    report = (tmp_path / "migrated.report.md").read_text(encoding="utf-8")
    assert "| `!192.0.2.9` | excluded by the site: nothing to do |" in report
    assert f"| `cidr:{folder / 'nets'}` | a file or table of networks" in report
    assert "| `/etc/relay-clients` | a file or table of networks" in report
    assert ("The site has only reject_known_sender_login_mismatch in its restrictions: its "
            "logins could send as addresses the sender maps do not list") in report


def test_with_a_sunset_each_login_keeps_its_password_as_a_hash(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    real = sha512_crypt.using(rounds=5000).hash("newsletter-pw-77")
    passwd = tmp_path / "dovecot.passwd"
    passwd.write_text(f"newsletter@site.example:{{SHA512-CRYPT}}{real}:::\n"
                      f"monitoring:{{PLAIN}}{SECRETS[2]}::::\n", encoding="utf-8")
    out = tmp_path / "m.yaml"
    done = migrate("--config-dir", str(site), "--sasldb", str(make_sasldb(tmp_path)),
                   "--dovecot-passwd", str(passwd), "--account", "acme",
                   "--sunset", "2027-03-01", "--out", str(out))
    assert (done.returncode, done.stderr) == (0, ""), done
    written = out.read_text(encoding="utf-8")
    report = (tmp_path / "m.report.md").read_text(encoding="utf-8")
    for secret in (*SECRETS[:3], "newsletter-pw-77"):
        assert secret not in written + report + done.stdout
    subs = yaml.safe_load(written)["accounts"]["acme"]["subusers"]
    legacy = {name: body.get("legacy_login") for name, body in subs.items()}
    assert legacy["monitoring"] is None  # {PLAIN}: no hash keyrelay verifies, reported
    assert "login `monitoring`: its password is not a hash keyrelay verifies" in report
    assert legacy["newsletter"] == {"username": "newsletter@site.example",
                                    "password_hash": "{SHA512-CRYPT}" + real,
                                    "sunset": "2027-03-01"}
    # the sasldb2's plaintext secrets, hashed with Argon2id at import
    assert legacy["crm"]["username"] == "crm@site.example"
    assert legacy["billing"]["username"] == "billing"  # the default realm: the plain name
    assert passwords.verify(legacy["crm"]["password_hash"], SECRETS[0])
    assert passwords.verify(legacy["billing"]["password_hash"], SECRETS[1])
    assert legacy["billing"]["password_hash"].startswith("{ARGON2ID}$argon2id$")
    assert "keep their old username and password until the sunset, **2027-03-01**" in report
    assert "password HASHES" in written and "--sunset 2027-03-01" in written

    config = write_config(tmp_path)
    synced = run_cli(config, "sync", str(out))
    assert (synced.returncode, synced.stderr) == (0, ""), synced
    data = YamlDirectory(str(tmp_path / "directory.yaml")).load()
    assert {p: (c.username, str(c.sunset)) for p, c in data.legacy.items()} == {
        "acme/crm": ("crm@site.example", "2027-03-01"),
        "acme/billing": ("billing", "2027-03-01"),
        "acme/newsletter": ("newsletter@site.example", "2027-03-01")}


def test_without_a_sunset_no_login_gets_a_password(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    out = tmp_path / "m.yaml"
    done = migrate("--config-dir", str(site), "--sasldb", str(make_sasldb(tmp_path)),
                   "--account", "acme", "--out", str(out))
    assert done.returncode == 0, done
    assert "legacy_login" not in out.read_text(encoding="utf-8")


def test_a_bad_sunset_is_one_line(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    done = migrate("--config-dir", str(site), "--account", "acme", "--sunset", "2027-02-30",
                   "--out", str(tmp_path / "m.yaml"))
    assert (done.returncode, done.stderr) == (
        1, "keyrelay: error: --sunset '2027-02-30': expected a date YYYY-MM-DD\n")
    assert not (tmp_path / "m.yaml").exists()


def test_a_folder_without_main_cf_is_one_line(tmp_path: Path) -> None:
    done = migrate("--config-dir", str(tmp_path), "--account", "acme", "--out",
                   str(tmp_path / "m.yaml"))
    assert (done.returncode, done.stderr) == (1, (
        f"keyrelay: error: --config-dir {tmp_path}: no main.cf there (name the folder of the "
        "site's main.cf, e.g. /etc/postfix)\n"))


def test_subuser_names_are_readable_valid_unique_and_stable() -> None:
    logins = ["App_1@example.com", "app-1@other.example", "billing", "Ünïcode@x.example",
              "a" * 40 + "@example.com", "a" * 40 + "@example.org", "@@@"]
    first = subuser_names(logins)
    assert first == subuser_names(reversed(logins))  # the same site, the same names
    assert first["App_1@example.com"] == "app-1-example-com"  # the local parts clash
    assert first["app-1@other.example"] == "app-1-other-example"
    assert first["billing"] == "billing"
    assert first["Ünïcode@x.example"] == "n-code"
    assert len(set(first.values())) == len(logins)
    for name in first.values():
        assert names.account_name(name) == name
    long_names = [first["a" * 40 + "@example.com"], first["a" * 40 + "@example.org"]]
    assert all(n.startswith("a" * 25 + "-") and len(n) == 32 for n in long_names)
