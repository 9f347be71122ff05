"""The typed configuration (keyrelay.config) and durations (keyrelay.durations).

Every test writes a real file under tmp_path and loads it the way the daemons do.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from keyrelay.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    LimitsConfig,
    default_config,
    load_config,
    parse_config,
    render_example,
    resolve_config_path,
)
from keyrelay.decisions import EngineSettings
from keyrelay.durations import format_duration, parse_duration
from keyrelay.errors import ConfigError
from keyrelay.limits import LIMIT_MAXIMA

EXAMPLE = Path(__file__).resolve().parent.parent / "postfix-conf" / "keyrelay.yaml.example"


def write(tmp_path: Path, text: str | bytes) -> str:
    path = tmp_path / "keyrelay.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def load_error(tmp_path: Path, text: str | bytes) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    error = info.value
    assert error.path == path
    # FILE:LINE: KEY.PATH: reason, on one line (LINE and KEY.PATH when the fault has them)
    where = f"{path}:{error.line}: " if error.line is not None else f"{path}: "
    assert str(error) == where + (f"{error.key}: " if error.key else "") + error.reason
    assert "\n" not in str(error)
    return error


# --- defaults and the example file ---------------------------------------------------------


def test_empty_file_means_all_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == default_config()
    assert load_config(write(tmp_path, "# only a comment\n")) == default_config()


def test_defaults_are_the_documented_values() -> None:
    config = default_config()
    assert config.directory.backend == "yaml"
    assert config.directory.path == "/etc/keyrelay/directory.yaml"
    assert config.dkim.key_dir == "/etc/keyrelay/dkim"
    assert config.dkim.selector_prefix == "kr"
    assert config.auth.username == "apikey"
    assert config.keys.default_scopes == ("mail.send",)
    assert config.keys.default_expiry is None
    assert config.keys.max_expiry is None
    assert config.keys.last_used_flush_interval == 300.0
    assert config.domains.failing_grace == 72 * 3600.0
    assert config.dns.spf_include == ""
    assert config.dns.dmarc_rua == ""
    assert config.monitor_mode is False
    assert config.limits.messages_per_minute == 600
    assert config.limits.messages_per_hour == 20000
    assert config.limits.recipients_per_message == 100
    # issue 21: no daily or monthly quota unless configured
    assert (config.limits.messages_per_day, config.limits.messages_per_month) == (None, None)
    assert config.routing.default_pool == ""
    assert config.routing.transport_prefix == "kr-pool-"
    assert config.logging.level == "info"
    assert config.logging.format == "text"
    assert config.logging.audit_log == "/var/log/keyrelay/audit.log"
    assert config.milter.listen == "unix:/var/spool/postfix/private/keyrelay-milter"
    assert (config.milter.check_sender, config.milter.sign) == (True, True)
    assert (config.milter.socket_mode, config.milter.socket_group) == ("0660", "postfix")
    assert (config.milter.user, config.policyd.user) == ("keyrelay", "keyrelay")
    assert config.milter.shutdown_grace == 10.0


def test_quota_defaults_are_optional_integers(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "limits:\n  messages_per_hour: 1000\n"
                               "  messages_per_day: 20000\n  messages_per_month: null\n"))
    assert (config.limits.messages_per_day, config.limits.messages_per_month) == (20000, None)
    settings = EngineSettings.from_config(config)
    assert settings.default_limits.messages_per_day == 20000
    assert settings.default_limits.messages_per_month is None


def test_unset_keys_of_a_partly_written_section_keep_their_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "limits:\n  messages_per_hour: 5000\n"))
    assert config.limits.messages_per_hour == 5000
    assert config.limits.messages_per_minute == 600
    assert config.keys == default_config().keys


def test_section_with_every_key_commented_out_means_its_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "keys:\n  # default_expiry: 90d\nmonitor_mode: true\n"))
    assert config.keys == default_config().keys
    assert config.monitor_mode is True


def test_config_is_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        default_config().limits.messages_per_minute = 1  # type: ignore[misc]


def test_example_file_is_identical_to_render_example() -> None:
    # On failure: python -m keyrelay.config > postfix-conf/keyrelay.yaml.example
    assert EXAMPLE.read_text(encoding="utf-8") == render_example()


def test_example_file_loads_back_to_default_config() -> None:
    assert load_config(str(EXAMPLE)) == default_config()


def test_example_documents_every_key_of_the_schema() -> None:
    text = render_example()

    def check(section: object, indent: str) -> None:
        for f in dataclasses.fields(section):  # type: ignore[arg-type]
            assert f.metadata.get("doc"), f"{type(section).__name__}.{f.name} has no doc"
            assert f"\n{indent}{f.name}:" in text, f"{f.name} missing from the example"
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                check(value, indent + "  ")

    check(default_config(), "")


def test_every_key_set_to_a_non_default_value_is_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
directory: {backend: yaml, path: /srv/kr/directory.yaml}
dkim: {key_dir: /srv/kr/dkim, selector_prefix: acme2024}
auth: {username: relay-user}
keys:
  default_scopes: [mail.send, stats.read]
  default_expiry: 90d
  max_expiry: 31536000
  last_used_flush_interval: 1m30s
domains: {failing_grace: 1w}
dns: {spf_include: _spf.relay.example.net, dmarc_rua: dmarc-reports@example.org}
monitor_mode: true
limits: {messages_per_minute: 10, messages_per_hour: 100, recipients_per_message: 5}
routing: {default_pool: shared, transport_prefix: pool-}
logging: {level: debug, format: json, audit_log: ""}
milter: {listen: "inet:8891@127.0.0.1", check_sender: false, socket_mode: "0600",
         socket_group: "", user: kr-milter, shutdown_grace: 30s}
""",
    )
    config = load_config(path)
    assert config.directory.path == "/srv/kr/directory.yaml"
    assert config.dkim.key_dir == "/srv/kr/dkim"
    assert config.dkim.selector_prefix == "acme2024"
    assert config.auth.username == "relay-user"
    assert config.keys.default_scopes == ("mail.send", "stats.read")
    assert config.keys.default_expiry == 90 * 86400.0
    assert config.keys.max_expiry == 365 * 86400.0
    assert config.keys.last_used_flush_interval == 90.0
    assert config.domains.failing_grace == 7 * 86400.0
    assert config.dns.spf_include == "_spf.relay.example.net"
    assert config.dns.dmarc_rua == "dmarc-reports@example.org"
    assert config.monitor_mode is True
    assert (config.limits.messages_per_minute, config.limits.messages_per_hour) == (10, 100)
    assert config.limits.recipients_per_message == 5
    assert config.routing.default_pool == "shared"
    assert config.routing.transport_prefix == "pool-"
    assert (config.logging.level, config.logging.format) == ("debug", "json")
    assert config.logging.audit_log == ""
    assert config.milter.listen == "inet:8891@127.0.0.1"
    assert (config.milter.check_sender, config.milter.sign) == (False, True)
    assert (config.milter.socket_mode, config.milter.socket_group) == ("0600", "")
    assert (config.milter.user, config.milter.shutdown_grace) == ("kr-milter", 30.0)


