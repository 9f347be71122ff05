"""Property tests (hypothesis) of every command line keyrelay ships: whatever argument vector
arrives, the program succeeds, or exits non-zero with one clear error line on stderr; never
a traceback, never a hang, within bounded memory, and nothing written outside the test's
state folder (issue 10, item 2; docs/RELIABILITY.md).

Entry points: setup.cfg's console scripts and the other argparse mains (the bench scripts
are out of scope):

- ``keyrelay`` (keyrelay.cli:main) with all its subcommands. Argument vectors are built from
  the real parser: every command path, its options and positionals, filled with values by
  metavar (names, principals and key ids that exist in the state, domains, CIDRs, durations,
  numbers, files) mixed with arbitrary text, undecodable bytes (as Python hands them over in
  ``sys.argv``), huge and negative numbers, empty strings, ``-`` and paths that do not exist;
  some are mutated (a word dropped or added), some are arbitrary lists of strings. ``sync -``
  reads arbitrary bytes on stdin.
- ``keyrelay-policyd`` (policyd.main:main) and ``keyrelay-milter`` (milters.main:main).
- ``python -m keyrelay.demo`` (keyrelay.demo:main, what ``make run`` starts).

How:

- In-process, for speed: ``main(argv)`` with stdin, stdout and stderr replaced by UTF-8
  streams as Python sets them up under a UTF-8 locale other than C.UTF-8 (stdin and stdout
  ``strict``, stderr ``backslashreplace``): the strictest case a real terminal gives.
  A few runs of the installed console scripts (``.venv/bin/keyrelay`` ...) with undecodable
  bytes in argv and ``PYTHONIOENCODING=utf-8:strict`` show that no traceback reaches a real
  terminal either.
- State: every example starts from the same installation in a temporary folder (accounts,
  subusers, keys, a revoked one, a pool, two domains with DKIM keys, one rotated, senders,
  IP rules, limits, monitor mode) made by the real CLI, beside broken configurations and odd
  files; the configuration is named by ``$KEYRELAY_CONFIG`` and, in some examples, by
  ``--config``; the working directory is inside the state folder. Domain checks ask a stub
  DNS server on loopback that answers NXDOMAIN at once.
- Sandbox: an audit hook (``sys.addaudithook``; it stays installed for the rest of the pytest
  process but does nothing outside these tests' calls) refuses, inside the program, every
  write, rename, removal or mode change outside the state folder, every read under
  /etc/keyrelay and /var/log/keyrelay, every child process and every network connection but
  to loopback. A refused action fails the example, unless the argument vector itself named
  that path (``export -o /somewhere``: the admin asked for it) or selected a configuration
  that is not one of the test's (an empty file means the defaults in /etc/keyrelay): then the
  example is rejected (``hypothesis.reject``), not counted. The console scripts cannot be
  sandboxed: they only get argument vectors that pass the same rules (``safe_to_run``).
- Daemons: an argument vector that would start serving reaches ``serve`` (policyd: ``run``),
  which is patched to record the start and return; everything before it (parsing,
  configuration, the directory and user checks, ``--check-config``) runs for real. So valid
  argument vectors are fuzzed too, without binding sockets. (The configurations leave
  ``user`` empty: a daemon with a user to become would empty the capability bounding set of
  the test process.) The demo's ``Settings.from_env`` is patched in the same way: everything
  after it starts Postfix. The console-script runs of the daemons always include
  ``--check-config`` or are usage errors.
- No hang: hypothesis' deadline (2 s per example) and pytest-timeout. Bounded memory: the
  process's peak resident size grows by less than ``MEMORY_LIMIT`` during one call (coarse:
  tracemalloc would be exact but makes every call four times slower); a console script runs
  with 1 GiB of address space (``RLIMIT_AS``), where a runaway allocation is a MemoryError.

Properties:

- ``keyrelay``: exit 0, 1 or 2. 1 is exactly one ``keyrelay: error: ...`` line, the last on
  stderr, without control characters and not vague (no bare "cannot access:", no Python
  object or ``None`` shown); 2 is argparse's usage and one ``keyrelay ...: error:`` line,
  nothing on stdout. A refusal (2 always; 1 except ``domain verify`` and ``domain check``,
  which record the DNS result before saying the domain failed) changes no file of the state
  but for the directory's lock file and empty folders; after a success the directory file
  still loads.
- ``keyrelay-policyd``, ``keyrelay-milter``: the same for 1 and 2 with their names; a daemon
  starts serving only without ``--check-config`` and never after an error; ``--check-config``
  that succeeds says the configuration is valid; nothing in the state changes.
- the demo: usage errors as above; anything else gets as far as the patched start.
- the console scripts: no "Traceback" on stderr, exit 0, 1 or 2, a non-zero exit ends with
  the program's error line; the daemons change nothing.

Not covered: ``postfix apply``/``postfix show --config-dir`` with a real Postfix
configuration (they run postconf, ``postfix check`` and ``postfix reload``; the sandbox
refuses child processes, so only folders without main.cf are given: tests/test_postfixconf.py
covers the rest); the LDAP backend (tests/test_directory_ldap.py). No option of any program
takes a secret (API keys are created, never passed in; the LDAP bind password is read from a
file the configuration names), so there is no "a secret is never echoed" property here.

``KEYRELAY_FUZZ_PROFILE``: ``default`` (make test) 400 argument vectors per in-process
property and 8 per console-script property; ``long`` 20,000 and 300 (and up to 4 hours per
test instead of pytest-timeout's 300 s). The settings are
local to this module: hypothesis profiles are global, and tests/test_fuzz_parsers.py
registers its own under the same names.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import traceback
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

import keyrelay.demo
import milters.main
import policyd.main
from keyrelay import cli
from keyrelay.directory import YamlDirectory

# profile -> (argument vectors per in-process property, per console script, seconds per test)
PROFILES = {"default": (400, 8, 300), "long": (20_000, 300, 4 * 3600)}
_profile = os.environ.get("KEYRELAY_FUZZ_PROFILE", "default")
if _profile not in PROFILES:
    raise ValueError(f"KEYRELAY_FUZZ_PROFILE={_profile!r}: use one of {', '.join(PROFILES)}")
IN_PROCESS_EXAMPLES, SCRIPT_EXAMPLES, TIMEOUT = PROFILES[_profile]
pytestmark = pytest.mark.timeout(TIMEOUT)  # a long run takes longer than setup.cfg's 300 s
# no per-example deadline: how long one call takes (an RSA key generated, a console script's
# interpreter started: 0.3 s here, seconds on a loaded machine) says nothing about its
# correctness; a call that hangs is caught by the test's timeout (pytestmark below)
FUZZ = settings(max_examples=IN_PROCESS_EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
SCRIPTS = settings(max_examples=SCRIPT_EXAMPLES, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow])
MEMORY_LIMIT = 64 << 20  # bytes the process's peak size may grow by in one call
SCRIPT_MEMORY = 1 << 30  # address space of one console script run (RLIMIT_AS)
BIN = Path(sys.executable).parent
REAL_SYSTEM = ("/etc/keyrelay", "/var/log/keyrelay")


# -- the sandbox -----------------------------------------------------------------------------
class Blocked(BaseException):
    """An action the sandbox refused inside the program under test. A BaseException, so that
    the program's own ``except Exception``/``except OSError`` cannot take it for its own."""

    def __init__(self, kind: str, what: str) -> None:
        super().__init__(f"{kind}: {what}")
        self.kind = kind  # "write", "real system", "process", "network"
        self.what = what


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_PATH_EVENTS = {  # event -> positions of the paths it changes
    "os.mkdir": (0,), "os.remove": (0,), "os.rmdir": (0,), "os.chmod": (0,), "os.chown": (0,),
    "os.rename": (0, 1), "os.link": (0, 1), "os.symlink": (1,), "os.truncate": (0,),
    "os.utime": (0,), "os.mkfifo": (0,), "os.mknod": (0,), "os.setxattr": (0,),
    "os.removexattr": (0,), "os.chflags": (0,), "os.lchown": (0,), "shutil.rmtree": (0,),
}
_PROCESS_EVENTS = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                   "os.fork", "os.forkpty"}
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


