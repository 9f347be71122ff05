"""What every command of the ``keyrelay`` CLI shares: the ``Context`` a handler gets, the
helpers that register a command beside its handler, the retries of a command that met
another writer, and the exit codes."""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO, TypeVar

from .. import audit, dkimkeys
from ..config import Config
from ..directory import DirectoryBackend
from ..directory.model import DirectoryData
from ..errors import ConfigError, DirectoryConflict

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# a command whose LDAP transaction met another writer's runs again, after a jittered pause
# that doubles each time (from 0.05 s up to 2 s), until CONFLICT_SECONDS have passed: many
# writers at once on a slow machine all get through, whatever their number (a fixed count of
# attempts gave up after ~6 s)
CONFLICT_SECONDS = 60.0
T = TypeVar("T")


@dataclass
class Context:
    config: Config
    config_path: str
    directory: DirectoryBackend
    now: datetime
    out: TextIO
    json: bool

    def read(self) -> DirectoryData:
        """A fresh read for listings; a directory not created yet (no file, an LDAP base
        without keyrelay's entries) is an empty directory."""
        return self.directory.load(missing_ok=True)

    @contextmanager
    def change(self, action: str, *, keys: dkimkeys.NewKeys | None = None,
               **details: str) -> Iterator[DirectoryData]:
        """A directory transaction, audited once it has been written; refused before it
        starts when the audit log cannot be appended to. ``keys``: the DKIM key files the
        change names (``dkimkeys.new_keys``), told when the write happened."""
        self.check_audit()
        with self.directory.transaction() as data:
            yield data
        if keys is not None:
            keys.written()
        audit.record(self.config.logging.audit_log, self.now, action, **details)

    def check_audit(self) -> None:
        """Refuse a change the audit log could not record (``audit.check``)."""
        audit.check(self.config.logging.audit_log)

    def new_keys(self, making: bool = True) -> AbstractContextManager[dkimkeys.NewKeys]:
        """``dkimkeys.new_keys`` in dkim.key_dir, a file it cannot delete a warning; after
        a failure it keeps what the directory names. Refused before a key is made when the
        audit log cannot be appended to or (``making``: keys will be made) dkim.key_dir is
        not a folder."""
        self.check_audit()
        if making:
            self.check_key_dir()
        return dkimkeys.new_keys(self.config.dkim.key_dir, warn, self.named_key_files)

    def check_key_dir(self) -> None:
        """dkim.key_dir must be a folder, or missing below a folder (it is made then)."""
        key_dir = self.config.dkim.key_dir
        probe = key_dir
        while not os.path.lexists(probe) and os.path.dirname(probe) not in ("", probe):
            probe = os.path.dirname(probe)
        if os.path.lexists(probe) and not os.path.isdir(probe):
            what = "is a file" if probe == key_dir else f"is below {probe}, a file"
            raise ConfigError(self.config_path, "dkim.key_dir",
                              f"{key_dir} {what}: dkim.key_dir must name a folder (it is made "
                              "if missing) where the private DKIM keys are kept")

    def named_key_files(self) -> set[str]:
        """The private key files the directory names now (absolute paths)."""
        data = self.directory.load(missing_ok=True)
        return {os.path.abspath(s.key_file) for d in data.domains.values() for s in d.selectors}

    def say(self, text: str) -> None:
        if not self.json:
            self.out.write(text + "\n")


Handler = Callable[[Context, argparse.Namespace], None]


def warn(text: str) -> None:
    print(f"keyrelay: warning: {text}", file=sys.stderr)


def delete_key_files(paths: list[str]) -> None:
    """Private key files of selectors the directory no longer names; warns for each that
    cannot be deleted."""
    for problem in dkimkeys.delete_key_files(paths):
        warn(problem)


# -- registering commands ------------------------------------------------------------------
def group(sub: Any, name: str, help_text: str) -> Any:
    """A command group (``keyrelay NAME ACTION``); add its actions with ``command``."""
    parser = sub.add_parser(name, help=help_text, description=help_text)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    return actions


def command(
    group: Any, name: str, handler: Handler | None, help_text: str, *, json: bool = False
) -> Any:
    """A command (an action of a group, or a command of its own); add its arguments to the
    parser returned."""
    parser = group.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(handler=handler)
    if json:
        parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def path(text: str) -> str:
    """A FILE or DIR argument. An empty one is a mistake (an unset shell variable), not the
    working directory that ``Path("")`` would make of it."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path names no file")
    return text


# -- running a command ---------------------------------------------------------------------
def run_handler(handler: Handler, ctx: Context, args: argparse.Namespace) -> None:
    """Run a command; again when another writer changed the directory under it.

    Only LDAP refuses a transaction that overlapped another writer's (the YAML file is
    locked instead), and it then wrote nothing; a command prints only after its one
    transaction, so running it again is what the admin would do by hand. (`domain check`
    writes once per domain and retries each one itself.)
    """
    retrying_conflicts(lambda: handler(ctx, args))


def retrying_conflicts(action: Callable[[], T], seconds: float = CONFLICT_SECONDS,
                       clock: Callable[[], float] = time.monotonic,
                       sleep: Callable[[float], None] = time.sleep) -> T:
    """``action()``, run again while it raises DirectoryConflict (nothing was written):
    after a random pause of 0.5-1.5 times 0.05 s, doubled at each conflict up to 2 s, for
    ``seconds``; the last conflict is raised after that."""
    deadline = clock() + seconds
    pause = 0.05
    while True:
        try:
            return action()
        except DirectoryConflict:
            if clock() >= deadline:
                raise
        sleep(pause * random.uniform(0.5, 1.5))  # noqa: S311 - jitter, not a secret
        pause = min(2.0, pause * 2)