def test_parse_config_accepts_already_loaded_yaml_and_names_the_given_path() -> None:
    assert parse_config({"monitor_mode": True}, "inline").monitor_mode is True
    assert parse_config(None, "inline") == default_config()
    with pytest.raises(ConfigError, match=r"^inline: monitor_mode: "):
        parse_config({"monitor_mode": "yes"}, "inline")


# --- errors name the file, the dotted key and the reason -----------------------------------

ERRORS = [
    # unknown keys, with a suggestion and the allowed keys
    ("directroy: {}\n", 1, "directroy", "did you mean 'directory'?"),
    ("dkim:\n  selector: kr\n", 2, "dkim.selector", "did you mean 'selector_prefix'?"),
    ("limits:\n  zzz: 1\n", 2, "limits.zzz",
     "allowed here: messages_per_minute, messages_per_hour"),
    ("1: x\n", 1, "1", "unknown key"),
    # wrong types, saying what was expected and what was found
    ("auth:\n  username: [a, b]\n", 2, "auth.username", "expected a string, got a list"),
    ("auth:\n  username: null\n", 2, "auth.username", "expected a string, got null"),
    ("limits:\n  messages_per_minute: '600'\n", 2, "limits.messages_per_minute", "got a string"),
    ("limits:\n  messages_per_hour: 1.5\n", 2, "limits.messages_per_hour", "expected an integer"),
    ("limits:\n  messages_per_hour: true\n", 2, "limits.messages_per_hour", "got a boolean (true)"),
    ("monitor_mode: 'yes'\n", 1, "monitor_mode", "expected true or false, got a string ('yes')"),
    ("monitor_mode: 1\n", 1, "monitor_mode", "expected true or false, got an integer (1)"),
    ("keys:\n  max_expiry: [1]\n", 2, "keys.max_expiry", "expected a duration"),
    ("keys:\n  max_expiry: true\n", 2, "keys.max_expiry", "or null, got a boolean (true)"),
    ("keys:\n  default_scopes: mail.send\n", 2, "keys.default_scopes", "expected a list"),
    ("keys:\n  default_scopes: [mail.send, 7]\n", 2, "keys.default_scopes[1]", "expected a string"),
    ("dkim: /etc/keyrelay/dkim\n", 1, "dkim", "expected a mapping of keys, got a string"),
    ("logging:\n  level: 2\n", 2, "logging.level", "got an integer (2)"),
    # impossible values
    ("limits:\n  recipients_per_message: 0\n", 2, "limits.recipients_per_message", "at least 1"),
    # issue 20 item 8: absurd values and contradictions, as `keyrelay limits set` refuses them
    ("limits:\n  messages_per_minute: 99999999999999999999999\n", 2,
     "limits.messages_per_minute", "must be at most 1000000, got 99999999999999999999999"),
    ("limits:\n  recipients_per_message: 100001\n", 2, "limits.recipients_per_message",
     "must be at most 100000"),
    ("limits:\n  messages_per_hour: 1\n  messages_per_minute: 100\n", 3,
     "limits.messages_per_minute", "100 per minute is above messages_per_hour (1)"),
    ("limits:\n  messages_per_minute: 30000\n", 2, "limits.messages_per_minute",
     "above messages_per_hour (20000)"),
    # issue 21: the quotas' bounds and order, as `keyrelay limits set` refuses them
    ("limits:\n  messages_per_day: 0\n", 2, "limits.messages_per_day", "at least 1, got 0"),
    ("limits:\n  messages_per_month: -3\n", 2, "limits.messages_per_month",
     "at least 1, got -3"),
    ("limits:\n  messages_per_month: 44640000001\n", 2, "limits.messages_per_month",
     "must be at most 44640000000"),
    ("limits:\n  messages_per_day: lots\n", 2, "limits.messages_per_day",
     "expected an integer or null, got a string"),
    ("limits:\n  messages_per_day: 1000\n", 2, "limits.messages_per_day",
     "1000 per day is below messages_per_hour (20000): the daily quota must not be below the "
     "per-hour limit"),
    ("limits:\n  messages_per_day: 50000\n  messages_per_month: 40000\n", 3,
     "limits.messages_per_month", "40000 per month is below messages_per_day (50000)"),
    ("keys:\n  last_used_flush_interval: 0.5\n", 2, "keys.last_used_flush_interval", "at least 1s"),
    ("keys:\n  default_expiry: 0\n", 2, "keys.default_expiry", "at least 1s, got 0s"),
    ("logging:\n  level: verbose\n", 2, "logging.level", "must be one of 'debug', 'info'"),
    ("directory:\n  backend: sql\n", 2, "directory.backend", "must be one of 'yaml', 'ldap'"),
    ("keys:\n  default_expiry: 3 months\n", 2, "keys.default_expiry", "invalid duration"),
    ("domains:\n  failing_grace: 2y\n", 2, "domains.failing_grace", "unknown unit 'y'"),
    ("domains:\n  failing_grace: -5\n", 2, "domains.failing_grace", "non-negative"),
    ("dkim:\n  selector_prefix: KR\n", 2, "dkim.selector_prefix", "must be a lowercase letter"),
    ("dkim:\n  selector_prefix: abcdefghijklmnopq\n", 2, "dkim.selector_prefix", "up to 15"),
    ("keys:\n  default_scopes: [Mail.Send]\n", 2, "keys.default_scopes[0]", "a dotted lowercase"),
    ("keys:\n  default_scopes: [mail]\n", 2, "keys.default_scopes[0]", "got 'mail'"),
    ("auth:\n  username: api key\n", 2, "auth.username", "without whitespace"),
    ("auth:\n  username: ''\n", 2, "auth.username", "non-empty"),
    ("routing:\n  transport_prefix: kr_pool\n", 2, "routing.transport_prefix", "got 'kr_pool'"),
    ("dns:\n  spf_include: not a host\n", 2, "dns.spf_include", "must be a domain name"),
    ("dns:\n  dmarc_rua: reports\n", 2, "dns.dmarc_rua", "must be a mailbox"),
    ("dns:\n  dmarc_rua: mailto:d@example.com\n", 2, "dns.dmarc_rua", "without mailto:"),
    ("directory:\n  path: directory.yaml\n", 2, "directory.path", "must be an absolute path"),
    ("dkim:\n  key_dir: ./dkim\n", 2, "dkim.key_dir", "must be an absolute path, got './dkim'"),
    ("logging:\n  audit_log: audit.log\n", 2, "logging.audit_log", "must be an absolute path"),
    ("milter:\n  listen: 127.0.0.1:8891\n", 2, "milter.listen", "must be inet:host:port"),
    ("milter:\n  listen: unix:relative\n", 2, "milter.listen", "got 'unix:relative'"),
    ("milter:\n  socket_mode: '999'\n", 2, "milter.socket_mode", "an octal mode"),
    ("milter:\n  sign: 'no'\n", 2, "milter.sign", "expected true or false"),
    ("milter:\n  check_sender: false\n  sign: false\n", 3, "milter.sign",
     "check_sender and sign are both false"),
    # a rule across two keys names the one to change
    (
        "keys:\n  default_expiry: 90d\n  max_expiry: 30d\n",
        2,
        "keys.default_expiry",
        "must not be longer than max_expiry (30d), got 90d",
    ),
]


