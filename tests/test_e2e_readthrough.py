"""A key created a moment ago works at its very first login (issue 18), through the real private
Postfix, keyrelay-policyd and keyrelay-milter reading a real slapd.

The relay here refreshes its copy of the directory only every five minutes, so within these
tests only the read-through (docs/ldap.md, "Read-through") can bring a new key to the daemons:
without it every first login below is a 535. slapd runs with ``-d stats``, so the LDAP reads
that guessed key ids cause are counted from slapd's own log, not from keyrelay's counters.
"""

from __future__ import annotations

import re
import smtplib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyrelay import keys
from keyrelay.demo import Relay
from testkit.net import wait_until
from testkit.protocols import DovecotClient, PolicyClient
from testkit.protocols import connect as connect_socket
from testkit.relay import connect, message, new_key, new_tenant, private_relay, send, wait_delivered
from testkit.slapd import KEYRELAY_INDEXES, SLAPD, Slapd

REFRESH = 300.0  # longer than the module runs: no background refresh brings a new key
BUDGET = 10  # directory.ldap.read_through_per_second
# Generous deadlines for conditions (never a measure of speed): a slow machine meets them.
DEADLINE = 60.0


@pytest.fixture(scope="module")
def slapd_stats() -> Iterator[Slapd]:
    if not SLAPD.exists():
        pytest.skip("slapd is not installed (make test installs it)")
    with Slapd(indexes=KEYRELAY_INDEXES, debug="stats") as server:
        yield server


@pytest.fixture(scope="module")
def relay(slapd_stats: Slapd) -> Iterator[Relay]:
    if not Path("/usr/sbin/postfix").exists():
        pytest.skip("Postfix is not installed (make test installs it)")
    section = slapd_stats.directory_config(
        refresh_interval=f"{REFRESH:g}s", full_reload_interval=f"{REFRESH:g}s",
        read_through_per_second=BUDGET, negative_cache="60s",
        # a lookup waiting on a hung slapd gives up after this: well after the test's other
        # login, however slow the machine (the default is 5 s)
        timeout="20s")
    with private_relay("127.0.0.4", section) as started:
        yield started


def unread_by_slapd(port: int) -> int:
    """Bytes that clients sent to slapd's ``port`` and slapd has not read yet (the receive
    queues of its established loopback connections, from /proc/net/tcp)."""
    waiting = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, queues = fields[1], fields[3], fields[4]
        if int(local.rpartition(":")[2], 16) == port and state == "01":  # ESTABLISHED
            waiting += int(queues.partition(":")[2], 16)
    return waiting


def login(relay: Relay, key: str, source: str | None = None) -> tuple[int, str]:
    with connect(relay, "submission", source=source) as client:
        try:
            return client.login("apikey", key)[0], ""
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code, (exc.smtp_error.decode() if isinstance(exc.smtp_error, bytes)
                                   else exc.smtp_error)
        except smtplib.SMTPServerDisconnected:
            return 0, "disconnected"


def test_a_new_tenant_sends_at_its_first_try_and_twenty_new_keys_each_log_in_at_once(
        relay: Relay) -> None:
    # a new account, subuser, domain and key, all written to LDAP after the daemons loaded
    # their copy: the login (policyd) and the message (milter) each read the key through
    tenant = new_tenant(relay)
    mid, text = message(tenant.sender, "rcpt@example.net", "first try")
    send(relay, "submission", tenant.key, tenant.sender, text)  # no retry: raises on a 4xx
    dump, _ = wait_delivered(relay, mid)
    assert dump.count(b"DKIM-Signature:") == 2

    answers = []
    for _ in range(20):
        key, _ = new_key(relay, tenant.principal)
        answers.append(login(relay, key))
    assert answers == [(235, "")] * 20


def guessing_searches(slapd: Slapd, guessed: set[str]) -> int:
    """slapd's SRCH operations (its -d stats log) that asked for one of ``guessed``."""
    text = slapd.log_path.read_text(errors="replace")
    return sum(1 for match in re.finditer(r"SRCH base=.*krKeyId=([a-z2-7]{16})\)", text)
               if match.group(1) in guessed)


