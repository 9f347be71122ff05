"""What only the LDAP backend does, against a real slapd (testkit/slapd.py): a
concurrent writer is refused instead of losing an update; a server that stops or hangs makes
the directory unavailable within the documented bound (temporary answers), and it comes back
by itself, without restarting the reader. What every backend does alike is in
test_directory_contract.py."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import ldap3
import pytest
from test_yaml_directory import build_rich_directory

from keyrelay import admin
from keyrelay.config import parse_config
from keyrelay.directory.ldap import LdapDirectory, changelog
from keyrelay.directory.model import Directory, DirectoryData
from keyrelay.errors import DirectoryConflict, DirectoryUnavailable
from testkit.net import free_port, wait_until
from testkit.slapd import KEYRELAY_INDEXES, SLAPD, Slapd, records_hidden_acls


@pytest.fixture
def ldap_dir(slapd: Any) -> LdapDirectory:
    config = parse_config({"directory": slapd.directory_config(refresh_interval=0.2)}, "t.yaml")
    directory = LdapDirectory(config.directory.ldap)
    with directory.transaction() as data:  # start every test from an empty directory
        admin.replace_all(data, DirectoryData())
    return directory


def test_a_concurrent_writer_is_refused_not_lost(ldap_dir: LdapDirectory) -> None:
    other = LdapDirectory(ldap_dir.config)
    with pytest.raises(DirectoryConflict), ldap_dir.transaction() as data:
        admin.add_account(data, "first", datetime.now(UTC))
        with other.transaction() as theirs:
            admin.add_account(theirs, "second", datetime.now(UTC))
    assert set(ldap_dir.load().accounts) == {"second"}



def test_last_used_times_do_not_make_the_readers_reload(ldap_dir: LdapDirectory) -> None:
    with ldap_dir.transaction() as data:
        admin.add_account(data, "acme", datetime.now(UTC))
        new = admin.create_key(data, "acme", "crm", ("mail.send",), None, datetime.now(UTC))
    reader = LdapDirectory(ldap_dir.config)
    first = reader.snapshot()

    ldap_dir.record_key_use({new.key_id: datetime.now(UTC)})
    written = reader._clock()
    # two of the reader's polls asked for the serial after the write (60 s: a slow machine)
    wait_until(lambda: reader._contact > written, 60, "a poll after the write")
    polled = reader._contact
    wait_until(lambda: reader._contact > polled, 60, "a second poll after the write")

    assert reader.snapshot() is first  # the serial did not move: nothing to reload
    assert ldap_dir.load().keys[new.key_id].last_used is not None
    reader.close()



def test_a_stopping_daemon_gives_up_writing_last_used_times_at_its_deadline(
        ldap_dir: LdapDirectory) -> None:
    with ldap_dir.transaction() as data:
        admin.add_account(data, "acme", datetime.now(UTC))
        new = admin.create_key(data, "acme", "crm", ("mail.send",), None, datetime.now(UTC))

    left = ldap_dir.record_key_use({new.key_id: datetime.now(UTC)},
                                   give_up=lambda: True)

    assert left == {new.key_id}
    assert ldap_dir.load().keys[new.key_id].last_used is None
    assert ldap_dir.record_key_use({new.key_id: datetime.now(UTC)},
                                   give_up=lambda: False) == set()
    assert ldap_dir.load().keys[new.key_id].last_used is not None

# -- the change log: readers fetch only what a write changed ---------------------------------
def manual_reader(ldap_dir: LdapDirectory, reads: list[int]) -> LdapDirectory:
    """A reader whose refresher never runs by itself (the test calls ``_refresh``), counting
    its full reads in ``reads``."""
    config = parse_config({"directory": {"backend": "ldap", "ldap": {
        **_ldap_settings(ldap_dir), "refresh_interval": 3600}}}, "t.yaml")
    reader = LdapDirectory(config.directory.ldap)
    whole = reader._read_entries

    def counted(conn: Any) -> Any:
        reads.append(1)
        return whole(conn)

    reader._read_entries = counted  # type: ignore[method-assign]
    return reader


def _ldap_settings(directory: LdapDirectory) -> dict[str, Any]:
    c = directory.config
    return {"urls": list(c.urls), "start_tls": c.start_tls, "ca_file": c.ca_file,
            "base_dn": c.base_dn, "bind_dn": c.bind_dn,
            "bind_password_file": c.bind_password_file}


def same(snapshot: Directory, data: DirectoryData) -> bool:
    return (dict(snapshot.accounts) == data.accounts and dict(snapshot.subusers) == data.subusers
            and dict(snapshot.keys) == data.keys and dict(snapshot.domains) == data.domains
            and dict(snapshot.pools) == data.pools and snapshot.monitor == data.monitor
            and {(p, a) for p in {*data.accounts, *data.subusers, "acme", "beta"}
                 for a in snapshot.sender_addresses_of(p)} == set(data.senders))


def test_a_reader_follows_writes_by_fetching_only_the_changed_entries(
        ldap_dir: LdapDirectory) -> None:
    reads: list[int] = []
    reader = manual_reader(ldap_dir, reads)
    reader.snapshot()  # the first, full read
    t0 = datetime.now(UTC)
    steps: list[Callable[[DirectoryData], object]] = [
        lambda d: build_rich_directory(d),
        lambda d: admin.revoke_key(d, next(k for k in d.keys.values()
                                           if k.revoked is None).key_id, t0),
        lambda d: admin.set_monitor(d, None, False),
        lambda d: admin.ungrant_domain(d, "example.com", "acme/marketing"),
        lambda d: admin.remove_sender(d, "beta", "news@example.org"),
        # characters a DN escapes, which slapd spells otherwise (\2B) than keyrelay (\+)
        lambda d: admin.add_sender(d, "acme", "a+b=c#d@example.net", t0),
        lambda d: admin.remove_sender(d, "acme", "a+b=c#d@example.net"),
        lambda d: admin.remove_domain(d, "example.com"),  # with its selectors
        lambda d: admin.remove_subuser(d, "acme/marketing"),  # with its key and sender
        lambda d: admin.remove_account(d, "beta"),
    ]
    for step in steps:
        with ldap_dir.transaction() as data:
            step(data)
        reader._refresh()
        assert same(reader.snapshot(), ldap_dir.load()), step
    assert len(reads) == 1
    reader.close()


def test_a_write_too_large_to_list_makes_readers_read_everything(
        ldap_dir: LdapDirectory, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []
    reader = manual_reader(ldap_dir, reads)
    reader.snapshot()
    monkeypatch.setattr(changelog, "CHANGE_LIST_LIMIT", 3)
    with ldap_dir.transaction() as data:
        build_rich_directory(data)  # far more than 3 entries
    reader._refresh()
    assert len(reads) == 2 and same(reader.snapshot(), ldap_dir.load())
    reader.close()


def test_the_change_log_is_pruned_and_a_reader_too_far_behind_reads_everything(
        ldap_dir: LdapDirectory, slapd: Slapd, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(changelog, "CHANGE_LOG_SERIALS", 6)  # three writes
    reads: list[int] = []
    reader = manual_reader(ldap_dir, reads)
    reader.snapshot()
    for name in ("a1", "a2", "a3", "a4", "a5"):
        with ldap_dir.transaction() as data:
            admin.add_account(data, name, datetime.now(UTC))
    conn = slapd.admin()
    conn.search(slapd.base_dn, "(objectClass=*)", search_scope=ldap3.BASE,
                attributes=["krChange"])
    logged = sorted(str(v) for v in conn.entries[0].krChange.values)
    conn.unbind()
    assert len(logged) == 3 and all(",ou=accounts," in v for v in logged)

    reader._refresh()  # five writes behind, the log keeps three: everything again
    assert len(reads) == 2 and same(reader.snapshot(), ldap_dir.load())
    reader.close()

@pytest.fixture
def own_slapd() -> Iterator[Slapd]:
    """A slapd this test may stop and pause (the session's is shared)."""
    if not SLAPD.exists():
        pytest.skip("slapd is not installed (make test installs it)")
    with Slapd(indexes=KEYRELAY_INDEXES) as server:
        yield server


def reader_of(server: Slapd, **overrides: Any) -> LdapDirectory:
    settings = {"refresh_interval": 0.2, "timeout": 1, **overrides}
    config = parse_config({"directory": server.directory_config(**settings)}, "t.yaml")
    return LdapDirectory(config.directory.ldap)


def available(directory: LdapDirectory) -> bool:
    try:
        directory.snapshot()
    except DirectoryUnavailable:
        return False
    return True


def test_a_stopped_server_is_unavailable_then_recovers_without_a_restart(
        own_slapd: Slapd) -> None:
    reader = reader_of(own_slapd)
    with reader.transaction() as data:
        admin.add_account(data, "acme", datetime.now(UTC))
    assert "acme" in reader.snapshot().accounts
    bound = 0.2 + 1  # refresh_interval + timeout (docs/ldap.md)

    own_slapd.stop()
    wait_until(lambda: not available(reader), bound + 10, "the directory unavailable")
    with pytest.raises(DirectoryUnavailable, match=r"LDAP unreachable for more than 1\.2s"):
        reader.snapshot()
    with pytest.raises(DirectoryUnavailable, match=re.escape(own_slapd.url)), reader.transaction():
        pass  # the CLI's writes fail as clearly

    own_slapd.start()
    with reader_of(own_slapd).transaction() as data:
        admin.add_account(data, "later", datetime.now(UTC))
    wait_until(lambda: available(reader) and "later" in reader.snapshot().accounts, 10,
               "the same reader serving again, with the change made meanwhile")
    reader.close()


def test_a_hung_server_is_unavailable_then_recovers(own_slapd: Slapd) -> None:
    reader = reader_of(own_slapd)
    with reader.transaction() as data:
        admin.add_account(data, "acme", datetime.now(UTC))
    assert available(reader)

    own_slapd.pause()  # the kernel still accepts connections; nothing answers
    try:
        wait_until(lambda: not available(reader), 0.2 + 1 + 10, "the directory unavailable")
    finally:
        own_slapd.resume()
    wait_until(lambda: available(reader), 10, "the reader serving again")
    reader.close()


def test_records_hidden_by_acls_are_unavailable_not_an_empty_directory(
        own_slapd: Slapd) -> None:
    reader = reader_of(own_slapd, full_reload_interval=1)
    with reader.transaction() as data:
        admin.add_account(data, "acme", datetime.now(UTC))
    assert available(reader)

    # the service DN still binds and reads the base entry (its serial), nothing under it: a
    # search finds nothing, which must not pass for an empty directory (every key unknown)
    own_slapd.set_acls(records_hidden_acls())
    try:
        with pytest.raises(DirectoryUnavailable) as info:
            reader_of(own_slapd).snapshot()  # a daemon starting now
        assert str(info.value) == (
            f"LDAP base {own_slapd.base_dn} is a keyrelay directory, but ou=accounts, "
            f"ou=keys, ou=domains, ou=senders, ou=pools cannot be read as "
            f"{own_slapd.service_dn}: the server's ACLs hide the records (docs/ldap.md: "
            "The service DN, ACLs and limits)")
        with pytest.raises(DirectoryUnavailable, match="ACLs hide the records"), \
                reader.transaction():
            pass  # the CLI writes nothing
        # the running reader: unavailable once its full read failed and its copy is old
        wait_until(lambda: not available(reader), 1 + 0.2 + 1 + 10, "the reader unavailable")
    finally:
        own_slapd.set_acls(own_slapd.acls)
    wait_until(lambda: available(reader) and "acme" in reader.snapshot().accounts, 10,
               "the reader serving again")
    reader.close()


def test_stale_grace_serves_the_last_copy_only_when_the_admin_allows_it(
        own_slapd: Slapd) -> None:
    strict, lenient = reader_of(own_slapd), reader_of(own_slapd, stale_grace=60)
    with strict.transaction() as data:
        admin.add_account(data, "acme", datetime.now(UTC))
    assert available(strict) and available(lenient)

    own_slapd.stop()
    wait_until(lambda: not available(strict), 15, "the strict reader unavailable")
    time.sleep(0.5)  # both last reached LDAP before it stopped: the lenient copy is as old
    assert "acme" in lenient.snapshot().accounts  # still served, within its grace
    strict.close()
    lenient.close()


def test_servers_are_tried_in_order_and_every_fault_is_named(slapd: Slapd) -> None:
    dead = f"ldap://127.0.0.1:{free_port()}"
    config = parse_config({"directory": slapd.directory_config(urls=[dead, slapd.url])},
                          "t.yaml")
    LdapDirectory(config.directory.ldap).load(missing_ok=True)  # the second one answered

    config = parse_config({"directory": slapd.directory_config(
        urls=[dead, slapd.ldaps_url], ca_file=str(slapd.server_cert))}, "t.yaml")
    with pytest.raises(DirectoryUnavailable) as info:
        LdapDirectory(config.directory.ldap).load()
    text = str(info.value)
    assert f"{dead}: socket connection error" in text and "Connection refused" in text
    assert f"{slapd.ldaps_url}: " in text and "certificate verify failed" in text.lower()


# -- read-through (issue 18): a key created a moment ago works at its first login ----------------
class FrozenClock:
    """The reader's monotonic clock, moved only by the test: the budget is exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def counting_reader(server: Slapd, clock: FrozenClock, **overrides: Any
                    ) -> tuple[LdapDirectory, list[str]]:
    """A reader whose background refresh never runs during the test, and the key ids it
    searched LDAP for."""
    # a generous LDAP timeout: the clock is frozen, time is not what these tests measure
    settings = {"refresh_interval": 600, "timeout": 30, **overrides}
    config = parse_config({"directory": server.directory_config(**settings)}, "t.yaml")
    reader = LdapDirectory(config.directory.ldap, clock=clock)
    searched: list[str] = []
    search = reader._search_key

    def counted(conn: Any, key_id: str) -> bool:
        searched.append(key_id)
        return search(conn, key_id)

    reader._search_key = counted  # type: ignore[method-assign]
    return reader, searched


def test_a_key_created_after_the_copy_was_loaded_is_read_through(own_slapd: Slapd) -> None:
    writer = reader_of(own_slapd)
    with writer.transaction() as data:
        admin.add_account(data, "acme", datetime.now(UTC))
    reader, searched = counting_reader(own_slapd, FrozenClock())
    assert reader.reads_through and not reader.snapshot().keys  # the copy is loaded
    with writer.transaction() as data:
        admin.add_subuser(data, "acme/app", datetime.now(UTC))
        created = admin.create_key(data, "acme/app", "new", ("mail.send",), None,
                                   datetime.now(UTC))
    key_id = created.key_id
    assert key_id not in reader.snapshot().keys  # no refresh ran
    fresh = reader.fresh_for_key(key_id)
    assert fresh.keys[key_id].principal == "acme/app" and "acme/app" in fresh.subusers
    assert reader.snapshot() is fresh and searched == [key_id]
    assert reader.fresh_for_key(key_id) is fresh and searched == [key_id]  # in the copy now
    reader.close()


def test_an_absent_key_id_is_asked_once_within_the_negative_cache_and_reads_are_budgeted(
        own_slapd: Slapd) -> None:
    with reader_of(own_slapd).transaction() as data:
        admin.add_account(data, "acme", datetime.now(UTC))
    clock = FrozenClock()
    reader, searched = counting_reader(own_slapd, clock, read_through_per_second=3,
                                       negative_cache=5)
    reader.snapshot()
    guesses = [f"{'abcdefgh'[i]}" * 16 for i in range(5)]
    assert guesses[0] not in reader.fresh_for_key(guesses[0]).keys
    assert guesses[0] not in reader.fresh_for_key(guesses[0]).keys  # remembered: not asked
    assert searched == [guesses[0]]
    reader.fresh_for_key(guesses[1])
    reader.fresh_for_key(guesses[2])
    with pytest.raises(DirectoryUnavailable, match="read_through_per_second"):
        reader.fresh_for_key(guesses[3])  # the burst of 3 is spent: temporary, not "absent"
    assert searched == guesses[:3]
    clock.now += 1 / 3  # a third of a second earns one read
    reader.fresh_for_key(guesses[3])
    with pytest.raises(DirectoryUnavailable):
        reader.fresh_for_key(guesses[4])
    clock.now += 5.1  # the negative cache ran out: asked again
    reader.fresh_for_key(guesses[0])
    assert searched == [*guesses[:4], guesses[0]]
    reader.close()


def test_a_key_written_without_the_cli_is_found_by_reading_everything(
        own_slapd: Slapd) -> None:
    writer = reader_of(own_slapd)
    with writer.transaction() as data:
        admin.add_account(data, "acme", datetime.now(UTC))
        created = admin.create_key(data, "acme", "first", ("mail.send",), None,
                                   datetime.now(UTC))
    reader, _ = counting_reader(own_slapd, FrozenClock())
    reader.snapshot()
    # an LDAP admin copies the key's entry under a new id by hand: krSerial does not move
    conn = own_slapd.admin()
    try:
        base = own_slapd.base_dn
        conn.search(f"ou=keys,{base}", f"(krKeyId={created.key_id})", attributes=["*"])
        entry = conn.response[0]["attributes"]
        new_id = "z" * 16
        attrs = {k: v for k, v in entry.items() if k not in ("krKeyId", "krLastUsed")}
        assert conn.add(f"krKeyId={new_id},ou=keys,{base}", attributes={**attrs,
                                                                         "krKeyId": new_id})
    finally:
        conn.unbind()
    assert new_id in reader.fresh_for_key(new_id).keys
    reader.close()


def test_a_read_through_while_ldap_is_down_is_unavailable_not_absent(own_slapd: Slapd) -> None:
    with reader_of(own_slapd).transaction() as data:
        admin.add_account(data, "acme", datetime.now(UTC))
    reader, _ = counting_reader(own_slapd, FrozenClock())
    reader.snapshot()
    own_slapd.stop()
    with pytest.raises(DirectoryUnavailable, match=re.escape(own_slapd.url)):
        reader.fresh_for_key("q" * 16)
    own_slapd.start()
    assert "q" * 16 not in reader.fresh_for_key("q" * 16).keys  # asked again: not remembered
    reader.close()
