"""``keyrelay suppression`` through the real CLI (subprocess): add, list, remove, export and
import round trip; a SendGrid-shaped bounce export (tests/fixtures/suppressions/); a CSV with
a BOM, CRLF and bad lines (each named FILE:LINE, the others imported); a file that cannot be
read at all changes nothing; every change audited (docs/suppressions.md, "Commands")."""

from __future__ import annotations

import csv
import io
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from keyrelay import admin
from keyrelay.suppressions import SqliteSuppressions
from testkit.policyd import KEYRELAY, Policyd, now

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "suppressions"


class Ran(NamedTuple):
    code: int
    out: str
    err: str


class Site:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.db = root / "state" / "suppressions.db"
        self.relay = Policyd(root / "relay", {"suppressions": {"path": str(self.db)}})
        with self.relay.directory().transaction() as data:
            admin.add_account(data, "acme", now())
            admin.add_subuser(data, "acme/news", now())
            admin.add_account(data, "globex", now())

    def run(self, *args: str) -> Ran:
        done = subprocess.run([str(KEYRELAY), "--config", str(self.relay.config_path), *args],
                              capture_output=True, text=True, timeout=120)
        return Ran(done.returncode, done.stdout, done.stderr)

    def ok(self, *args: str) -> str:
        ran = self.run(*args)
        assert ran.code == 0, ran
        return ran.out

    def audit(self) -> list[dict[str, str]]:
        path = self.relay.root / "audit.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() \
            else []


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    yield Site(tmp_path)


