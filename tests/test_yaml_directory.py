"""The YAML directory backend (keyrelay.directory.yamlfile).

Every test works on a real file under tmp_path; the concurrency test runs the real ``keyrelay``
console script in many processes at once against one directory file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from keyrelay import admin, yamlread
from keyrelay.directory import DirectoryData, YamlDirectory, yamlfile
from keyrelay.directory.model import (
    Algorithm,
    DomainState,
    Limits,
    Selector,
    SelectorState,
    Status,
)
from keyrelay.errors import ConfigError, DirectoryUnavailable, printable

T0 = datetime(2026, 1, 31, 12, 0, 0, tzinfo=UTC)
KEYRELAY = Path(sys.executable).with_name("keyrelay")


# --- helpers -------------------------------------------------------------------------------


def directory_path(tmp_path: Path) -> Path:
    return tmp_path / "directory.yaml"


def selector(name: str, algorithm: Algorithm, state: SelectorState) -> Selector:
    # a public key as long as a real RSA-2048 one, so long scalars are exercised too
    public = base64.b64encode(bytes(range(256)) + bytes(38)).decode("ascii")
    return Selector(
        name=name,
        algorithm=algorithm,
        state=state,
        key_file=f"/etc/keyrelay/dkim/example.com/{name}.pem",
        public_key=public,
        created=T0,
    )


def build_rich_directory(data: DirectoryData) -> None:
    """Every kind of record and field, made through the admin operations."""
    admin.add_pool(data, "shared", ["192.0.2.10", "2001:db8::10"], "mail.example.net", T0)
    admin.add_pool(data, "bulk", ["198.51.100.20"], "bulk.example.net", T0)
    admin.add_account(data, "acme", T0)
    admin.add_account(data, "beta", T0 + timedelta(minutes=1))
    admin.add_subuser(data, "acme/marketing", T0)
    admin.add_subuser(data, "acme/billing", T0)
    admin.ip_allow(data, "acme", "192.0.2.0/24")
    admin.ip_allow(data, "acme", "2001:db8:1::/48")
    admin.ip_allow(data, "acme", "203.0.113.7")
    admin.set_limits(data, "acme", Limits(messages_per_minute=60, recipients_per_message=50,
                                          messages_per_day=100_000))
    admin.set_limits(data, "acme/marketing", Limits(messages_per_hour=5000,
                                                    messages_per_month=900_000))
    admin.set_monitor(data, "acme", True)
    admin.set_monitor(data, None, True)
    admin.set_status(data, "beta", Status.SUSPENDED)
    admin.set_status(data, "acme/billing", Status.SUSPENDED)
    admin.assign_pool(data, "acme", "shared")
    admin.assign_pool(data, "acme/marketing", "bulk")
    crm = admin.create_key(data, "acme", "crm-prod", ("mail.send",), None, T0)
    news = admin.create_key(
        data, "acme/marketing", "newsletters", ("mail.send", "stats.read"),
        T0 + timedelta(days=90), T0 + timedelta(seconds=1),
    )
    old = admin.create_key(data, "acme", "old-app", ("mail.send",), None, T0 + timedelta(hours=1))
    admin.create_key(data, "beta", "yes", ("mail.send",), None, T0)  # a YAML-ish name
    admin.revoke_key(data, old.key_id, T0 + timedelta(days=1))
    admin.record_key_use(
        data, {crm.key_id: T0 + timedelta(hours=2), news.key_id: T0 + timedelta(hours=3)}
    )
    admin.add_domain(
        data, "acme", "Example.COM.",
        (
            selector("kr20260131-rsa", Algorithm.RSA_SHA256, SelectorState.ACTIVE),
            selector("kr20260131-ed", Algorithm.ED25519_SHA256, SelectorState.ACTIVE),
        ),
        T0,
    )
    admin.mark_verified(data, "example.com", T0 + timedelta(hours=4))
    admin.record_check(data, "example.com", False, False, T0 + timedelta(hours=5), 3)
    admin.rotate_domain(
        data, "example.com",
        (selector("kr20260201-rsa", Algorithm.RSA_SHA256, SelectorState.PENDING),),
    )
    admin.grant_domain(data, "example.com", "acme/marketing")
    retired = replace(selector("kr20250101-ed", Algorithm.ED25519_SHA256,
                               SelectorState.RETIRING), retiring_since=T0 + timedelta(days=2))
    admin.add_domain(data, "acme/billing", "bücher.example", (retired,), T0)
    admin.add_sender(data, "acme", "Alerts@Example.net", T0)
    admin.add_sender(data, "acme/marketing", "news@example.org", T0)
    admin.add_sender(data, "beta", "news@example.org", T0)


def write_rich(path: Path) -> DirectoryData:
    with YamlDirectory(str(path)).transaction() as data:
        build_rich_directory(data)
    return data


def write_config(tmp_path: Path) -> Path:
    config = tmp_path / "keyrelay.yaml"
    config.write_text(
        f"directory:\n  path: {json.dumps(str(directory_path(tmp_path)))}\n"
        f"dkim:\n  key_dir: {json.dumps(str(tmp_path / 'dkim'))}\n"
        f"logging:\n  audit_log: {json.dumps(str(tmp_path / 'audit.log'))}\n",
        encoding="utf-8",
    )
    return config


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(KEYRELAY), "--config", str(config), *args],
        capture_output=True, text=True, timeout=60, check=False,
    )


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.fixture
def parse_calls(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Records every full parse of a directory document."""
    calls: list[object] = []
    original: Callable[..., DirectoryData] = yamlfile._Parser.document

    def spy(self: Any, document: object) -> DirectoryData:
        calls.append(document)
        return original(self, document)

    monkeypatch.setattr(yamlfile._Parser, "document", spy)
    return calls