class Sandbox:
    """The audit hook; active while ``root`` (the state folder) is set."""

    def __init__(self) -> None:
        self.root: str | None = None

    @contextlib.contextmanager
    def active(self, root: Path) -> Iterator[None]:
        self.root = str(root)
        try:
            yield
        finally:
            self.root = None

    def inside(self, path: str) -> bool:
        assert self.root is not None
        return path == self.root or path.startswith(self.root + os.sep)

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if self.root is None:
            return
        if event == "open":
            self.check_open(args[0], args[1], args[2])
        elif event in _PATH_EVENTS:
            for position in _PATH_EVENTS[event]:
                self.check_write(args[position])
        elif event in _PROCESS_EVENTS:
            self.root = None  # the test reports it; nothing else is checked meanwhile
            raise Blocked("process", f"{event} {args[:2]!r}")
        elif event in ("socket.connect", "socket.sendto"):
            self.check_peer(args[1])
        elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"):
            self.check_peer((args[0],))

    @staticmethod
    def path(value: Any) -> str | None:
        if isinstance(value, int) or value is None:
            return None  # a file descriptor: its path was checked when it was opened
        text = os.fsdecode(os.fspath(value))
        return os.path.abspath(text)

    def check_open(self, target: Any, mode: Any, flags: Any) -> None:
        path = self.path(target)
        if path is None:
            return
        self.check_real_system(path)
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS)
        if writes:
            self.check_write(target)

    def check_write(self, target: Any) -> None:
        path = self.path(target)
        if path is None or self.inside(path) or f"{os.sep}__pycache__{os.sep}" in path:
            return  # __pycache__: Python itself, caching a module imported for the first time
        self.check_real_system(path)
        self.root = None
        raise Blocked("write", path)

    def check_real_system(self, path: str) -> None:
        if any(path == p or path.startswith(p + os.sep) for p in REAL_SYSTEM):
            self.root = None
            raise Blocked("real system", path)

    def check_peer(self, address: Any) -> None:
        if isinstance(address, tuple) and address and address[0] in _LOOPBACK:
            return
        if isinstance(address, str | bytes) and self.inside(self.path(address) or ""):
            return  # a unix socket in the state folder
        self.root = None
        raise Blocked("network", repr(address))


SANDBOX = Sandbox()
sys.addaudithook(SANDBOX.hook)


# -- running an entry point in-process -------------------------------------------------------
@dataclass
class RunOutcome:
    argv: Sequence[str]
    code: int
    out: str
    err: str
    crash: str  # the traceback of an exception that escaped main(), or ""
    blocked: Blocked | None
    growth: int  # bytes the process's peak resident size grew by during the call

    def __str__(self) -> str:
        return (f"argv {list(self.argv)!r}\nexit {self.code}\n--- stdout\n{self.out[-3000:]}"
                f"--- stderr\n{self.err[-3000:]}{self.crash}")


