"""Property tests (hypothesis) of every parser that reads peer or untrusted input: whatever
arrives, each answers or refuses with its own error type (which the daemons turn into a
clean answer or a closed connection), never another exception; valid input survives
being cut into arbitrary pieces.

- dovecot auth lines (policyd/dovecot.py: LineReader, ServerSession)
- policy attribute blocks (policyd/attributes.py: RequestReader)
- socketmap netstrings (policyd/netstring.py: NetstringReader)
- header From/Sender values (keyrelay/headers.py: mailboxes)
- the configuration (keyrelay/config/loader.py: parse_config) and the YAML directory file
- the declared directory of ``keyrelay sync`` (keyrelay/declare.py: load)

What each parser must do is written once, in fuzz/checks.py, which the atheris targets
(fuzz/run.py) share. Every property also bounds the memory one input may take: its Python
allocations may peak at most ``*_BOUND`` bytes above where they began (tracemalloc;
fuzz.checks.memory_bounded; the bounds are explained where they are set).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_yaml_directory import write_rich

from fuzz import checks
from fuzz.checks import memory_bounded, pieces
from keyrelay import declare
from keyrelay.config import parse_config
from keyrelay.directory import YamlDirectory
from policyd.netstring import Lookup

MAX = 4096
# make test: 400 inputs per property; KEYRELAY_FUZZ_PROFILE=long for 20,000 (docs/RELIABILITY.md)
# no per-example deadline: time says nothing about correctness on a loaded machine; a parser
# that hangs or backtracks without end is caught by the test's timeout (setup.cfg)
settings.register_profile("default", max_examples=400, deadline=None)
settings.register_profile("long", max_examples=20_000, deadline=None)
settings.load_profile(os.environ.get("KEYRELAY_FUZZ_PROFILE", "default"))
EXAMPLES = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
# Peak Python allocation per input, above where it began; the measured peaks over 3,000 inputs
# per property are at most a fifth of each bound (wire 13 kB, header 72 kB, documents 49 kB).
# A wire reader holds at most one unfinished request of at
# most MAX bytes and the requests it returned: 16 times MAX. A header value (the milter's
# limit: 2048 characters) goes through Python's email parser: 256 bytes per character. A
# configuration, directory or declaration document (the rich directory: 7 kB) through
# PyYAML or json and the schema: 1 MB. A parser that copied its input per byte, per
# nesting level or per alias would cross these at once.
WIRE_BOUND = 16 * MAX
HEADER_BOUND = 256 * 2048
FILE_BOUND = 1 << 20


# -- socketmap -------------------------------------------------------------------------------
names = st.text(st.characters(exclude_characters=" \0", codec="utf-8"),
                min_size=1, max_size=20)
keys = st.text(st.characters(exclude_characters="\0", codec="utf-8"),
               max_size=60)


@EXAMPLES
@given(st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=8))
@memory_bounded(WIRE_BOUND)
def test_a_netstring_reader_answers_or_refuses_whatever_arrives(
        data: bytes, cuts: list[int]) -> None:
    checks.same_however_cut(checks.netstring_stream, data, pieces(data, cuts), MAX)


@EXAMPLES
@given(st.lists(st.tuples(names, keys), min_size=1, max_size=5),
       st.lists(st.integers(0, 2000), max_size=10))
@memory_bounded(WIRE_BOUND)
def test_valid_netstrings_come_out_whole_however_they_are_cut(
        requests: list[tuple[str, str]], cuts: list[int]) -> None:
    wire = b"".join(b"%d:%s," % (len(p), p) for p in
                    (f"{name} {key}".encode() for name, key in requests))
    got = checks.netstring_stream(pieces(wire, cuts), MAX)
    assert got == checks.Stream([Lookup(name, key) for name, key in requests])


# -- policy delegation -----------------------------------------------------------------------
attr_names = st.text(st.characters(exclude_characters="=\n\0", codec="utf-8"),
                     min_size=1, max_size=20)
attr_values = st.text(st.characters(exclude_characters="\n\0", codec="utf-8"),
                      max_size=60)


@EXAMPLES
@given(st.binary(max_size=400), st.lists(st.integers(0, 500), max_size=8))
@memory_bounded(WIRE_BOUND)
def test_a_policy_reader_answers_or_refuses_whatever_arrives(
        data: bytes, cuts: list[int]) -> None:
    checks.same_however_cut(checks.policy_stream, data, pieces(data, cuts), MAX)


@EXAMPLES
@given(st.lists(st.dictionaries(attr_names, attr_values, min_size=1, max_size=8),
                min_size=1, max_size=4),
       st.lists(st.integers(0, 3000), max_size=10))
@memory_bounded(WIRE_BOUND)
def test_valid_policy_requests_come_out_whole_however_they_are_cut(
        requests: list[dict[str, str]], cuts: list[int]) -> None:
    wire = b"".join("".join(f"{k}={v}\n" for k, v in r.items()).encode() + b"\n"
                    for r in requests)
    assert checks.policy_stream(pieces(wire, cuts), MAX) == checks.Stream(requests)


# -- dovecot auth ----------------------------------------------------------------------------
auth_words = st.sampled_from(["VERSION\t1\t2", "CPID\t4242", "AUTH", "CONT", "PLAIN", "LOGIN",
                              "service=smtp", "secured", "rip=192.0.2.1", "resp=", "1", "2",
                              "nologin", "\t", "VERSION\t2\t0", ""])


@EXAMPLES
@given(st.lists(st.one_of(st.lists(auth_words, max_size=6).map("\t".join),
                          st.text(max_size=80)), max_size=8),
       st.binary(max_size=200), st.lists(st.integers(0, 1200), max_size=8))
@memory_bounded(WIRE_BOUND)
def test_an_auth_session_answers_or_refuses_whatever_lines_arrive(
        lines: list[str], raw: bytes, cuts: list[int]) -> None:
    wire = "\n".join(lines).encode("utf-8", "surrogatepass") + b"\n" + raw
    checks.same_however_cut(checks.auth_stream, wire, pieces(wire, cuts), MAX)


# -- headers ---------------------------------------------------------------------------------
@EXAMPLES
@given(st.one_of(st.text(max_size=300),
                 st.lists(st.sampled_from(['"', "<", ">", "@", ",", ";", ":", "(", ")",
                                           "\\", " ", "\t", "\r\n ", "a", "b.example",
                                           "=?utf-8?q?x?=", "[", "]", "."]),
                          max_size=60).map("".join)))
@memory_bounded(HEADER_BOUND)
def test_a_header_value_gives_addresses_or_a_header_error(value: str) -> None:
    # () is an empty group ("x:;"); decide_headers refuses such a From (test_decisions.py)
    checks.header_addresses(value)


# -- configuration and directory files -------------------------------------------------------
json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=3),
    max_leaves=12)
config_keys = st.sampled_from(["directory", "dkim", "auth", "keys", "limits", "routing",
                               "logging", "policyd", "milter", "postfix", "monitor_mode",
                               "domains", "dns", "brute_force", "path", "backend", "listen"])


@EXAMPLES
@given(st.dictionaries(config_keys, json_values, max_size=4) | json_values)
@memory_bounded(FILE_BOUND)
def test_a_configuration_is_loaded_or_refused_with_a_config_error(data: object) -> None:
    checks.loaded_or_config_error(lambda: parse_config(data, "fuzz.yaml"), "fuzz.yaml")


def _mutations(document: Any) -> st.SearchStrategy[Any]:
    """The document with one value somewhere replaced by an arbitrary JSON value."""
    paths: list[tuple[Any, ...]] = []

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, (*path, i))

    walk(document, ())

    def replaced(path: tuple[Any, ...], value: Any) -> Any:
        copy = json.loads(json.dumps(document))
        if not path:
            return value
        node = copy
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
        return copy

    return st.builds(replaced, st.sampled_from(paths), json_values)


def _rich_document(folder: Path) -> Any:
    path = folder / "rich.yaml"
    write_rich(path)
    text = path.read_text()
    return json.loads(text[text.index("{"):])


def test_a_directory_file_is_loaded_or_refused_with_a_config_error(tmp_path: Path) -> None:
    document = _rich_document(tmp_path)
    target = tmp_path / "directory.yaml"

    @EXAMPLES
    @given(_mutations(document))
    @memory_bounded(FILE_BOUND)
    def check(mutated: Any) -> None:
        target.write_text(json.dumps(mutated))
        checks.loaded_or_config_error(YamlDirectory(str(target)).load, target)

    check()


@EXAMPLES
@given(st.text(max_size=300))
@memory_bounded(FILE_BOUND)
def test_any_text_as_a_directory_file_is_loaded_or_refused(text: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "directory.yaml"
        target.write_text(text, encoding="utf-8", errors="surrogatepass")
        checks.loaded_or_config_error(YamlDirectory(str(target)).load, target)


declared_keys = st.sampled_from(["pools", "accounts", "domains", "subusers", "ip_allow",
                                 "senders", "state", "owner", "grants", "bind", "helo",
                                 "limits", "status", "pool", "monitor", "keys", "acme",
                                 "acme.example", "app"])
declared_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.sampled_from(
        ["absent", "present", "active", "suspended", "acme", "acme/app", "192.0.2.0/24",
         "192.0.2.1", "a@acme.example", "x.example", "Bad Name", ""]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(declared_keys, inner,
                                                                 max_size=4),
    max_leaves=15)


@EXAMPLES
@given(st.dictionaries(declared_keys, declared_values, max_size=3) | declared_values)
@memory_bounded(FILE_BOUND)
def test_a_declaration_is_read_or_refused_with_a_config_error(data: object) -> None:
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "declared.yaml"
        target.write_text(yaml.safe_dump(data))
        checks.loaded_or_config_error(lambda: declare.load(target), target)