# --- round trip ------------------------------------------------------------------------------


def test_rich_directory_round_trips_through_the_file(tmp_path: Path) -> None:
    path = directory_path(tmp_path)
    written = write_rich(path)

    loaded = YamlDirectory(str(path)).load()

    assert loaded == written
    # spot checks that the comparison is not between two empty directories
    assert loaded.monitor is True
    assert set(loaded.accounts) == {"acme", "beta"}
    assert set(loaded.subusers) == {"acme/marketing", "acme/billing"}
    assert len(loaded.keys) == 4
    assert {str(n) for n in loaded.accounts["acme"].ip_allow} == {
        "192.0.2.0/24", "2001:db8:1::/48", "203.0.113.7/32",
    }
    assert loaded.accounts["acme"].monitor is True
    assert loaded.accounts["beta"].status is Status.SUSPENDED
    assert loaded.accounts["acme"].limits == Limits(60, None, 50, messages_per_day=100_000)
    assert loaded.subusers["acme/marketing"].limits == Limits(
        messages_per_hour=5000, messages_per_month=900_000)
    assert {str(a) for a in loaded.pools["shared"].bind} == {"192.0.2.10", "2001:db8::10"}
    revoked = [k for k in loaded.keys.values() if k.revoked is not None]
    assert [k.name for k in revoked] == ["old-app"]
    news = next(k for k in loaded.keys.values() if k.name == "newsletters")
    assert news.scopes == ("mail.send", "stats.read")
    assert news.expires == T0 + timedelta(days=90)
    assert news.last_used == T0 + timedelta(hours=3)
    dom = loaded.domains["example.com"]
    assert dom.state is DomainState.VERIFIED
    assert dom.grants == ("acme/marketing",)
    assert [s.state for s in dom.selectors] == [
        SelectorState.ACTIVE, SelectorState.ACTIVE, SelectorState.PENDING,
    ]
    assert "xn--bcher-kva.example" in loaded.domains
    assert ("acme", "alerts@example.net") in loaded.senders


def test_rendered_yaml_is_stable(tmp_path: Path) -> None:
    path = directory_path(tmp_path)
    written = write_rich(path)
    text = path.read_text(encoding="utf-8")

    assert yamlfile.render(written) == yamlfile.render(written) == text
    loaded = YamlDirectory(str(path)).load()
    assert yamlfile.render(loaded) == text
    # a transaction that changes nothing writes the very same text again
    with YamlDirectory(str(path)).transaction():
        pass
    assert path.read_text(encoding="utf-8") == text


def test_rendered_yaml_stores_key_hashes_only(tmp_path: Path) -> None:
    path = directory_path(tmp_path)
    with YamlDirectory(str(path)).transaction() as data:
        admin.add_account(data, "acme", T0)
        new = admin.create_key(data, "acme", "crm", ("mail.send",), None, T0)
    secret = new.text.rsplit(".", 1)[1]
    text = path.read_text(encoding="utf-8")
    assert new.secret_hash in text
    assert secret not in text