def exit_status(code: object) -> int:
    if code is None:
        return 0
    return code if isinstance(code, int) else 1  # sys.exit("text") prints it, exits 1


@contextlib.contextmanager
def keyrelay_logging_kept() -> Iterator[None]:
    """The daemons point the "keyrelay" logger at the stderr of the moment; put it back."""
    logger = logging.getLogger("keyrelay")
    saved = logger.handlers[:], logger.level, logger.propagate
    try:
        yield
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


def run_main(main: Callable[[list[str]], object], argv: Sequence[str], root: Path,
             stdin: bytes = b"") -> RunOutcome:
    out_bytes, err_bytes = io.BytesIO(), io.BytesIO()
    streams = (
        io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8", errors="strict"),
        io.TextIOWrapper(out_bytes, encoding="utf-8", errors="strict", write_through=True),
        io.TextIOWrapper(err_bytes, encoding="utf-8", errors="backslashreplace",
                         write_through=True),
    )
    saved = sys.stdin, sys.stdout, sys.stderr
    code, crash, blocked = 0, "", None
    peak = peak_size()
    sys.stdin, sys.stdout, sys.stderr = streams
    try:
        with keyrelay_logging_kept(), SANDBOX.active(root):
            code = exit_status(main(list(argv)))
    except SystemExit as exc:
        code = exit_status(exc.code)
    except Blocked as exc:
        blocked = exc
    except BaseException:  # noqa: BLE001 - what the property is about: nothing escapes main()
        crash = traceback.format_exc()
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
    # main() lets stdout write arguments that are not UTF-8 back as their bytes
    return RunOutcome(argv, code, out_bytes.getvalue().decode("utf-8", "backslashreplace"),
                   err_bytes.getvalue().decode("utf-8"), crash, blocked, peak_size() - peak)


def peak_size() -> int:
    """The process's peak resident size so far, in bytes. (tracemalloc would measure one
    call exactly, but makes every call four times slower.)"""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- the state: one installation, restored before every example ------------------------------
def configuration(root: Path, dns_port: int) -> dict[str, Any]:
    """The test's keyrelay.yaml: every path in the state folder, DNS asks the stub."""
    return {
        "directory": {"path": f"{root}/directory.yaml"},
        "dkim": {"key_dir": f"{root}/dkim"},
        "logging": {"audit_log": f"{root}/audit.log"},
        "suppressions": {"path": f"{root}/suppressions.db"},
        "dns": {"nameservers": ["127.0.0.1"], "port": dns_port, "timeout": 1},
        "policyd": {"auth_listen": f"unix:{root}/run/auth",
                    "policy_listen": f"unix:{root}/run/policy",
                    "socketmap_listen": f"unix:{root}/run/socketmap", "socket_group": "",
                    "control_listen": f"unix:{root}/run/control", "user": "root"},
        "milter": {"listen": f"unix:{root}/run/milter", "socket_group": "", "user": "root"},
    }


# configurations beside keyrelay.yaml that keep every path in the state folder: what they
# change in keyrelay.yaml, section by section
FULL_CONFIGS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "configs/max-expiry.yaml": lambda root: {"keys": {"default_expiry": "7d",
                                                      "max_expiry": "30d"}},
    "configs/json-logs.yaml": lambda root: {"logging": {"format": "json", "level": "debug"},
                                            "monitor_mode": True},
    # a directory file in a folder that does not exist, and one that is a folder
    "configs/missing-directory.yaml": lambda root: {
        "directory": {"path": f"{root}/missing/directory.yaml"}},
    "configs/directory-is-a-folder.yaml": lambda root: {"directory": {"path": f"{root}/files"}},
}
BROKEN_FILES = {
    "configs/broken-yaml.yaml": b"directory: [\n",
    "configs/unknown-key.yaml": b"directory:\n  bogus: 1\n",
    "configs/wrong-type.yaml": b"monitor_mode: maybe\n",
    "configs/list.yaml": b"- 1\n- 2\n",
    "files/not-utf8.yaml": b"accounts:\n  \xff\xfe: {}\n",
    "files/empty.yaml": b"",
    "files/binary.bin": bytes(range(1, 256)),
    "files/declaration.yaml": json.dumps({
        "pools": {"bulk": {"bind": ["192.0.2.20"], "helo": "bulk.relay.example.net"}},
        "accounts": {"initech": {"pool": "bulk", "ip_allow": ["198.51.100.0/24"],
                                 "subusers": {"app": {}}},
                     "acme": {"senders": ["alerts@partner.example"]}},
        "domains": {"initech.example": {"owner": "initech", "grants": ["initech/app"]}},
    }).encode(),
    "files/declaration-broken.yaml": b"accounts:\n  acme:\n    keys: [x]\n",
    "files/declaration-absent.yaml": b"accounts:\n  globex: {state: absent}\n",
}