@pytest.mark.parametrize(("text", "line", "key", "reason"), ERRORS, ids=[e[2] for e in ERRORS])
def test_invalid_value_is_an_error_naming_file_line_key_and_reason(
    tmp_path: Path, text: str, line: int, key: str, reason: str
) -> None:
    error = load_error(tmp_path, text)
    assert (error.line, error.key) == (line, key)
    assert f"keyrelay.yaml:{line}: {key}: " in str(error)
    assert reason in error.reason


def test_the_configuration_bounds_limits_as_the_cli_does() -> None:
    """limits.* in keyrelay.yaml are bounded by the same maxima as `keyrelay limits set`."""
    for name, top in LIMIT_MAXIMA.items():
        meta = next(f.metadata for f in dataclasses.fields(LimitsConfig) if f.name == name)
        assert (meta["min"], meta["max"]) == (1, top), name


def test_unknown_key_without_a_close_match_lists_the_allowed_keys(tmp_path: Path) -> None:
    error = load_error(tmp_path, "xyzzy: 1\n")
    assert "did you mean" not in error.reason
    assert "allowed here: directory, dkim, auth, keys, domains, dns, monitor_mode" in error.reason


def test_expiry_within_max_expiry_is_accepted(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "keys: {default_expiry: 30d, max_expiry: 30d}\n"))
    assert config.keys.default_expiry == config.keys.max_expiry == 30 * 86400.0


