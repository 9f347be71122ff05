"""The admin CLI ``keyrelay`` against files in tmp_path.

Commands run in-process (``keyrelay.cli.main`` with stdout and stderr captured): what the
CLI prints and exits with, without a new interpreter per command. A few tests run the real
console script (the ``keyrelay`` script beside ``sys.executable``, ``CliSite.script``): its
exit codes, ``--help``, an argument that is not UTF-8, and what happens to DKIM keys when a
command is interrupted or loses a race with another writer. Each test uses a configuration
whose directory, DKIM key folder and audit log live in a temporary folder.

- One installation for the whole module (``shared``) goes through what a new user does first
  (WALKTHROUGH); the listing tests only read it and the refusal tests are refused by it, so it
  never changes afterwards.
- Lifecycle tests (revoke, rotate, suspend, remove, ...) start from an empty installation of
  their own (``fresh``).
- Text output is compared with golden files under tests/golden/cli/ after ``normalise()`` has
  masked what differs between runs. ``KEYRELAY_UPDATE_GOLDEN=1 pytest tests/test_cli.py``
  rewrites them; review the diff before committing.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from keyrelay import admin, cli, keys
from keyrelay.directory import YamlDirectory
from keyrelay.directory.yamlfile import render

KEYRELAY = shutil.which("keyrelay", path=os.path.dirname(sys.executable))
GOLDEN = Path(__file__).resolve().parent / "golden" / "cli"
UPDATE_ENV = "KEYRELAY_UPDATE_GOLDEN"
# the console script's environment (CliSite.script)
ENV = {k: v for k, v in os.environ.items()
       if k not in ("KEYRELAY_CONFIG", "PYTHONDONTWRITEBYTECODE")}
# Without cached bytecode every run compiles keyrelay again (PYTHONDONTWRITEBYTECODE=1 is set in
# some environments), which costs a third of each run; keep the cache outside the source tree.
ENV["PYTHONPYCACHEPREFIX"] = os.path.join(tempfile.gettempdir(), f"keyrelay-tests-{os.getuid()}")
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

CONFIG = """\
directory:
  path: {root}/directory.yaml
dkim:
  key_dir: {root}/dkim
logging:
  audit_log: {root}/audit.log
"""


# -- running the CLI -------------------------------------------------------------------------
@dataclass(frozen=True)
class Result:
    args: tuple[str, ...]
    code: int
    out: str
    err: str

    def __str__(self) -> str:  # what a failed assertion shows
        return (f"$ keyrelay {shlex.join(self.args)}\nexit {self.code}\n"
                f"--- stdout\n{self.out}--- stderr\n{self.err}")


class CliSite:
    """One keyrelay installation in a folder: configuration, directory, DKIM keys, audit log."""

    def __init__(self, root: Path, extra_config: str = "") -> None:
        self.root = root
        self.config = root / "keyrelay.yaml"
        self.directory = root / "directory.yaml"
        self.key_dir = root / "dkim"
        self.audit_log = root / "audit.log"
        self.masks: dict[str, str] = {}  # literal -> mask, for normalise()
        self.config.write_text(CONFIG.format(root=root) + extra_config, encoding="utf-8")

    def run(self, command: str | Sequence[str], config: Path | None = None) -> Result:
        """``keyrelay --config CONFIG COMMAND`` in-process (a string is split like a shell
        would)."""
        args = tuple(shlex.split(command) if isinstance(command, str) else command)
        return run_main(["--config", str(config or self.config), *args], shown=args)

    def script(self, argv: Sequence[str], config: bool = True) -> Result:
        """The installed console script, ``keyrelay [--config CONFIG] ARGV``."""
        full = ["--config", str(self.config), *argv] if config else list(argv)
        proc = subprocess.run([script(), *full], capture_output=True, text=True, env=ENV,
                              timeout=60, check=False)
        return Result(tuple(argv), proc.returncode, proc.stdout, proc.stderr)

    def start(self, argv: Sequence[str]) -> subprocess.Popen[str]:
        """The console script started, not waited for; Ctrl-C (SIGINT) raises
        KeyboardInterrupt in it, as in a terminal (even if this test run ignores SIGINT)."""
        return subprocess.Popen(
            [script(), "--config", str(self.config), *argv], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=ENV,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def run_all(self, commands: Sequence[str]) -> dict[str, Result]:
        """Run read-only commands; results by command."""
        return {command: self.run(command) for command in commands}

    def ok(self, command: str) -> str:
        """Run a command that must succeed silently on stderr; its stdout."""
        result = self.run(command)
        assert (result.code, result.err) == (0, ""), result
        return result.out

    def json(self, command: str) -> Any:
        return json.loads(self.ok(command + " --json"))

    def refused(self, command: str) -> str:
        """Run a command that must be refused (exit 1); its one stderr line."""
        return assert_refused(self.run(command))

    def remember_key(self, name: str, key_id: str, text: str) -> None:
        self.masks[text] = f"<api-key:{name}>"
        self.masks[key_id] = f"<key:{name}>"

    def normalise(self, text: str) -> str:
        return normalise(text, self.root, self.masks)


def run_main(argv: Sequence[str], shown: Sequence[str] | None = None) -> Result:
    """``keyrelay.cli.main(argv)`` with stdout and stderr captured; a usage error or
    ``--help`` (SystemExit from argparse) gives its exit status. Any other exception is a
    bug, and fails the test with its traceback."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:
            assert isinstance(exc.code, int), exc.code
            code = exc.code
    return Result(tuple(argv if shown is None else shown), code, out.getvalue(),
                  err.getvalue())


def script() -> str:
    assert KEYRELAY, "no keyrelay console script beside sys.executable: pip install -e ."
    return KEYRELAY


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str], what: str,
             seconds: float = 60.0) -> None:
    """Wait until ``condition()`` while ``proc`` runs; 60 s is a generous deadline for one
    keyrelay command, even on a loaded machine."""
    deadline = time.monotonic() + seconds
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"keyrelay exited {proc.returncode} before {what}:\n{out}{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"not within {seconds:g} s: {what}")
        time.sleep(0.02)


def assert_refused(result: Result, code: int = 1) -> str:
    """Exit ``code``, nothing on stdout, no traceback and one error line; return that line.

    Refusals (1) print exactly ``keyrelay: error: ...``; usage errors (2) print argparse's usage
    lines, then one ``keyrelay [COMMAND ACTION]: error: ...`` line.
    """
    assert "Traceback" not in result.err, result
    assert (result.code, result.out) == (code, ""), result
    lines = result.err.splitlines() or [""]
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith("keyrelay: error: "), result
    else:
        assert lines[0].startswith("usage: keyrelay"), result
        assert [line for line in lines if ": error: " in line] == [lines[-1]], result
        assert lines[-1].startswith("keyrelay"), result
    return lines[-1]


# -- golden files ----------------------------------------------------------------------------
_TIME = re.compile(r"\b\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\b")
_SELECTOR_DATE = re.compile(r"\bkr\d{8}(?=[a-z]?-(?:rsa|ed)\b)")
_BASE64 = re.compile(r"[A-Za-z0-9+/]{40,}={0,2}")
_ANY_KEY = re.compile(r"\bkr\.[a-z2-7]{16}\.[A-Za-z0-9_-]{20,}")


def normalise(text: str, root: Path, masks: Mapping[str, str]) -> str:
    """Mask what differs between runs, so that a golden file holds only what is worth reviewing.

    In this order: the temporary folder becomes ``<tmp>``; each literal in ``masks`` becomes its
    mask (an API key's text ``<api-key:NAME>``, its id ``<key:NAME>``; any other key text
    ``<api-key>``); UTC times become ``YYYY-MM-DDThh:mm:ssZ`` and the date in generated selector
    names ``krYYYYMMDD`` (same width, so table columns stay aligned); base64 runs of 40 or more
    characters (DKIM public keys) become ``<base64>``.
    """
    text = text.replace(str(root), "<tmp>")
    for literal, mask in sorted(masks.items(), key=lambda item: -len(item[0])):
        text = text.replace(literal, mask)
    text = _ANY_KEY.sub("<api-key>", text)
    text = _TIME.sub("YYYY-MM-DDThh:mm:ssZ", text)
    text = _SELECTOR_DATE.sub("krYYYYMMDD", text)
    return _BASE64.sub("<base64>", text)


def assert_golden(name: str, text: str) -> None:
    """Compare ``text`` with tests/golden/cli/NAME; with KEYRELAY_UPDATE_GOLDEN=1, rewrite it."""
    path = GOLDEN / name
    if os.environ.get(UPDATE_ENV) == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    assert path.exists(), f"{path} is missing: run with {UPDATE_ENV}=1, then review the file"
    expected = path.read_text(encoding="utf-8")
    assert text == expected, f"output differs from {path} ({UPDATE_ENV}=1 rewrites it)"


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=UTC)