class DnsStub:
    """A DNS server on loopback that answers every query NXDOMAIN at once."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                wire, peer = self.sock.recvfrom(65535)
            except OSError:
                return  # closed
            try:
                answer = dns.message.make_response(dns.message.from_wire(wire))
            except Exception:  # noqa: BLE001 - not a query: no answer, as a server does
                continue
            answer.set_rcode(dns.rcode.NXDOMAIN)
            with contextlib.suppress(OSError):
                self.sock.sendto(answer.to_wire(), peer)

    def close(self) -> None:
        self.sock.close()


Vocabulary = dict[str, tuple[list[str], list[str]]]
# what the seed made, for the strategies (st.deferred: drawn from once the fixture has run);
# @given stays on the test functions, so --hypothesis-show-statistics counts their examples
VOCABULARY: Vocabulary = {}


@dataclass
class State:
    root: Path  # the state folder: restored from ``seed`` before every example
    seed: Path
    config: Path
    seeded: dict[str, bytes]  # the seed's files
    vocabulary: Vocabulary

    def restore(self) -> None:
        """Back to the seed, unless the last example changed nothing."""
        if snapshot(self.root) != self.seeded:
            shutil.rmtree(self.root)
            shutil.copytree(self.seed, self.root, symlinks=True)
        os.chdir(self.root / "work")

    def full_config(self, path: str) -> bool:
        """Is ``path`` (as the program was given it) one of the test's own configurations?"""
        if not path:
            return True  # empty: $KEYRELAY_CONFIG, which is keyrelay.yaml
        absolute = os.path.abspath(os.path.join(self.root / "work", path))
        return absolute in {str(self.config), *(str(self.root / p) for p in FULL_CONFIGS)}


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its content (folders as b"/", links as their target)."""
    found: dict[str, bytes] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            key = os.path.relpath(path, root)
            if os.path.islink(path):
                found[key] = b"-> " + os.fsencode(os.readlink(path))
            elif name in dirs:
                found[key] = b"/"
            else:
                with open(path, "rb") as handle:
                    found[key] = handle.read()
    return found


def _seed(root: Path, dns_port: int) -> Vocabulary:
    """Install keyrelay in ``root`` with the real CLI; return the names it made."""
    config = root / "keyrelay.yaml"
    base = configuration(root, dns_port)
    config.write_text(json.dumps(base), encoding="utf-8")
    for sub in ("work", "run", "configs", "files"):
        (root / sub).mkdir()
    for name, change in FULL_CONFIGS.items():
        merged = dict(base)
        for section, values in change(root).items():
            merged[section] = ({**base.get(section, {}), **values} if isinstance(values, dict)
                               else values)
        (root / name).write_text(json.dumps(merged), encoding="utf-8")
    for name, content in BROKEN_FILES.items():
        (root / name).write_bytes(content)

    def ok(*argv: str) -> str:
        outcome = run_main(cli.main, ["--config", str(config), *argv], root)
        assert (outcome.code, outcome.crash, outcome.blocked) == (0, "", None), outcome
        return outcome.out

    for command in ["account add acme", "account add globex", "subuser add acme/app",
                    "subuser add acme/mkt", "ip allow acme 192.0.2.0/24",
                    "ip allow acme 2001:db8::/32",
                    "pool add mkt --bind 192.0.2.10 --bind 2001:db8::10 "
                    "--helo mkt.relay.example.net", "pool assign acme/mkt mkt",
                    "domain add acme example.com", "domain grant example.com acme/app",
                    "sender add globex news@globex.example",
                    "limits set acme/app --per-minute 10 --recipients 5",
                    "domain add globex globex.example",
                    "domain mark-verified globex.example", "monitor on globex"]:
        ok(*command.split())
    keys = [json.loads(ok("key", "create", principal, "--name", "ci", "--json"))
            for principal in ("acme/app", "acme", "globex")]
    ok("key", "revoke", keys[2]["key_id"])
    ok("export", "-o", str(root / "files/export.yaml"))
    ok("domain", "rotate", "globex.example")
    selectors = [s["selector"] for d in ("example.com", "globex.example")
                 for s in json.loads(ok("domain", "show", d, "--json"))["selectors"]]
    key_ids = [k["key_id"] for k in keys]
    principals = ["acme", "acme/app", "acme/mkt", "globex", "globex/x", "initech"]
    odd_principals = ["acme/nobody", "acme/app/x", "acme/", "/app", "Acme", "a" * 33, "-"]
    configs = ["", "../keyrelay.yaml", str(config), *(f"../{p}" for p in FULL_CONFIGS)]
    odd_configs = [*(f"../{p}" for p in BROKEN_FILES if p.startswith("configs/")),
                   "../files/not-utf8.yaml", "../files/binary.bin", "../files", "missing.yaml",
                   "missing-\udc80.yaml", "missing\n.yaml"]
    return {  # metavar (or dest) -> (values that mean something in the state, odd ones)
        "ACCOUNT": (["acme", "globex", "initech"],
                    ["nope", "ACME", "a-", "-a", "a" * 33, "acme\udcff", "acme\n"]),
        "PRINCIPAL": (principals, odd_principals),
        "ACCOUNT/NAME": (["acme/app", "acme/mkt", "acme/new", "globex/x"], odd_principals),
        "ACCOUNT/SUBUSER": (["acme/app", "acme/mkt", "globex/x"], odd_principals),
        "KEY_ID": (key_ids, ["aaaaaaaaaaaaaaaa", key_ids[0].upper(), key_ids[0][:-1],
                             keys[0]["key"]]),
        "SCOPE": (["mail.send", "stats.read"], ["Mail", "mail", "mail..send", "mail.send.x"]),
        "DOMAIN": (["example.com", "globex.example", "new.example", "EXAMPLE.COM.",
                    "bücher.example", "initech.example"],
                   ["☃.example", "xn--zz.example", "localhost", "192.0.2.1", "a..b",
                    "-x.example", "x" * 64 + ".example"]),
        "SELECTOR": (selectors, ["kr1", "nope", selectors[0].upper()]),
        "CIDR": (["192.0.2.0/24", "198.51.100.7", "2001:db8::/32", "::/0", "0.0.0.0/0"],
                 ["10.0.0.0/33", "192.0.2.1/24", "300.1.1.1", "fe80::1%eth0",
                  "2001:db8::1/64"]),
        "IP": (["192.0.2.10", "192.0.2.99", "2001:db8::10", "2001:db8::99"],
               ["::1", "0.0.0.0", "256.0.0.1", "192.0.2.0/24", "fe80::1%lo"]),
        "ADDRESS": (["news@globex.example", "a@example.com", "é@bücher.example",
                     "A@EXAMPLE.COM"],
                    ["nobody", "@x.example", "a@", '"q q"@example.com', "a@localhost"]),
        "POOL": (["mkt", "none", "bulk"], ["other", "NONE"]),
        "NAME": (["mkt", "bulk", "new", "mkt.relay.example.net"],
                 ["none", "relay..example", "Bad Name"]),
        "DURATION": (["90d", "never", "1h30m", "7d", "31d", "1.5d", "0.0001s"],
                     ["0", "30m1h", "1000000w", "-5d", "9" * 400, "١٢d", "1e9"]),
        "N": (["0", "1", "10", "1_000", "١٢"],
              ["-1", "9" * 30, "-" + "9" * 30, "0x10", " 5", "+5", "lots", "9" * 5000]),
        "FILE": (["-", "../files/declaration.yaml", "../files/export.yaml",
                  "../files/declaration-absent.yaml", "out.yaml", str(root / "work/out.yaml"),
                  "../directory.yaml"],
                 ["", ".", "..", "../files", "../files/not-utf8.yaml", "../files/empty.yaml",
                  "../files/binary.bin", "../files/declaration-broken.yaml", "../dkim",
                  "missing/nothing.yaml", str(root / "missing/out.yaml"),
                  "/nonexistent/keyrelay/file.yaml", "out-\udc80.yaml", "out\n\x1b[2J.yaml"]),
        "DIR": ([str(root / "run")], [".", "..", "../files", "missing", "/nonexistent/postfix"]),
        "PATH": (configs, odd_configs),
        "name": (["ci", "crm-prod", "new key", "ß"], ["x" * 65, "", "\t", "a\nb"]),
    }


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[State]:
    base = Path(os.path.realpath(tmp_path_factory.mktemp("fuzz-cli")))
    root, seed = base / "state", base / "seed"
    root.mkdir()
    stub = DnsStub()
    cwd = os.getcwd()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KEYRELAY_CONFIG", str(root / "keyrelay.yaml"))
        os.chdir(root)
        try:
            VOCABULARY.update(_seed(root, stub.port))
            shutil.copytree(root, seed, symlinks=True)
            yield State(root, seed, root / "keyrelay.yaml", snapshot(seed), VOCABULARY)
        finally:
            os.chdir(cwd)
            stub.close()


# -- argument vectors ------------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]  # ("key", "create")
    actions: tuple[argparse.Action, ...]  # its arguments, -h and --json included


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[Command]:
    """Every leaf command of ``parser`` (argparse has no public API for this walk)."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        return [Command(path, tuple(parser._actions))]
    return [c for name, sub in groups[0].choices.items() for c in commands(sub, (*path, name))]