def test_yaml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    error = load_error(tmp_path, "limits:\n  messages_per_minute: 1\n bad: [\n")
    assert (error.line, error.key) == (3, "")
    assert error.reason == ("invalid YAML at column 2: did not find expected key (while parsing "
                            "a block mapping at line 1)")


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path: Path) -> None:
    # PyYAML keeps the last of two equal keys: the second logging section silently dropped
    # the first one's audit_log, and the CLI wrote /var/log/keyrelay/audit.log (found when
    # a configuration of tests/test_fuzz_cli.py did this)
    error = load_error(tmp_path, "logging:\n  audit_log: /srv/audit.log\n"
                                 "dkim:\n  key_dir: /srv/dkim\nlogging:\n  level: debug\n")
    assert str(error) == f"{error.path}:5: logging: given twice (first at line 1); keep one"
    nested = load_error(tmp_path, "limits:\n  messages_per_hour: 5\n  messages_per_hour: 6\n")
    assert (nested.line, nested.key, nested.reason) == (
        3, "limits.messages_per_hour", "given twice (first at line 2); keep one")
    # equal as loaded, not as written: 0x1E and 30 are the same number
    numbers = load_error(tmp_path, "x:\n  30: a\n  0x1E: b\n")
    assert (numbers.line, numbers.key) == (3, "x.30")


