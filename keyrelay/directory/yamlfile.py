"""The YAML directory backend: one file, written atomically under a lock, reloaded on change.

Writes: take an exclusive ``flock`` on ``<file>.lock`` (the data file itself is replaced by
rename, so it cannot carry the lock), re-read the file, apply the change, write a temporary file
in the same folder with the original's owner and mode, fsync it, rename it over the original and
fsync the folder. Concurrent CLI runs therefore serialise and never lose an update.

Reads: ``snapshot()`` compares the file's identity (inode, size, mtime, ctime) with the one it
parsed; the file is parsed again only when it changed, so the hot path costs one ``stat``.
The file is written in JSON style (valid YAML) and read back with the json module when it is
JSON, which is what keeps a reload of a large directory short; keyrelay/yamlread.py reads it
(a key given twice is refused, every error is ``FILE:LINE: KEY.PATH: reason``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

from .. import __version__, names, yamlread
from ..errors import ConfigError, DirectoryUnavailable, UserError
from ..keys import KEY_ID_RE
from . import yamllegacy, yamlwebhook
from .model import (
    LIMIT_FIELDS,
    Account,
    Algorithm,
    ApiKey,
    Directory,
    DirectoryData,
    Domain,
    DomainState,
    Limits,
    Pool,
    Selector,
    SelectorState,
    Sender,
    Status,
    Subuser,
)
from .yamlrender import render as render  # re-exported: every writer of the file uses it

T = TypeVar("T")

# The directory file's format (its top-level ``version:``; docs/directory.md, "Backups and
# upgrades"). Version 1 is every file keyrelay has written so far: the fields added since
# the first release (verified_at, failed_checks, retiring_since, limits) are optional with
# the old meaning when absent, so older files read as they are (tests/golden/directory/).
# A change that older code would misread raises FORMAT_VERSION and adds the step from the
# version before to _UPGRADES: a file of an older version is then read through the steps,
# transparently, and written in the new version by the next change. A newer version than
# FORMAT_VERSION is refused with one line naming both versions.
FORMAT_VERSION = 1

# version N -> N + 1, on the document as loaded (mappings, lists, strings, numbers)
_UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


class YamlDirectory:
    """The directory kept in one YAML file (the embedded default backend)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int, int] | None = None
        self._snapshot: Directory | None = None
        self._error: DirectoryUnavailable | None = None
        # told each time the file is read again: True parsed, False broken (the metrics)
        self.on_reload: Callable[[bool], None] | None = None

    def __repr__(self) -> str:
        return f"YamlDirectory({self.path!r})"

    # -- reading -------------------------------------------------------------------------
    # snapshot() reads the file again whenever it changed: a key missing from it is absent
    reads_through = False

    def fresh_for_key(self, key_id: str) -> Directory:
        return self.snapshot()

    def snapshot(self) -> Directory:
        """The current directory; re-parsed only when the file changed since the last call.

        Raises ``DirectoryUnavailable`` when the file cannot be read or is invalid; the
        failure is remembered for that file version, so a broken file is not re-parsed for
        every request.
        """
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise DirectoryUnavailable(f"{self.path}: directory file does not exist") from None
        except OSError as exc:
            raise DirectoryUnavailable(f"{self.path}: cannot stat: {exc.strerror}") from None
        # ctime too: chmod/chown (fixing an unreadable file) changes neither size nor mtime
        signature = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        # The hot path, without the lock. A reload stores _snapshot and _error before
        # _signature, and this reads _signature first: a matching signature therefore always
        # comes with the snapshot parsed from that very file.
        if signature == self._signature:
            snapshot, error = self._snapshot, self._error
            if error is None and snapshot is not None:
                return snapshot
        with self._lock:
            if signature != self._signature:
                try:
                    self._snapshot, self._error = Directory(self._read()), None
                except ConfigError as exc:
                    self._snapshot, self._error = None, DirectoryUnavailable(str(exc))
                # only now: an unexpected exception must not leave the old snapshot in place
                self._signature = signature
                if self.on_reload is not None:
                    try:  # the metrics: a failure there must not fail the request
                        self.on_reload(self._error is None)
                    except Exception:  # logged; the copy is what matters
                        logging.getLogger("keyrelay.directory").exception(
                            "directory reload not counted")
            if self._error is not None:
                raise self._error
            assert self._snapshot is not None
            return self._snapshot

    def load(self, missing_ok: bool = False) -> DirectoryData:
        """Parse the file now (no cache); raises ``ConfigError`` naming file, key and reason.
        With ``missing_ok``, a file that does not exist yet is an empty directory."""
        if missing_ok and not os.path.exists(self.path):
            return DirectoryData()
        return self._read()

    def _read(self) -> DirectoryData:
        document = yamlread.load(self.path, json_first=True,
                                 missing="directory file does not exist")
        return document.build(_Parser(self.path).document)

    def record_key_use(self, used: dict[str, datetime],
                       give_up: Callable[[], bool] | None = None) -> set[str]:
        """Keys' last-used times from a daemon; never creates the file. One quick write, so
        ``give_up`` (a stopping daemon's "time is up") never leaves any out: returns the
        empty set of keys not recorded."""
        from .. import admin  # here: keyrelay.admin imports this package

        with self.transaction(create=False) as data:
            admin.record_key_use(data, used)
        return set()

    # -- writing -------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self, create: bool = True) -> Iterator[DirectoryData]:
        """Lock, read, let the caller change the data, then write it back atomically.

        A missing file starts an empty directory when ``create`` (the CLI); without it (the
        daemons' bookkeeping writes) a missing file raises ``DirectoryUnavailable``, so a
        file moved away for a moment is never replaced by an empty directory. An exception
        inside the block writes nothing.
        """
        folder = os.path.dirname(os.path.abspath(self.path))
        if create:
            os.makedirs(folder, mode=0o750, exist_ok=True)
        elif not os.path.exists(self.path):
            raise DirectoryUnavailable(f"{self.path}: directory file does not exist")
        lock_path = self.path + ".lock"
        new_lock = not os.path.exists(lock_path)
        # 0660: the daemons (as their own user, in the folder's group) write last-used times
        lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o660)
        try:
            if new_lock:
                os.fchmod(lock_fd, 0o660)  # whatever the umask
                _give_to_folder_owner(lock_fd, folder)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            if os.path.exists(self.path):
                data = self._read()
            elif create:
                data = DirectoryData()
            else:
                raise DirectoryUnavailable(f"{self.path}: directory file does not exist")
            yield data
            self._write(render(data))
        finally:
            os.close(lock_fd)  # closing releases the flock

    def update(self, change: Callable[[DirectoryData], None]) -> None:
        with self.transaction() as data:
            change(data)

    def _write(self, text: str) -> None:
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            st: os.stat_result | None = os.stat(self.path)
        except FileNotFoundError:
            st = None
        fd, tmp = tempfile.mkstemp(prefix=".directory.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                # the file holds key hashes: keep the original's owner and mode, else 0640
                # and the folder's owner (the daemons' user, as the deployment sets it up)
                os.fchmod(handle.fileno(), st.st_mode & 0o777 if st else 0o640)
                if st is not None and os.geteuid() == 0:
                    os.fchown(handle.fileno(), st.st_uid, st.st_gid)
                elif st is None:
                    _give_to_folder_owner(handle.fileno(), folder)
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_folder(folder)


def fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (the folder's entry, not only the file's bytes)."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _give_to_folder_owner(fd: int, folder: str) -> None:
    """As root, a new file belongs to the owner of its folder, not to root."""
    if os.geteuid() == 0:
        owner = os.stat(folder)
        os.fchown(fd, owner.st_uid, owner.st_gid)


def parse_text(text: str, name: str) -> DirectoryData:
    """A directory file's ``text`` (e.g. from a backup archive), ``name`` named in errors."""
    return yamlread.parse(text, name, json_first=True).build(_Parser(name).document)


# -- parsing ---------------------------------------------------------------------------------
class _Parser:
    """Turns the loaded document into records; every error names file, key path and reason
    (yamlread adds the line)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.path, key, reason)

    def mapping(self, value: object, key: str, allowed: tuple[str, ...] = ()) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping of keys, got {yamlread.got(value)}")
        for name in value:
            if not isinstance(name, str):
                raise self.fail(yamlread.join(key, str(name)),
                                f"keys must be strings, got {yamlread.got(name)}")
            if allowed and name not in allowed:
                raise self.fail(yamlread.join(key, name), yamlread.unknown_key(name, allowed))
        return value

    def string(self, value: object, key: str, *, optional: bool = False) -> str:
        if value is None and optional:
            return ""
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"expected a non-empty string, got {yamlread.got(value)}")
        return value

    def time(self, value: object, key: str) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=UTC)
        if isinstance(value, str):
            try:
                parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                pass
            else:
                return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        raise self.fail(key, "expected a UTC time like 2026-01-31T12:00:00Z, got "
                        f"{yamlread.got(value)}")

    def enum(self, kind: Callable[[str], T], value: object, key: str, choices: str) -> T:
        try:
            return kind(str(value))
        except ValueError:
            raise self.fail(key, f"expected one of {choices}, got {yamlread.got(value)}") from None

    def checked(self, check: Callable[[str], T], value: object, key: str) -> T:
        try:
            return check(self.string(value, key))
        except UserError as exc:
            raise self.fail(key, str(exc)) from None

    def integer(self, value: object, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.fail(key, f"expected a positive integer, got {yamlread.got(value)}")
        return value

    def count(self, value: object, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(key, f"expected 0 or a positive integer, got {yamlread.got(value)}")
        return value

    def str_list(self, value: object, key: str) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(key, f"expected a list, got {yamlread.got(value)}")
        return [self.string(v, f"{key}[{i}]") for i, v in enumerate(value)]

    def limits(self, value: object, key: str) -> Limits:
        doc = self.mapping(value, key, LIMIT_FIELDS)
        return Limits(**{f: self.integer(v, f"{key}.{f}") for f, v in doc.items() if v is not None})

    def document(self, document: object) -> DirectoryData:
        data = DirectoryData()
        if document is None:
            # not "no accounts": a file caught between an editor's truncate and its write
            # reads empty for a moment, and must not refuse every login permanently
            raise self.fail("", "the file is empty; an empty directory is written {}")
        top = self.upgraded(self.mapping(document, ""))
        self.mapping(top, "", ("version", "monitor", "pools", "accounts", "domains"))
        data.monitor = top.get("monitor", False)
        if not isinstance(data.monitor, bool):
            raise self.fail("monitor", f"expected true or false, got {yamlread.got(data.monitor)}")
        for name, doc in self.mapping(top.get("pools"), "pools").items():
            self.pool(data, name, doc, f"pools.{name}")
        for name, doc in self.mapping(top.get("accounts"), "accounts").items():
            self.account(data, name, doc, f"accounts.{name}")
        for name, doc in self.mapping(top.get("domains"), "domains").items():
            self.domain(data, name, doc, f"domains.{name}")
        self.check_references(data)
        return data

    def upgraded(self, top: dict[str, Any]) -> dict[str, Any]:
        """The top-level mapping in FORMAT_VERSION: an older version through _UPGRADES, a
        newer one refused. A file without ``version:`` (written by hand) is version 1."""
        version = top.get("version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise self.fail("version", "expected the format version, a whole number from 1 "
                            f"(this keyrelay writes {FORMAT_VERSION}), got "
                            f"{yamlread.got(version)}")
        if version > FORMAT_VERSION:
            known = "1" if FORMAT_VERSION == 1 else f"1 to {FORMAT_VERSION}"
            raise self.fail("version", f"format version {version} is newer than this keyrelay "
                            f"({__version__}) reads (format version {known}): the file was "
                            "written by a newer keyrelay; upgrade keyrelay on this host (every "
                            "program that reads the file), or restore a backup this version "
                            "made")
        while version < FORMAT_VERSION:
            top = dict(_UPGRADES[version](top))
            version += 1
            top["version"] = version
        return top

    def pool(self, data: DirectoryData, name: str, value: object, key: str) -> None:
        doc = self.mapping(value, key, ("bind", "helo", "created"))
        self.checked(names.account_name, name, key)
        binds = self.str_list(doc.get("bind"), f"{key}.bind")
        if not binds:
            raise self.fail(f"{key}.bind", "a pool needs at least one bind address")
        addresses = tuple(self.checked(names.ip_address, b, f"{key}.bind[{i}]")
                          for i, b in enumerate(binds))
        helo = self.checked(names.domain, doc.get("helo"), f"{key}.helo")
        created = self.time(doc.get("created"), f"{key}.created")
        data.pools[name] = Pool(name=name, bind=addresses, helo=helo, created=created)

    def principal_parts(
        self, data: DirectoryData, principal: str, doc: dict[str, Any], key: str
    ) -> tuple[Status, str | None, Limits, datetime | None]:
        for kid, kdoc in self.mapping(doc.get("keys"), f"{key}.keys").items():
            self.key(data, principal, kid, kdoc, f"{key}.keys.{kid}")
        for addr, sdoc in self.mapping(doc.get("senders"), f"{key}.senders").items():
            where = f"{key}.senders.{addr}"
            address = self.checked(names.address, addr, where)
            created = self.time(self.mapping(sdoc, where, ("created",)).get("created"), where)
            data.senders[(principal, address)] = Sender(address, principal, created)
        if doc.get("legacy_login") is not None:
            yamllegacy.parse(self, data, principal, doc["legacy_login"], f"{key}.legacy_login")
        status = self.enum(
            Status, doc.get("status", "active"), f"{key}.status", "active, suspended"
        )
        pool = self.string(doc.get("pool"), f"{key}.pool", optional=True) or None
        limits = self.limits(doc.get("limits"), f"{key}.limits")
        return status, pool, limits, self.time(doc.get("created"), f"{key}.created")

    def account(self, data: DirectoryData, name: str, value: object, key: str) -> None:
        common = ("status", "pool", "limits", "created", "keys", "senders", "legacy_login")
        doc = self.mapping(value, key, (*common, "monitor", "ip_allow", "webhook", "subusers"))
        self.checked(names.account_name, name, key)
        status, pool, limits, created = self.principal_parts(data, name, doc, key)
        monitor = doc.get("monitor", False)
        if not isinstance(monitor, bool):
            raise self.fail(f"{key}.monitor",
                            f"expected true or false, got {yamlread.got(monitor)}")
        ip_allow = tuple(
            self.checked(names.network, n, f"{key}.ip_allow[{i}]")
            for i, n in enumerate(self.str_list(doc.get("ip_allow"), f"{key}.ip_allow"))
        )
        webhook = (yamlwebhook.parse(self, doc["webhook"], f"{key}.webhook")
                   if doc.get("webhook") is not None else None)
        data.accounts[name] = Account(name, status, monitor, ip_allow, pool, limits, created,
                                      webhook)
        for sub, sdoc in self.mapping(doc.get("subusers"), f"{key}.subusers").items():
            where = f"{key}.subusers.{sub}"
            self.checked(names.account_name, sub, where)
            parts = self.principal_parts(
                data, f"{name}/{sub}", self.mapping(sdoc, where, common), where
            )
            data.subusers[f"{name}/{sub}"] = Subuser(name, sub, *parts)

    def key(self, data: DirectoryData, principal: str, kid: str, value: object, key: str) -> None:
        allowed = ("name", "sha256", "scopes", "created", "expires", "revoked", "last_used")
        doc = self.mapping(value, key, allowed)
        if not KEY_ID_RE.match(kid):
            raise self.fail(key, "a key id is 16 characters of a-z and 2-7")
        if kid in data.keys:
            raise self.fail(key, f"key id also used by {data.keys[kid].principal}")
        digest = self.string(doc.get("sha256"), f"{key}.sha256")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise self.fail(f"{key}.sha256", "expected 64 lowercase hex digits")
        created = self.time(doc.get("created"), f"{key}.created")
        if created is None:
            raise self.fail(f"{key}.created", "a key needs its creation time")
        data.keys[kid] = ApiKey(
            key_id=kid,
            principal=principal,
            name=self.string(doc.get("name"), f"{key}.name"),
            secret_hash=digest,
            scopes=tuple(self.str_list(doc.get("scopes"), f"{key}.scopes")),
            created=created,
            expires=self.time(doc.get("expires"), f"{key}.expires"),
            revoked=self.time(doc.get("revoked"), f"{key}.revoked"),
            last_used=self.time(doc.get("last_used"), f"{key}.last_used"),
        )

    def domain(self, data: DirectoryData, name: str, value: object, key: str) -> None:
        allowed = ("owner", "state", "grants", "created", "verified_at", "verified_by",
                   "failed_checks", "selectors")
        doc = self.mapping(value, key, allowed)
        if self.checked(names.domain, name, key) != name:
            raise self.fail(key, f"write the domain in normal form: {names.domain(name)}")
        selectors = []
        for sel, sdoc in self.mapping(doc.get("selectors"), f"{key}.selectors").items():
            where = f"{key}.selectors.{sel}"
            sd = self.mapping(
                sdoc, where,
                ("algorithm", "state", "key_file", "public_key", "created", "retiring_since")
            )
            selectors.append(
                Selector(
                    name=sel,
                    algorithm=self.enum(
                        Algorithm, sd.get("algorithm"), f"{where}.algorithm",
                        "rsa-sha256, ed25519-sha256",
                    ),
                    state=self.enum(
                        SelectorState, sd.get("state"), f"{where}.state",
                        "pending, active, retiring",
                    ),
                    key_file=self.string(sd.get("key_file"), f"{where}.key_file"),
                    public_key=self.string(sd.get("public_key"), f"{where}.public_key"),
                    created=self.time(sd.get("created"), f"{where}.created") or datetime.now(UTC),
                    retiring_since=self.time(sd.get("retiring_since"), f"{where}.retiring_since"),
                )
            )
        data.domains[name] = Domain(
            name=name,
            owner=self.string(doc.get("owner"), f"{key}.owner"),
            state=self.enum(
                DomainState, doc.get("state", "pending"), f"{key}.state",
                "pending, verified, failing",
            ),
            grants=tuple(self.str_list(doc.get("grants"), f"{key}.grants")),
            selectors=tuple(selectors),
            created=self.time(doc.get("created"), f"{key}.created"),
            verified_at=self.time(doc.get("verified_at"), f"{key}.verified_at"),
            verified_by=self.string(doc.get("verified_by"), f"{key}.verified_by", optional=True)
            or None,
            failed_checks=self.count(doc.get("failed_checks", 0), f"{key}.failed_checks"),
        )

    def check_references(self, data: DirectoryData) -> None:
        for acc in data.accounts.values():
            if acc.pool and acc.pool not in data.pools:
                raise self.fail(f"accounts.{acc.name}.pool", f"no pool named {acc.pool!r}")
        for sub in data.subusers.values():
            if sub.pool and sub.pool not in data.pools:
                where = f"accounts.{sub.account}.subusers.{sub.name}.pool"
                raise self.fail(where, f"no pool named {sub.pool!r}")
        for dom in data.domains.values():
            if dom.owner not in data.accounts and dom.owner not in data.subusers:
                raise self.fail(f"domains.{dom.name}.owner", f"no principal {dom.owner!r}")
            for i, grant in enumerate(dom.grants):
                if data.subusers.get(grant) is None or grant.partition("/")[0] != dom.owner:
                    raise self.fail(
                        f"domains.{dom.name}.grants[{i}]",
                        f"{grant!r} is not a subuser of the owning account {dom.owner!r}",
                    )