def rows(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def test_add_list_remove_and_the_audit_log(site: Site) -> None:
    assert site.ok("suppression", "list", "acme") == "Account acme suppresses no address.\n"
    said = site.ok("suppression", "add", "acme", "Bob@Example.COM", "--reason", "asked to stop")
    assert said == ("bob@example.com is suppressed for account acme: its mail to it is "
                    "refused at RCPT (550 5.7.1).\n")
    listed = site.ok("suppression", "list", "acme").splitlines()
    assert listed[0].split() == ["ADDRESS", "SINCE", "SOURCE", "STATUS", "REASON"]
    assert listed[1].split()[0] == "bob@example.com" and "manual" in listed[1]
    assert listed[1].endswith("asked to stop")
    found = json.loads(site.ok("suppression", "list", "acme", "--json"))
    assert [(f["email"], f["source"], f["reason"]) for f in found] == [
        ("bob@example.com", "manual", "asked to stop")]
    assert site.ok("suppression", "list", "globex", "--json") == "[]\n"
    assert site.ok("suppression", "remove", "acme", "BOB@example.com") == (
        "bob@example.com is no longer suppressed for account acme.\n")
    assert "was not suppressed" in site.ok("suppression", "remove", "acme", "bob@example.com")
    assert [(a["action"], a["account"], a["address"]) for a in site.audit()] == [
        ("suppression.add", "acme", "bob@example.com"),
        ("suppression.remove", "acme", "bob@example.com"),
        ("suppression.remove", "acme", "bob@example.com")]


def test_refusals_are_one_line_and_change_nothing(site: Site) -> None:
    for args, says in [
        (("add", "nobody", "a@example.com"), "no account nobody"),
        (("add", "acme", "not-an-address"), "invalid address 'not-an-address'"),
        (("add", "acme", "bell\x07@example.com"), "control characters"),
        (("add", "acme/news", "a@example.com"), "invalid name 'acme/news'"),
        (("import", "acme", str(site.root / "missing.csv")), "cannot read"),
    ]:
        ran = site.run("suppression", *args)
        assert ran.code == 1, ran
        assert len(ran.err.splitlines()) == 1 and says in ran.err, ran.err
        assert "Traceback" not in ran.err
    assert site.ok("suppression", "list", "acme", "--json") == "[]\n"
    assert site.audit() == []


def test_a_sendgrid_export_imports_and_exports_back_the_same(site: Site,
                                                             tmp_path: Path) -> None:
    fixture = FIXTURES / "sendgrid_bounces.csv"
    said = site.ok("suppression", "import", "acme", str(fixture))
    assert said == ("Imported 4 address(es) into the suppression list of account acme (4 new, "
                    "0 already there); 0 bad line(s) skipped.\n")
    exported = site.ok("suppression", "export", "acme")
    given = rows(fixture.read_text())
    assert rows(exported)[0] == given[0] == ["email", "created", "status", "reason"]
    assert sorted(rows(exported)[1:]) == sorted(
        [[r[0].lower(), *r[1:]] for r in given[1:]])
    # the export, imported into another account, is the same list
    out = tmp_path / "acme.csv"
    assert site.ok("suppression", "export", "acme", str(out)) == (
        f"Wrote 4 suppression(s) of account acme to {out}.\n")
    assert out.read_text() == exported
    site.ok("suppression", "import", "globex", str(out))
    assert site.ok("suppression", "export", "globex") == exported
    again = site.ok("suppression", "import", "acme", str(fixture))
    assert "(0 new, 4 already there)" in again
    imports = [a for a in site.audit() if a["action"] == "suppression.import"]
    assert [(a["account"], a["imported"], a["new"]) for a in imports] == [
        ("acme", "4", "4"), ("globex", "4", "4"), ("acme", "4", "0")]


def test_bad_lines_are_each_named_and_the_others_imported(site: Site) -> None:
    path = FIXTURES / "with_bad_lines.csv"  # a BOM, CRLF, a quoted reason over two lines
    ran = site.run("suppression", "import", "acme", str(path))
    assert ran.code == 1
    assert ran.out == ("Imported 3 address(es) into the suppression list of account acme (3 "
                       "new, 0 already there); 4 bad line(s) skipped.\n")
    assert ran.err.splitlines() == [
        f"keyrelay: {path}:3: not an address: 'not-an-address'",
        f"keyrelay: {path}:4: created 'yesterday' is neither Unix seconds nor a date such as "
        "2026-12-05 08:34:48",
        f"keyrelay: {path}:5: 5 columns, the header has 4",
        f"keyrelay: {path}:6: not an address: 'bell\\x07@example.com'",
        f"keyrelay: error: 4 line(s) of {path} were not imported (listed above); the others "
        "were",
    ]
    found = {f["email"]: f for f in json.loads(site.ok("suppression", "list", "acme",
                                                       "--json"))}
    assert sorted(found) == ["dated@example.com", "last@example.com", "ok@example.com"]
    assert found["dated@example.com"]["created"] == 1417854888  # 2014-12-06 08:34:48 UTC
    assert found["dated@example.com"]["reason"] == "550 5.1.1 multi line reason"


def test_a_header_that_is_not_sendgrids_imports_nothing(site: Site, tmp_path: Path) -> None:
    path = tmp_path / "mailgun.csv"
    path.write_text("address,code,error,created_at\na@example.com,550,gone,\n")
    ran = site.run("suppression", "import", "acme", str(path))
    assert ran.code == 1
    assert ran.err.splitlines()[0] == (
        f"keyrelay: {path}:1: the header 'address,code,error,created_at' is not SendGrid's: "
        "expected email,created,status,reason (email, then any of the others)")
    assert site.ok("suppression", "list", "acme", "--json") == "[]\n"


def test_a_file_that_cannot_be_decoded_changes_nothing(site: Site, tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"email\nok@example.com\nj\xe9r\xf4me@example.com\n")
    ran = site.run("suppression", "import", "acme", str(path))
    assert ran.code == 1
    assert ran.err == (
        f"keyrelay: error: {path}:3: not UTF-8 text (byte 23); nothing was imported\n")
    assert not site.db.exists() or SqliteSuppressions(str(site.db)).count("acme") == 0


def test_a_list_longer_than_the_limit_says_so_and_export_pages_through_all(
        site: Site, tmp_path: Path) -> None:
    path = tmp_path / "many.csv"
    path.write_text("email\n" + "".join(f"u{n:04d}@example.com\n" for n in range(2500)))
    site.ok("suppression", "import", "acme", str(path))
    listed = site.ok("suppression", "list", "acme", "--limit", "3").splitlines()
    assert len(listed) == 5 and listed[-1].startswith("(3 of 2500; --limit shows more")
    exported = rows(site.ok("suppression", "export", "acme"))
    assert [r[0] for r in exported[1:]] == [f"u{n:04d}@example.com" for n in range(2500)]


def test_reading_an_empty_list_creates_no_file(site: Site) -> None:
    assert site.ok("suppression", "list", "acme") == "Account acme suppresses no address.\n"
    assert site.ok("suppression", "export", "acme") == "email,created,status,reason\n"
    assert "was not suppressed" in site.ok("suppression", "remove", "acme", "a@example.com")
    assert not site.db.exists() and not site.db.parent.exists()