def test_yaml_merge_keys_and_aliases_are_not_duplicates(tmp_path: Path) -> None:
    text = ("limits: &l {messages_per_minute: 5}\n"
            "x-defaults: &d {messages_per_hour: 7, recipients_per_message: 3}\n")
    error = load_error(tmp_path, text)  # x-defaults: only an unknown key, not a duplicate
    assert error.key == "x-defaults"
    config = load_config(write(tmp_path, "limits:\n  <<: {messages_per_minute: 5}\n"
                                         "  messages_per_minute: 6\n"))
    assert config.limits.messages_per_minute == 6


def test_impossible_yaml_date_is_a_config_error_not_a_traceback(tmp_path: Path) -> None:
    # PyYAML raises ValueError (not YAMLError) while constructing a timestamp like this one
    error = load_error(tmp_path, "logging: {}\nmonitor_mode: 2026-13-45\n")
    assert (error.line, error.key) == (2, "monitor_mode")
    assert error.reason == "invalid YAML: month must be in 1..12"


@pytest.mark.parametrize(
    ("text", "got"), [("- a\n- b\n", "a list"), ("just words\n", "a string ('just words')")]
)
def test_top_level_that_is_not_a_mapping_is_an_error(tmp_path: Path, text: str, got: str) -> None:
    error = load_error(tmp_path, text)
    assert error.key == ""
    assert error.reason == f"the top level must be a mapping of keys, got {got}"


def test_missing_file_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.path, info.value.key, info.value.reason) == (path, "", "file not found")
    assert str(info.value) == f"{path}: file not found"


def test_unreadable_path_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(str(tmp_path))  # a directory


def test_file_that_is_not_utf8_is_an_error(tmp_path: Path) -> None:
    error = load_error(tmp_path, b"auth:\n  username: \xff\xfe\n")
    assert error.key == ""
    assert "not UTF-8" in error.reason


# --- where the file is ---------------------------------------------------------------------


def test_config_path_from_cli_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV, "/env/keyrelay.yaml")
    assert resolve_config_path("/cli/keyrelay.yaml") == "/cli/keyrelay.yaml"