def test_guessed_key_ids_at_a_high_rate_cost_ldap_only_the_budget_and_lock_only_the_guesser(
        relay: Relay, slapd_stats: Slapd) -> None:
    tenant = new_tenant(relay)
    assert login(relay, tenant.key) == (235, "")  # now in the copy
    endpoint = f"unix:{relay.settings.socket('auth')}"

    # 1. one address guessing: locked out after max_failures_per_address (10) real misses
    guess = keys.generate().text
    with DovecotClient(connect_socket(endpoint)) as client:
        client.handshake()
        replies = [client.plain("apikey", guess, rip="127.66.0.1") for _ in range(11)]
    assert [r.status for r in replies] == ["FAIL"] * 11
    assert "too many failed logins from 127.66.0.1" in replies[-1].reason
    # one address cannot spend the budget alone: however many different ids it guesses, it
    # causes at most max_failures_per_address (10) searches, then its lock-out stops it
    # before any look-up (docs/ldap.md, "Read-through"). A guess past the budget of the
    # moment is answered temporarily (a closed connection) and counts for nothing, so the
    # guesser goes on until the budget has refilled enough for its tenth real miss.
    alone: list[keys.NewKey] = []
    deadline = time.monotonic() + 60  # generous: the budget refills at 10 per second
    while time.monotonic() < deadline:
        alone.append(keys.generate())
        with DovecotClient(connect_socket(endpoint), timeout=DEADLINE) as client:
            client.handshake()
            reply = client.plain("apikey", alone[-1].text, rip="127.67.0.1")
        assert reply.status in ("FAIL", "CLOSED"), reply
        if "too many failed logins from 127.67.0.1" in reply.reason:
            break
        time.sleep(0.02)
    assert "too many failed logins from 127.67.0.1" in reply.reason
    for key in [keys.generate() for _ in range(20)]:  # locked: no look-up at all
        with DovecotClient(connect_socket(endpoint), timeout=DEADLINE) as client:
            client.handshake()
            assert "too many failed logins" in client.plain("apikey", key.text,
                                                            rip="127.67.0.1").reason
        alone.append(key)
    assert guessing_searches(slapd_stats, {k.key_id for k in alone}) <= 10

    # 2. a flood of guessed key ids from many addresses, each used once, by four clients
    guesses = [keys.generate() for _ in range(4000)]
    guessed = {g.key_id for g in guesses}
    before = guessing_searches(slapd_stats, guessed)
    statuses: dict[str, int] = {}
    lock = threading.Lock()

    def flood(part: list[keys.NewKey], worker: int) -> None:
        client: DovecotClient | None = None
        for n, key in enumerate(part):
            if client is None:
                client = DovecotClient(connect_socket(endpoint, DEADLINE), timeout=DEADLINE)
                client.handshake()
            reply = client.plain("apikey", key.text, rip=f"127.{100 + worker}.{n // 250}.{n % 250}")
            with lock:
                statuses[reply.status] = statuses.get(reply.status, 0) + 1
            if reply.status == "CLOSED":  # a temporary answer: Postfix's 454, a new connection
                client.close()
                client = None
        if client is not None:
            client.close()

    threads = [threading.Thread(target=flood, args=(guesses[i::4], i)) for i in range(4)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    print(f"{len(guesses)} guesses in {elapsed:.2f}s ({len(guesses) / elapsed:.0f}/s): "
          f"{statuses}")
    assert sum(statuses.values()) == len(guesses)
    assert set(statuses) <= {"FAIL", "CLOSED"}  # refused or temporary, never OK
    assert statuses.get("CLOSED", 0) > 0, "the budget was never reached: no test of it"

    # slapd's own count: the burst plus the budget for every second the flood lasted
    # slapd writes its log as it answers; wait for it rather than read it at once
    wait_until(lambda: guessing_searches(slapd_stats, guessed) > before, DEADLINE,
               "slapd's log of the lookups")
    searches = guessing_searches(slapd_stats, guessed) - before
    assert 0 < searches <= BUDGET * (elapsed + 1) + BUDGET, (searches, elapsed)

    # 3. nobody else is locked out: the tenant's key, and a brand-new key, from another
    # address (a new key may get a temporary 454 while the budget refills; never a 535)
    assert login(relay, tenant.key, source="127.0.2.1") == (235, "")
    fresh, _ = new_key(relay, tenant.principal)
    answers: list[tuple[int, str]] = []

    def logged_in() -> bool:
        answers.append(login(relay, fresh, source="127.0.2.2"))
        # only a temporary answer is waited out: a 535 is final (and retrying it would count
        # towards a lock-out)
        assert answers[-1][0] in (235, 454, 0), answers
        return answers[-1][0] == 235

    wait_until(logged_in, DEADLINE, "the new key accepted")
    assert all(code in (235, 454, 0) for code, _ in answers), answers


def test_a_lookup_waiting_for_ldap_holds_up_no_other_login_and_ends_temporarily(
        relay: Relay, slapd_stats: Slapd) -> None:
    tenant = new_tenant(relay)
    assert login(relay, tenant.key) == (235, "")  # now in the copy
    endpoint = f"unix:{relay.settings.socket('auth')}"
    finished: list[str] = []
    waiting: dict[str, str] = {}

    def guess() -> None:
        # LDAP hung: the lookup waits for directory.ldap.timeout (20 s), then gives up
        with DovecotClient(connect_socket(endpoint), timeout=DEADLINE) as client:
            client.handshake()
            waiting["status"] = client.plain("apikey", keys.generate().text,
                                             rip="127.77.0.1").status
        finished.append("guess")

    slapd_stats.pause()
    try:
        guesser = threading.Thread(target=guess)
        guesser.start()
        # the guess's lookup is in flight: its request waits, unread, in the stopped slapd's
        # socket (nothing else asks LDAP here: the relay refreshes every REFRESH seconds)
        wait_until(lambda: unread_by_slapd(slapd_stats.port), DEADLINE,
                   "the guess's LDAP request to reach the stopped slapd")
        with DovecotClient(connect_socket(endpoint), timeout=DEADLINE) as client:
            client.handshake()
            reply = client.plain("apikey", tenant.key, rip="127.77.0.2")
        finished.append("known key")
        guesser.join(DEADLINE)
    finally:
        slapd_stats.resume()
    assert reply.status == "OK"
    # the known key was answered from the copy while the other login waited for LDAP (the
    # event loop never waits for LDAP); that one then ended temporarily (Postfix: 454)
    assert finished == ["known key", "guess"] and waiting["status"] == "CLOSED"
    # a temporary answer counts against nobody: the same address logs in
    with DovecotClient(connect_socket(endpoint)) as client:
        client.handshake()
        assert client.plain("apikey", tenant.key, rip="127.77.0.1").status == "OK"


def test_a_message_of_a_key_this_process_has_not_read_is_looked_up_not_deferred(
        relay: Relay) -> None:
    """With worker processes (keyrelay/supervisor.py) a key's first login may be read through
    by one policyd worker and its first message decided by another, whose copy lacks the key:
    that one reads it through too, instead of answering 451 key_not_in_copy until its next
    refresh (here five minutes). The policy request is sent without a login through this
    process, as the other worker's session would reach it."""
    with PolicyClient(connect_socket(f"unix:{relay.settings.socket('policy')}")) as policy:
        policy.ask(protocol_state="RCPT")  # the daemon's copy is loaded now, if it was not
        tenant = new_tenant(relay)  # its key is in LDAP, not in the daemon's copy
        action = policy.ask(protocol_state="RCPT", policy_context="submission",
                            sasl_method="PLAIN", sender=tenant.sender,
                            sasl_username=f"{tenant.principal}:{tenant.key_id}",
                            client_address="127.0.0.1")
    assert action is not None and "is not in this server's copy" not in action, action
    assert action.startswith("FILTER kr-pool-") or action == "DUNNO", action