PARSER = cli.build_parser()  # only for building argument vectors: main() builds its own
COMMANDS = commands(PARSER)
OPTION_NAMES = sorted({o for c in COMMANDS for a in c.actions for o in a.option_strings}
                      | {"--config", "--version", "--", "-", "--config=", "--conf", "--c"})
ODD = ["", " ", "-", "--", "---", "-1", "-0", "--1", "=", "--=x", ".", "..", "/", "~", "$HOME",
       "*", "'", '"', "\\", "a b", "\n", "a\nb", "\t", "\r", "\x7f", "\x1b[31mred\x1b[0m",
       "%s%n", "{0}", "{}", "é", "İ", "ß", "☃", "📧", "\u202eevil", "a\u200bb", "e\u0301",
       "１２", "١٢٣", "0x10", "1_000", "1e309", "nan", "-inf", "9" * 30, "-" + "9" * 30,
       "9" * 5000, "a" * 5000, "acme " * 100, "\udcff", "--json", "-h",
       "--help", "--version"]
TEXT = st.characters(exclude_characters="\0", codec="utf-8")
arbitrary = st.one_of(
    st.text(TEXT, max_size=24),
    st.sampled_from(ODD),
    st.sampled_from(OPTION_NAMES),
    st.sampled_from(sorted({w for c in COMMANDS for w in c.path})),
    st.integers(-(10**40), 10**40).map(str),
    # bytes that are not UTF-8 reach Python's argv as lone surrogates (surrogateescape)
    st.binary(min_size=1, max_size=12).map(
        lambda b: b.replace(b"\0", b"").decode("utf-8", "surrogateescape")),
)