def test_config_path_from_environment_without_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV, "/env/keyrelay.yaml")
    assert resolve_config_path(None) == "/env/keyrelay.yaml"


def test_config_path_defaults_when_neither_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert resolve_config_path(None) == DEFAULT_CONFIG_PATH == "/etc/keyrelay/keyrelay.yaml"
    monkeypatch.setenv(CONFIG_ENV, "")
    assert resolve_config_path(None) == DEFAULT_CONFIG_PATH


# --- durations -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (0, 0.0),
        (45, 45.0),
        (2.5, 2.5),
        ("45", 45.0),
        ("30s", 30.0),
        ("5m", 300.0),
        ("72h", 259200.0),
        ("90d", 7776000.0),
        ("2w", 1209600.0),
        ("1h30m", 5400.0),
        ("1w2d3h4m5s", 788645.0),
        (" 10m ", 600.0),
        ("1.5h", 5400.0),
    ],
)
def test_parse_duration_accepts_seconds_and_unit_strings(
    text: str | int | float, seconds: float
) -> None:
    assert parse_duration(text) == seconds
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        (-1, "non-negative"),
        ("-5m", "negative"),
        (math.inf, "non-negative"),
        (math.nan, "non-negative"),
        ("5y", "unknown unit 'y'"),
        ("5M", "unknown unit 'M'"),
        ("h", "expected a number of seconds"),
        ("5 m", "expected a number of seconds"),
        ("1h 30m", "expected a number of seconds"),
        ("ten minutes", "expected a number of seconds"),
        ("30m1h", "largest to smallest"),
        ("5m5m", "largest to smallest"),
        (True, "expected a number of seconds"),
        ([5], "expected a number of seconds"),
    ],
)
def test_parse_duration_rejects_anything_else_with_a_reason(text: object, message: str) -> None:
    with pytest.raises(ValueError, match="invalid duration") as info:
        parse_duration(text)  # type: ignore[arg-type]
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (45, "45s"),
        (300, "5m"),
        (5400, "1h30m"),
        (259200, "3d"),
        (7776000, "90d"),
        (1209600, "2w"),
        (10 * 86400, "10d"),
        (93784, "1d2h3m4s"),
        (1.5, "1.5s"),
        (0.00001, "0.00001s"),
    ],
)
def test_format_duration_gives_the_shortest_exact_form(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("seconds", [0, 1, 59, 61, 3599, 3601, 86399, 90061, 604800, 1.25, 3601.1])
def test_format_duration_output_parses_back_to_the_same_seconds(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("seconds", [-1, math.inf, math.nan])
def test_format_duration_rejects_impossible_durations(seconds: float) -> None:
    with pytest.raises(ValueError, match="non-negative"):
        format_duration(seconds)


@pytest.mark.parametrize(("value", "reason"), [
    ("9466", "must be HOST:PORT (IPv6 as [::1]:9464), or empty for no endpoints, got '9466'"),
    ("127.0.0.1:0", "127.0.0.1:0: the port must be 1 to 65535"),
    ("127.0.0.1:70000", "127.0.0.1:70000: the port must be 1 to 65535"),
    ("http://127.0.0.1:9466", "must be HOST:PORT"),
    ("[::1]", "must be HOST:PORT"),
])
def test_a_bad_events_metrics_listen_is_one_line_naming_the_key(tmp_path: Path, value: str,
                                                                reason: str) -> None:
    error = load_error(tmp_path, f"events:\n  metrics_listen: '{value}'\n")
    assert error.key == "events.metrics_listen"
    assert error.line == 2
    assert reason in error.reason


def test_events_metrics_listen_is_off_by_default_and_takes_ipv6(tmp_path: Path) -> None:
    assert default_config().events.metrics_listen == ""
    config = load_config(write(tmp_path, "events:\n  metrics_listen: '[::1]:9466'\n"))
    assert config.events.metrics_listen == "[::1]:9466"
