"""``keyrelay migrate sendgrid`` (issue 24, part 4): JSON files shaped like SendGrid v3 API
answers (tests/fixtures/sendgrid/, built from the shapes of the public API reference:
``GET /v3/subusers``, ``/v3/access_settings/whitelist``, ``/v3/whitelabel/domains``,
``/v3/verified_senders``, ``/v3/api_keys`` with each key's scopes) become a declaration that
the real ``keyrelay sync`` accepts, and a report listing the keys to create."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from test_yaml_directory import KEYRELAY, run_cli, write_config

from keyrelay.directory import YamlDirectory
from keyrelay.directory.model import Status

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "sendgrid"


def migrate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(KEYRELAY), "migrate", "sendgrid", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def test_an_export_becomes_a_declaration_and_the_keys_to_create(tmp_path: Path) -> None:
    out = tmp_path / "sendgrid.yaml"
    done = migrate("--from", str(FIXTURES), "--account", "acme", "--out", str(out))
    assert (done.returncode, done.stderr) == (0, ""), done
    assert done.stdout.startswith(f"Wrote {out}: account acme, 2 subuser(s), 2 domain(s), "
                                  "2 single sender(s)")
    assert yaml.safe_load(out.read_text(encoding="utf-8")) == {
        "accounts": {"acme": {
            "ip_allow": ["192.0.2.0/24", "203.0.113.7/32"],
            "senders": ["support@partner.example"],
            "subusers": {"billing-ops": {"status": "suspended", "senders": []},
                         "marketing-team": {"senders": ["news@partner.example"]}},
        }},
        "domains": {"billing.example.net": {"owner": "acme", "grants": ["acme/billing-ops"]},
                    "example.com": {"owner": "acme", "grants": ["acme/marketing-team"]}},
    }
    report = (tmp_path / "sendgrid.report.md").read_text(encoding="utf-8")
    # the keys to create, with keyrelay's scopes; what has no equivalent is said
    assert ("`keyrelay key create acme --name Production-SMTP --scope mail.send`: SendGrid key "
            "`Production SMTP` of the parent account") in report
    assert "`keyrelay key create acme/marketing-team --name newsletter --scope mail.send`" in report
    assert "`keyrelay key create acme/billing-ops --name invoices --scope mail.send`" in report
    assert ("API key `Production SMTP` of the parent account: scopes with no keyrelay "
            "equivalent (keyrelay has no web API): alerts.read, templates.read") in report
    assert "API key `Dashboard` of the parent account cannot send mail" in report
    assert "API key `listed without scopes` of the parent account: its scopes are not in" in report
    assert "`pending@partner.example` of the parent account is not verified in SendGrid" in report
    assert "invalid CIDR '198.51.100.1/24': host bits are set" in report
    assert "IP access rules of subuser `marketing_team` (10.1.0.0/16)" in report
    # key ids are not secrets, but nothing of a key but its name is repeated
    for key_id in ("qfTQ6KG0QBiwWdJ0-pCLCA", "Zr5lWn0XQF6TtY1g9b3zYw"):
        assert key_id not in report + out.read_text(encoding="utf-8")

    config = write_config(tmp_path)
    synced = run_cli(config, "sync", str(out))
    assert (synced.returncode, synced.stderr) == (0, ""), synced
    data = YamlDirectory(str(tmp_path / "directory.yaml")).load()
    assert set(data.subusers) == {"acme/billing-ops", "acme/marketing-team"}
    assert data.subusers["acme/billing-ops"].status is Status.SUSPENDED
    assert [str(n) for n in data.accounts["acme"].ip_allow] == ["192.0.2.0/24",
                                                                "203.0.113.7/32"]
    assert set(data.senders) == {("acme", "support@partner.example"),
                                 ("acme/marketing-team", "news@partner.example")}
    assert {d: v.grants for d, v in data.domains.items()} == {
        "billing.example.net": ("acme/billing-ops",), "example.com": ("acme/marketing-team",)}


def copy_fixtures(tmp_path: Path) -> Path:
    folder = tmp_path / "export"
    shutil.copytree(FIXTURES, folder)
    return folder


@pytest.mark.parametrize("name, content, error", [
    ("subusers.json", '[{"username": "a", ', "subusers.json: not valid JSON: "),
    ("subusers.json", '{"username": "a"}', "subusers.json: top level: expected a list, got "
                                           "an object"),
    ("subusers.json", '[{"username": 7}]', "subusers.json: [0].username: expected a string, "
                                           "got a number"),
    ("verified_senders.json", '{"senders": []}',
     'verified_senders.json: top level: expected a list or an object with "results" (the '
     "API's answer), got keys senders"),
    ("api_keys.json", '{"result": [{"name": "x", "scopes": "mail.send"}]}',
     "api_keys.json: result[0].scopes: expected a list of strings, got a string"),
    ("whitelabel_domains.json", b"\xff\xfe[]", "whitelabel_domains.json: not UTF-8 text"),
])
def test_malformed_json_is_one_line_naming_file_and_reason_and_nothing_is_written(
        tmp_path: Path, name: str, content: str | bytes, error: str) -> None:
    folder = copy_fixtures(tmp_path)
    target = folder / name
    if isinstance(content, bytes):
        target.write_bytes(content)
    else:
        target.write_text(content, encoding="utf-8")
    out = tmp_path / "sendgrid.yaml"
    done = migrate("--from", str(folder), "--out", str(out))
    assert done.returncode == 1, done
    assert done.stderr.startswith(f"keyrelay: error: {folder}/{error}"), done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert not out.exists() and not (tmp_path / "sendgrid.report.md").exists()


def test_a_folder_without_answers_is_refused(tmp_path: Path) -> None:
    done = migrate("--from", str(tmp_path), "--out", str(tmp_path / "s.yaml"))
    assert done.returncode == 1
    assert done.stderr.startswith(f"keyrelay: error: --from {tmp_path}: holds none of "
                                  "subusers.json, "), done.stderr


def test_a_partial_export_says_what_it_lacks(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "verified_senders.json").write_text(
        '{"results": [{"from_email": "a@b.example", "verified": true}]}', encoding="utf-8")
    out = tmp_path / "s.yaml"
    done = migrate("--from", str(folder), "--account", "shop", "--out", str(out))
    assert (done.returncode, done.stderr) == (0, ""), done
    assert yaml.safe_load(out.read_text(encoding="utf-8")) == {
        "accounts": {"shop": {"senders": ["a@b.example"], "subusers": {}}}}
    report = (tmp_path / "s.report.md").read_text(encoding="utf-8")
    assert "Not in the export (nothing of these was imported): `subusers.json`" in report