def value_for(action: argparse.Action, vocabulary: Vocabulary,
              clean: bool) -> st.SearchStrategy[str]:
    metavar = action.metavar if isinstance(action.metavar, str) else action.dest
    good, odd = vocabulary.get(metavar) or vocabulary.get(action.dest) or (["x"], ["-x"])
    if clean:  # mostly values that work
        return st.one_of(*[st.sampled_from(good)] * 4, st.sampled_from(odd))
    return st.one_of(st.sampled_from(good), st.sampled_from(odd), arbitrary)


@st.composite
def well_formed(draw: st.DrawFn, vocabulary: Vocabulary, clean: bool) -> list[str]:
    """A command with values for its positionals and some of its options; unless ``clean``,
    with odd values and maybe mutated (a word dropped or an arbitrary one added)."""
    command = draw(st.sampled_from(COMMANDS))
    parts: list[list[str]] = []
    for action in command.actions:
        if isinstance(action, argparse._HelpAction):
            if draw(st.integers(0, 30)) == 0:
                parts.append([draw(st.sampled_from(action.option_strings))])
            continue
        if not action.option_strings:
            counts: dict[object, int] = {
                None: 1, "?": draw(st.integers(0, 1)), "*": draw(st.integers(0, 3)),
                "+": draw(st.integers(1, 3))}
            count = counts[action.nargs]
            parts += [[draw(value_for(action, vocabulary, clean))] for _ in range(count)]
            continue
        if not (action.required or draw(st.booleans())):
            continue
        repeat = draw(st.integers(1, 2)) if isinstance(action, argparse._AppendAction) else 1
        for _ in range(repeat):
            option = draw(st.sampled_from(action.option_strings))
            if action.nargs == 0:
                parts.append([option])
            elif draw(st.integers(0, 5)) == 0:
                parts.append([f"{option}={draw(value_for(action, vocabulary, clean))}"])
            else:
                parts.append([option, draw(value_for(action, vocabulary, clean))])
    words = [w for part in draw(st.permutations(parts)) for w in part]
    prefix = []
    if draw(st.integers(0, 3)) == 0:  # the global option, with some configuration
        config = draw(value_for(PARSER._option_string_actions["--config"], vocabulary, clean))
        prefix = draw(st.sampled_from([["--config", config], [f"--config={config}"]]))
    argv = [*prefix, *command.path, *words]
    for _ in range(0 if clean else draw(st.integers(0, 2))):
        if len(argv) > 0 and draw(st.booleans()):
            del argv[draw(st.integers(0, len(argv) - 1))]
        else:
            argv.insert(draw(st.integers(0, len(argv))), draw(arbitrary))
    return argv


def keyrelay_argv(vocabulary: Vocabulary) -> st.SearchStrategy[list[str]]:
    loose = st.tuples(st.sampled_from(COMMANDS), st.lists(arbitrary, max_size=5)).map(
        lambda pair: [*pair[0].path, *pair[1]])
    return st.one_of(well_formed(vocabulary, True), well_formed(vocabulary, True),
                     well_formed(vocabulary, False), loose, st.lists(arbitrary, max_size=6))


stdin_content = st.one_of(st.just(BROKEN_FILES["files/declaration.yaml"]),
                          st.binary(max_size=64), st.text(TEXT, max_size=64).map(str.encode))


# -- judging an outcome ----------------------------------------------------------------------
_VAGUE = [
    (re.compile(r"^cannot access: "), "names no file"),
    (re.compile(r"(^|: )None\b"), "shows Python's None"),
    (re.compile(r" object at 0x[0-9a-f]+"), "shows a Python object"),
    (re.compile(r"Traceback|^\s*$"), "says nothing"),
]


def assert_error_line(outcome: RunOutcome, program: str) -> str:
    """The status-1 promise: the last stderr line is the only ``PROGRAM: error: ...`` line,
    and it is a clear message. Returns it."""
    lines = outcome.err.splitlines()
    errors = [line for line in lines if line.startswith(f"{program}: error")]
    assert lines and errors == [lines[-1]] and outcome.err.endswith("\n"), outcome
    message = lines[-1].removeprefix(f"{program}: error: ")
    control = [c for c in message if unicodedata.category(c) == "Cc"]
    assert not control, f"control characters {control!r} in the error line\n{outcome}"
    for pattern, why in _VAGUE:
        assert not pattern.search(message), f"the error {why}\n{outcome}"
    return lines[-1]


def assert_usage_error(outcome: RunOutcome, program: str) -> None:
    """Status 2 from argparse: usage, then one ``PROGRAM [COMMAND ...]: error: ...`` line."""
    lines = outcome.err.splitlines()
    assert outcome.out == "" and lines and re.match(f"usage: {program}", lines[0]), outcome
    errors = [i for i, line in enumerate(lines) if re.match(rf"{program}( \S+)*: error: ", line)]
    assert errors == [len(lines) - 1], outcome
    control = [c for c in lines[-1] if unicodedata.category(c) == "Cc"]
    assert not control, f"control characters {control!r} in the error line\n{outcome}"


def assert_clean(outcome: RunOutcome, state: State, full_config: Callable[[], bool]) -> None:
    """Nothing escaped main(); a sandbox refusal is a failure unless argv asked for it."""
    assert not outcome.crash, outcome
    if outcome.blocked is not None:
        blocked = outcome.blocked
        if blocked.kind == "write" and named_in(outcome.argv, blocked.what, state):
            reject()  # `export -o /elsewhere`: written where the admin said
        if blocked.kind in ("real system", "network") and not full_config():
            # a configuration without paths of its own: the defaults in /etc, and the
            # control socket of the host's keyrelay-policyd in /run/keyrelay
            reject()
        pytest.fail(f"the sandbox refused {blocked}\n{outcome}")
    assert outcome.growth < MEMORY_LIMIT, f"the process grew by {outcome.growth} bytes\n{outcome}"
    assert "Traceback" not in outcome.err, outcome


