"""``keyrelay sync FILE``: a declared directory (what the Ansible role's keyrelay_directory
becomes), run with the real CLI against a YAML directory in tmp_path."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import yaml
from test_yaml_directory import run_cli, write_config

from keyrelay.directory import YamlDirectory

DECLARED = {
    "pools": {"mkt": {"bind": ["192.0.2.10"], "helo": "mkt.relay.example.net"}},
    "accounts": {
        "acme": {
            "ip_allow": ["192.0.2.0/24", "2001:db8::/32"],
            "limits": {"messages_per_minute": 100, "messages_per_hour": "inherit",
                       "messages_per_day": 50000, "messages_per_month": 1000000},
            "senders": ["alerts@partner.example"],
            "subusers": {"marketing": {"pool": "mkt",
                                       "limits": {"messages_per_day": 20000}},
                         "billing": {}},
        },
    },
    "domains": {"acme.example": {"owner": "acme", "grants": ["acme/marketing"]}},
}


def declare(folder: Path, content: object, name: str = "declared.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(content), encoding="utf-8")
    return path


def sync(config: Path, path: Path, *options: str) -> str:
    result = run_cli(config, "sync", str(path), *options)
    assert (result.returncode, result.stderr) == (0, ""), result
    return result.stdout


def test_sync_creates_what_is_declared_and_a_second_run_changes_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    path = declare(tmp_path, DECLARED)

    planned = sync(config, path, "--dry-run")
    assert planned.startswith("Dry run: would make 6 change(s):"), planned
    assert not (tmp_path / "directory.yaml").exists()

    made = sync(config, path)
    assert made.splitlines()[1:7] == [
        "  add account acme", "  add subuser acme/billing", "  add subuser acme/marketing",
        "  add domain acme.example", "  add sender acme alerts@partner.example", "  add pool mkt",
    ]
    assert "Domain acme.example is pending" in made
    data = YamlDirectory(str(tmp_path / "directory.yaml")).load()
    acme = data.accounts["acme"]
    assert [str(n) for n in acme.ip_allow] == ["192.0.2.0/24", "2001:db8::/32"]
    assert acme.limits.messages_per_minute == 100 and acme.limits.messages_per_hour is None
    # issue 21: the quotas are declared like the other limits
    assert (acme.limits.messages_per_day, acme.limits.messages_per_month) == (50000, 1000000)
    assert data.subusers["acme/marketing"].limits.messages_per_day == 20000
    assert data.subusers["acme/marketing"].limits.messages_per_month is None
    assert data.subusers["acme/marketing"].pool == "mkt"
    domain = data.domains["acme.example"]
    assert (domain.owner, domain.grants, str(domain.state)) == (
        "acme", ("acme/marketing",), "pending")
    assert sorted(str(s.algorithm) for s in domain.selectors) == ["ed25519-sha256", "rsa-sha256"]
    for selector in domain.selectors:  # the domain's own DKIM keys, readable by the owner only
        assert stat.S_IMODE(Path(selector.key_file).stat().st_mode) == 0o600

    written = (tmp_path / "directory.yaml").read_bytes()
    assert sync(config, path) == (
        f"Nothing to do: the directory already holds what {path} declares.\n")
    assert sync(config, path, "--dry-run").startswith("Nothing to do")
    assert (tmp_path / "directory.yaml").read_bytes() == written  # not even rewritten


def test_sync_keeps_keys_and_what_it_does_not_name_and_makes_given_lists_exact(
        tmp_path: Path) -> None:
    config = write_config(tmp_path)
    sync(config, declare(tmp_path, DECLARED))
    created = json.loads(run_cli(config, "key", "create", "acme/marketing", "--name", "app",
                                 "--json").stdout)
    for command in (["account", "add", "by-hand"], ["subuser", "suspend", "acme/billing"]):
        assert run_cli(config, *command).returncode == 0
    changed = json.loads(json.dumps(DECLARED))
    changed["accounts"]["acme"]["ip_allow"] = ["192.0.2.0/24"]
    changed["accounts"]["acme"]["senders"] = ["news@partner.example"]
    changed["domains"]["acme.example"]["grants"] = []

    made = sync(config, declare(tmp_path, changed))

    assert made.splitlines()[1:] == [
        "  change account acme", "  change domain acme.example",
        "  add sender acme news@partner.example", "  remove sender acme alerts@partner.example",
    ]
    data = YamlDirectory(str(tmp_path / "directory.yaml")).load()
    assert [str(n) for n in data.accounts["acme"].ip_allow] == ["192.0.2.0/24"]
    assert data.domains["acme.example"].grants == ()
    assert created["key_id"] in data.keys  # keys are never the declaration's business
    assert "by-hand" in data.accounts  # not named: left alone
    assert str(data.subusers["acme/billing"].status) == "suspended"  # status not given: kept


def test_state_absent_removes_a_subuser_with_its_keys_and_a_domain_with_its_key_files(
        tmp_path: Path) -> None:
    config = write_config(tmp_path)
    sync(config, declare(tmp_path, DECLARED))
    created = json.loads(run_cli(config, "key", "create", "acme/billing", "--name", "app",
                                 "--json").stdout)
    key_files = [Path(s.key_file) for s in
                 YamlDirectory(str(tmp_path / "directory.yaml")).load()
                 .domains["acme.example"].selectors]
    gone = json.loads(json.dumps(DECLARED))
    gone["accounts"]["acme"]["subusers"]["billing"] = {"state": "absent"}
    gone["domains"]["acme.example"] = {"state": "absent"}

    made = sync(config, declare(tmp_path, gone))

    assert "  remove subuser acme/billing" in made and "  remove domain acme.example" in made
    assert f"  remove key {created['key_id']}" in made
    data = YamlDirectory(str(tmp_path / "directory.yaml")).load()
    assert "acme/billing" not in data.subusers and "acme.example" not in data.domains
    assert not any(p.exists() for p in key_files)
    assert sync(config, declare(tmp_path, gone)).startswith("Nothing to do")


@pytest.mark.parametrize(("content", "message"), [
    ({"accounts": {"acme": {"keys": {"k1": {"sha256": "00"}}}}},
     "3: accounts.acme.keys: API keys are never declared; create them with `keyrelay key "
     "create"),
    ({"accounts": {"acme": {"ip_allow": ["192.0.2.1/24"]}}},
     "4: accounts.acme.ip_allow[0]: invalid CIDR '192.0.2.1/24': host bits are set; did you "
     "mean 192.0.2.0/24?"),
    ({"accounts": {"acme": {"subusers": {"Bad_Name": {}}}}},
     "4: accounts.acme.subusers.Bad_Name: invalid name 'Bad_Name'"),
    ({"accounts": {"acme": {"limits": {"messages_per_minute": -1}}}},
     "4: accounts.acme.limits.messages_per_minute: expected a whole number of at least 1, or "
     "inherit (or null, or leave it out) to take the account's or the configuration's value; "
     "got an integer (-1)"),
    # 0 is refused as `keyrelay limits set` refuses it (it meant "inherit" here before)
    ({"accounts": {"acme": {"limits": {"messages_per_hour": 0}}}},
     "4: accounts.acme.limits.messages_per_hour: expected a whole number of at least 1, or "
     "inherit (or null, or leave it out) to take the account's or the configuration's value; "
     "got an integer (0)"),
    # issue 21: the quotas likewise
    ({"accounts": {"acme": {"subusers": {"app": {"limits": {"messages_per_month": 0}}}}}},
     "6: accounts.acme.subusers.app.limits.messages_per_month: expected a whole number of at "
     "least 1"),
    ({"accounts": {"acme": {"colour": "red"}}},
     "3: accounts.acme.colour: unknown key; allowed here: state, status, pool, limits, "
     "senders, legacy_login, monitor, ip_allow, subusers"),
    ({"accounts": {"acme": {"stat": "active"}}},
     "3: accounts.acme.stat: unknown key; did you mean 'state'? allowed here: state, status"),
    ({"accounts": {"acme": {"status": "paused"}}},
     "3: accounts.acme.status: expected active or suspended, got a string ('paused')"),
    ({"accounts": {"acme": {"monitor": "yes"}}},
     "3: accounts.acme.monitor: expected true or false, got a string ('yes')"),
    # a key the file leaves out: the line of the entry that needs it
    ({"domains": {"acme.example": {"grants": []}}},
     "2: domains.acme.example.owner: required"),
    ({"pools": {"mkt": {"bind": ["192.0.2.300"], "helo": "x.example"}}},
     "4: pools.mkt.bind[0]: invalid IP address '192.0.2.300'"),
    (["accounts"], "1: expected a mapping of keys, got a list"),
])
def test_a_broken_declaration_is_refused_with_file_line_key_and_reason(
        tmp_path: Path, content: object, message: str) -> None:
    config = write_config(tmp_path)
    path = declare(tmp_path, content)

    result = run_cli(config, "sync", str(path))

    assert result.returncode == 1 and "Traceback" not in result.stderr, result
    assert result.stderr.startswith(f"keyrelay: error: {path}:{message}"), result.stderr
    assert not (tmp_path / "directory.yaml").exists()


@pytest.mark.parametrize(("text", "message"), [
    ("accounts:\n  acme: {}\n  beta: {}\n  acme:\n    status: suspended\n",
     "4: accounts.acme: given twice (first at line 2); keep one"),
    ("domains:\n  acme.example:\n    owner: acme\n  acme.example:\n    owner: beta\n",
     "4: domains.acme.example: given twice (first at line 2); keep one"),
    ("accounts:\n  acme:\n    limits:\n      messages_per_hour: 5\n"
     "      messages_per_hour: 50\n",
     "5: accounts.acme.limits.messages_per_hour: given twice (first at line 4); keep one"),
], ids=["account", "domain", "limit"])
def test_a_declaration_with_a_key_given_twice_is_refused_at_its_line(
        tmp_path: Path, text: str, message: str) -> None:
    # YAML keeps the last of two equal keys: the first domain (its owner) was silently gone
    config = write_config(tmp_path)
    path = tmp_path / "declared.yaml"
    path.write_text(text, encoding="utf-8")

    result = run_cli(config, "sync", str(path))

    assert result.returncode == 1, result
    assert result.stderr == f"keyrelay: error: {path}:{message}\n"
    assert not (tmp_path / "directory.yaml").exists()


@pytest.mark.parametrize(("raw", "message"), [
    (b"accounts:\n  acme: {}\n# caf\xe9\n",
     ": not UTF-8 text (byte 26: invalid continuation byte)"),
    (b"accounts: 2026-13-45\n", ":1: accounts: invalid YAML: month must be in 1..12"),
    (b"accounts: !!int x\n", ":1: accounts: invalid YAML: invalid literal for int()"),
    # libyaml: at most 1000 levels
    (b"[" * 3000 + b"]" * 3000, ":1: invalid YAML at column 1001: exceeded maximum nesting depth"),
], ids=["latin-1", "impossible-date", "int-tag-on-text", "nested-3000-deep"])
def test_a_declaration_that_is_no_yaml_text_is_refused_in_one_line(
        tmp_path: Path, raw: bytes, message: str) -> None:
    # These were tracebacks: the atheris fuzzer (fuzz/run.py --target declaration) found the
    # UnicodeDecodeError; the ValueErrors and the RecursionError of PyYAML's pure Python
    # loader turned up while fixing it.
    config = write_config(tmp_path)
    path = tmp_path / "declared.yaml"
    path.write_bytes(raw)

    result = run_cli(config, "sync", str(path))

    assert result.returncode == 1 and "Traceback" not in result.stderr, result
    assert result.stderr.startswith(f"keyrelay: error: {path}{message}"), result.stderr
    assert not (tmp_path / "directory.yaml").exists()


@pytest.mark.parametrize(("content", "message"), [
    ({"accounts": {"acme": {}}, "domains": {"acme.example": {"owner": "acme/missing"}}},
     "unknown subuser 'acme/missing'"),
    ({"accounts": {"acme": {"pool": "nowhere"}}}, "unknown pool 'nowhere'"),
    ({"pools": {"a": {"bind": ["192.0.2.1"], "helo": "a.example"},
                "b": {"bind": ["192.0.2.1"], "helo": "b.example"}}},
     "192.0.2.1 already belongs to pool a"),
    ({"accounts": {"acme": {}, "other": {"subusers": {"x": {}}}},
      "domains": {"acme.example": {"owner": "acme", "grants": ["other/x"]}}},
     "other/x is not a subuser of acme"),
])
def test_a_declaration_that_clashes_changes_nothing_and_leaves_no_key_behind(
        tmp_path: Path, content: object, message: str) -> None:
    config = write_config(tmp_path)
    result = run_cli(config, "sync", str(declare(tmp_path, content)))

    assert result.returncode == 1 and "Traceback" not in result.stderr, result
    assert message in result.stderr
    assert not (tmp_path / "directory.yaml").exists()
    assert [p for p in tmp_path.joinpath("dkim").rglob("*") if p.is_file()] == []


@pytest.mark.parametrize(("content", "message"), [
    ({"accounts": {"acme": {"limits": {"messages_per_minute": 100, "messages_per_hour": 1}}}},
     "acme would be allowed 100 messages per minute (account acme) but only 1 per hour "
     "(account acme): the per-minute limit must not be above the per-hour limit"),
    # a subuser's own quota above its account's longer one could never be reached (issue 21:
    # an account's per-minute limit above a subuser's own per-hour one is no contradiction
    # any more, the account's caps all its subusers together)
    ({"accounts": {"acme": {"limits": {"messages_per_month": 1000},
                            "subusers": {"app": {"limits": {"messages_per_day": 5000}}}}}},
     "acme/app would be allowed 5000 messages per day (subuser acme/app) but only 1000 per "
     "month (account acme): the per-day limit must not be above the per-month limit"),
    ({"accounts": {"acme": {"limits": {"messages_per_day": 100, "messages_per_month": 50}}}},
     "acme would be allowed 100 messages per day (account acme) but only 50 per month "
     "(account acme)"),
    ({"accounts": {"acme": {"limits": {"recipients_per_message": 10**20}}}},
     "recipients per message: 100000000000000000000 is above the maximum of 100000"),
], ids=["minute-above-hour", "a-subusers-day-above-the-accounts-month", "day-above-month",
        "absurd"])
def test_declared_limits_are_sanity_checked(tmp_path: Path, content: object,
                                            message: str) -> None:
    # issue 20, item 8
    config = write_config(tmp_path)
    path = declare(tmp_path, content)

    result = run_cli(config, "sync", str(path))

    assert result.returncode == 1 and "Traceback" not in result.stderr, result
    assert result.stderr.startswith(f"keyrelay: error: {path}: {message}"), result.stderr
    assert not (tmp_path / "directory.yaml").exists()


def test_a_dkim_key_dir_that_is_a_file_stops_only_a_sync_that_makes_keys(
        tmp_path: Path) -> None:
    # issue 20, item 15: it read "cannot access ...: File exists"
    config = write_config(tmp_path)
    (tmp_path / "dkim").write_text("", encoding="utf-8")
    sync(config, declare(tmp_path, {"accounts": {"acme": {}}}))

    result = run_cli(config, "sync", str(declare(tmp_path, DECLARED)))

    assert result.returncode == 1, result
    assert result.stderr == (
        f"keyrelay: error: {config}: dkim.key_dir: {tmp_path}/dkim is a file: dkim.key_dir "
        "must name a folder (it is made if missing) where the private DKIM keys are kept\n")
    assert "acme.example" not in YamlDirectory(str(tmp_path / "directory.yaml")).load().domains


def test_a_domain_owned_by_someone_else_is_not_moved_silently(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    sync(config, declare(tmp_path, DECLARED))
    moved = {"accounts": {"other": {}}, "domains": {"acme.example": {"owner": "other"}}}

    result = run_cli(config, "sync", str(declare(tmp_path, moved, "moved.yaml")))

    assert result.returncode == 1, result
    assert "domains.acme.example.owner: it belongs to acme, not other" in result.stderr
    data = YamlDirectory(str(tmp_path / "directory.yaml")).load()
    assert data.domains["acme.example"].owner == "acme" and "other" not in data.accounts


def test_a_pool_is_changed_in_place_and_may_not_take_another_pools_address(
        tmp_path: Path) -> None:
    config = write_config(tmp_path)
    pools = {"pools": {"mkt": {"bind": ["192.0.2.10"], "helo": "mkt.relay.example.net"},
                       "tx": {"bind": ["192.0.2.20"], "helo": "tx.relay.example.net"}}}
    sync(config, declare(tmp_path, pools))
    pools["pools"]["mkt"] = {"bind": ["192.0.2.11", "192.0.2.10"]}  # helo not given: kept

    assert sync(config, declare(tmp_path, pools)).splitlines()[1:] == [
        "  change pool mkt",
        "Postfix needs the transport kr-pool-mkt: run `keyrelay postfix apply --reload`; mail "
        "through this pool waits until then."]
    mkt = YamlDirectory(str(tmp_path / "directory.yaml")).load().pools["mkt"]
    assert ([str(a) for a in mkt.bind], mkt.helo) == (
        ["192.0.2.11", "192.0.2.10"], "mkt.relay.example.net")

    pools["pools"]["tx"] = {"bind": ["192.0.2.11"]}
    result = run_cli(config, "sync", str(declare(tmp_path, pools)))
    assert result.returncode == 1 and "192.0.2.11 already belongs to pool mkt" in result.stderr