def test_snapshot_indexes_match_the_loaded_records(tmp_path: Path) -> None:
    path = directory_path(tmp_path)
    written = write_rich(path)

    snap = YamlDirectory(str(path)).snapshot()

    assert snap.monitor is True
    assert dict(snap.keys) == written.keys
    assert {k.name for k in snap.keys_of("acme")} == {"crm-prod", "old-app"}
    assert snap.senders_of("news@example.org") == {"acme/marketing", "beta"}
    assert {s.name for s in snap.subusers_of("acme")} == {"marketing", "billing"}
    assert [d.name for d in snap.domains_owned_by("acme/billing")] == ["xn--bcher-kva.example"]
    assert snap.has_principal("acme/billing") and not snap.has_principal("acme/nobody")


# --- readers see changes without a restart ---------------------------------------------------


def test_snapshot_sees_a_write_by_another_instance(tmp_path: Path) -> None:
    path = str(directory_path(tmp_path))
    reader, writer = YamlDirectory(path), YamlDirectory(path)
    with writer.transaction() as data:
        admin.add_account(data, "acme", T0)
    assert set(reader.snapshot().accounts) == {"acme"}

    with writer.transaction() as data:
        new = admin.create_key(data, "acme", "crm", ("mail.send",), None, T0)
    assert set(reader.snapshot().keys) == {new.key_id}

    with writer.transaction() as data:
        admin.revoke_key(data, new.key_id, T0 + timedelta(hours=1))
    assert reader.snapshot().keys[new.key_id].revoked == T0 + timedelta(hours=1)


