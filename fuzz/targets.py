"""The atheris targets: what each feeds to which parser (fuzz/entries.py holds the code).

Kept free of keyrelay imports, so that the runner starts quickly. ``instrument`` names the
modules (with their submodules) whose branches guide the fuzzer (fuzz/harness.py): the parser's
own, and Python's email or PyYAML's constructor code where the parser hands over to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
SEEDS = FUZZ_DIR / "corpus"
# The wire readers' request bound in the targets: the smallest policyd.max_request_size the
# configuration allows (keyrelay/config/services.py), so inputs up to max_len cross it.
MAX_REQUEST = 1024


@dataclass(frozen=True)
class Target:
    name: str
    summary: str
    instrument: tuple[str, ...]
    max_len: int
    selftest: bool = False

    @property
    def seeds(self) -> Path:
        return SEEDS / self.name


TARGETS = {t.name: t for t in (
    Target("auth", "dovecot auth connections (policyd/dovecot.py: LineReader, ServerSession): "
           "answered or closed (BadRequest), the same sent whole or a few bytes at a time, "
           "every reply one line", ("policyd.dovecot", "policyd.sasl"), 4096),
    Target("policy", "policy delegation connections (policyd/attributes.py: RequestReader): "
           "name=value requests or BadRequest, the same sent whole or in pieces",
           ("policyd.attributes",), 4096),
    Target("netstring", "socketmap connections (policyd/netstring.py: NetstringReader): "
           "lookups or BadRequest, the same sent whole or in pieces",
           ("policyd.netstring",), 4096),
    Target("header", "From:/Sender: values as the milter passes them (keyrelay/headers.py: "
           "mailboxes): addresses or HeaderError",
           ("keyrelay.headers", "email._header_value_parser", "email.headerregistry"), 4096),
    Target("config", "configuration files (keyrelay/config/loader.py: load_config): a Config "
           "or a ConfigError naming the file",
           ("keyrelay.config", "keyrelay.yamlread", "keyrelay.durations", "yaml.constructor",
            "yaml.resolver"), 4096),
    Target("directory", "directory files (keyrelay/directory/yamlfile.py: YamlDirectory.load): "
           "the directory or a ConfigError naming the file",
           ("keyrelay.directory", "keyrelay.yamlread", "keyrelay.names", "keyrelay.keys",
            "yaml.constructor", "yaml.resolver"), 8192),
    Target("declaration", "keyrelay sync declarations (keyrelay/declare.py: load): a "
           "declaration or a ConfigError naming the file",
           ("keyrelay.declare", "keyrelay.yamlread", "keyrelay.names", "yaml.constructor",
            "yaml.resolver"), 4096),
    Target("cli", "command lines (NUL-separated arguments) of keyrelay, run in a sandbox "
           "directory, and of keyrelay-policyd and keyrelay-milter (argparse only): exit 0, 1 "
           "or 2", ("keyrelay", "policyd.main", "milters.main", "argparse"), 512),
    # Self-tests of the runner (tests/test_fuzz_atheris.py): each must be reported as a finding.
    Target("selftest-crash", "raises RuntimeError on every input", (), 64, selftest=True),
    Target("selftest-hang", "sleeps far past -timeout", (), 64, selftest=True),
    Target("selftest-oom", "allocates far past -rss_limit_mb", (), 64, selftest=True),
)}
PARSERS = [t.name for t in TARGETS.values() if not t.selftest]
