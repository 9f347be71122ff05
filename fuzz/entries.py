"""The atheris targets' code: bytes from libFuzzer in, the parser's check (fuzz/checks.py) run.

``build(name)`` returns the function libFuzzer calls with each input; what it may raise is a
finding. The file-reading targets write each input to one file in a scratch folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import TypeVar

import milters.main
import policyd.main
from fuzz import checks
from fuzz.targets import MAX_REQUEST
from keyrelay import declare
from keyrelay.config import load_config
from keyrelay.directory import YamlDirectory

Entry = Callable[[bytes], None]
T = TypeVar("T")


def _stream(read: Callable[[Iterable[bytes], int], checks.Stream[T]]) -> Entry:
    def entry(data: bytes) -> None:
        checks.same_however_cut(read, data, checks.trickled(data), MAX_REQUEST)
    return entry


def _header(data: bytes) -> None:
    checks.header_addresses(checks.header_value(data))


def _file(load: Callable[[str], object]) -> Entry:
    path = checks.scratch_folder("keyrelay-fuzz-") / "input.yaml"

    def entry(data: bytes) -> None:
        path.write_bytes(data)
        checks.loaded_or_config_error(partial(load, str(path)), path)
    return entry


def _cli() -> Entry:
    sandbox = checks.CliSandbox()

    def entry(data: bytes) -> None:
        argv = checks.argv_of(data)
        sandbox.run(argv)
        checks.parsed(policyd.main.parse_args, argv)
        checks.parsed(milters.main.parse_args, argv)
    return entry


def _crash(data: bytes) -> None:
    raise RuntimeError("selftest-crash: a finding on purpose")


def _hang(data: bytes) -> None:
    time.sleep(3600)


def _oom(data: bytes) -> None:
    hoard = []
    # 8 MB every 50 ms, each page written, until libFuzzer (which looks once a second) stops
    # it: the process ends at most about 160 MB past the limit
    while True:
        hoard.append(b"x" * (8 << 20))
        time.sleep(0.05)


def build(name: str) -> Entry:
    builders: dict[str, Callable[[], Entry]] = {
        "auth": lambda: _stream(checks.auth_stream),
        "policy": lambda: _stream(checks.policy_stream),
        "netstring": lambda: _stream(checks.netstring_stream),
        "header": lambda: _header,
        "config": lambda: _file(load_config),
        "directory": lambda: _file(lambda path: YamlDirectory(path).load()),
        "declaration": lambda: _file(declare.load),
        "cli": _cli,
        "selftest-crash": lambda: _crash,
        "selftest-hang": lambda: _hang,
        "selftest-oom": lambda: _oom,
    }
    return builders[name]()