def test_snapshot_sees_a_write_by_another_process(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    reader = YamlDirectory(str(directory_path(tmp_path)))
    assert run_cli(config, "account", "add", "acme").returncode == 0
    first = reader.snapshot()
    assert set(first.accounts) == {"acme"}

    result = run_cli(config, "account", "add", "beta")
    assert result.returncode == 0, result.stderr

    assert set(reader.snapshot().accounts) == {"acme", "beta"}
    assert set(first.accounts) == {"acme"}  # an old snapshot stays as it was


def test_snapshot_does_not_reparse_an_unchanged_file(
    tmp_path: Path, parse_calls: list[object]
) -> None:
    path = directory_path(tmp_path)
    write_rich(path)
    directory = YamlDirectory(str(path))

    first = directory.snapshot()
    assert len(parse_calls) == 1
    for _ in range(5):
        assert directory.snapshot() is first
    assert len(parse_calls) == 1

    with YamlDirectory(str(path)).transaction() as data:
        admin.add_account(data, "gamma", T0)
    parses_so_far = len(parse_calls)  # the transaction parsed the file once itself
    second = directory.snapshot()
    assert second is not first and "gamma" in second.accounts
    assert len(parse_calls) == parses_so_far + 1
    assert directory.snapshot() is second
    assert len(parse_calls) == parses_so_far + 1


def test_snapshot_of_a_missing_file_is_unavailable(tmp_path: Path) -> None:
    path = directory_path(tmp_path)
    with pytest.raises(DirectoryUnavailable, match="does not exist") as info:
        YamlDirectory(str(path)).snapshot()
    assert str(path) in str(info.value)


def test_readers_never_see_a_half_written_file(tmp_path: Path) -> None:
    path = str(directory_path(tmp_path))
    with YamlDirectory(path).transaction() as data:
        build_rich_directory(data)
    errors: list[BaseException] = []
    done = threading.Event()

    def read_until_done() -> None:
        reader = YamlDirectory(path)
        while not done.is_set():
            try:
                reader.snapshot()
            except Exception as exc:  # noqa: BLE001 - collected and reported by the test
                errors.append(exc)
                return

    thread = threading.Thread(target=read_until_done)
    thread.start()
    try:
        for i in range(30):
            with YamlDirectory(path).transaction() as data:
                admin.add_sender(data, "acme", f"user{i}@example.net", T0)
    finally:
        done.set()
        thread.join(timeout=30)
    assert errors == []
    assert len(YamlDirectory(path).snapshot().sender_addresses_of("acme")) == 31


# --- bad files ------------------------------------------------------------------------------

HASH = hashlib.sha256(b"not a real secret").hexdigest()
GOOD_KEY = (
    "        aaaaaaaaaaaaaaaa:\n"
    "          name: crm\n"
    f"          sha256: {HASH}\n"
    "          scopes: [mail.send]\n"
    "          created: '2026-01-31T12:00:00Z'\n"
)

BAD_FILES: list[tuple[str, str, int | None, str, str]] = [
    # (test id, file text, line and key the error must name, words of the reason)
    ("broken-yaml", "accounts: [acme\n", 2, "",
     "invalid YAML at column 1: did not find expected ',' or ']' (while parsing a flow "
     "sequence at line 1)"),
    ("tab-indent", "accounts:\n\tacme: {}\n", 2, "",
     "invalid YAML at column 1: found character that cannot start any token"),
    ("impossible-date", "accounts:\n  acme:\n    created: 2026-13-45\n", 3,
     "accounts.acme.created", "invalid YAML: month must be in 1..12"),
    ("bad-int-tag", "accounts:\n  acme:\n    limits: {messages_per_hour: !!int many}\n", 3,
     "accounts.acme.limits.messages_per_hour", "invalid YAML: invalid literal for int()"),
    ("unknown-tag", "accounts:\n  acme: !account {}\n", 2, "accounts.acme",
     "invalid YAML at column 9: could not determine a constructor for the tag '!account'"),
    ("two-documents", "accounts: {}\n---\npools: {}\n", 2, "",
     "expected a single document in the stream"),
    # a key given twice: PyYAML kept the last one silently (the first account, keys and all,
    # was gone, and keyrelay check-config said OK)
    ("account-twice", "accounts:\n  acme:\n    status: active\n  beta: {}\n"
     "  acme:\n    status: suspended\n", 5, "accounts.acme",
     "given twice (first at line 2); keep one"),
    ("key-field-twice", "accounts:\n  acme:\n    keys:\n" + GOOD_KEY + "          name: other\n",
     9, "accounts.acme.keys.aaaaaaaaaaaaaaaa.name", "given twice (first at line 5); keep one"),
    ("top-level-twice", "accounts: {}\npools: {}\naccounts: {}\n", 3, "accounts",
     "given twice (first at line 1); keep one"),
    ("top-level-list", "- acme\n", 1, "", "expected a mapping of keys, got a list"),
    ("unknown-top-key", "acounts: {}\n", 1, "acounts",
     "unknown key; did you mean 'accounts'? allowed here: version, monitor, pools, accounts, "
     "domains"),
    ("unknown-account-key", "accounts:\n  acme:\n    colour: red\n", 3, "accounts.acme.colour",
     "unknown key; allowed here: status, pool, limits, created, keys, senders, legacy_login, "
     "monitor"),
    ("unknown-key-field",
     "accounts:\n  acme:\n    keys:\n" + GOOD_KEY + "          secret: hunter2\n", 9,
     "accounts.acme.keys.aaaaaaaaaaaaaaaa.secret", "unknown key"),
    ("unknown-subuser-key", "accounts:\n  acme:\n    subusers:\n      web:\n        ip_allow: []\n",
     5, "accounts.acme.subusers.web.ip_allow", "unknown key"),
    ("number-as-key", "accounts:\n  7: {}\n", 2, "accounts.7", "keys must be strings, got an "
     "integer (7)"),
    ("unsupported-version", "version: 2\n", 1, "version", "format version 2 is newer"),
    ("accounts-as-list", "accounts: [acme]\n", 1, "accounts",
     "expected a mapping of keys, got a list"),
    ("monitor-not-bool", "monitor: 'yes'\n", 1, "monitor",
     "expected true or false, got a string ('yes')"),
    ("account-monitor-not-bool", "accounts:\n  acme:\n    monitor: 1\n", 3,
     "accounts.acme.monitor", "expected true or false, got an integer (1)"),
    ("status-unknown", "accounts:\n  acme:\n    status: paused\n", 3, "accounts.acme.status",
     "expected one of active, suspended, got a string ('paused')"),
    ("ip-allow-not-list", "accounts:\n  acme:\n    ip_allow: 10.0.0.0/8\n", 3,
     "accounts.acme.ip_allow", "expected a list, got a string ('10.0.0.0/8')"),
    ("ip-allow-host-bits", "accounts:\n  acme:\n    ip_allow:\n      - 10.0.0.0/8\n"
     "      - 192.0.2.1/24\n", 5, "accounts.acme.ip_allow[1]", "host bits are set"),
    ("limit-not-int", "accounts:\n  acme:\n    limits:\n      messages_per_minute: ten\n", 4,
     "accounts.acme.limits.messages_per_minute", "expected a positive integer, got a string"),
    ("limit-bool", "accounts:\n  acme:\n    limits:\n      messages_per_hour: true\n", 4,
     "accounts.acme.limits.messages_per_hour",
     "expected a positive integer, got a boolean (true)"),
    ("created-not-time", "accounts:\n  acme:\n    created: 12\n", 3, "accounts.acme.created",
     "expected a UTC time like 2026-01-31T12:00:00Z, got an integer (12)"),
    ("bad-account-name", "accounts:\n  Acme: {}\n", 2, "accounts.Acme", "invalid name"),
    ("bad-key-id", "accounts:\n  acme:\n    keys:\n" + GOOD_KEY.replace("a" * 16, "a" * 15), 4,
     "accounts.acme.keys.aaaaaaaaaaaaaaa", "a key id is 16 characters"),
    ("key-id-trailing-newline",
     "accounts:\n  acme:\n    keys:\n" + GOOD_KEY.replace("a" * 16 + ":", '"' + "a" * 16 + '\\n":'),
     4, "accounts.acme.keys.aaaaaaaaaaaaaaaa\n", "a key id is 16 characters"),
    ("key-bad-hash", "accounts:\n  acme:\n    keys:\n" + GOOD_KEY.replace(HASH, HASH[:-1]), 6,
     "accounts.acme.keys.aaaaaaaaaaaaaaaa.sha256", "64 lowercase hex digits"),
    # a key the file leaves out: the line of the nearest key it has
    ("key-without-created",
     "accounts:\n  acme:\n    keys:\n" + GOOD_KEY.replace("created", "expires"), 4,
     "accounts.acme.keys.aaaaaaaaaaaaaaaa.created", "needs its creation time"),
    ("key-scopes-not-list",
     "accounts:\n  acme:\n    keys:\n" + GOOD_KEY.replace("[mail.send]", "mail.send"), 7,
     "accounts.acme.keys.aaaaaaaaaaaaaaaa.scopes", "expected a list"),
    ("bad-sender", "accounts:\n  acme:\n    senders:\n      not-an-address: {}\n", 4,
     "accounts.acme.senders.not-an-address", "invalid address"),
    ("pool-without-bind", "pools:\n  shared:\n    helo: mail.example.net\n", 2,
     "pools.shared.bind", "at least one bind address"),
    ("pool-bad-ip", "pools:\n  shared:\n    bind: [192.0.2.300]\n    helo: mail.example.net\n",
     3, "pools.shared.bind[0]", "invalid IP address"),
    ("domain-not-normal", "accounts:\n  acme: {}\ndomains:\n  Example.com:\n    owner: acme\n",
     4, "domains.Example.com", "normal form: example.com"),
    ("selector-bad-algorithm",
     "accounts:\n  acme: {}\ndomains:\n  example.com:\n    owner: acme\n    selectors:\n"
     "      s1: {algorithm: dsa, state: active, key_file: /k, public_key: AAAA}\n", 7,
     "domains.example.com.selectors.s1.algorithm", "expected one of rsa-sha256, ed25519-sha256"),
    # dangling references. Keys and senders are nested under their principal in the file, so
    # "a key of an unknown principal" cannot be written; these are the references that can.
    ("account-unknown-pool", "accounts:\n  acme:\n    pool: nowhere\n", 3, "accounts.acme.pool",
     "no pool named 'nowhere'"),
    ("subuser-unknown-pool", "accounts:\n  acme:\n    subusers:\n      web:\n        pool: gone\n",
     5, "accounts.acme.subusers.web.pool", "no pool named 'gone'"),
    ("domain-unknown-owner", "domains:\n  example.com:\n    owner: ghost\n", 3,
     "domains.example.com.owner", "no principal 'ghost'"),
    ("domain-unknown-subuser-owner",
     "accounts:\n  acme: {}\ndomains:\n  example.com:\n    owner: acme/ghost\n", 5,
     "domains.example.com.owner", "no principal 'acme/ghost'"),
    ("grant-to-unknown-subuser",
     "accounts:\n  acme: {}\ndomains:\n  example.com:\n    owner: acme\n    grants: [acme/web]\n",
     6, "domains.example.com.grants[0]", "'acme/web' is not a subuser of the owning account"),
    ("grant-to-other-accounts-subuser",
     "accounts:\n  acme: {}\n  beta:\n    subusers:\n      web: {}\n"
     "domains:\n  example.com:\n    owner: acme\n    grants: [beta/web]\n", 9,
     "domains.example.com.grants[0]",
     "'beta/web' is not a subuser of the owning account 'acme'"),
    ("key-id-of-two-principals",
     "accounts:\n  acme:\n    keys:\n" + GOOD_KEY
     + "  beta:\n    keys:\n" + GOOD_KEY, 11,
     "accounts.beta.keys.aaaaaaaaaaaaaaaa", "key id also used by acme"),
]


@pytest.mark.parametrize(
    ("text", "line", "key", "reason"),
    [case[1:] for case in BAD_FILES],
    ids=[case[0] for case in BAD_FILES],
)
def test_bad_file_is_refused_naming_file_line_key_and_reason(
    tmp_path: Path, text: str, line: int | None, key: str, reason: str
) -> None:
    path = directory_path(tmp_path)
    path.write_text(text, encoding="utf-8")

    with pytest.raises(ConfigError) as info:
        YamlDirectory(str(path)).load()

    assert (info.value.path, info.value.line, info.value.key) == (str(path), line, key)
    assert reason in info.value.reason
    # FILE:LINE: KEY.PATH: reason, one printable line: a newline in the key is shown escaped
    where = f"{path}:{line}" if line else str(path)
    expected_start = f"{where}: {printable(key)}: " if key else f"{where}: "
    assert str(info.value).startswith(expected_start)
    assert "\n" not in str(info.value)
    # the hot path turns the same fault into a temporary "directory unavailable"
    with pytest.raises(DirectoryUnavailable) as unavailable:
        YamlDirectory(str(path)).snapshot()
    assert str(unavailable.value) == str(info.value)


def test_written_json_style_file_with_an_account_twice_is_refused_with_its_line(
    tmp_path: Path,
) -> None:
    # what keyrelay writes is read with the json module, which also kept the last of two
    # equal keys: a hand edit that pasted an account a second time is refused, at its line
    path = directory_path(tmp_path)
    write_rich(path)
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if line == '    "acme": {\n')
    pasted = '    "acme": {"status": "suspended"},\n'
    path.write_text("".join([*lines[:first], pasted, *lines[first:]]), encoding="utf-8")

    with pytest.raises(ConfigError) as info:
        YamlDirectory(str(path)).load()

    assert str(info.value) == (f"{path}:{first + 2}: accounts.acme: given twice "
                               f"(first at line {first + 1}); keep one")
    with pytest.raises(DirectoryUnavailable, match=r"accounts\.acme: given twice"):
        YamlDirectory(str(path)).snapshot()