def named_in(argv: Sequence[str], path: str, state: State) -> bool:
    """Did one of ``argv``'s words (or an ``--option=VALUE``/``-oVALUE`` value) name ``path``,
    or the file that ``path`` is the temporary file of (``keyrelay backup FILE`` writes
    ``.keyrelay-backup.*.tmp`` beside FILE first)?"""
    cwd = state.root / "work"
    folder, temporary = os.path.dirname(path), os.path.basename(path).startswith(
        ".keyrelay-backup.")
    for word in argv:
        for candidate in (word, word.partition("=")[2], word[2:]):
            named = os.path.abspath(os.path.join(cwd, candidate)) if candidate else ""
            if named == path or (named and temporary and os.path.dirname(named) == folder):
                return True
    return False


def parsed(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace | None:
    """``argv`` as ``parser`` understands it, or None for a usage error."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            return parser.parse_args(list(argv))
        except SystemExit:
            return None


def config_named(namespace: argparse.Namespace | None) -> str:
    """The --config an argument vector gives ("" for none: $KEYRELAY_CONFIG)."""
    if namespace is None:
        return ""
    return getattr(namespace, "config", None) or ""


# -- keyrelay --------------------------------------------------------------------------------
def side_effect(path: str, content: bytes) -> bool:
    """A new file or folder a refused command may leave: the directory's lock (taken before
    the command looks at the directory, and created with its folder when missing), a folder
    (``domain add`` makes its key folder before it is refused; the keys are deleted)."""
    return content == b"/" or (path.endswith(".lock") and content == b"")


# these record the DNS result in the directory, then exit 1 when a domain did not pass;
# suppression import keeps the good lines of a file, then exits 1 for its bad ones
_RECORD_THEN_REFUSE = {("domain", "verify"), ("domain", "check"), ("suppression", "import")}


@FUZZ
@given(argv=st.deferred(lambda: keyrelay_argv(VOCABULARY)), stdin=stdin_content)
def test_keyrelay_answers_every_argument_vector_or_refuses_it_in_one_clear_line(
        state: State, argv: list[str], stdin: bytes) -> None:
    state.restore()
    outcome = run_main(cli.main, argv, state.root, stdin)
    args = parsed(PARSER, argv)
    assert_clean(outcome, state, lambda: state.full_config(config_named(args)))
    assert outcome.code in (0, 1, 2), outcome
    after = snapshot(state.root)
    if outcome.code == 2:
        assert_usage_error(outcome, "keyrelay")
    if outcome.code == 1:
        assert_error_line(outcome, "keyrelay")
    if outcome.code == 0:
        assert not re.search(r"^keyrelay: error", outcome.err, re.M), outcome
        if os.path.exists(state.root / "directory.yaml"):
            YamlDirectory(str(state.root / "directory.yaml")).load()
        return
    command = (getattr(args, "command", ""), getattr(args, "action", ""))
    if outcome.code == 2 or command not in _RECORD_THEN_REFUSE:
        changed = sorted(k for k in after.keys() | state.seeded.keys()
                         if after.get(k) != state.seeded.get(k) and not (
                             k not in state.seeded and side_effect(k, after[k])))
        assert not changed, f"a refusal changed {changed}\n{outcome}"


# -- the daemons -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Daemon:
    program: str
    main: Callable[[list[str]], object]
    parser: Callable[[list[str] | None], argparse.Namespace]


DAEMONS = [Daemon("keyrelay-policyd", policyd.main.main, policyd.main.parse_args),
           Daemon("keyrelay-milter", milters.main.main, milters.main.parse_args)]


@contextlib.contextmanager
def serving_recorded() -> Iterator[list[str]]:
    """Patch the daemons' start so that reaching it is recorded, not done."""
    started: list[str] = []

    def policyd_run(main: Any) -> None:
        main.close()  # the serve() coroutine, never started
        started.append("keyrelay-policyd")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(policyd.main, "run", policyd_run)
        patch.setattr(policyd.main, "_raise_fd_limit", lambda: None)
        patch.setattr(milters.main, "serve",
                      lambda config, *rest: started.append("keyrelay-milter"))
        yield started


def daemon_argv(vocabulary: Vocabulary) -> st.SearchStrategy[list[str]]:
    configs = [*vocabulary["PATH"][0], *vocabulary["PATH"][1]]
    words = st.one_of(
        st.sampled_from(["--config", "--check-config", "--version", "-h", "--help", "--check",
                         "--conf", "--", "-c"]),
        st.sampled_from(configs).map(lambda p: f"--config={p}"),
        st.sampled_from(configs),
        arbitrary,
    )
    return st.lists(words, max_size=5)


def _parses(parser: Callable[[list[str] | None], argparse.Namespace],
            argv: list[str]) -> argparse.Namespace | None:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            return parser(argv)
        except SystemExit:
            return None