def public_half(key_file: Path) -> str:
    """The DNS ``p=`` value for a PKCS#8 private key file, computed independently of keyrelay."""
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    if isinstance(key, rsa.RSAPrivateKey):
        assert key.key_size == 2048
        raw = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    return base64.b64encode(raw).decode("ascii")


def key_files(relay: CliSite) -> list[str]:
    return sorted(str(p.relative_to(relay.key_dir)) for p in relay.key_dir.rglob("*.pem"))


# -- the walkthrough: one installation that the listing and refusal tests share --------------
WALKTHROUGH = [
    "account add acme",
    "account add globex",
    "subuser add acme/marketing",
    "key create acme/marketing --name newsletter --expires 90d",
    "ip allow acme 192.0.2.0/24",
    "ip allow acme 2001:DB8:1::/48",
    "pool add mkt --bind 192.0.2.10 --bind 2001:db8::10 --helo mkt.relay.example.net",
    "pool assign acme/marketing mkt",
    "domain add acme example.com",
    "domain grant example.com acme/marketing",
    "domain mark-verified example.com",
    "sender add acme/marketing Alerts@Example.ORG",
    "limits set acme/marketing --per-minute 10 --recipients 5",
]


@dataclass
class Shared:
    relay: CliSite
    transcript: str  # every walkthrough command with its output, normalised
    key_id: str
    key_text: str
    shown: dict[str, str]  # stdout of the read-only LISTINGS


