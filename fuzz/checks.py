"""What every parser of peer or untrusted input must do with whatever arrives.

Each check runs one parser the way its daemon or command does and returns what it gave, or
``None``/``refused`` when the parser refused the input with its own error type, which the
daemons turn into a clean answer or a closed connection and the CLI into one error line:

- ``BadRequest`` for the wire protocols (dovecot auth, policy delegation, socketmap);
- ``HeaderError`` for a From:/Sender: value (the milter refuses the message with 550);
- ``ConfigError`` naming the file for the configuration, the directory file and a
  ``keyrelay sync`` declaration;
- exit status 0, 1 or 2 (argparse's usage error) for the CLI.

Any other exception escapes, and a wrong result raises ``Finding``: both are findings of the
hypothesis properties (tests/test_fuzz_parsers.py) and of the atheris targets (fuzz/targets.py).
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import os
import tempfile
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, ParamSpec, TypeVar

from keyrelay import cli
from keyrelay.errors import ConfigError
from keyrelay.headers import HeaderError, mailboxes
from policyd.attributes import RequestReader
from policyd.dovecot import Attempt, LineReader, Reply, ServerSession
from policyd.errors import BadRequest
from policyd.netstring import Lookup, NetstringReader

T = TypeVar("T")
P = ParamSpec("P")


class Finding(AssertionError):
    """A parser answered, but wrongly (or used more memory than its bound)."""


def expect(condition: bool, what: str) -> None:
    """Raise ``Finding`` unless ``condition`` (not ``assert``: ``python -O`` keeps it)."""
    if not condition:
        raise Finding(what)


# -- memory ----------------------------------------------------------------------------------
@contextlib.contextmanager
def peak_allocation_below(limit: int) -> Iterator[None]:
    """Raise ``Finding`` when the Python allocations made inside the block peak more than
    ``limit`` bytes above what was allocated when it began (tracemalloc, started here when it
    is not already running). Memory that C libraries allocate with their own ``malloc``
    (libyaml's scanner, OpenSSL) is not seen; libFuzzer's ``-rss_limit_mb`` bounds it."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        if started:
            tracemalloc.stop()
    expect(peak - before <= limit,
           f"peak allocation {peak - before} bytes above the bound of {limit} bytes")


def memory_bounded(limit: int) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """Decorator: each call of the function runs under ``peak_allocation_below(limit)``."""
    def decorate(func: Callable[P, T]) -> Callable[P, T]:
        @functools.wraps(func)
        def bounded(*args: P.args, **kwargs: P.kwargs) -> T:
            with peak_allocation_below(limit):
                return func(*args, **kwargs)
        return bounded
    return decorate


# -- byte streams ----------------------------------------------------------------------------
def pieces(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """``data`` cut at the given offsets (any order, duplicates allowed)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


# Piece sizes for a byte stream that carries no cut offsets of its own (the atheris targets):
# single bytes, a CRLF's worth, sizes around the short and the long requests.
_PIECE_SIZES = (1, 7, 2, 64, 3, 300, 5, 1024)


def trickled(data: bytes) -> list[bytes]:
    """``data`` in pieces of the sizes above, in turn: how a slow or hostile peer sends it."""
    cuts, offset = [], 0
    for size in itertools.cycle(_PIECE_SIZES):
        offset += size
        if offset >= len(data):
            break
        cuts.append(offset)
    return pieces(data, cuts)


@dataclass
class Stream(Generic[T]):
    """What a reader gave for one connection's bytes, in order, and whether it refused the
    rest (its own error: the daemon logs it and closes the connection)."""

    items: list[T] = field(default_factory=list)
    refused: bool = False
    pending: bool = False


def netstring_stream(chunks: Iterable[bytes], max_request: int) -> Stream[Lookup]:
    """Socketmap requests (policyd/netstring.py), as policyd's socketmap server reads them."""
    stream: Stream[Lookup] = Stream()
    reader = NetstringReader(max_request)
    try:
        for chunk in chunks:
            for lookup in reader.feed(chunk):
                expect(isinstance(lookup, Lookup) and bool(lookup.map_name)
                       and " " not in lookup.map_name and "\0" not in lookup.key,
                       f"not a lookup of a map: {lookup!r}")
                stream.items.append(lookup)
    except BadRequest:
        stream.refused = True
    stream.pending = reader.pending
    return stream


def policy_stream(chunks: Iterable[bytes], max_request: int) -> Stream[dict[str, str]]:
    """Policy delegation requests (policyd/attributes.py), as policyd's policy server reads
    them."""
    stream: Stream[dict[str, str]] = Stream()
    reader = RequestReader(max_request)
    try:
        for chunk in chunks:
            for request in reader.feed(chunk):
                expect(bool(request) and all(isinstance(v, str) and "\n" not in k + v and k
                                             for k, v in request.items()),
                       f"not a request of name=value attributes: {request!r}")
                stream.items.append(request)
    except BadRequest:
        stream.refused = True
    stream.pending = reader.pending
    return stream


def auth_stream(chunks: Iterable[bytes], max_line: int) -> Stream[Attempt | Reply | None]:
    """One dovecot auth connection (policyd/dovecot.py): lines, then the session's events."""
    stream: Stream[Attempt | Reply | None] = Stream()
    session, reader = ServerSession(), LineReader(max_line)
    try:
        for chunk in chunks:
            for line in reader.feed(chunk):
                event = session.receive(line)
                if isinstance(event, Reply):
                    # one line back: an LF in it would let the client write our answers
                    expect(event.data.endswith(b"\n") and event.data.count(b"\n") == 1,
                           f"a reply that is not one line: {event.data!r}")
                else:
                    expect(event is None or isinstance(event, Attempt),
                           f"not an event: {event!r}")
                stream.items.append(event)
    except BadRequest:
        stream.refused = True
    stream.pending = reader.pending
    return stream


def same_however_cut(read: Callable[[Iterable[bytes], int], Stream[T]], data: bytes,
                     chunks: Iterable[bytes], max_request: int) -> Stream[T]:
    """What ``read`` gives for ``data`` sent as ``chunks``, which must be what it gives for
    ``data`` sent in one piece: a stream refused one way is refused the other way too.

    What came before a refusal may differ for the netstring and policy readers: their
    ``feed`` returns a piece's requests as one list, which a refusal later in the same piece
    discards (the connection closes anyway). The auth reader yields each line at once, so
    there it must not differ.
    """
    whole = read([data], max_request)
    cut = read(chunks, max_request)
    expect(whole.refused == cut.refused,
           f"refused {'whole' if whole.refused else 'in pieces'} only")
    if not whole.refused or read is auth_stream:
        expect(whole.items == cut.items, "whole and in pieces, the requests differ")
    if not whole.refused:
        expect(whole.pending == cut.pending, "whole and in pieces, what is pending differs")
    return cut


# -- header values ---------------------------------------------------------------------------
def header_addresses(value: str) -> tuple[str, ...] | None:
    """The addresses of a From:/Sender: value (keyrelay/headers.py), or ``None`` when the
    value is refused (HeaderError). An empty tuple is an empty group (``x:;``), which
    decide_headers refuses."""
    try:
        found = mailboxes(value)
    except HeaderError:
        return None
    expect(all(isinstance(a, str) and "@" in a for a in found),
           f"not addresses: {found!r}")
    return found


def header_value(raw: bytes) -> str:
    """A header value as the milter hands it on (milters/service.py: ``_values``)."""
    return raw.decode("utf-8", "surrogateescape")


# -- files -----------------------------------------------------------------------------------
def loaded_or_config_error(load: Callable[[], T], path: str | Path) -> T | None:
    """``load()``, or ``None`` when it raised ConfigError naming ``path`` first."""
    try:
        return load()
    except ConfigError as exc:
        where = f"{path}:{exc.line}: " if exc.line is not None else f"{path}: "  # FILE:LINE:
        expect(str(exc).startswith(where), f"a ConfigError not naming {path}: {exc}")
        return None


def scratch_folder(prefix: str) -> Path:
    """A new temporary folder for the files a target writes per input. fuzz/run.py points
    TMPDIR at a folder in memory (/dev/shm) that it removes after the target: libFuzzer ends
    the process without Python's clean-up."""
    return Path(tempfile.mkdtemp(prefix=prefix))


# -- command lines ---------------------------------------------------------------------------
def argv_of(raw: bytes) -> list[str]:
    """Arguments from NUL-separated bytes, decoded as Python decodes ``sys.argv``."""
    return [os.fsdecode(arg) for arg in raw.split(b"\0")] if raw else []


def parsed(parse: Callable[[list[str]], T], argv: list[str]) -> T | int:
    """What ``parse(argv)`` returns, or argparse's exit status when it exits (0 after --help
    or --version, 2 for a usage error); whatever it prints is dropped."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            return parse(argv)
        except SystemExit as exc:
            expect(exc.code in (0, 2), f"argparse exited {exc.code!r}")
            return int(exc.code or 0)


# Commands the CLI sandbox does not run: they read or write files the arguments name
# (export -o, import, sync, postfix), ask DNS (domain verify, check) or generate RSA keys
# (domain add, rotate: 0.1 s each, which would slow the fuzzer down to a crawl).
UNSAFE_COMMANDS = frozenset({
    ("export", None), ("import", None), ("sync", None), ("postfix", "show"),
    ("postfix", "apply"), ("domain", "verify"), ("domain", "check"), ("domain", "add"),
    ("domain", "rotate"),
})
# The directory every CLI run starts from: one of each kind of record.
SANDBOX_SETUP = (
    ("pool", "add", "shared", "--bind", "192.0.2.10", "--helo", "mail.example.net"),
    ("account", "add", "acme"),
    ("account", "add", "beta"),
    ("subuser", "add", "acme/marketing"),
    ("key", "create", "acme", "--name", "crm-prod"),
    ("ip", "allow", "acme", "192.0.2.0/24"),
    ("sender", "add", "acme", "alerts@example.net"),
    ("limits", "set", "acme/marketing", "--per-hour", "5000"),
    ("pool", "assign", "acme", "shared"),
    ("domain", "add", "acme", "example.com"),
    ("domain", "grant", "example.com", "acme/marketing"),
)


class CliSandbox:
    """``keyrelay`` (keyrelay/cli/: ``main``) run in-process against a configuration,
    directory, DKIM key folder and audit log in a scratch folder, reset before each run."""

    def __init__(self) -> None:
        self.folder = scratch_folder("keyrelay-fuzz-cli-")
        self.config = self.folder / "keyrelay.yaml"
        self.directory = self.folder / "directory.yaml"
        self.audit = self.folder / "audit.log"
        self.config.write_text(
            f"directory:\n  path: {self.directory}\n"
            f"dkim:\n  key_dir: {self.folder / 'dkim'}\n"
            f"logging:\n  audit_log: {self.audit}\n",
            encoding="utf-8")
        for argv in SANDBOX_SETUP:
            if self._main(list(argv)) != cli.EXIT_OK:
                raise RuntimeError(f"the CLI sandbox's setup failed: keyrelay {' '.join(argv)}")
        self.parser = cli.build_parser()
        self.snapshot = {path: path.read_bytes() for path in self.folder.rglob("*")
                         if path.is_file() and path != self.config}

    def _main(self, argv: list[str]) -> int:
        status = parsed(cli.main, ["--config", str(self.config), *argv])
        expect(status in (cli.EXIT_OK, cli.EXIT_FAILED, cli.EXIT_USAGE),
               f"keyrelay exited {status}")
        return status

    def run(self, argv: list[str]) -> int | None:
        """The exit status of ``keyrelay ARGV``; ``None`` when the arguments parse but name a
        command the sandbox does not run, or a configuration file of their own."""
        args = parsed(self.parser.parse_args, argv)
        if isinstance(args, int):
            return args
        command = (args.command, getattr(args, "action", None))
        if args.config is not None or command in UNSAFE_COMMANDS or (
                command[0], None) in UNSAFE_COMMANDS:
            return None
        for path, data in self.snapshot.items():  # the directory, audit log and DKIM keys
            path.write_bytes(data)
        return self._main(argv)