@pytest.mark.parametrize("daemon", DAEMONS, ids=[d.program for d in DAEMONS])
@FUZZ
@given(argv=st.deferred(lambda: daemon_argv(VOCABULARY)))
def test_a_daemon_answers_every_argument_vector_or_refuses_it_in_one_clear_line(
        state: State, daemon: Daemon, argv: list[str]) -> None:
    state.restore()
    with serving_recorded() as started:
        outcome = run_main(daemon.main, argv, state.root)
    args = _parses(daemon.parser, argv)
    assert_clean(outcome, state, lambda: state.full_config(config_named(args)))
    assert outcome.code in (0, 1, 2), outcome
    if outcome.code == 2:
        assert_usage_error(outcome, daemon.program)
    elif outcome.code == 1:
        assert_error_line(outcome, daemon.program)
        assert not started, outcome
    elif started:  # it would serve: only when asked to, with a configuration that loads
        assert args is not None and not args.check_config, outcome
    elif args is not None and args.check_config:
        assert f"{daemon.program}: configuration " in outcome.out, outcome
    assert snapshot(state.root) == state.seeded, f"the daemon changed the state\n{outcome}"


# -- the demo --------------------------------------------------------------------------------
class WouldStart(Exception):
    """The demo got past its argument checks: from here on it starts Postfix."""


def would_start(run_dir: Path) -> None:
    raise WouldStart(str(run_dir))


@FUZZ
@given(argv=st.lists(st.one_of(arbitrary, st.sampled_from(["run", "-h", "--help", "--x"])),
                     max_size=4))
def test_the_demo_refuses_bad_arguments_before_starting_anything(
        state: State, argv: list[str]) -> None:
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(keyrelay.demo.Settings, "from_env", would_start)
            outcome = run_main(keyrelay.demo.main, argv, state.root)
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    if "WouldStart" in outcome.crash:
        return  # a run folder and nothing else: the demo would start
    assert_clean(outcome, state, lambda: True)
    assert outcome.code in (0, 1, 2), outcome
    if outcome.code == 2:
        assert_usage_error(outcome, re.escape("python -m keyrelay.demo"))
    elif outcome.code == 1:  # not root
        assert_error_line(outcome, "keyrelay demo")


# -- the installed console scripts -----------------------------------------------------------
def script_env(state: State) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYRELAY_", "PYTHON"))}
    # the strictest terminal: stdout strict (stderr stays backslashreplace, as in Python)
    env.update(KEYRELAY_CONFIG=str(state.config), PYTHONIOENCODING="utf-8:strict")
    return env


raw_word = st.one_of(arbitrary.map(lambda w: os.fsencode(w)),
                     st.binary(min_size=1, max_size=16).map(lambda b: b.replace(b"\0", b"")))


def limit_memory() -> None:
    """In the child: a runaway allocation is a MemoryError (a traceback), not a slow swap."""
    resource.setrlimit(resource.RLIMIT_AS, (SCRIPT_MEMORY, SCRIPT_MEMORY))


def safe_to_run(program: str, argv: list[str], state: State) -> bool:
    """Can ``argv`` run without the sandbox? No daemon start, only the test's configurations,
    and the only write an argument can direct (``export -o``) inside the state folder."""
    if program == "keyrelay":
        args = parsed(PARSER, argv)
    else:
        daemon = next(d for d in DAEMONS if d.program == program)
        args = _parses(daemon.parser, argv)
    if args is None:
        return True  # a usage error: argparse exits before anything else
    if not state.full_config(config_named(args)):
        return False
    if program != "keyrelay":
        return bool(args.check_config)
    if args.command == "postfix":
        return False  # postconf, postfix check and reload: not fuzzed (module doc)
    output = getattr(args, "output", None)
    if output is None or output == "-":
        return True
    return os.path.abspath(os.path.join(state.root / "work", str(output))).startswith(
        f"{state.root}{os.sep}")


SCRIPT_PREFIXES = {  # program -> argument vectors the odd words are appended to
    "keyrelay": [[], [b"account", b"add"], [b"key", b"create", b"acme", b"--name"], [b"sync"],
                 [b"export", b"-o"], [b"domain", b"verify"], [b"ip", b"allow"]],
    "keyrelay-policyd": [[b"--check-config"], [], [b"--config"]],
    "keyrelay-milter": [[b"--check-config"], [], [b"--config"]],
}


@pytest.mark.parametrize("program", SCRIPT_PREFIXES)
@SCRIPTS
@given(data=st.data(), words=st.lists(raw_word, max_size=4))
def test_a_console_script_shows_no_traceback_for_odd_bytes_in_argv(
        state: State, program: str, data: st.DataObject, words: list[bytes]) -> None:
    script = BIN / program
    assert script.exists(), f"{script}: pip install -e ."
    argv = [*data.draw(st.sampled_from(SCRIPT_PREFIXES[program]), label="prefix"), *words]
    if not safe_to_run(program, [os.fsdecode(w) for w in argv], state):
        reject()
    state.restore()
    proc = subprocess.run([script, *argv], capture_output=True, env=script_env(state),
                          stdin=subprocess.DEVNULL, cwd=state.root / "work", timeout=60,
                          check=False, preexec_fn=limit_memory)
    err = proc.stderr.decode("utf-8", "replace")
    shown = f"argv {argv!r}\nexit {proc.returncode}\n--- stderr\n{err}"
    assert "Traceback" not in err, shown
    assert proc.returncode in (0, 1, 2), shown
    if proc.returncode:
        last = err.splitlines()[-1] if err.strip() else ""
        assert re.match(rf"{program}( \S+)*: error: ", last), shown
    if program != "keyrelay":
        assert snapshot(state.root) == state.seeded, shown