def test_every_program_refuses_a_directory_with_an_account_twice_at_the_same_line(
    tmp_path: Path,
) -> None:
    # the bug: a hand-edited directory.yaml with an account given twice was accepted (the
    # second silently replaced the first, keys and all) and `keyrelay check-config` said OK
    config = write_config(tmp_path)
    path = directory_path(tmp_path)
    path.write_text("accounts:\n  acme:\n    status: active\n  beta: {}\n"
                    "  acme:\n    status: suspended\n", encoding="utf-8")
    error = f"{path}:5: accounts.acme: given twice (first at line 2); keep one"

    for program, args in (("keyrelay", ["--config", str(config), "check-config"]),
                          ("keyrelay-policyd", ["--config", str(config), "--check-config"]),
                          ("keyrelay-milter", ["--config", str(config), "--check-config"])):
        result = subprocess.run([str(KEYRELAY.with_name(program)), *args], capture_output=True,
                                text=True, timeout=60, check=False)
        assert (result.returncode, result.stdout) == (1, ""), result
        assert result.stderr == f"{program}: error: {error}\n", result


def test_written_json_style_file_with_a_bad_value_names_its_line(tmp_path: Path) -> None:
    # JSON has no line numbers: the error is found on the json module's (fast) reading, and
    # its line from the same text read as YAML
    path = directory_path(tmp_path)
    write_rich(path)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    status = next(i for i, line in enumerate(lines) if line.strip() == '"status": "active",')
    lines[status] = lines[status].replace("active", "paused")
    path.write_text("".join(lines), encoding="utf-8")

    with pytest.raises(ConfigError) as info:
        YamlDirectory(str(path)).load()

    assert info.value.line == status + 1
    assert info.value.key.endswith(".status")
    assert info.value.reason == "expected one of active, suspended, got a string ('paused')"


