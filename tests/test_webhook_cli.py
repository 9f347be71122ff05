"""``keyrelay webhook set|show|remove|test`` through the real CLI (a subprocess) with the YAML
directory, and a real HTTPS receiver on 127.0.0.1 (testkit/webhooks.py) that checks every
signature with the documented ``verify`` (docs/webhooks.md). The signing secret is printed
once, by ``set``, and never again: not by ``show``, ``account show``, the audit log, an
error, nor the repr of the directory's records. Export, import and backup carry it; sync
leaves it alone."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from test_yaml_directory import run_cli

from keyrelay.directory import YamlDirectory
from keyrelay.webhooks import sign
from testkit.webhooks import Answer, Receiver


class Node:
    """A configuration root of its own: keyrelay.yaml, directory file, audit log."""

    def __init__(self, root: Path, *, allow_private: bool = True, ca_file: str = "") -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.directory = root / "directory.yaml"
        self.audit = root / "audit.log"
        self.config = root / "keyrelay.yaml"
        self.config.write_text(yaml.safe_dump({
            "directory": {"path": str(self.directory)},
            "dkim": {"key_dir": str(root / "dkim")},
            "logging": {"audit_log": str(self.audit)},
            "webhooks": {"allow_private_targets": allow_private, "ca_file": ca_file,
                         "timeout": "5s"},
        }))

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(self.config, *args)

    def ok(self, *args: str) -> str:
        result = self.cli(*args)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def refused(self, *args: str) -> str:
        """The one error line of a command that must fail (exit 1)."""
        result = self.cli(*args)
        assert result.returncode == 1, result.stdout
        assert result.stderr.startswith("keyrelay: error: ") and result.stderr.count("\n") == 1
        assert "Traceback" not in result.stderr
        return result.stderr.removeprefix("keyrelay: error: ").rstrip("\n")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver(tls=True) as running:
        yield running


@pytest.fixture
def node(tmp_path: Path, receiver: Receiver) -> Node:
    made = Node(tmp_path / "node", ca_file=str(receiver.ca_file))
    made.ok("account", "add", "acme")
    return made


def secret_of(output: str) -> str:
    """The secret ``webhook set`` printed (its last line)."""
    secret = output.rstrip("\n").splitlines()[-1]
    assert secret.startswith(sign.SECRET_PREFIX) and sign.secret_problem(secret) is None
    return secret


def test_set_prints_the_secret_once_and_nothing_shows_it_again(node: Node,
                                                               receiver: Receiver) -> None:
    out = node.ok("webhook", "set", "acme", "--url", receiver.url)
    secret = secret_of(out)
    assert out.startswith(f"Webhook of acme: deliveries go to {receiver.url}\n")
    assert "shown only now" in out

    shown = node.ok("webhook", "show", "acme")
    assert f"url:      {receiver.url}\n" in shown and "secret:   set" in shown
    as_json = json.loads(node.ok("webhook", "show", "acme", "--json"))
    assert set(as_json) == {"account", "url", "created", "updated"}
    account = node.ok("account", "show", "acme")
    assert f"webhook:   {receiver.url}\n" in account
    account_json = json.loads(node.ok("account", "show", "acme", "--json"))
    assert account_json["webhook"] == receiver.url
    audit = [json.loads(line) for line in node.audit.read_text().splitlines()]
    assert audit[-1]["action"] == "webhook.set" and audit[-1]["url"] == receiver.url
    assert audit[-1]["secret"] == "new"
    loaded = YamlDirectory(str(node.directory)).load()
    assert loaded.accounts["acme"].webhook is not None
    assert loaded.accounts["acme"].webhook.secret == secret  # stored usable: it signs
    for text in (shown, json.dumps(as_json), account, json.dumps(account_json),
                 node.audit.read_text(), repr(loaded), repr(loaded.accounts["acme"]),
                 node.ok("account", "list", "--json")):
        assert secret not in text
    assert secret in node.directory.read_text()  # the file holds it, like a DKIM key


def test_json_gives_the_secret_once_and_keep_secret_changes_only_the_url(
        node: Node, receiver: Receiver) -> None:
    made = json.loads(node.ok("webhook", "set", "acme", "--url", receiver.url, "--json"))
    assert made["url"] == receiver.url and sign.secret_problem(made["secret"]) is None
    other = receiver.url_for(path="/other")
    kept = node.ok("webhook", "set", "acme", "--url", other, "--keep-secret")
    assert kept == (f"Webhook of acme: deliveries go to {other}\n"
                    "The signing secret is the one it had.\n")
    hook = YamlDirectory(str(node.directory)).load().accounts["acme"].webhook
    assert hook is not None and (hook.url, hook.secret) == (other, made["secret"])
    renewed = secret_of(node.ok("webhook", "set", "acme", "--url", other))
    assert renewed != made["secret"]
    audit = [json.loads(line) for line in node.audit.read_text().splitlines()]
    assert [a["secret"] for a in audit if a["action"] == "webhook.set"] == ["new", "kept", "new"]


def test_test_sends_a_signed_event_the_receiver_verifies(node: Node,
                                                         receiver: Receiver) -> None:
    secret = secret_of(node.ok("webhook", "set", "acme", "--url", receiver.url))
    out = node.ok("webhook", "test", "acme")
    assert out == f"Test event delivered: webhook {receiver.url}: HTTP 200 OK\n"
    (got,) = receiver.wait_for(1)
    header = got.headers["x-keyrelay-signature"]
    assert sign.verify(secret, header, got.body, time.time())
    assert not sign.verify(secret, header, got.body.replace(b"acme", b"acmf"), time.time())
    assert not sign.verify(secret, header, got.body, time.time() + 600)  # an old timestamp
    (event,) = json.loads(got.body)
    assert event["event"] == "test" and event["account"] == "acme"
    assert abs(event["timestamp"] - time.time()) < 3600

    receiver.answer = lambda _request: Answer(503)
    assert node.refused("webhook", "test", "acme") == (
        f"webhook {receiver.url}: HTTP 503 Service Unavailable")
    receiver.answer = lambda _request: Answer(204)
    assert json.loads(node.ok("webhook", "test", "acme", "--json")) == {
        "account": "acme", "url": receiver.url, "status": 204, "address": "127.0.0.1"}


def test_a_test_to_a_receiver_whose_certificate_does_not_verify_says_why(
        tmp_path: Path, receiver: Receiver) -> None:
    node = Node(tmp_path / "system-ca")  # the system's CA store: the test CA is unknown
    node.ok("account", "add", "acme")
    node.ok("webhook", "set", "acme", "--url", receiver.url)
    line = node.refused("webhook", "test", "acme")
    assert line.startswith(f"webhook {receiver.url}: the TLS certificate of 127.0.0.1 "
                           "(127.0.0.1) does not verify: ")


def test_remove_ends_the_webhook(node: Node, receiver: Receiver) -> None:
    node.ok("webhook", "set", "acme", "--url", receiver.url)
    assert node.ok("webhook", "remove", "acme").startswith(
        f"Removed the webhook of acme ({receiver.url})")
    assert YamlDirectory(str(node.directory)).load().accounts["acme"].webhook is None
    assert node.refused("webhook", "show", "acme") == (
        "account acme has no webhook (set one: keyrelay webhook set acme --url URL)")
    assert node.refused("webhook", "test", "acme").startswith("account acme has no webhook")
    assert json.loads(node.audit.read_text().splitlines()[-1]) | {"time": "", "user": ""} == {
        "time": "", "user": "", "action": "webhook.remove", "account": "acme"}


@pytest.mark.parametrize(("url", "line"), [
    ("ftp://hooks.example.com/in", "webhook URL ftp://hooks.example.com/in: only http:// and "
     "https:// URLs are allowed, got ftp://"),
    ("https://u:p@hooks.example.com/in", "webhook URL https://u:p@hooks.example.com/in: a URL "
     "with credentials (user:password@) is not allowed: the deliveries are signed "
     "(X-Keyrelay-Signature) instead"),
    ("https:///in", "webhook URL https:///in: the URL has no host"),
    ("https://127.0.0.1:8443/hook", "webhook URL https://127.0.0.1:8443/hook: 127.0.0.1 is a "
     "loopback address; set webhooks.allow_private_targets: true to allow it"),
    ("https://10.0.0.5/hook", "webhook URL https://10.0.0.5/hook: 10.0.0.5 is a private "
     "address; set webhooks.allow_private_targets: true to allow it"),
    ("http://localhost/hook", "webhook URL http://localhost/hook: localhost resolves to "),
])
def test_a_refused_url_is_one_precise_line_and_changes_nothing(tmp_path: Path, url: str,
                                                               line: str) -> None:
    node = Node(tmp_path / "strict", allow_private=False)
    node.ok("account", "add", "acme")
    before = node.directory.read_bytes()
    assert node.refused("webhook", "set", "acme", "--url", url).startswith(line)
    assert node.directory.read_bytes() == before
    assert "webhook" not in node.audit.read_text()


def test_an_unknown_account_and_a_secret_to_keep_that_is_not_there_are_refused(
        node: Node, receiver: Receiver) -> None:
    assert node.refused("webhook", "set", "nobody", "--url", receiver.url) == (
        "unknown account 'nobody' (see: keyrelay account list)")
    assert node.refused("webhook", "set", "acme", "--url", receiver.url, "--keep-secret") == (
        "account acme has no webhook yet, so no secret to keep: leave out --keep-secret")


def test_export_import_and_backup_carry_the_webhook_and_sync_leaves_it(
        node: Node, receiver: Receiver, tmp_path: Path) -> None:
    secret = secret_of(node.ok("webhook", "set", "acme", "--url", receiver.url))
    hook = YamlDirectory(str(node.directory)).load().accounts["acme"].webhook
    exported = tmp_path / "export.yaml"
    node.ok("export", "-o", str(exported))
    other = Node(tmp_path / "other")
    assert "add account acme" in other.ok("import", str(exported))
    assert YamlDirectory(str(other.directory)).load().accounts["acme"].webhook == hook

    archive = tmp_path / "node.tar.gz"
    node.ok("backup", str(archive))
    restored = Node(tmp_path / "restored")
    restored.ok("restore", str(archive))
    assert YamlDirectory(str(restored.directory)).load().accounts["acme"].webhook == hook

    declared = tmp_path / "declared.yaml"
    declared.write_text("accounts:\n  acme:\n    monitor: true\n")
    node.ok("sync", str(declared))
    after = YamlDirectory(str(node.directory)).load().accounts["acme"]
    assert after.monitor and after.webhook == hook
    declared.write_text(f"accounts:\n  acme:\n    webhook: {{url: {receiver.url}}}\n")
    line = node.refused("sync", str(declared))
    assert "accounts.acme.webhook" in line and secret not in line
