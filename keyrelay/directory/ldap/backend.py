"""The LDAP directory backend: the daemons' copy of the directory, kept fresh by a
refresher thread, read through for a key id it lacks; the CLI's reads and writes.

Reads for the daemons: ``snapshot()`` never waits for LDAP once the first copy is loaded. A
background thread asks for the base entry's ``krSerial`` every ``refresh_interval`` (one
base-scope read). When it moved, the base entry's change log (``krChange`` values "SERIAL DN",
written by every keyrelay write; changelog.py) names the entries to fetch again, one
base-scope read each; the copy is rebuilt from memory. The whole directory is read again only
when the log cannot say (a write of more than ``CHANGE_LIST_LIMIT`` entries, a reader more
than ``CHANGE_LOG_SERIALS`` behind), and every ``full_reload_interval`` to catch changes made
without the keyrelay CLI. A copy is served only
while the last successful contact is at most ``refresh_interval + timeout`` old (plus
``stale_grace`` when the admin allows stale answers); after that, ``snapshot()`` raises
``DirectoryUnavailable`` and every front end answers temporarily.

Read-through (``fresh_for_key``): a login with a key id that the copy lacks may be a key
created a moment ago, so that one key id is looked up in LDAP (one subtree search by
``krKeyId``). Found: the copy is refreshed at once (the change log brings the key and its
principal) and the login decided on it. Not found: the key id is remembered as absent for
``negative_cache`` seconds and the login refused. At most ``read_through_per_second`` such
searches run per second (a token bucket); past that, and whenever LDAP does not answer, the
lookup raises ``DirectoryUnavailable`` (a temporary answer), never "unknown key".

Writes (``transaction()``, ``record_key_use()``): writes.py explains the serial lock.
The entries' layout is in mapping.py, the schema in schema.py.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar

from ldap3.core.exceptions import LDAPException

from ...errors import DirectoryUnavailable
from ..model import Directory, DirectoryData
from . import connection, searches, writes
from .changelog import changed_since
from .connection import Connection, reason, unbind
from .mapping import Raw, dn_key, entries_of, records_of

if TYPE_CHECKING:
    from ...config import LdapConfig

log = logging.getLogger("keyrelay.directory.ldap")
_ABSENT_LIMIT = 100_000  # key ids remembered as absent; a flood of guesses stays bounded
T = TypeVar("T")


class LdapDirectory:
    """The directory in LDAP; the module docstring explains the copy and the read-through,
    writes.py the writes."""

    def __init__(self, config: LdapConfig, *, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.config = config
        self.base = config.base_dn
        self._clock = clock
        self._password: str | None = None
        self._snapshot: Directory | None = None
        self._serial: int | None = None
        self._loaded_at = 0.0
        self._contact = 0.0  # when LDAP last answered
        self._error = "not loaded yet"
        self._refresher: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._stop = threading.Event()
        self._poll_conn: Connection | None = None  # the refresher's, reused between polls
        self._entries: dict[str, Raw] = {}  # the copy's entries by dn_key
        self._refresh_lock = threading.Lock()  # one refresh at a time (refresher, lookups)
        self._gate = threading.Lock()  # the read-through budget and the absent key ids
        self._lookup_lock = threading.Lock()  # the read-through's own connection
        self._lookup_conn: Connection | None = None
        self._tokens = float(config.read_through_per_second)
        self._tokens_at = clock()
        self._absent: dict[str, float] = {}  # key id -> until when LDAP's "no such key" holds
        self.problems: list[str] = []  # entries the last load skipped
        # told each time the copy is rebuilt (True) or a poll fails (False): the metrics
        self.on_reload: Callable[[bool], None] | None = None

    def __repr__(self) -> str:
        return f"LdapDirectory({', '.join(self.config.urls)!r}, base={self.base!r})"

    # -- connections ---------------------------------------------------------------------
    def _read_password(self) -> str:
        if self._password is None:
            path = self.config.bind_password_file
            try:
                with open(path, encoding="utf-8") as handle:
                    self._password = handle.read().rstrip("\r\n")
            except OSError as exc:
                raise DirectoryUnavailable(
                    f"{path}: cannot read the LDAP bind password (directory.ldap."
                    f"bind_password_file): {exc.strerror}") from None
        return self._password

    def connect(self) -> Connection:
        """A bound connection to the first of ``urls`` that answers (``connection.connect``)."""
        password = self._read_password() if self.config.bind_dn else None
        return connection.connect(self.config, password)

    # -- reading -------------------------------------------------------------------------
    def _read_all(self, conn: Connection) -> tuple[DirectoryData, int | None]:
        entries, serial, monitor = self._read_entries(conn)
        return self._records(entries, monitor), serial

    def _read_entries(self, conn: Connection) -> tuple[dict[str, Raw], int | None, bool]:
        """Every keyrelay entry by ``dn_key``, the serial and the directory-wide monitor."""
        return searches.read_entries(conn, self.base, self.config.bind_dn)

    def _records(self, entries: dict[str, Raw], monitor: bool) -> DirectoryData:
        problems: list[str] = []
        data = records_of(list(entries.values()), problems)
        data.monitor = monitor
        self.problems = problems
        return data

    def load(self, missing_ok: bool = False) -> DirectoryData:
        """Everything, read now (the CLI's listings). With ``missing_ok``, a base that is not
        a keyrelay directory yet is an empty directory."""
        conn = self._guarded(self.connect)
        try:
            data, serial = self._guarded(lambda: self._read_all(conn))
        finally:
            unbind(conn)
        if serial is None and missing_ok:
            return DirectoryData()
        if serial is None:
            raise DirectoryUnavailable(
                f"LDAP base {self.base} is not a keyrelay directory yet (no krDirectory "
                "class): create it with a keyrelay command such as `keyrelay account add` or "
                "`keyrelay import`")
        return data

    def _guarded(self, action: Callable[[], T]) -> T:
        """``action()``, its LDAP and socket errors turned into ``DirectoryUnavailable``."""

        try:
            return action()
        except LDAPException as exc:
            raise DirectoryUnavailable(f"LDAP {', '.join(self.config.urls)}: "
                                       f"{reason(exc)}{_schema_hint(exc)}") from None
        except OSError as exc:
            raise DirectoryUnavailable(f"LDAP {', '.join(self.config.urls)}: {exc}") from None

    def snapshot(self) -> Directory:
        """The current copy; never waits for LDAP after the first load (see module doc)."""
        snapshot = self._snapshot
        if snapshot is None:
            with self._start_lock:
                if self._snapshot is None:
                    self._refresh(force=True)  # raises DirectoryUnavailable
                self._start_refresher()
            snapshot = self._snapshot
            assert snapshot is not None
        limit = self.config.refresh_interval + self.config.timeout + self.config.stale_grace
        if self._clock() - self._contact > limit:
            raise DirectoryUnavailable(f"LDAP unreachable for more than {limit:g}s: "
                                       f"{self._error}")
        return snapshot

    def contact_age(self) -> float:
        """Seconds since LDAP last answered a poll (the copy's age, docs/metrics.md)."""
        return max(0.0, self._clock() - self._contact) if self._contact else float("inf")

    # -- read-through -------------------------------------------------------------------
    reads_through = True  # a key id missing from the copy may exist: ask (fresh_for_key)

    def fresh_for_key(self, key_id: str) -> Directory:
        """The copy, brought up to date first when it lacks ``key_id`` and LDAP has it.

        Blocks for at most one LDAP search and one refresh (call it off the event loop).
        The copy it returns still lacks ``key_id`` when LDAP has no such key (now, or
        within ``negative_cache``). Raises ``DirectoryUnavailable`` when LDAP cannot be
        asked: unreachable, or over the ``read_through_per_second`` budget.
        """
        snapshot = self.snapshot()
        if key_id in snapshot.keys:
            return snapshot
        now = self._clock()
        with self._gate:
            if self._absent.get(key_id, 0.0) > now:
                return snapshot
            rate = float(self.config.read_through_per_second)
            self._tokens = min(rate, self._tokens + (now - self._tokens_at) * rate)
            self._tokens_at = now
            if self._tokens < 1.0:
                raise DirectoryUnavailable(
                    f"more than {self.config.read_through_per_second} logins per second with "
                    "key ids not in this copy (directory.ldap.read_through_per_second); "
                    "answering temporarily")
            self._tokens -= 1.0
        if not self._key_in_ldap(key_id):
            with self._gate:
                if len(self._absent) >= _ABSENT_LIMIT:
                    now = self._clock()
                    self._absent = {k: t for k, t in self._absent.items() if t > now}
                    while len(self._absent) >= _ABSENT_LIMIT:  # the oldest go first
                        del self._absent[next(iter(self._absent))]
                self._absent[key_id] = self._clock() + self.config.negative_cache
            return self.snapshot()
        log.info("API key %s is in LDAP but not in this copy yet: refreshing now", key_id)
        self._refresh()
        if key_id not in self.snapshot().keys:
            # written without the keyrelay CLI (krSerial did not move): read everything
            self._refresh(force=True)
        return self.snapshot()

    def _key_in_ldap(self, key_id: str) -> bool:
        """One subtree search for the key's entry, on the read-through's own connection."""
        with self._lookup_lock:
            if self._lookup_conn is None:
                self._lookup_conn = self._guarded(self.connect)
            conn = self._lookup_conn
            try:
                return bool(self._guarded(lambda: self._search_key(conn, key_id)))
            except BaseException:
                self._lookup_conn = None
                unbind(conn)
                raise

    def _search_key(self, conn: Connection, key_id: str) -> bool:
        return searches.key_exists(conn, self.base, key_id)

    def _refresh(self, force: bool = False) -> None:
        with self._refresh_lock:
            self._refresh_now(force)

    def _refresh_now(self, force: bool = False) -> None:
        """Poll krSerial, reload when it moved; the connection is kept between polls and
        opened again only after an error. The contact time recorded is the moment the serial
        was asked for, not its answer: the copy's age counts from the moment LDAP was asked,
        so a slow answer does not lengthen how long a change may go unseen."""
        if self._poll_conn is None:
            self._poll_conn = self._guarded(self.connect)
        conn = self._poll_conn
        try:
            asked = self._clock()
            serial, _ = self._guarded(lambda: searches.serial_of(conn, self.base))
            now, known = self._clock(), self._serial
            stale = now - self._loaded_at > self.config.full_reload_interval
            if force or stale or known is None or serial is None:
                self._reload(conn, now)
            elif serial != known:
                log = self._guarded(lambda: changed_since(conn, self.base, known))
                if log is None:
                    self._reload(conn, now)
                else:
                    self._apply(conn, *log)
            self._contact = asked
        except BaseException:
            self._poll_conn = None
            unbind(conn)
            raise

    def _reload(self, conn: Connection, now: float) -> None:
        """Everything again: the first load, every full_reload_interval, and whenever the
        change log cannot say what changed."""
        entries, serial, monitor = self._guarded(lambda: self._read_entries(conn))
        if serial is None:
            raise DirectoryUnavailable(f"LDAP base {self.base} is not a keyrelay directory yet")
        self._snapshot = Directory(self._records(entries, monitor))
        self._entries = entries
        self._serial = serial
        self._loaded_at = now
        self._told(True)

    def _apply(self, conn: Connection, serial: int, monitor: bool, changed: list[str]) -> None:
        """Fetch only the entries the change log names and rebuild the copy from memory."""
        entries = dict(self._entries)
        for dn in dict.fromkeys(changed):
            found = self._guarded(lambda: searches.fetch(conn, dn))  # noqa: B023 - called now
            if found is None:
                entries.pop(dn_key(dn), None)
            else:
                entries[dn_key(found[0])] = found
        self._snapshot = Directory(self._records(entries, monitor))
        self._entries = entries
        self._serial = serial
        self._told(True)

    def _start_refresher(self) -> None:
        if self._refresher is not None:
            return
        self._refresher = threading.Thread(target=self._run, name="keyrelay-ldap-refresh",
                                           daemon=True)
        self._refresher.start()

    def _run(self) -> None:
        while not self._stop.wait(self.config.refresh_interval):
            try:
                self._refresh()
            except DirectoryUnavailable as exc:
                self._error = str(exc)
            except Exception as exc:  # noqa: BLE001 - keep refreshing; the copy ages out
                self._error = f"internal error: {exc!r}"
            else:
                continue
            self._told(False)

    def _told(self, ok: bool) -> None:
        """Tell ``on_reload`` (the metrics); a failure there must not stop the refresher."""
        if self.on_reload is not None:
            try:
                self.on_reload(ok)
            except Exception:  # logged; the copy is what matters
                log.exception("directory reload not counted")

    def close(self) -> None:
        self._stop.set()
        if self._poll_conn is not None:
            unbind(self._poll_conn)
        if self._lookup_conn is not None:
            unbind(self._lookup_conn)

    # -- writing -------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self, create: bool = True) -> Iterator[DirectoryData]:
        """Read, let the caller change the records, write the difference (writes.py)."""
        conn = self._guarded(self.connect)
        try:
            data, serial = self._guarded(lambda: self._read_all(conn))
            if serial is None and not create:
                raise DirectoryUnavailable(f"LDAP base {self.base} is not a keyrelay "
                                           "directory yet")
            before = entries_of(data, self.base)
            monitor_before = data.monitor
            yield data
            after = entries_of(data, self.base)
            if before == after and data.monitor == monitor_before and serial is not None:
                return
            self._guarded(lambda: writes.write_difference(conn, self.base, serial, before, after,
                                                             data.monitor))
        finally:
            unbind(conn)

    def record_key_use(self, used: dict[str, datetime],
                       give_up: Callable[[], bool] | None = None) -> set[str]:
        """Keys' last-used times from a daemon, written to the key entries directly; the
        ids not recorded because ``give_up()`` turned true (a stopping daemon's deadline).

        No decision reads them, so ``krSerial`` is left alone: a flush would otherwise make
        every relay node read the whole directory again. A time is only ever moved forward
        (several nodes flush the same key); keys removed meanwhile are skipped. One modify
        per key (about 8 ms each against a local slapd that syncs every write): a stopping
        daemon gives up at its deadline rather than hold up its stop.
        """
        conn = self._guarded(self.connect)
        try:
            legacy = {i: w for i, w in used.items() if i.endswith(":legacy")}
            keys_used = {i: w for i, w in used.items() if i not in legacy}
            left = self._guarded(lambda: writes.write_key_use(conn, self.base, keys_used,
                                                              give_up))
            if legacy and not left:
                self._guarded(lambda: writes.write_legacy_use(conn, self.base, legacy))
        finally:
            unbind(conn)
        return left


def _schema_hint(exc: LDAPException) -> str:
    """For a write slapd refuses because its keyrelay schema is older than this release (an
    attribute added since, such as krMessagesPerDay): how to upgrade it."""
    text = str(exc)
    if ("undefinedAttributeType" in text or "objectClassViolation" in text) and " kr" in text:
        return (" (the server's keyrelay schema is older than this keyrelay: load "
                "ldap/keyrelay-upgrade.ldif, docs/ldap.md \"Upgrading the schema\")")
    return ""