# Read-only commands run once on the walkthrough's installation; {key} is its key id.
LISTINGS = [
    "account list", "account list --json", "account show acme", "account show acme --json",
    "subuser list acme", "subuser list acme --json",
    "key list acme/marketing", "key list --json", "key show {key}", "key show {key} --json",
    "ip list acme", "ip list acme --json", "ip list globex",
    "domain list", "domain list acme/marketing --json",
    "domain show example.com", "domain show example.com --json",
    "domain dns example.com", "domain dns Example.COM. --json",
    "pool list", "pool list --json", "sender list", "sender list acme/marketing --json",
    "monitor status", "monitor status --json", "check-config",
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Shared:
    relay = CliSite(tmp_path_factory.mktemp("relay"))
    transcript, key_id, key_text = [], "", ""
    for command in WALKTHROUGH:
        out = relay.ok(command)
        if command.startswith("key create"):
            found = re.search(r"^Created key (\S+) ", out, re.MULTILINE)
            assert found, out
            key_id, key_text = found[1], out.splitlines()[-1]
            relay.remember_key("newsletter", key_id, key_text)
        transcript.append(f"$ keyrelay {command}\n{out}")
    results = relay.run_all([c.format(key=key_id) for c in LISTINGS])
    for result in results.values():
        assert (result.code, result.err) == (0, ""), result
    shown = {c: results[c.format(key=key_id)].out for c in LISTINGS}
    return Shared(relay, relay.normalise("\n".join(transcript)), key_id, key_text, shown)


def test_walkthrough_prints_what_a_new_user_needs(shared: Shared) -> None:
    assert_golden("walkthrough.txt", shared.transcript)


def test_created_key_is_printed_once_and_stored_only_as_a_hash(shared: Shared) -> None:
    prefix, key_id, secret = shared.key_text.split(".")
    assert (prefix, key_id) == ("kr", shared.key_id)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", secret)  # 256 random bits
    for command, out in shared.shown.items():
        assert secret not in out, command
    stored = shared.relay.directory.read_text(encoding="utf-8")
    assert secret not in stored
    assert hashlib.sha256(secret.encode()).hexdigest() in stored
    assert secret not in shared.relay.audit_log.read_text(encoding="utf-8")


def test_every_change_is_audited_once(shared: Shared) -> None:
    entries = [json.loads(line) for line in shared.relay.audit_log.read_text().splitlines()]
    assert [e["action"] for e in entries] == [
        "account.add", "account.add", "subuser.add", "key.create", "ip.allow", "ip.allow",
        "pool.add", "pool.assign", "domain.add", "domain.grant", "domain.mark-verified",
        "sender.add", "limits.set",
    ]
    assert entries[3]["key_id"] == shared.key_id
    assert entries[10]["how"].startswith("manual")


# -- listings, each as text (golden) and as JSON ---------------------------------------------
def test_account_list_and_show(shared: Shared) -> None:
    assert_golden("account_list.txt", shared.shown["account list"])
    assert_golden("account_show.txt", shared.relay.normalise(shared.shown["account show acme"]))
    accounts = json.loads(shared.shown["account list --json"])
    assert [a["name"] for a in accounts] == ["acme", "globex"]
    acme = json.loads(shared.shown["account show acme --json"])
    assert accounts[0] == acme
    parse_time(acme.pop("created"))
    assert acme == {
        "name": "acme", "status": "active", "monitor": False, "pool": None,
        "ip_allow": ["192.0.2.0/24", "2001:db8:1::/48"],
        "limits": {"messages_per_minute": None, "messages_per_hour": None,
                   "recipients_per_message": None, "messages_per_day": None,
                   "messages_per_month": None},
        # the numbers the policy service applies: here the configuration's defaults
        "effective_limits": {"messages_per_minute": 600, "messages_per_hour": 20000,
                             "recipients_per_message": 100, "messages_per_day": None,
                             "messages_per_month": None},
        "subusers": ["marketing"], "keys": 1, "domains": ["example.com"], "webhook": None,
    }
    assert (accounts[1]["subusers"], accounts[1]["keys"], accounts[1]["domains"]) == ([], 0, [])


def test_subuser_list(shared: Shared) -> None:
    assert_golden("subuser_list.txt", shared.shown["subuser list acme"])
    (sub,) = json.loads(shared.shown["subuser list acme --json"])
    parse_time(sub.pop("created"))
    assert sub == {
        "principal": "acme/marketing", "account": "acme", "name": "marketing",
        "status": "active", "pool": "mkt",
        "limits": {"messages_per_minute": 10, "messages_per_hour": None,
                   "recipients_per_message": 5, "messages_per_day": None,
                   "messages_per_month": None},
        # the tightest number that caps it: its own per-minute limit, the account's others
        "effective_limits": {"messages_per_minute": 10, "messages_per_hour": 20000,
                             "recipients_per_message": 5, "messages_per_day": None,
                             "messages_per_month": None},
        "keys": 1,
    }


def test_key_list_and_show_never_print_the_key(shared: Shared) -> None:
    relay = shared.relay
    assert_golden("key_list.txt", relay.normalise(shared.shown["key list acme/marketing"]))
    assert_golden("key_show.txt", relay.normalise(shared.shown["key show {key}"]))
    (listed,) = json.loads(shared.shown["key list --json"])
    shown = json.loads(shared.shown["key show {key} --json"])
    assert listed == shown
    assert set(shown) == {"key_id", "principal", "name", "scopes", "state", "created",
                          "expires", "revoked", "last_used"}
    assert (shown["key_id"], shown["principal"], shown["name"]) == (
        shared.key_id, "acme/marketing", "newsletter")
    assert (shown["scopes"], shown["state"], shown["revoked"], shown["last_used"]) == (
        ["mail.send"], "active", None, None)
    assert parse_time(shown["expires"]) - parse_time(shown["created"]) == timedelta(days=90)


def test_ip_list_shows_ipv4_and_ipv6_rules(shared: Shared) -> None:
    assert shared.shown["ip list acme"] == "192.0.2.0/24\n2001:db8:1::/48\n"
    assert json.loads(shared.shown["ip list acme --json"]) == ["192.0.2.0/24", "2001:db8:1::/48"]
    assert "any client address may log in" in shared.shown["ip list globex"]


def test_domain_add_writes_rsa_and_ed25519_private_keys_mode_0600(shared: Shared) -> None:
    relay = shared.relay
    dom = json.loads(shared.shown["domain show example.com --json"])
    assert [s["algorithm"] for s in dom["selectors"]] == ["rsa-sha256", "ed25519-sha256"]
    for sel in dom["selectors"]:
        path = Path(sel["key_file"])
        assert path == relay.key_dir / "example.com" / f"{sel['selector']}.pem"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert stat.S_IMODE((relay.key_dir / "example.com").stat().st_mode) == 0o700
    assert stat.S_IMODE(relay.key_dir.stat().st_mode) == 0o700


def test_domain_dns_publishes_the_public_half_of_each_key_file(shared: Shared) -> None:
    dns = json.loads(shared.shown["domain dns Example.COM. --json"])
    dom = json.loads(shared.shown["domain show example.com --json"])
    assert (dns["domain"], dns["state"]) == ("example.com", "verified")
    records = {r["name"]: r for r in dns["records"]}
    for sel in dom["selectors"]:
        k = "rsa" if sel["algorithm"] == "rsa-sha256" else "ed25519"
        record = records.pop(f"{sel['selector']}._domainkey.example.com")
        assert record["type"] == "TXT"
        assert record["value"] == f"v=DKIM1; k={k}; p={public_half(Path(sel['key_file']))}"
    # the grantee acme/marketing sends through pool mkt: SPF must authorise both addresses
    assert records.pop("example.com")["value"] == "v=spf1 ip4:192.0.2.10 ip6:2001:db8::10 ~all"
    assert records.pop("_dmarc.example.com")["value"] == "v=DMARC1; p=none; adkim=r; aspf=r"
    assert records == {}


def test_domain_dns_zone_form_matches_json(shared: Shared) -> None:
    zone = shared.shown["domain dns example.com"]
    assert_golden("domain_dns.txt", shared.relay.normalise(zone))
    values = {}
    for line in zone.splitlines():
        if line.startswith(";"):
            continue
        name, ttl, klass, rtype, rest = line.split(" ", 4)
        assert (ttl, klass, rtype) == ("3600", "IN", "TXT")
        chunks = re.findall(r'"([^"]*)"', rest)
        assert " ".join(f'"{c}"' for c in chunks) == rest
        assert all(len(c) <= 255 for c in chunks)  # RFC 1035 character-strings
        values[name] = "".join(chunks)
    dns = json.loads(shared.shown["domain dns Example.COM. --json"])
    assert values == {f"{r['name']}.": r["value"] for r in dns["records"]}


def test_domain_list_and_show(shared: Shared) -> None:
    relay = shared.relay
    assert_golden("domain_list.txt", relay.normalise(shared.shown["domain list"]))
    assert_golden("domain_show.txt", relay.normalise(shared.shown["domain show example.com"]))
    dom = json.loads(shared.shown["domain show example.com --json"])
    assert json.loads(shared.shown["domain list acme/marketing --json"]) == [dom]  # granted
    assert (dom["domain"], dom["owner"], dom["state"], dom["grants"], dom["verified_by"]) == (
        "example.com", "acme", "verified", ["acme/marketing"], "manual")
    parse_time(dom["verified_at"])
    assert [s["state"] for s in dom["selectors"]] == ["active", "active"]


def test_pool_list(shared: Shared) -> None:
    assert_golden("pool_list.txt", shared.shown["pool list"])
    (pool,) = json.loads(shared.shown["pool list --json"])
    parse_time(pool.pop("created"))
    assert pool == {"name": "mkt", "bind": ["192.0.2.10", "2001:db8::10"],
                    "helo": "mkt.relay.example.net", "transport": "kr-pool-mkt"}


def test_sender_list_normalises_the_address(shared: Shared) -> None:
    assert_golden("sender_list.txt", shared.shown["sender list"])
    (sender,) = json.loads(shared.shown["sender list acme/marketing --json"])
    parse_time(sender.pop("created"))
    assert sender == {"address": "alerts@example.org", "principal": "acme/marketing"}


def test_monitor_status_is_off_by_default(shared: Shared) -> None:
    assert_golden("monitor_status.txt", shared.relay.normalise(shared.shown["monitor status"]))
    assert json.loads(shared.shown["monitor status --json"]) == {
        "config": False, "directory": False, "accounts": []}


def test_check_config_reports_ok_and_counts(shared: Shared) -> None:
    assert shared.relay.normalise(shared.shown["check-config"]) == (
        "<tmp>/keyrelay.yaml: OK; directory <tmp>/directory.yaml: "
        "2 accounts, 1 keys, 1 domains\n")


# -- refusals and usage errors ---------------------------------------------------------------
@dataclass(frozen=True)
class Refusal:
    command: str
    code: int  # 1 refused, 2 usage
    says: str  # part of the error line, after normalise()
    config: str = ""  # another configuration file in the installation's folder


REFUSALS: dict[str, Refusal] = {
    # unknown names
    "unknown-account": Refusal("account show nope", 1, "unknown account 'nope'"),
    "unknown-subuser": Refusal("key create acme/nobody --name x", 1,
                               "unknown subuser 'acme/nobody'"),
    "unknown-key": Refusal("key revoke aaaaaaaaaaaaaaaa", 1, "unknown key id 'aaaaaaaaaaaaaaaa'"),
    "unknown-domain": Refusal("domain dns unknown.example", 1, "unknown domain 'unknown.example'"),
    "unknown-pool": Refusal("pool assign acme nopool", 1, "unknown pool 'nopool'"),
    # duplicates and conflicts
    "duplicate-account": Refusal("account add acme", 1, "account 'acme' already exists"),
    "duplicate-subuser": Refusal("subuser add acme/marketing", 1,
                                 "subuser 'acme/marketing' already exists"),
    "duplicate-key-name": Refusal("key create acme/marketing --name newsletter", 1,
                                  "acme/marketing already has a key named 'newsletter'"),
    "duplicate-domain": Refusal("domain add globex EXAMPLE.com.", 1,
                                "domain example.com already belongs to acme"),
    "pool-address-taken": Refusal("pool add other --bind 2001:db8::10 --helo x.example.net", 1,
                                  "2001:db8::10 already belongs to pool mkt"),
    "pool-named-none": Refusal("pool add none --bind 192.0.2.99 --helo x.example.net", 1,
                               "'none' cannot name a pool"),
    "account-owns-domain": Refusal("account remove acme", 1,
                                   "acme still owns domain(s) example.com; remove them first"),
    "grant-outside-account": Refusal("domain grant example.com globex", 1,
                                     "globex is not a subuser of acme"),
    # IP access rules
    "cidr-prefix-too-long": Refusal("ip allow acme 10.0.0.0/33", 1,
                                    "invalid CIDR '10.0.0.0/33'"),
    "cidr-host-bits-ipv4": Refusal("ip allow acme 192.0.2.1/24", 1,
                                   "host bits are set; did you mean 192.0.2.0/24?"),
    "cidr-host-bits-ipv6": Refusal("ip allow acme 2001:db8::1/64", 1,
                                   "host bits are set; did you mean 2001:db8::/64?"),
    # domains, IDN included
    "domain-one-label": Refusal("domain add acme localhost", 1,
                                "invalid domain 'localhost': expected a name like example.com"),
    "domain-bad-label": Refusal("domain add acme bad_label.example", 1, "label 'bad_label'"),
    "domain-numeric": Refusal("domain add acme 192.0.2.1", 1, "the last label cannot be numeric"),
    "idn-disallowed-character": Refusal("domain add acme ☃.example", 1,
                                        "invalid internationalised domain '☃.example'"),
    "idn-bad-a-label": Refusal("domain add acme xn--zz.example", 1, "bad A-label 'xn--zz'"),
    "address-without-at": Refusal("sender add acme nobody", 1,
                                  "invalid address 'nobody': expected local-part@domain"),
    # principal names
    "subuser-without-account": Refusal("subuser add marketing", 1,
                                       "expected ACCOUNT/SUBUSER, got 'marketing'"),
    "name-uppercase": Refusal("account add Acme", 1, "invalid name 'Acme'"),
    "principal-nested": Refusal("key list acme/a/b", 1, "invalid name 'a/b'"),
    "subuser-suspend-of-account": Refusal("subuser suspend acme", 1,
                                          "expected ACCOUNT/SUBUSER, got 'acme'"),
    "account-suspend-of-subuser": Refusal("account suspend acme/marketing", 1,
                                          "expected an account name, got 'acme/marketing'"),
    # keys
    "expires-not-a-duration": Refusal("key create acme --name x --expires soon", 1,
                                      "--expires: invalid duration 'soon'"),
    "expires-zero": Refusal("key create acme --name x --expires 0", 1,
                            "--expires must be a positive duration"),
    "expires-beyond-year-9999": Refusal("key create acme --name x --expires 1000000w", 1,
                                        "--expires is too far in the future"),
    "scope-malformed": Refusal("key create acme --name x --scope Mail", 1,
                               "invalid scope 'Mail'"),
    "limit-negative": Refusal("limits set acme --per-minute -1", 1,
                              "messages per minute: a limit is at least 1, got -1"),
    # issue 20, items 5 and 15: a lifetime needs its unit, and cannot be negative
    "expires-without-unit": Refusal(
        "key create acme --name x --expires 90", 1,
        "--expires 90 has no unit: write it with one of s (seconds), m (minutes), h (hours), "
        "d (days) or w (weeks), e.g. 90d"),
    "expires-negative": Refusal("key create acme --name x --expires -5d", 1,
                                "--expires must be a positive duration such as 90d, got '-5d'"),
    "expires-negative-with-equals": Refusal(
        "key create acme --name x --expires=-5d", 1,
        "--expires must be a positive duration such as 90d, got '-5d'"),
    # issue 20, item 6: scopes are checked against the known list
    "scope-unknown": Refusal("key create acme --name x --scope mail.sendd", 1,
                             "unknown scope 'mail.sendd': known scopes are mail.send, "
                             "stats.read"),
    # issue 20, items 7 and 8: limits
    "limits-nothing-to-set": Refusal("limits set acme", 1, "nothing to set: give --per-minute, "
                                     "--per-hour, --recipients, --per-day or --per-month, each "
                                     "a number or inherit"),
    "limit-zero": Refusal("limits set acme --per-minute 0", 1,
                          "messages per minute: a limit is at least 1, got 0 (to take the "
                          "account's or the configuration's value instead, inherit it)"),
    "limit-absurd": Refusal("limits set acme --per-minute 99999999999999999999999", 1,
                            "messages per minute: 99999999999999999999999 is above the maximum "
                            "of 1000000"),
    "limit-minute-above-hour": Refusal(
        "limits set acme --per-hour 1 --per-minute 100", 1,
        "acme would be allowed 100 messages per minute (account acme) but only 1 per hour "
        "(account acme): the per-minute limit must not be above the per-hour limit"),
    "limit-minute-above-inherited-hour": Refusal(
        "limits set acme/marketing --per-minute 20001", 1,
        "acme/marketing would be allowed 20001 messages per minute (subuser acme/marketing) "
        "but only 20000 per hour (config default limits.messages_per_hour)"),
    # issue 21, section 3: quotas
    "quota-zero": Refusal("limits set acme --per-day 0", 1,
                          "messages per day: a limit is at least 1, got 0"),
    "quota-negative": Refusal("limits set acme --per-month -5", 1,
                              "messages per month: a limit is at least 1, got -5"),
    "quota-absurd": Refusal("limits set acme --per-month 99999999999999", 1,
                            "messages per month: 99999999999999 is above the maximum of "
                            "44640000000"),
    "quota-month-below-day": Refusal(
        "limits set acme --per-day 50000 --per-month 40000", 1,
        "acme would be allowed 50000 messages per day (account acme) but only 40000 per month "
        "(account acme): the per-day limit must not be above the per-month limit"),
    "quota-day-below-hour": Refusal(
        "limits set acme --per-hour 5000 --per-day 1000", 1,
        "acme would be allowed 5000 messages per hour (account acme) but only 1000 per day "
        "(account acme): the per-hour limit must not be above the per-day limit"),
    "quota-not-a-number": Refusal("limits set acme --per-day lots", 2,
                                  "argument --per-day: expected a whole number or inherit, "
                                  "got 'lots'"),
    "limits-of-unknown-principal": Refusal("limits show acme/nobody", 1,
                                           "unknown subuser 'acme/nobody'"),
    # issue 20, item 9: IP access rules belong to accounts
    "ip-rule-on-subuser": Refusal(
        "ip allow acme/marketing 10.0.0.0/8", 1,
        "IP access rules are set on accounts; acme/marketing is a subuser of acme: use "
        "`keyrelay ip allow acme 10.0.0.0/8`"),
    "ip-list-of-subuser": Refusal("ip list acme/marketing", 1,
                                  "acme/marketing is a subuser of acme: use `keyrelay ip list "
                                  "acme`"),
    # configuration and directory files
    "config-missing": Refusal("check-config", 1, "<tmp>/missing.yaml: file not found",
                              "missing.yaml"),
    "config-unknown-key": Refusal("check-config", 1,
                                  "<tmp>/unknown-key.yaml:3: directory.bogus: unknown key",
                                  "unknown-key.yaml"),
    "config-bad-yaml": Refusal("check-config", 1, "<tmp>/bad-yaml.yaml:2: invalid YAML at column",
                               "bad-yaml.yaml"),
    "directory-bad-yaml": Refusal("check-config", 1,
                                  "<tmp>/broken/directory.yaml:2: invalid YAML at column 1",
                                  "bad-directory-yaml.yaml"),
    "directory-bad-value": Refusal("account list", 1,
                                   "<tmp>/weird/directory.yaml:3: accounts.acme.status: "
                                   "expected one of active, suspended, got a string ('weird')",
                                   "bad-directory-value.yaml"),
    # issue 20, item 15: the directory file (or a declaration) given as the configuration
    "config-is-the-directory": Refusal(
        "account list", 1,
        "<tmp>/directory.yaml: this is a directory file (it has version:), not keyrelay's "
        "configuration: --config (or $KEYRELAY_CONFIG) names the configuration",
        "directory.yaml"),
    "config-is-a-declaration": Refusal(
        "account list", 1,
        "<tmp>/declared.yaml: this is a directory file or a sync declaration (it has "
        "accounts:), not keyrelay's configuration", "declared.yaml"),
    # usage errors
    "no-command": Refusal("", 2, "the following arguments are required: COMMAND"),
    "unknown-command": Refusal("frobnicate", 2, "invalid choice: 'frobnicate'"),
    "unknown-action": Refusal("account frob", 2, "invalid choice: 'frob'"),
    "missing-argument": Refusal("subuser add", 2, "the following arguments are required"),
    "missing-option": Refusal("key create acme", 2, "the following arguments are required: --name"),
    "not-a-number": Refusal("limits set acme --per-minute lots", 2,
                            "argument --per-minute: expected a whole number or inherit, "
                            "got 'lots'"),
    # an empty FILE or DIR (an unset shell variable) named no file, or the working directory
    "empty-output": Refusal("export -o ''", 2,
                            "argument --output/-o: an empty path names no file"),
    "empty-declaration": Refusal("sync ''", 2, "argument FILE: an empty path names no file"),
    "empty-postfix-dir": Refusal("postfix apply --config-dir ''", 2,
                                 "argument --config-dir: an empty path names no file"),
}

BROKEN_FILES = {
    "unknown-key.yaml": "directory:\n  path: /x/directory.yaml\n  bogus: 1\n",
    "bad-yaml.yaml": "directory: [\n",
    "bad-directory-yaml.yaml": "directory:\n  path: {root}/broken/directory.yaml\n",
    "broken/directory.yaml": "accounts: [\n",
    "bad-directory-value.yaml": "directory:\n  path: {root}/weird/directory.yaml\n",
    "weird/directory.yaml": "accounts:\n  acme:\n    status: weird\n",
    "declared.yaml": "accounts:\n  acme:\n    limits:\n      messages_per_minute: 10\n",
}


@dataclass
class Refused:
    results: dict[str, Result]
    before: tuple[bytes, bytes, list[str]]  # directory, audit log, key files
    after: tuple[bytes, bytes, list[str]]


def _state(relay: CliSite) -> tuple[bytes, bytes, list[str]]:
    return relay.directory.read_bytes(), relay.audit_log.read_bytes(), key_files(relay)


@pytest.fixture(scope="module")
def refused(shared: Shared) -> Refused:
    """Every REFUSALS case, run against the shared installation."""
    relay = shared.relay
    for name, text in BROKEN_FILES.items():
        (relay.root / name).parent.mkdir(exist_ok=True)
        (relay.root / name).write_text(text.format(root=relay.root), encoding="utf-8")
    before = _state(relay)
    results = {
        case_id: relay.run(case.command,
                           (relay.root / case.config).resolve() if case.config else None)
        for case_id, case in REFUSALS.items()
    }
    return Refused(results, before, _state(relay))


@pytest.mark.parametrize("case_id", REFUSALS)
def test_refusal_is_one_clear_line_with_exit_1_or_2(
    refused: Refused, shared: Shared, case_id: str
) -> None:
    case = REFUSALS[case_id]
    line = assert_refused(refused.results[case_id], case.code)
    assert case.says in shared.relay.normalise(line), refused.results[case_id]


def test_refusals_change_nothing(refused: Refused) -> None:
    assert refused.after == refused.before


def test_refusal_messages(refused: Refused, shared: Shared) -> None:
    """The catalogue of error lines, for reviewing their wording in one place."""
    lines = []
    for case_id, case in REFUSALS.items():
        result = refused.results[case_id]
        config = f"--config <tmp>/{case.config} " if case.config else ""
        lines.append(f"$ keyrelay {config}{case.command}".rstrip())
        lines.append(f"[{result.code}] {result.err.splitlines()[-1]}")
    assert_golden("refusals.txt", shared.relay.normalise("\n".join(lines) + "\n"))


# -- lifecycles, each in an installation of its own ------------------------------------------
@pytest.fixture
def fresh(tmp_path: Path) -> CliSite:
    # a control socket of its own, never served: `limits set` that lowers a limit asks
    # keyrelay-policyd for the counts there, never a daemon that runs on this machine
    return CliSite(tmp_path, f"policyd:\n  control_listen: unix:{tmp_path}/none.sock\n")


def lowered(site: CliSite, command: str) -> str:
    """A ``limits set`` that lowers a limit: done, with the one warning line that the counts
    could not be read (no keyrelay-policyd runs; tests/test_quota_below_usage.py). Its
    stdout."""
    result = site.run(command)
    assert result.code == 0 and result.err.startswith(
        "keyrelay: warning: the new limits of ") and result.err.endswith(
        "does not exist: is keyrelay-policyd running? (systemctl status keyrelay-policyd)); "
        "they are set anyway\n"), result
    return result.out


def test_key_set_scopes_and_revoke(fresh: CliSite) -> None:
    fresh.ok("account add acme")
    new = fresh.json("key create acme --name ci")
    kid = new["key_id"]
    assert new["key"].startswith(f"kr.{kid}.")
    assert (new["smtp_username"], new["scopes"], new["expires"]) == ("apikey", ["mail.send"], None)
    assert fresh.ok(f"key set-scopes {kid} mail.send stats.read mail.send") == (
        f"Key {kid} now has scopes: mail.send stats.read.\n")
    assert fresh.ok(f"key revoke {kid}") == (
        f"Revoked key {kid} of acme; it is refused from the next login or message on.\n")
    shown = fresh.json(f"key show {kid}")
    assert (shown["state"], shown["scopes"]) == ("revoked", ["mail.send", "stats.read"])
    parse_time(shown["revoked"])
    assert f"key {kid} was already revoked at " in fresh.refused(f"key revoke {kid}")
    # a revoked key counts neither in the KEYS column nor in the JSON "keys"
    assert fresh.json("account list")[0]["keys"] == 0


def test_a_whole_key_given_as_a_key_id_is_refused_without_echoing_its_secret(
        fresh: CliSite) -> None:
    fresh.ok("account add acme")
    new = fresh.json("key create acme --name pasted")
    secret = new["key"].split(".")[2]
    for command in ("key revoke", "key show", "key set-scopes"):
        args = f"{new['key']} mail.send" if command == "key set-scopes" else new["key"]
        said = fresh.refused(f"{command} {args}")
        assert secret not in said, command
        assert f"that is an API key, not a key id; give only its id '{new['key_id']}'" \
            in said, command
    assert fresh.json(f"key show {new['key_id']}")["state"] == "active"


def _pasted_shapes(key: str) -> dict[str, str]:
    """An API key as a user might paste it where something else belongs."""
    _, key_id, secret = key.split(".")
    return {
        "whole key": key,
        "key without its prefix": f"{key_id}.{secret}",
        "secret alone": secret,
        "blanks around": f"  {key}\t",
        "quotes around": f"'{key}'",
        "double quotes around": f'"{key}"',
        "newline after": f"{key}\n",
        "label before": f"SMTP password: {key}",
        "secret after a dot": f"x.{secret}",
        "secret with a unit": f"5{secret}",
    }


# Every command that takes a key id, a name, a scope, a duration, a principal or other free
# text; SHAPE is replaced by each pasted shape, KEY by a real key id.
SHAPE_COMMANDS = [
    ["key", "revoke", "SHAPE"], ["key", "show", "SHAPE"], ["key", "show", "SHAPE", "--json"],
    ["key", "set-scopes", "SHAPE", "mail.send"], ["key", "set-scopes", "KEY", "SHAPE"],
    ["key", "create", "acme", "--name", "SHAPE"],
    ["key", "create", "acme", "--name", "x", "--scope", "SHAPE"],
    ["key", "create", "acme", "--name", "x", "--expires", "SHAPE"],
    ["key", "create", "SHAPE", "--name", "x"], ["key", "list", "SHAPE"],
    ["account", "add", "SHAPE"], ["account", "show", "SHAPE"], ["account", "remove", "SHAPE"],
    ["subuser", "add", "acme/SHAPE"], ["subuser", "list", "SHAPE"],
    ["limits", "set", "SHAPE", "--per-minute", "5"], ["limits", "show", "SHAPE"],
    ["limits", "set", "acme", "--per-minute", "SHAPE"],
    ["ip", "allow", "SHAPE", "192.0.2.0/24"], ["ip", "allow", "acme", "SHAPE"],
    ["ip", "list", "SHAPE"], ["domain", "show", "SHAPE"], ["domain", "dns", "SHAPE"],
    ["domain", "add", "SHAPE", "a.example"],
    ["domain", "grant", "SHAPE", "acme/app"], ["domain", "verify", "SHAPE"],
    ["sender", "add", "SHAPE", "a@example.com"], ["sender", "list", "SHAPE"],
    ["pool", "assign", "acme", "SHAPE"], ["pool", "remove", "SHAPE"], ["monitor", "on", "SHAPE"],
    ["account", "list", "SHAPE"],  # a usage error: argparse repeats the argument
    ["SHAPE"], ["key", "SHAPE"],
]


def test_no_error_repeats_an_api_key_or_its_secret_whatever_its_shape(fresh: CliSite) -> None:
    """Issue 20, item 13: `key revoke <id>.<secret>` printed the secret in its error. No part
    of a secret 8 characters long may reach stdout or stderr, in any case (a domain or an
    address is lower-cased before it is quoted), from any command given the key in any
    shape."""
    fresh.ok("account add acme")
    fresh.ok("subuser add acme/app")
    kid = fresh.json("key create acme --name ci")["key_id"]
    before = fresh.directory.read_bytes()
    for _ in range(3):  # fresh random secrets each round
        key = keys.generate().text
        secret = key.split(".")[2]
        parts = {secret[i:i + 8].lower() for i in range(len(secret) - 7)}
        for shape_name, shape in _pasted_shapes(key).items():
            for command in SHAPE_COMMANDS:
                argv = [a.replace("SHAPE", shape).replace("KEY", kid) for a in command]
                result = fresh.run(argv)
                shown = (result.out + result.err).lower()
                leaked = sorted(p for p in parts if p in shown)
                assert not leaked, f"{shape_name}: {leaked}\n{result}"
                assert result.code in (1, 2), f"{shape_name}:\n{result}"
    assert fresh.directory.read_bytes() == before


def test_a_key_pasted_in_place_of_its_id_is_named_as_such(fresh: CliSite) -> None:
    fresh.ok("account add acme")
    key = keys.generate().text
    _, key_id, secret = key.split(".")
    for shape in (key, f"{key_id}.{secret}", f" '{key}'\n"):
        assert assert_refused(fresh.run(["key", "revoke", shape])) == (
            f"keyrelay: error: that is an API key, not a key id; give only its id '{key_id}' "
            "(the key was not shown or stored)")
    # a secret may start with "-" (base64url): still a value, refused as a secret, not a
    # usage error (it failed one run in 64, when the random secret did)
    for pasted in (secret, "-" + secret[1:], "--" + secret[2:]):
        assert assert_refused(fresh.run(["key", "revoke", pasted])) == (
            "keyrelay: error: that looks like an API key's secret, not a key id (16 characters "
            "a-z and 2-7; see: keyrelay key list); it was not shown or stored"), pasted
    assert assert_refused(fresh.run(["key", "create", "acme", "--name", f"prod {key}"])) == (
        "keyrelay: error: a key name must not hold an API key or its secret; name what the key "
        "is for, e.g. crm-prod (the name was not stored)")


def test_key_lifetime_follows_default_and_max_expiry(tmp_path: Path) -> None:
    relay = CliSite(tmp_path, "keys:\n  default_expiry: 7d\n  max_expiry: 30d\n")
    relay.ok("account add acme")
    key = relay.json("key create acme --name ci")
    assert parse_time(key["expires"]) - parse_time(key["created"]) == timedelta(days=7)
    assert "keys may live at most 30d (keys.max_expiry)" in relay.refused(
        "key create acme --name forever --expires never")


def test_ip_rules_removed_until_any_address_may_log_in(fresh: CliSite) -> None:
    fresh.ok("account add acme")
    assert fresh.ok("ip allow acme 192.0.2.7") == (
        "acme may now log in and send from: 192.0.2.7/32.\n")
    assert fresh.ok("ip allow acme 2001:db8::5") == (
        "acme may now log in and send from: 192.0.2.7/32, 2001:db8::5/128.\n")
    assert fresh.ok("ip remove acme 192.0.2.7/32") == (
        "acme may now log in and send from: 2001:db8::5/128.\n")
    assert fresh.ok("ip remove acme 2001:DB8::5") == (
        "acme may now log in and send from: any address (no rules left).\n")


def test_domain_rotate_keeps_old_selectors_until_retired(fresh: CliSite) -> None:
    fresh.ok("account add acme")
    added = fresh.json("domain add acme example.net")  # --json: the records only, no prose
    assert [r["name"] for r in added["records"]][2:] == ["_dmarc.example.net"]  # no pool, no SPF
    old = [r["name"].split(".")[0] for r in added["records"][:2]]
    assert all(re.fullmatch(r"kr\d{8}-(rsa|ed)", name) for name in old)

    rotated = fresh.json("domain rotate example.net")  # records of the new selectors only
    new = [r["name"].split(".")[0] for r in rotated["records"]]
    assert [n.rsplit("-", 1)[1] for n in new] == ["rsa", "ed"] and not set(new) & set(old)
    assert all(r["purpose"].endswith("(pending)") for r in rotated["records"])
    assert "already has pending selectors" in fresh.refused("domain rotate example.net")
    assert "still signs mail" in fresh.refused(f"domain retire-selector example.net {old[0]}")

    fresh.ok("domain mark-verified example.net")  # publishes the new, retires the old
    dom = fresh.json("domain show example.net")
    assert [(s["selector"], s["state"]) for s in dom["selectors"]] == [
        (old[0], "retiring"), (old[1], "retiring"), (new[0], "active"), (new[1], "active")]
    assert dom["selectors"][0]["retiring_since"] is not None
    assert "may still be verified until" in fresh.refused(  # dkim.retiring_overlap: 7 days
        f"domain retire-selector example.net {old[0]}")
    assert fresh.ok(f"domain retire-selector example.net {old[0]} --force") == (
        f"Retired selector {old[0]}; remove its DNS record {old[0]}._domainkey.example.net "
        "now.\n")
    assert key_files(fresh) == sorted(f"example.net/{s}.pem" for s in [old[1], *new])


def test_domain_grant_ungrant_and_remove_deletes_private_keys(fresh: CliSite) -> None:
    fresh.ok("account add acme")
    fresh.ok("subuser add acme/app")
    fresh.ok("domain add acme example.org")
    assert len(key_files(fresh)) == 2
    assert fresh.ok("domain grant example.org acme/app") == (
        "acme/app may now send as example.org.\n")
    assert [d["domain"] for d in fresh.json("domain list acme/app")] == ["example.org"]
    assert fresh.ok("domain ungrant example.org acme/app") == (
        "acme/app may no longer send as example.org.\n")
    assert fresh.ok("domain remove example.org") == (
        "Removed domain example.org and its private keys; its DNS records can go too.\n")
    assert key_files(fresh) == []
    assert fresh.json("domain list") == []


def test_unicode_domains_and_senders_are_stored_as_a_labels(fresh: CliSite) -> None:
    """IDNA 2008 via UTS 46: upper case is folded, the A-label is what is stored and shown."""
    fresh.ok("account add acme")
    added = fresh.json("domain add acme Bücher.Example")
    assert added["domain"] == "xn--bcher-kva.example"
    assert fresh.json("domain show bücher.example")["domain"] == "xn--bcher-kva.example"
    assert key_files(fresh)[0].startswith("xn--bcher-kva.example/")
    assert fresh.ok("sender add acme Bob@Bücher.Example") == (
        "acme may now send as bob@xn--bcher-kva.example.\n")
    assert fresh.ok("sender remove acme BOB@xn--bcher-kva.example") == (
        "acme may no longer send as bob@xn--bcher-kva.example.\n")
    assert fresh.ok("sender list acme") == "ADDRESS  PRINCIPAL\n"


def test_pool_assign_none_inherits_and_unused_pool_can_be_removed(fresh: CliSite) -> None:
    fresh.ok("account add acme")
    fresh.ok("pool add out --bind 198.51.100.7 --helo out.relay.example.net")
    assert fresh.ok("pool assign acme out") == (
        "acme now sends through pool out.\nPostfix needs the transport kr-pool-out: run "
        "`keyrelay postfix apply --reload`; mail through this pool waits until then.\n")
    assert "pool out is still assigned to acme" in fresh.refused("pool remove out")
    assert fresh.ok("pool assign acme none") == (
        "acme now uses its account's pool or the default route.\n")
    assert fresh.ok("pool remove out") == "Removed pool out.\n"
    assert fresh.json("account list")[0]["pool"] is None


def test_limits_set_changes_only_what_it_is_given_and_inherit_clears_one(fresh: CliSite) -> None:
    # issue 20, item 7: `limits set P --recipients 10` dropped the limits set just before
    fresh.ok("account add acme")
    fresh.ok("subuser add acme/app")
    # a subuser's own limits cap it alone; its account's (here the config's defaults) still
    # cap the account as a whole, shown beside them
    assert fresh.ok("limits set acme/app --per-minute 10 --per-hour 100") == (
        "Limits of acme/app: 10/min (own; account: 600/min), 100/hour (own; account: "
        "20000/hour), 100 rcpt/msg (config default).\n")
    assert fresh.ok("limits set acme/app --recipients 10") == (
        "Limits of acme/app: 10/min (own; account: 600/min), 100/hour (own; account: "
        "20000/hour), 10 rcpt/msg (own).\n")
    no_quota = {"messages_per_day": None, "messages_per_month": None}
    assert fresh.json("subuser list acme")[0]["limits"] == {
        "messages_per_minute": 10, "messages_per_hour": 100, "recipients_per_message": 10,
        **no_quota}
    lowered(fresh, "limits set acme --per-hour 5000 --per-minute 50")
    assert fresh.ok("limits set acme/app --per-minute inherit --per-hour inherit") == (
        "Limits of acme/app: 50/min (account acme), 5000/hour (account acme), "
        "10 rcpt/msg (own).\n")
    assert fresh.json("subuser list acme")[0]["limits"] == {
        "messages_per_minute": None, "messages_per_hour": None, "recipients_per_message": 10,
        **no_quota}
    entries = [json.loads(line) for line in fresh.audit_log.read_text().splitlines()]
    assert entries[-1]["limits"] == "messages_per_minute=inherit messages_per_hour=inherit"


def test_limits_show_gives_the_numbers_in_use_and_where_each_is_set(fresh: CliSite) -> None:
    fresh.ok("account add acme")
    fresh.ok("subuser add acme/app")
    lowered(fresh, "limits set acme --per-hour 5000")
    fresh.ok("limits set acme/app --recipients 7")
    shown = fresh.json("limits show acme/app")
    assert shown["limits"] == {
        "messages_per_minute": {"value": 600, "source": "config",
                                "set_on": "limits.messages_per_minute"},
        "messages_per_hour": {"value": 5000, "source": "account", "set_on": "acme"},
        "recipients_per_message": {"value": 7, "source": "subuser", "set_on": "acme/app"},
        "messages_per_day": {"value": None, "source": "none", "set_on": None},
        "messages_per_month": {"value": None, "source": "none", "set_on": None},
    }
    assert [w for w in shown["windows"] if w["value"] is not None] == [
        {"limit": "messages_per_minute", "value": 600, "source": "config",
         "set_on": "limits.messages_per_minute", "caps": "account"},
        {"limit": "messages_per_hour", "value": 5000, "source": "account", "set_on": "acme",
         "caps": "account"},
        {"limit": "recipients_per_message", "value": 7, "source": "subuser",
         "set_on": "acme/app", "caps": "message"},
    ]
    assert fresh.ok("limits show acme/app").splitlines() == [
        "LIMIT                   VALUE  FROM                                       CAPS",
        "messages per minute     none   not set                                    acme/app alone",
        "messages per minute     600    config default limits.messages_per_minute  all of acme",
        "messages per hour       none   not set                                    acme/app alone",
        "messages per hour       5000   account acme                               all of acme",
        "recipients per message  7      subuser acme/app                           each message",
        "messages per day        none   not set                                    acme/app alone",
        "messages per day        none   not set                                    all of acme",
        "messages per month      none   not set                                    acme/app alone",
        "messages per month      none   not set                                    all of acme",
    ]
    # listings show the numbers in use, never "defaults"
    assert "limits:    600/min (config default), 5000/hour (own), 100 rcpt/msg (config " \
        "default)\n" in fresh.ok("account show acme")
    listed = fresh.ok("subuser list acme").splitlines()
    assert listed[1].endswith("  600/min, 5000/hour, 7 rcpt/msg  0"), listed


def test_limits_of_an_account_may_not_contradict_a_subusers_own(fresh: CliSite) -> None:
    # issue 20, item 8 refused an account limit above a subuser's own longer one, because the
    # subuser took the account's number as its own. Issue 21: an account's number caps the
    # account as a whole (all its subusers together), so 1000 per minute for acme beside 700
    # per hour for acme/app alone is no contradiction; a subuser's own number above its
    # account's longer one still is (it could never be reached).
    fresh.ok("account add acme")
    fresh.ok("subuser add acme/app")
    fresh.ok("limits set acme/app --per-hour 700")
    assert fresh.ok("limits set acme --per-minute 1000").startswith("Limits of acme: 1000/min")
    lowered(fresh, "limits set acme --per-hour 2000 --per-day 10000")
    assert fresh.refused("limits set acme/app --per-minute 3000") == (
        "keyrelay: error: acme/app would be allowed 3000 messages per minute (subuser "
        "acme/app) but only 700 per hour (subuser acme/app): the per-minute limit must not be "
        "above the per-hour limit")
    fresh.ok("limits set acme --per-month 15000")
    assert fresh.refused("limits set acme/app --per-day 20000") == (
        "keyrelay: error: acme/app would be allowed 20000 messages per day (subuser acme/app) "
        "but only 15000 per month (account acme): the per-day limit must not be above the "
        "per-month limit")
    assert fresh.json("subuser list acme")[0]["limits"]["messages_per_day"] is None
    # a daily quota under the configuration's default hourly rate: the quota refuses first
    fresh.ok("account add globex")
    assert fresh.ok("limits set globex --per-day 1000") == (
        "Limits of globex: 600/min (config default), 20000/hour (config default), "
        "100 rcpt/msg (config default), 1000/day (own).\n")


def test_scopes_are_checked_against_the_known_list(fresh: CliSite) -> None:
    # issue 20, item 6: `mail.sendd` made a key that could never send
    fresh.ok("account add acme")
    kid = fresh.json("key create acme --name ci")["key_id"]
    assert fresh.refused(f"key set-scopes {kid} mail.sendd") == (
        "keyrelay: error: unknown scope 'mail.sendd': known scopes are mail.send, stats.read "
        "(a key needs mail.send to send)")
    assert fresh.json(f"key show {kid}")["scopes"] == ["mail.send"]
    assert fresh.refused("key create acme --name typo --scope mail.sendd").startswith(
        "keyrelay: error: unknown scope 'mail.sendd'")
    assert [k["name"] for k in fresh.json("key list")] == ["ci"]


def test_the_selectors_of_a_pending_domain_are_not_shown_as_active(fresh: CliSite) -> None:
    # issue 20, item 15: `domain add` labelled the new, pending domain's selectors "(active)"
    fresh.ok("account add acme")
    added = fresh.ok("domain add acme example.net")
    assert "(active)" not in added
    assert added.count("(signs once example.net is verified)\n") == 2, added
    assert "signs once example.net is verified" in fresh.ok("domain show example.net")
    assert fresh.ok("domain list").splitlines()[1].split()[-1] == "-"  # no signing selectors
    fresh.ok("domain mark-verified example.net")
    assert fresh.ok("domain dns example.net").count("(active)\n") == 2


def test_no_change_is_made_when_the_audit_log_cannot_be_appended_to(fresh: CliSite) -> None:
    # issue 20, item 15: an unwritable audit log was only a warning, and the change was made
    fresh.ok("account add acme")
    directory = fresh.directory.read_bytes()
    fresh.audit_log.unlink()
    fresh.audit_log.mkdir()  # unwritable whoever runs the test, root too
    for command in ("account add beta", "key create acme --name ci", "domain add acme a.example",
                    "limits set acme --per-hour 10", "ip allow acme 192.0.2.0/24"):
        assert fresh.refused(command) == (
            f"keyrelay: error: cannot append to the audit log {fresh.audit_log} "
            "(logging.audit_log): Is a directory; nothing was changed (every change is "
            "audited)"), command
    assert fresh.directory.read_bytes() == directory
    assert key_files(fresh) == []
    # a log below a file, not a folder
    logs = fresh.root / "logs"
    logs.write_text("", encoding="utf-8")
    below_a_file = fresh.root / "below-a-file.yaml"
    below_a_file.write_text(CONFIG.format(root=fresh.root).replace("audit.log", "logs/audit.log"),
                            encoding="utf-8")
    assert assert_refused(fresh.run("account add beta", config=below_a_file)) == (
        f"keyrelay: error: cannot append to the audit log {logs}/audit.log (logging.audit_log): "
        f"{logs} is a file, not a folder; nothing was changed (every change is audited)")
    assert fresh.directory.read_bytes() == directory


def test_a_dkim_key_dir_that_is_a_file_is_named_clearly(tmp_path: Path) -> None:
    (tmp_path / "dkim").write_text("", encoding="utf-8")
    relay = CliSite(tmp_path)
    relay.ok("account add acme")
    assert relay.refused("domain add acme example.com") == (
        f"keyrelay: error: {relay.config}: dkim.key_dir: {tmp_path}/dkim is a file: "
        "dkim.key_dir must name a folder (it is made if missing) where the private DKIM keys "
        "are kept")
    assert relay.json("domain list") == []


def test_monitor_mode_global_and_per_account(fresh: CliSite) -> None:
    fresh.ok("account add acme")
    assert fresh.ok("monitor on") == (
        "Monitor mode on for all accounts: refusals are logged, and mail passes.\n")
    assert fresh.ok("monitor on acme") == (
        "Monitor mode on for acme: refusals are logged, and mail passes.\n")
    assert fresh.json("monitor status") == {"config": False, "directory": True,
                                            "accounts": ["acme"]}
    # the account's own flag is still on: the command says so, and status agrees
    assert fresh.ok("monitor off") == (
        "Directory-wide monitor mode off. Still in monitor mode by their own flag (refusals "
        "logged, mail passes): acme; end it with keyrelay monitor off ACCOUNT, or for every "
        "account with keyrelay monitor off --all.\n")
    assert fresh.json("monitor status") == {"config": False, "directory": False,
                                            "accounts": ["acme"]}
    assert fresh.ok("monitor off acme") == "Monitor mode off for acme: refusals are enforced.\n"
    assert fresh.json("monitor status") == {"config": False, "directory": False, "accounts": []}


def test_monitor_off_says_what_stays_in_monitor_mode(fresh: CliSite) -> None:
    """Issue 20 item 1: `monitor off` printed "refusals are enforced" while an account's own
    flag, or monitor_mode in keyrelay.yaml, kept monitor mode on."""
    fresh.ok("account add acme")
    fresh.ok("account add beta")
    fresh.ok("monitor on")
    fresh.ok("monitor on acme")
    fresh.ok("monitor on beta")
    assert fresh.ok("monitor off acme") == (
        "Monitor flag of acme off, but acme stays in monitor mode (refusals logged, mail "
        "passes): directory-wide monitor mode is on (keyrelay monitor off).\n")
    assert assert_refused(fresh.run("monitor off acme --all")) == (
        "keyrelay: error: monitor off: give ACCOUNT or --all, not both (--all ends the "
        "directory-wide flag and every account's own)")
    assert fresh.ok("monitor off --all") == (
        "Monitor mode off for all accounts: refusals are enforced.\n")
    assert fresh.json("monitor status") == {"config": False, "directory": False, "accounts": []}
    # the configuration file's flag cannot be changed here: it is named
    on = fresh.root / "monitor-on.yaml"
    on.write_text(fresh.config.read_text(encoding="utf-8") + "monitor_mode: true\n",
                  encoding="utf-8")
    fresh.ok("monitor on beta")
    result = fresh.run("monitor off", config=on)
    assert (result.code, result.err) == (0, ""), result
    assert result.out == (
        "Directory-wide monitor mode off, but every account stays in monitor mode (refusals "
        f"logged, mail passes): monitor_mode: true in {on}, which this command cannot change "
        "(set it to false there and reload the daemons).\n")
    result = fresh.run("monitor off beta", config=on)
    assert result.out == (
        "Monitor flag of beta off, but beta stays in monitor mode (refusals logged, mail "
        f"passes): monitor_mode: true in {on}, which this command cannot change (set it to "
        "false there and reload the daemons).\n")


def test_account_and_subuser_suspend_resume_remove(fresh: CliSite) -> None:
    fresh.ok("account add acme")
    fresh.ok("subuser add acme/app")
    fresh.ok("key create acme/app --name app")
    assert fresh.ok("account suspend acme") == "acme is suspended.\n"
    assert fresh.ok("subuser suspend acme/app") == "acme/app is suspended.\n"
    assert fresh.json("account show acme")["status"] == "suspended"
    assert [s["status"] for s in fresh.json("subuser list acme")] == ["suspended"]
    assert fresh.ok("account resume acme") == "acme is active.\n"
    assert fresh.ok("subuser resume acme/app") == "acme/app is active.\n"
    assert [s["status"] for s in fresh.json("subuser list acme")] == ["active"]
    assert fresh.ok("subuser remove acme/app") == (
        "Removed subuser acme/app with its keys and senders.\n")
    acme = fresh.json("account show acme")
    assert (acme["status"], acme["subusers"], acme["keys"]) == ("active", [], 0)
    assert fresh.ok("account remove acme") == (
        "Removed account acme with its subusers, keys and senders.\n")
    assert fresh.json("account list") == []


# -- the console script ----------------------------------------------------------------------
def test_help_and_config_example_need_no_config_file(fresh: CliSite) -> None:
    usage = fresh.script(["--help"], config=False)
    example = fresh.script(["config", "example"], config=False)
    for result in (usage, example):
        assert (result.code, result.err) == (0, ""), result
    assert "exit status:" in usage.out
    assert example.out.startswith("# keyrelay configuration.")


def test_the_console_script_exits_0_done_1_refused_2_usage(fresh: CliSite) -> None:
    done = fresh.script(["account", "add", "acme"])
    assert (done.code, done.out, done.err) == (0, "Added account acme.\n", ""), done
    assert [json.loads(line)["action"] for line in fresh.audit_log.read_text().splitlines()] \
        == ["account.add"]
    assert assert_refused(fresh.script(["account", "add", "acme"])) == (
        "keyrelay: error: account 'acme' already exists")
    assert assert_refused(fresh.script(["account", "frob"]), 2).startswith(
        "keyrelay account: error: argument ACTION: invalid choice: 'frob'")


def test_control_characters_in_arguments_and_file_names_stay_escaped_on_the_error_line(
    fresh: CliSite,
) -> None:
    # found by tests/test_fuzz_cli.py: argparse echoed unrecognised arguments as they came,
    # file names were printed raw, so a newline split the one error line in two and an
    # escape sequence reached the terminal
    usage = assert_refused(fresh.run(["account", "list", "a\nb\x1b[2J"]), 2)
    assert usage.endswith(r"error: unrecognized arguments: a\nb\x1b[2J"), usage
    config = assert_refused(fresh.run(["check-config"], config=fresh.root / "a\nb.yaml"))
    assert config == rf"keyrelay: error: {fresh.root}/a\nb.yaml: file not found"
    output = assert_refused(fresh.run(["export", "-o", f"{fresh.root}/missing\x1b/x"]))
    assert output == (rf"keyrelay: error: cannot access {fresh.root}/missing\x1b/x: "
                      "No such file or directory")


def test_a_file_name_that_is_not_utf8_is_echoed_as_given_not_a_traceback(fresh: CliSite) -> None:
    # found by tests/test_fuzz_cli.py: with the strict stdout of a UTF-8 locale other than
    # C.UTF-8, `export -o` a name holding a byte that is not UTF-8 wrote the file, then died
    # with a traceback printing where
    target = os.fsencode(fresh.root) + b"/export-\x80.yaml"
    proc = subprocess.run([script(), "--config", str(fresh.config), "export", "-o", target],
                          capture_output=True, env={**ENV, "PYTHONIOENCODING": "utf-8:strict"},
                          timeout=60, check=False)
    assert (proc.returncode, proc.stderr) == (0, b""), proc
    assert proc.stdout.endswith(b" to " + target + b".\n") and os.path.exists(target)


# -- DKIM key files and the directory write that names them ----------------------------------
DECLARATION = "domains:\n  example.com: {owner: acme}\n"


def _selectors(relay: CliSite) -> list[str]:
    """The key files of example.com's selectors, as the directory names them."""
    found = YamlDirectory(str(relay.directory)).load().domains.get("example.com")
    return sorted(s.key_file for s in found.selectors) if found else []


@pytest.mark.parametrize("command", ["domain add", "domain rotate", "sync"])
def test_dkim_keys_the_directory_names_stay_when_the_command_is_interrupted_after_writing_it(
        fresh: CliSite, command: str) -> None:
    """Ctrl-C after the directory write, while the audit log is written: the write stands,
    so its key files must stay (without them the domain cannot sign; they were deleted)."""
    fresh.ok("account add acme")
    argv = {"domain add": ["domain", "add", "acme", "example.com"],
            "domain rotate": ["domain", "rotate", "example.com"],
            "sync": ["sync", str(fresh.root / "declared.yaml")]}[command]
    if command == "domain rotate":
        fresh.ok("domain add acme example.com")
    (fresh.root / "declared.yaml").write_text(DECLARATION, encoding="utf-8")
    before = _selectors(fresh)
    # a FIFO without a reader: the audit write waits in open(), as on a hung log disk
    fresh.audit_log.unlink()
    os.mkfifo(fresh.audit_log)
    proc = fresh.start(argv)
    try:
        wait_for(lambda: len(_selectors(fresh)) == len(before) + 2, proc,
                 "the directory names the new selectors")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (out, err)
    named = _selectors(fresh)
    assert len(named) == len(before) + 2
    assert key_files(fresh) == sorted(str(Path(f).relative_to(fresh.key_dir)) for f in named)
    for path in named:
        assert public_half(Path(path)) in {s.public_key for s in YamlDirectory(
            str(fresh.directory)).load().domains["example.com"].selectors}


@pytest.mark.parametrize("command", ["domain add", "sync"])
def test_dkim_keys_are_deleted_when_the_directory_write_is_refused(
        fresh: CliSite, command: str) -> None:
    """The keys are made before the directory transaction; another admin removes the account
    meanwhile, so the write is refused: no key file may stay behind."""
    fresh.ok("account add acme")
    (fresh.root / "declared.yaml").write_text(DECLARATION, encoding="utf-8")
    argv = {"domain add": ["domain", "add", "acme", "example.com"],
            "sync": ["sync", str(fresh.root / "declared.yaml")]}[command]
    with open(f"{fresh.directory}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other admin's transaction
        proc = fresh.start(argv)
        try:
            # the keys are written, then the command waits for the lock
            wait_for(lambda: len(key_files(fresh)) == 2, proc, "two key files are written")
            data = YamlDirectory(str(fresh.directory)).load()
            admin.remove_account(data, "acme")
            fresh.directory.write_text(render(data), encoding="utf-8")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            try:
                out, err = proc.communicate(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
    assert (proc.returncode, out) == (1, ""), err
    assert "unknown account 'acme'" in err, err
    assert key_files(fresh) == []
    assert YamlDirectory(str(fresh.directory)).load().domains == {}


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_domain_keys_belong_to_the_owner_of_the_key_folder(tmp_path: Path) -> None:
    # `keyrelay domain add` runs as root; the milter reads the keys as the daemon user
    config = tmp_path / "k.yaml"
    key_dir = tmp_path / "dkim"
    key_dir.mkdir(mode=0o700)
    os.chown(key_dir, 65534, 65534)  # nobody:nogroup, standing in for the daemon user
    config.write_text(
        f"directory: {{path: {tmp_path / 'd.yaml'}}}\n"
        f"dkim: {{key_dir: {key_dir}}}\n"
        "logging: {audit_log: ''}\n"
    )
    for args in (["account", "add", "acme"], ["domain", "add", "acme", "acme.example"]):
        result = run_main(["--config", str(config), *args])
        assert (result.code, result.err) == (0, ""), result
    made = [key_dir / "acme.example", *sorted((key_dir / "acme.example").iterdir())]
    assert len(made) == 3
    for path in made:
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (65534, 65534), path
        assert stat.S_IMODE(st.st_mode) == (0o700 if path.is_dir() else 0o600), path


def test_a_usage_error_of_an_in_process_call_hides_what_could_be_a_secret(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # the arguments being parsed are main's, not sys.argv (the demo calls main in process)
    secretish = "AbCdEfGhIjKlMnOpQrStUvWxYz12"
    with pytest.raises(SystemExit) as exited:
        cli.main(["limits", "show", "acme", secretish])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:") and "error:" in err
    assert secretish[:8] not in err and secretish[-8:] not in err