def test_good_file_with_every_key_written_by_hand_loads(tmp_path: Path) -> None:
    """The hand-written counterpart of the bad files: the same keys, all valid."""
    path = directory_path(tmp_path)
    path.write_text(
        "version: 1\nmonitor: false\n"
        "pools:\n  shared:\n    bind: [192.0.2.10]\n    helo: mail.example.net\n"
        "accounts:\n  acme:\n    pool: shared\n    ip_allow: [192.0.2.0/24]\n"
        "    created: 2026-01-31T12:00:00Z\n"  # an unquoted YAML timestamp is fine too
        "    keys:\n" + GOOD_KEY
        + "    subusers:\n      web:\n        status: suspended\n"
        "domains:\n  example.com:\n    owner: acme\n    grants: [acme/web]\n",
        encoding="utf-8",
    )
    data = YamlDirectory(str(path)).load()
    assert data.accounts["acme"].created == T0
    assert data.keys["aaaaaaaaaaaaaaaa"].principal == "acme"
    assert data.subusers["acme/web"].status is Status.SUSPENDED
    assert data.domains["example.com"].grants == ("acme/web",)


def test_an_empty_file_is_refused_and_unavailable_but_an_empty_mapping_is_empty(
        tmp_path: Path) -> None:
    # An editor that truncates before it writes shows readers an empty file for a moment:
    # read as "no accounts", every login in that moment was refused permanently (535), as
    # the fault-injection soak found (bench/soak.py, docs/RELIABILITY.md).
    path = directory_path(tmp_path)
    path.write_text("# nothing yet\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="the file is empty; an empty directory is written"):
        YamlDirectory(str(path)).load()
    with pytest.raises(DirectoryUnavailable):
        YamlDirectory(str(path)).snapshot()
    path.write_text("{}\n", encoding="utf-8")
    assert YamlDirectory(str(path)).load() == DirectoryData()
    assert YamlDirectory(str(path)).snapshot().accounts == {}


def test_broken_write_after_good_load_is_unavailable_until_fixed(
    tmp_path: Path, parse_calls: list[object]
) -> None:
    path = directory_path(tmp_path)
    write_rich(path)
    good_text = path.read_text(encoding="utf-8")
    directory = YamlDirectory(str(path))
    assert "acme" in directory.snapshot().accounts

    # in place, like an editor: the JSON-style document with one more top-level key
    broken = good_text.rstrip().removesuffix("}") + ',\n  "bogus_key": 1\n}\n'
    path.write_text(broken, encoding="utf-8")
    for _ in range(3):  # never the stale good snapshot: the file on disk is what counts
        with pytest.raises(DirectoryUnavailable, match="bogus_key: unknown key") as info:
            directory.snapshot()
        assert str(path) in str(info.value)
    parses = len(parse_calls)
    with pytest.raises(DirectoryUnavailable):
        directory.snapshot()
    assert len(parse_calls) == parses  # the broken version is not re-parsed per request

    path.write_text(good_text, encoding="utf-8")
    recovered = directory.snapshot()
    assert "acme" in recovered.accounts and len(recovered.keys) == 4


def test_directory_is_written_in_json_style_and_any_yaml_style_reads_the_same(
    tmp_path: Path,
) -> None:
    path = directory_path(tmp_path)
    write_rich(path)
    text = path.read_text(encoding="utf-8")
    body = "".join(line for line in text.splitlines(True) if not line.startswith("#"))
    document = json.loads(body)  # what keyrelay writes is plain JSON after the comment header
    assert yaml.safe_load(text) == document  # ... and, being JSON, also valid YAML
    expected = YamlDirectory(str(path)).load()
    block = yaml.safe_dump(document, default_flow_style=False, sort_keys=False)
    path.write_text(block, encoding="utf-8")
    assert YamlDirectory(str(path)).load() == expected  # a block-style hand edit reads the same


def test_value_error_from_yaml_is_unavailable_not_the_stale_snapshot(tmp_path: Path) -> None:
    # PyYAML raises ValueError (not YAMLError) for an impossible date; once that escaped and
    # left the previous snapshot in place for every later call.
    path = directory_path(tmp_path)
    write_rich(path)
    directory = YamlDirectory(str(path))
    assert "acme" in directory.snapshot().accounts

    path.write_text("accounts:\n  acme:\n    created: 2026-13-45\n", encoding="utf-8")
    for _ in range(2):
        with pytest.raises(DirectoryUnavailable,
                           match=r":3: accounts\.acme\.created: invalid YAML"):
            directory.snapshot()


def test_unreadable_file_recovers_when_permissions_are_fixed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # chmod/chown change neither size nor mtime; the reader must still notice the fix.
    # Tests run as root here, so the unreadable file is simulated at open().
    path = directory_path(tmp_path)
    write_rich(path)
    directory = YamlDirectory(str(path))
    directory.snapshot()
    with YamlDirectory(str(path)).transaction() as data:
        admin.add_account(data, "gamma", T0)

    def denied(*args: object, **kwargs: object) -> object:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(yamlread, "open", denied, raising=False)  # where every file is read
    with pytest.raises(DirectoryUnavailable, match="cannot read the file: Permission denied"):
        directory.snapshot()
    monkeypatch.undo()
    before = os.stat(path).st_ctime_ns
    deadline = time.monotonic() + 5
    while os.stat(path).st_ctime_ns == before and time.monotonic() < deadline:
        os.chmod(path, 0o640)  # the admin's fix, at a later clock tick than the write
    assert "gamma" in directory.snapshot().accounts


def test_transaction_on_a_broken_file_refuses_and_keeps_it(tmp_path: Path) -> None:
    path = directory_path(tmp_path)
    path.write_text("accounts: [acme\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"directory\.yaml:2: invalid YAML"):
        with YamlDirectory(str(path)).transaction() as data:
            admin.add_account(data, "beta", T0)
    assert path.read_text(encoding="utf-8") == "accounts: [acme\n"


# --- atomic writes --------------------------------------------------------------------------


def test_new_file_is_created_with_mode_0640(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "directory.yaml"
    old_umask = os.umask(0o022)
    try:
        with YamlDirectory(str(path)).transaction() as data:
            admin.add_account(data, "acme", T0)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    # the lock holds no data; the daemons' group must be able to take it
    assert stat.S_IMODE(os.stat(str(path) + ".lock").st_mode) == 0o660


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o660])
def test_write_keeps_the_existing_mode(tmp_path: Path, mode: int) -> None:
    path = directory_path(tmp_path)
    with YamlDirectory(str(path)).transaction() as data:
        admin.add_account(data, "acme", T0)
    os.chmod(path, mode)
    inode = os.stat(path).st_ino

    with YamlDirectory(str(path)).transaction() as data:
        admin.add_account(data, "beta", T0)

    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == mode
    assert st.st_ino != inode  # replaced by rename, not rewritten in place
    assert set(YamlDirectory(str(path)).load().accounts) == {"acme", "beta"}


def test_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    path = directory_path(tmp_path)
    for name in ("acme", "beta", "gamma"):
        with YamlDirectory(str(path)).transaction() as data:
            admin.add_account(data, name, T0)
    assert files_in(tmp_path) == {"directory.yaml", "directory.yaml.lock"}


def test_failure_inside_the_transaction_leaves_the_file_untouched(tmp_path: Path) -> None:
    path = directory_path(tmp_path)
    write_rich(path)
    before_text = path.read_bytes()
    before = os.stat(path)

    with pytest.raises(RuntimeError, match="half way"):
        with YamlDirectory(str(path)).transaction() as data:
            admin.add_account(data, "gamma", T0)
            del data.accounts["beta"]
            raise RuntimeError("half way")

    after = os.stat(path)
    assert path.read_bytes() == before_text
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert files_in(tmp_path) == {"directory.yaml", "directory.yaml.lock"}


def test_failed_rename_leaves_the_file_untouched_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = directory_path(tmp_path)
    write_rich(path)
    before_text = path.read_bytes()

    def no_space(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError, match="No space left"):
        with YamlDirectory(str(path)).transaction() as data:
            admin.add_account(data, "gamma", T0)
    monkeypatch.undo()

    assert path.read_bytes() == before_text
    assert files_in(tmp_path) == {"directory.yaml", "directory.yaml.lock"}
    # and the lock was released: the next writer goes through
    with YamlDirectory(str(path)).transaction() as data:
        admin.add_account(data, "gamma", T0)
    assert "gamma" in YamlDirectory(str(path)).load().accounts


# Concurrent CLI writers: test_directory_contract.py, for every backend.
