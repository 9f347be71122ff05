"""keyrelay-policyd as a process on real sockets, driven by clients that speak each Postfix hook
exactly as Postfix 3.7.11 does: Dovecot SASL auth, policy delegation and socketmap.

One module-scoped daemon (``relay``) serves most tests; tests that need their own settings,
signals or a stopped daemon start one with ``spawn``. Tests sharing ``relay`` use their own
client addresses and keys, so brute-force counters and rate limits never leak between them.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import resource
import select
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from keyrelay import admin, keys
from keyrelay.config.loader import parse_config
from keyrelay.directory.model import Status
from testkit.net import wait_until
from testkit.policyd import (
    POLICYD,
    Key,
    Policyd,
    add_key,
    add_verified_domain,
    broken_directory,
    capabilities_of_every_thread,
    fresh_address,
    now,
    proc_status,
)
from testkit.protocols import (
    AuthReply,
    DovecotClient,
    PolicyClient,
    SocketmapClient,
    b64,
    closed_by_peer,
    connect,
    encode_policy,
    netstring,
    new_instance,
    peer_name,
    policy_request,
)

APIKEY = "apikey"
HANDSHAKE = b"VERSION\t1\t0\nCPID\t4242\n"

# Small thresholds so every limit can be reached in a few requests.
MAIN_SETTINGS: dict[str, Any] = {
    "keys": {"last_used_flush_interval": "1s"},
    "policyd": {
        "request_timeout": "1s",
        "idle_timeout": "10m",
        "max_request_size": 2048,
        "bruteforce": {"max_failures_per_address": 3, "max_failures_per_key": 3,
                       "window": "10m", "lockout": "15m"},
    },
}


@dataclass
class Site:
    """A running keyrelay-policyd and the keys of its directory: what the tests talk to."""

    daemon: Policyd
    keys: dict[str, Key]

    def auth(self) -> DovecotClient:
        client = DovecotClient(connect(self.daemon.endpoint("auth")))
        client.handshake()
        return client

    def policy(self) -> PolicyClient:
        return PolicyClient(connect(self.daemon.endpoint("policy")))

    def socketmap(self) -> SocketmapClient:
        return SocketmapClient(connect(self.daemon.endpoint("socketmap")))

    def login(self, key: Key, rip: str | None = None) -> str:
        """Log in as Postfix would; the SASL user name it then carries (principal:keyid)."""
        with self.auth() as auth:
            reply = auth.plain(APIKEY, key.text, rip=rip or fresh_address())
        assert reply.status == "OK", reply
        assert reply.user is not None
        return reply.user


def populate(daemon: Policyd) -> dict[str, Key]:
    """The tenants of the shared daemon, written with keyrelay.admin in one transaction."""
    made: dict[str, Key] = {}
    when = now()
    with daemon.directory().transaction() as data:
        admin.add_pool(data, "mkt", ["192.0.2.25"], "mkt.relay.example.net", when)
        # acme: its subusers send as the account's verified domain; acme/app via pool mkt
        admin.add_account(data, "acme", when)
        subusers = ("acme/app", "acme/limited", "acme/counted", "acme/rcpt")
        for sub in subusers:
            admin.add_subuser(data, sub, when)
        admin.assign_pool(data, "acme/app", "mkt")
        add_verified_domain(data, "acme", "acme.example", grants=subusers)
        for name in ("app", "target", "revoked", "expired", "lastused", "pasted", "misnamed",
                     "typo"):
            made[name] = add_key(data, "acme/app", name)
        made["noscope"] = add_key(data, "acme/app", "noscope", scopes=("stats.read",))
        admin.revoke_key(data, made["revoked"].key_id, when)
        expired = data.keys[made["expired"].key_id]
        data.keys[expired.key_id] = replace(expired, expires=when - timedelta(days=1))
        for name in ("limited", "counted", "rcpt"):
            made[name] = add_key(data, f"acme/{name}", name)
        # dormant: a suspended account
        admin.add_account(data, "dormant", when)
        made["dormant"] = add_key(data, "dormant", "dormant")
        admin.set_status(data, "dormant", Status.SUSPENDED)
        # fenced: may log in and send only from 10.1.0.0/16
        admin.add_account(data, "fenced", when)
        admin.ip_allow(data, "fenced", "10.1.0.0/16")
        add_verified_domain(data, "fenced", "fenced.example")
        made["fenced"] = add_key(data, "fenced", "fenced")
        # watch: for monitor mode
        admin.add_account(data, "watch", when)
        add_verified_domain(data, "watch", "watch.example")
        made["watch"] = add_key(data, "watch", "watch")
        # shared.example: owner, a granted subuser with one usable key among unusable ones,
        # and another account that verified one single address of that domain
        admin.add_account(data, "shared", when)
        admin.add_subuser(data, "shared/web", when)
        add_verified_domain(data, "shared", "shared.example", grants=("shared/web",))
        made["k1"] = add_key(data, "shared", "k1")
        made["w1"] = add_key(data, "shared/web", "w1")
        made["w2"] = add_key(data, "shared/web", "w2")
        admin.revoke_key(data, made["w2"].key_id, when)
        made["w3"] = add_key(data, "shared/web", "w3", scopes=("stats.read",))
        made["w4"] = add_key(data, "shared/web", "w4")
        w4 = data.keys[made["w4"].key_id]
        data.keys[w4.key_id] = replace(w4, expires=when - timedelta(hours=1))
        admin.add_account(data, "partner", when)
        admin.add_sender(data, "partner", "alerts@shared.example", when)
        made["p1"] = add_key(data, "partner", "p1")
    return made


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    daemon = Policyd(tmp_path_factory.mktemp("relay"), MAIN_SETTINGS)
    made = populate(daemon)
    daemon.start()
    try:
        yield Site(daemon, made)
    finally:
        assert daemon.stop() == 0, daemon.log()[-3000:]
    assert not daemon.tracebacks(), daemon.tracebacks()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Policyd]]:
    """Start a daemon of its own: account acme (domain acme.example) with key ``acme``."""
    daemons: list[Policyd] = []

    def make(overrides: dict[str, Any] | None = None, *, unix: bool = False,
             module: bool = False, start: bool = True) -> Policyd:
        daemon = Policyd(tmp_path / f"p{len(daemons)}", overrides, unix=unix, module=module)
        daemons.append(daemon)
        with daemon.directory().transaction() as data:
            admin.add_account(data, "acme", now())
            add_verified_domain(data, "acme", "acme.example")
            daemon.keys["acme"] = add_key(data, "acme", "main")
        if start:
            daemon.start()
        return daemon

    yield make
    for daemon in daemons:
        if daemon.running():
            assert daemon.stop() == 0, daemon.log()[-3000:]
        assert not daemon.tracebacks(), daemon.tracebacks()


def login_reply(daemon: Policyd, username: str, password: str, rip: str) -> AuthReply:
    with DovecotClient(connect(daemon.endpoint("auth"))) as auth:
        auth.handshake()
        return auth.plain(username, password, rip=rip)


def ask(daemon: Policyd, **values: str) -> str | None:
    with PolicyClient(connect(daemon.endpoint("policy"))) as client:
        return client.ask(**values)


def authenticated(identity: str, sender: str, **values: str) -> dict[str, str]:
    """Attributes of a request from a submission session logged in as ``identity``."""
    return {"sasl_method": "PLAIN", "sasl_username": identity, "sender": sender, **values}


_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def fields(line: str) -> dict[str, str]:
    """The key=value fields of a text-format decision line."""
    pairs = line.split(": ", 1)[1]
    return {k: json.loads(v) if v.startswith('"') else v for k, v in _FIELD.findall(pairs)}


def unknown_key_text() -> str:
    return keys.generate().text  # well-formed, random id: not in any directory


# == auth ======================================================================================
def test_handshake_offers_plain_and_login_as_plaintext_mechanisms(relay: Site) -> None:
    with DovecotClient(connect(relay.daemon.endpoint("auth"))) as auth:
        mechanisms = auth.handshake()
    assert mechanisms == ["PLAIN", "LOGIN"]
    server = {fields[0]: fields[1:] for fields in auth.server}
    assert server["VERSION"][0] == "1"  # Postfix requires major version 1
    assert server["MECH"] == ["LOGIN", "plaintext"]  # plaintext: offered only under TLS
    assert list(server)[-1] == "DONE" and "SPID" in server


def test_plain_with_initial_response_logs_in_as_principal_and_key_id(relay: Site) -> None:
    key = relay.keys["app"]
    with relay.auth() as auth:
        reply = auth.auth("PLAIN", rip=fresh_address(), resp=b64(f"\0{APIKEY}\0{key.text}"))
    assert reply.status == "OK"
    assert reply.user == f"acme/app:{key.key_id}"


def test_plain_without_initial_response_gets_an_empty_challenge_then_logs_in(
    relay: Site,
) -> None:
    key = relay.keys["app"]
    with relay.auth() as auth:
        challenge = auth.auth("PLAIN", rip=fresh_address())
        assert (challenge.status, challenge.data) == ("CONT", "")  # the client sees "334 "
        reply = auth.cont(b64(f"\0{APIKEY}\0{key.text}"))
    assert (reply.status, reply.user) == ("OK", key.identity)


def test_login_without_initial_response_asks_username_then_password(relay: Site) -> None:
    key = relay.keys["app"]
    with relay.auth() as auth:
        reply = auth.login(APIKEY, key.text, rip=fresh_address(), initial=False)
    assert (reply.status, reply.user) == ("OK", key.identity)


def test_login_with_the_username_as_initial_response_asks_only_for_the_password(
    relay: Site,
) -> None:
    key = relay.keys["app"]
    with relay.auth() as auth:
        reply = auth.login(APIKEY, key.text, rip=fresh_address(), initial=True)
    assert (reply.status, reply.user) == ("OK", key.identity)


def test_one_auth_connection_serves_many_logins_in_turn(relay: Site) -> None:
    # smtpd keeps one connection to the auth server for all its sessions
    with relay.auth() as auth:
        replies = [auth.plain(APIKEY, relay.keys[name].text, rip=fresh_address())
                   for name in ("app", "k1", "app", "watch")]
    assert [r.user for r in replies] == [relay.keys[n].identity
                                         for n in ("app", "k1", "app", "watch")]


def test_username_other_than_apikey_fails_saying_which_username_to_use(relay: Site) -> None:
    with relay.auth() as auth:
        reply = auth.plain("alice", relay.keys["misnamed"].text, rip=fresh_address())
    assert reply.status == "FAIL"
    assert reply.reason == "log in with username 'apikey' and an API key as the password"
    assert reply.user is None


def test_password_that_is_not_an_api_key_fails_as_basic_auth_is_not_accepted(
    relay: Site,
) -> None:
    with relay.auth() as auth:
        reply = auth.login(APIKEY, "hunter2", rip=fresh_address())
    assert reply.status == "FAIL"
    assert reply.reason == ("the password is not a keyrelay API key (kr.<id>.<secret>); "
                            "account passwords are not accepted")


def test_unknown_key_fails_asking_to_check_the_whole_key_was_copied(relay: Site) -> None:
    with relay.auth() as auth:
        reply = auth.plain(APIKEY, unknown_key_text(), rip=fresh_address())
    assert (reply.status, reply.reason) == (
        "FAIL", "unknown API key; check that the whole key was copied")


def test_key_revoked_with_the_cli_is_refused_at_the_next_login_without_restart(
    relay: Site,
) -> None:
    key = relay.daemon.create_key("acme/app", "revoke-me-at-login")
    rip = fresh_address()
    with relay.auth() as auth:
        assert auth.plain(APIKEY, key.text, rip=rip).status == "OK"
        relay.daemon.keyrelay("key", "revoke", key.key_id)
        reply = auth.plain(APIKEY, key.text, rip=rip)  # same connection, no signal, no restart
    assert reply.status == "FAIL"
    assert reply.reason == f"API key {key.key_id} was revoked; create a new key"


def test_expired_key_fails_saying_when_it_expired(relay: Site) -> None:
    key = relay.keys["expired"]
    with relay.auth() as auth:
        reply = auth.plain(APIKEY, key.text, rip=fresh_address())
    assert reply.status == "FAIL"
    assert re.fullmatch(rf"API key {key.key_id} expired at \d{{4}}-\d\d-\d\d \d\d:\d\d UTC; "
                        "create a new key", reply.reason), reply.reason


def test_key_of_a_suspended_account_fails_naming_the_suspension(relay: Site) -> None:
    with relay.auth() as auth:
        reply = auth.plain(APIKEY, relay.keys["dormant"].text, rip=fresh_address())
    assert reply.status == "FAIL"
    assert reply.reason == "account dormant is suspended; contact your relay administrator"


def test_key_without_the_mail_send_scope_fails_naming_the_scope(relay: Site) -> None:
    key = relay.keys["noscope"]
    with relay.auth() as auth:
        reply = auth.plain(APIKEY, key.text, rip=fresh_address())
    assert (reply.status, reply.reason) == (
        "FAIL", f"API key {key.key_id} lacks the mail.send scope")


def test_client_outside_the_accounts_ip_rules_fails_naming_its_address(relay: Site) -> None:
    key = relay.keys["fenced"]
    with relay.auth() as auth:
        outside = auth.plain(APIKEY, key.text, rip="192.0.2.99")
        inside = auth.plain(APIKEY, key.text, rip="10.1.0.9")
    assert outside.status == "FAIL"
    assert outside.reason == ("client address 192.0.2.99 is not in the IP access list of "
                              "account fenced")
    assert (inside.status, inside.user) == ("OK", key.identity)


def test_fifty_concurrent_clients_all_log_in(relay: Site) -> None:
    clients = 50
    key = relay.keys["app"]
    start = threading.Barrier(clients)
    rip = fresh_address()

    def one() -> AuthReply:
        with relay.auth() as auth:
            start.wait(timeout=30)  # every handshake done: all AUTH lines go out together
            return auth.plain(APIKEY, key.text, rip=rip)

    with ThreadPoolExecutor(max_workers=clients) as pool:
        replies = list(pool.map(lambda _: one(), range(clients)))
    assert [r.status for r in replies] == ["OK"] * clients
    assert {r.user for r in replies} == {key.identity}


def test_unreadable_directory_closes_the_auth_connection_instead_of_failing_and_recovers(
    relay: Site,
) -> None:
    key = relay.keys["app"]
    rip = fresh_address()
    mark = relay.daemon.mark()
    with broken_directory(relay.daemon.directory_path):
        with relay.auth() as auth:
            reply = auth.plain(APIKEY, key.text, rip=rip)
        # no FAIL (Postfix would make it a permanent 535): the connection drops, and Postfix
        # answers 454 4.7.0 so the client retries
        assert reply.status == "CLOSED"
    relay.daemon.wait_for_log(r"ERROR keyrelay\.policyd\.auth: directory unavailable: .*"
                              r"directory\.yaml", since=mark)
    with relay.auth() as auth:
        assert auth.plain(APIKEY, key.text, rip=rip).status == "OK"


# == brute force ===============================================================================
def test_guessing_failures_from_one_address_lock_it_out_even_for_a_correct_key(
    relay: Site,
) -> None:
    attacker, bystander = fresh_address(), fresh_address()
    good = relay.keys["app"].text
    with relay.auth() as auth:
        guesses = [auth.plain("admin", unknown_key_text(), rip=attacker),
                   auth.plain(APIKEY, "password123", rip=attacker),
                   auth.plain(APIKEY, unknown_key_text(), rip=attacker)]
        assert [g.status for g in guesses] == ["FAIL"] * 3
        locked = auth.plain(APIKEY, good, rip=attacker)
        other = auth.plain(APIKEY, good, rip=bystander)
    assert locked.status == "FAIL"
    assert locked.reason == f"too many failed logins from {attacker}; try again in 15 minutes"
    assert (other.status, other.user) == ("OK", relay.keys["app"].identity)


def test_wrong_secrets_for_one_key_id_lock_it_everywhere_but_where_it_logged_in(
    relay: Site,
) -> None:
    # issue 20: a stranger who knows a key id (it is in 535 replies and the mail log) must not
    # lock its owner out where the owner uses the key
    target = relay.keys["target"]
    home = fresh_address()
    v6_home = "2001:db8:20:14::7"
    addresses = [fresh_address() for _ in range(3)]
    with relay.auth() as auth:
        assert auth.plain(APIKEY, target.text, rip=home).status == "OK"
        assert auth.plain(APIKEY, target.text, rip=v6_home).status == "OK"
        for rip in addresses:  # one failure per address: no address reaches its limit
            wrong = f"kr.{target.key_id}.{keys.generate().text.split('.')[2]}"
            assert auth.plain(APIKEY, wrong, rip=rip).reason.startswith("unknown API key")
        locked = auth.plain(APIKEY, target.text, rip=fresh_address())  # the owner, elsewhere
        by_attacker = auth.plain(APIKEY, target.text, rip=addresses[0])
        at_home = auth.plain(APIKEY, target.text, rip=home)
        same_slash_64 = auth.plain(APIKEY, target.text, rip="2001:db8:20:14:abcd::1")
        others = [auth.plain(APIKEY, relay.keys["app"].text, rip=rip) for rip in addresses]
    assert locked.status == by_attacker.status == "FAIL"
    assert locked.reason == by_attacker.reason == (
        f"too many failed logins for API key {target.key_id}; try again in 15 minutes")
    assert (at_home.status, at_home.user) == ("OK", target.identity)
    assert (same_slash_64.status, same_slash_64.user) == ("OK", target.identity)
    assert [r.status for r in others] == ["OK"] * 3


def test_wrong_username_with_the_right_key_does_not_lock_that_key(relay: Site) -> None:
    key = relay.keys["typo"]
    with relay.auth() as auth:
        for _ in range(3):  # max_failures_per_key; a fresh address each time
            assert auth.plain("user", key.text, rip=fresh_address()).status == "FAIL"
        reply = auth.plain(APIKEY, key.text, rip=fresh_address())
    assert (reply.status, reply.user) == ("OK", key.identity), reply


def test_revoked_and_expired_key_attempts_never_count_towards_a_lockout(relay: Site) -> None:
    rip = fresh_address()
    revoked, expired = relay.keys["revoked"], relay.keys["expired"]
    with relay.auth() as auth:
        for _ in range(4):  # more than max_failures_per_address and _per_key
            assert "was revoked" in auth.plain(APIKEY, revoked.text, rip=rip).reason
            assert "expired at" in auth.plain(APIKEY, expired.text, rip=rip).reason
        good = auth.plain(APIKEY, relay.keys["app"].text, rip=rip)
        still_revoked = auth.plain(APIKEY, revoked.text, rip=fresh_address())
    assert good.status == "OK"
    assert still_revoked.reason == f"API key {revoked.key_id} was revoked; create a new key"


# == policy ====================================================================================
def test_submission_port_without_login_is_refused_530(relay: Site) -> None:
    with relay.policy() as policy:
        by_port = policy.ask(server_port="587", sender="app@acme.example")
        by_context = policy.ask(server_port="10587", policy_context="submission",
                                sender="app@acme.example")
    assert by_port == "530 5.7.0 Authentication required"
    assert by_context == "530 5.7.0 Authentication required"


def test_port_25_without_login_is_left_to_postfix_with_dunno(relay: Site) -> None:
    with relay.policy() as policy:
        action = policy.ask(server_port="25", sender="someone@elsewhere.example")
    assert action == "DUNNO"


def test_logged_in_owned_sender_is_routed_through_the_principals_pool(relay: Site) -> None:
    identity = relay.login(relay.keys["app"])
    with relay.policy() as policy:
        action = policy.ask(**authenticated(identity, "app@acme.example"))
    assert action == "FILTER kr-pool-mkt:"


def test_sender_not_owned_by_the_principal_is_refused_550(relay: Site) -> None:
    identity = relay.login(relay.keys["app"])
    with relay.policy() as policy:
        action = policy.ask(**authenticated(identity, "ceo@bank.example"))
    assert action == ("550 5.7.1 envelope sender: ceo@bank.example is not a verified "
                      "domain or sender of acme/app")


def test_key_revoked_after_login_is_refused_at_the_next_message(relay: Site) -> None:
    key = relay.daemon.create_key("acme/app", "revoke-me-in-session")
    identity = relay.login(key)
    with relay.policy() as policy:
        before = policy.ask(**authenticated(identity, "app@acme.example"))
        relay.daemon.keyrelay("key", "revoke", key.key_id)
        after = policy.ask(**authenticated(identity, "app@acme.example"))
    assert before == "FILTER kr-pool-mkt:"
    assert after == f"550 5.7.1 API key {key.key_id} was revoked; create a new key"


def test_client_outside_the_accounts_ip_rules_is_refused_554(relay: Site) -> None:
    identity = relay.login(relay.keys["fenced"], rip="10.1.0.7")
    with relay.policy() as policy:
        outside = policy.ask(**authenticated(identity, "app@fenced.example"),
                             client_address="192.0.2.77")
        inside = policy.ask(**authenticated(identity, "app@fenced.example"),
                            client_address="10.1.0.7")
    assert outside == ("554 5.7.1 client address 192.0.2.77 is not in the IP access list of "
                       "account fenced")
    assert inside == "DUNNO"


def _message(policy: PolicyClient, identity: str, *stages: str, instance: str = "",
             sender: str = "app@acme.example", recipients: int = 1) -> list[str | None]:
    """The policy requests of one message, as Postfix sends them at each stage."""
    instance = instance or new_instance()
    answers = []
    for stage in stages:
        at_data = stage in ("DATA", "END-OF-MESSAGE")
        answers.append(policy.ask(
            **authenticated(identity, sender), protocol_state=stage, instance=instance,
            queue_id="4XyZ1" if at_data or stage == "RCPT" else "",
            # Postfix sends the recipient count only at DATA and END-OF-MESSAGE, and the
            # recipient there only when there is exactly one
            recipient_count=str(recipients) if at_data else "0",
            recipient="rcpt@example.net" if not at_data or recipients == 1 else "",
        ))
    return answers


def test_a_message_beyond_the_per_minute_limit_is_deferred_451_at_data(relay: Site) -> None:
    # the counting itself (a limit of 3, counted once at DATA and END-OF-MESSAGE, the window
    # sliding) is tested in process on a clock the test moves (test_policyd_services.py);
    # here the daemon's answer on the wire. With a limit of 1 the second message is deferred
    # whenever it comes within the minute, wherever the minute's window boundary falls.
    relay.daemon.keyrelay("limits", "set", "acme/limited", "--per-minute", "1")
    identity = relay.login(relay.keys["limited"])
    with relay.policy() as policy:
        sent = [_message(policy, identity, "RCPT", "DATA", "END-OF-MESSAGE") for _ in range(2)]
    assert sent[0] == ["DUNNO"] * 3
    assert sent[1][0] == "DUNNO"
    assert (sent[1][1] or "").startswith(
        "451 4.7.1 limit of 1 messages per minute reached for acme/limited (a message to N "
        "recipients counts N); try again in "), sent[1]


def test_recipient_beyond_the_per_message_limit_is_refused_452_4_5_3_at_rcpt(
    relay: Site,
) -> None:
    # RFC 5321 section 4.5.3.1.10: "too many recipients" is 452 (4.5.3, RFC 3463), as
    # Postfix's own smtpd_recipient_limit answers; only that recipient is refused, the client
    # sends the message to the first two and the third in another transaction
    relay.daemon.keyrelay("limits", "set", "acme/rcpt", "--recipients", "2")
    identity = relay.login(relay.keys["rcpt"])
    instance, client = new_instance(), fresh_address()
    mark = relay.daemon.mark()
    with relay.policy() as policy:
        answers = [policy.ask(**authenticated(identity, "app@acme.example"), instance=instance,
                              recipient=f"rcpt{n}@example.net", queue_id="4XyZ2",
                              client_address=client)
                   for n in range(3)]  # recipient_count=0, as Postfix sends it at RCPT
    line = relay.daemon.wait_for_log(rf"service=policy .*client={client} .*rcpt2@", since=mark)
    assert (fields(line)["verdict"], fields(line)["reason"]) == ("tempfail",
                                                                "too_many_recipients")
    assert answers[:2] == ["DUNNO", "DUNNO"]
    assert answers[2] == ("452 4.5.3 too many recipients: at most 2 per message for acme/rcpt; "
                          "send the others in another message")


def test_message_with_more_recipients_than_the_limit_is_deferred_452_4_5_3_at_data(
    relay: Site,
) -> None:
    relay.daemon.keyrelay("limits", "set", "acme/rcpt", "--recipients", "2")
    identity = relay.login(relay.keys["rcpt"])
    with relay.policy() as policy:
        two = _message(policy, identity, "DATA", recipients=2)
        three = _message(policy, identity, "DATA", recipients=3)
    assert two == ["DUNNO"]
    assert three == ["452 4.5.3 too many recipients: at most 2 per message for acme/rcpt; "
                     "send the others in another message"]


def test_monitor_mode_lets_a_refused_sender_pass_and_logs_it_as_monitor(relay: Site) -> None:
    identity = relay.login(relay.keys["watch"])
    request = authenticated(identity, "ceo@bank.example", client_address=fresh_address())
    with relay.policy() as policy:
        enforced = policy.ask(**request)
        relay.daemon.keyrelay("monitor", "on", "watch")
        mark = relay.daemon.mark()
        monitored = policy.ask(**request)
    assert enforced is not None and enforced.startswith("550 5.7.1 envelope sender:")
    assert monitored == "DUNNO"
    line = relay.daemon.wait_for_log(rf"service=policy .*client={request['client_address']} ",
                                     since=mark)
    logged = fields(line)
    assert logged["verdict"] == "monitor-allow"
    assert logged["reason"] == "sender_not_owned"
    assert logged["would_be"] == enforced
    assert logged["principal"] == "watch"


def test_unreadable_directory_answers_policy_requests_451_4_3_0(relay: Site) -> None:
    identity = relay.login(relay.keys["app"])
    with relay.policy() as policy:
        with broken_directory(relay.daemon.directory_path):
            broken = policy.ask(**authenticated(identity, "app@acme.example"))
        recovered = policy.ask(**authenticated(identity, "app@acme.example"))
    assert broken == "451 4.3.0 account directory temporarily unavailable; try again later"
    assert recovered == "FILTER kr-pool-mkt:"


def test_one_persistent_connection_serves_many_requests_in_order(relay: Site) -> None:
    identity = relay.login(relay.keys["app"])
    with relay.policy() as policy:
        first = _message(policy, identity, "MAIL", "RCPT", "RCPT", "DATA", "END-OF-MESSAGE")
        refused = _message(policy, identity, "MAIL", sender="ceo@bank.example")
        # pipelined: two requests in one write, two answers in order
        policy.stream.send(encode_policy(policy_request(server_port="25"))
                           + encode_policy(policy_request(**authenticated(identity,
                                                                          "x@acme.example"))))
        pipelined = [policy.read_action(), policy.read_action()]
        last = _message(policy, identity, "RCPT")
    assert first == ["FILTER kr-pool-mkt:"] * 5
    assert refused[0] is not None and refused[0].startswith("550 5.7.1")
    assert pipelined == ["DUNNO", "FILTER kr-pool-mkt:"]
    assert last == ["FILTER kr-pool-mkt:"]


def test_non_utf8_bytes_in_a_policy_request_are_decided_and_logged_not_an_internal_error(
    relay: Site,
) -> None:
    identity = relay.login(relay.keys["app"])
    client = fresh_address()
    mark = relay.daemon.mark()
    raw = encode_policy(policy_request(**authenticated(identity, "app@acme.example"),
                                       client_address=client))
    raw = raw.replace(b"sender=app@acme.example", b"sender=app\xff@acme.example")
    with relay.policy() as policy:
        policy.stream.send(raw)
        action = policy.read_action()
    assert action is not None and action.startswith("550 5.7.1"), action
    line = relay.daemon.wait_for_log(rf"service=policy .*client={client} ", since=mark)
    assert "verdict=refuse" in line
    assert "internal error" not in relay.daemon.log(mark)


# == socketmap =================================================================================
def test_sender_login_lists_every_usable_identity_of_every_owner(relay: Site) -> None:
    k = relay.keys
    with relay.socketmap() as socketmap:
        single_sender = socketmap.lookup("sender_login", "alerts@shared.example")
        domain_only = socketmap.lookup("sender_login", "news@shared.example")
    # partner verified this one address; shared owns the domain and granted it to shared/web,
    # whose revoked, expired and scope-less keys are left out
    assert single_sender == f"OK {k['p1'].identity},{k['k1'].identity},{k['w1'].identity}"
    assert domain_only == f"OK {k['k1'].identity},{k['w1'].identity}"


def test_sender_login_matches_an_uppercase_key(relay: Site) -> None:
    k = relay.keys
    with relay.socketmap() as socketmap:
        reply = socketmap.lookup("sender_login", "News@SHARED.Example")
    assert reply == f"OK {k['k1'].identity},{k['w1'].identity}"


def test_sender_login_of_an_unknown_address_is_notfound(relay: Site) -> None:
    with relay.socketmap() as socketmap:
        assert socketmap.lookup("sender_login", "someone@nowhere.example") == "NOTFOUND "
        assert socketmap.lookup("sender_login", "not an address") == "NOTFOUND "


def test_unknown_map_name_is_a_permanent_error(relay: Site) -> None:
    with relay.socketmap() as socketmap:
        assert socketmap.lookup("virtual", "a@shared.example") == "PERM unknown map 'virtual'"


def test_unreadable_directory_makes_sender_login_a_temporary_error(relay: Site) -> None:
    with relay.socketmap() as socketmap:
        with broken_directory(relay.daemon.directory_path):
            broken = socketmap.lookup("sender_login", "news@shared.example")
        recovered = socketmap.lookup("sender_login", "news@shared.example")
    assert broken == "TEMP account directory temporarily unavailable"
    assert recovered is not None and recovered.startswith("OK ")


# == bad input =================================================================================
BAD_INPUT = [
    # auth
    ("auth", b"\x80\x81\xfe\xff garbage\n", "auth line is not UTF-8 text"),
    ("auth", b"AUTH\t1\tPLAIN\tservice=smtp\tnologin\tlip=127.0.0.1\trip=192.0.2.1\n",
     "expected the VERSION handshake first, got 'AUTH'"),
    ("auth", b"VERSION\t1\t0\nAUTH\t1\tPLAIN\tservice=smtp\n", "AUTH before the CPID handshake"),
    ("auth", b"VERSION\t2\t0\n", "unsupported protocol major version '2'"),
    ("auth", HANDSHAKE + b"FROB\t1\n", "unknown command 'FROB'"),
    ("auth", HANDSHAKE + b"AUTH\t1\tPLAIN\tresp=" + b"A" * 3000 + b"\n",
     "auth line longer than 2048 bytes"),
    ("auth", HANDSHAKE + b"A" * 5000, "auth line longer than 2048 bytes"),
    ("auth", HANDSHAKE + b"AUTH\t1\tPLA\x00IN\tservice=smtp\n", "auth line contains a NUL byte"),
    ("auth", HANDSHAKE + b"CONT\t7\tAAAA\n", "CONT for request id 7, which is not in progress"),
    # policy
    ("policy", b"\x80\x81 this is not a policy request\n\n",
     "policy request line is not name=value"),
    ("policy", b"request=smtpd_access_policy\nsender=" + b"a" * 3000 + b"\n\n",
     "policy request longer than 2048 bytes"),
    ("policy", b"request=" + b"a" * 5000, "policy request longer than 2048 bytes"),
    ("policy", b"request=smtpd_access_policy\nsender=a\x00b@acme.example\n\n",
     "policy request contains a NUL byte"),
    ("policy", b"\n", "empty policy request"),
    # socketmap
    ("socketmap", b"hello, this is not a netstring", "socketmap request is not a netstring"),
    ("socketmap", b"016:sender_login a@b,", "socketmap request is not a netstring"),
    ("socketmap", b"99999:sender_login a@b,", "socketmap request longer than 2048 bytes"),
    ("socketmap", b"16:sender_login a@bX", "socketmap netstring does not end with ','"),
    ("socketmap", netstring(b"sender_login a\x00b@acme.example"),
     "socketmap request contains a NUL byte"),
    ("socketmap", netstring(b"sender_login"), "socketmap request is not '<map name> <key>'"),
]


def _served(relay: Site, service: str) -> bool:
    """A fresh client of ``service`` gets a real answer."""
    if service == "auth":
        with relay.auth() as auth:
            return auth.plain(APIKEY, relay.keys["app"].text, rip=fresh_address()).status == "OK"
    if service == "policy":
        with relay.policy() as policy:
            return policy.ask(server_port="25") == "DUNNO"
    with relay.socketmap() as socketmap:
        return socketmap.lookup("sender_login", "nobody@nowhere.example") == "NOTFOUND "


@pytest.mark.parametrize(("service", "data", "warning"), BAD_INPUT,
                         ids=[f"{s}-{w.split(' ', 3)[-1][:28]}" for s, _, w in BAD_INPUT])
def test_bad_input_closes_only_that_connection_with_a_warning(
    relay: Site, service: str, data: bytes, warning: str,
) -> None:
    bystander = connect(relay.daemon.endpoint(service))  # opened before, must survive
    mark = relay.daemon.mark()
    with connect(relay.daemon.endpoint(service)) as sock:
        peer = peer_name(sock)
        sock.sendall(data)
        assert closed_by_peer(sock), "the daemon kept the connection open"
    line = relay.daemon.wait_for_log(rf"{service}: closing connection from {peer}: ", since=mark)
    assert "WARNING" in line and warning in line, line
    with bystander:
        if service == "auth":
            client = DovecotClient(bystander)
            client.handshake()
            assert client.plain(APIKEY, relay.keys["app"].text, rip=fresh_address()).status == "OK"
        elif service == "policy":
            assert PolicyClient(bystander).ask(server_port="25") == "DUNNO"
        else:
            assert SocketmapClient(bystander).lookup("sender_login", "x@y.example") == "NOTFOUND "
    assert _served(relay, service)


def test_invalid_base64_fails_that_exchange_and_keeps_the_connection(relay: Site) -> None:
    with relay.auth() as auth:
        initial = auth.auth("PLAIN", rip=fresh_address(), resp="!!not base64!!")
        auth.auth("LOGIN", rip=fresh_address())
        continued = auth.cont("%%%")
        mechanism = auth.auth("CRAM-MD5", rip=fresh_address())
        good = auth.plain(APIKEY, relay.keys["app"].text, rip=fresh_address())
    assert (initial.status, initial.reason) == (
        "FAIL", "the initial response is not valid base64")
    assert (continued.status, continued.reason) == ("FAIL", "the response is not valid base64")
    assert (mechanism.status, mechanism.reason) == (
        "FAIL", "mechanism CRAM-MD5 is not supported")
    assert good.status == "OK"


def test_invalid_base64_refusal_is_logged_with_the_client_address(relay: Site) -> None:
    rip = fresh_address()
    mark = relay.daemon.mark()
    with relay.auth() as auth:
        auth.auth("PLAIN", rip=rip, resp="!!not base64!!")
        auth.plain(APIKEY, relay.keys["app"].text, rip=fresh_address())  # flushes the log
    relay.daemon.wait_for_log(r"service=auth .*verdict=allow", since=mark)
    assert [line for line in relay.daemon.log(mark).splitlines()
            if rip in line and "base64" in line]


def test_a_request_left_half_sent_is_closed_after_request_timeout_on_every_service(
    relay: Site,
) -> None:
    partial = {
        "auth": HANDSHAKE + b"AUTH\t1\tPLAIN\tservice=smtp\tnologin",
        "policy": b"request=smtpd_access_policy\nprotocol_state=RCPT\n",
        "socketmap": b"40:sender_login app@",
    }
    mark = relay.daemon.mark()
    stalled = {}
    for service, data in partial.items():
        sock = connect(relay.daemon.endpoint(service))
        sock.sendall(data)
        stalled[service] = sock
    try:
        for service, sock in stalled.items():
            assert closed_by_peer(sock, timeout=30), f"{service}: stalled client kept"
            relay.daemon.wait_for_log(
                rf"WARNING .*{service}: closing connection from {peer_name(sock)}: "
                r"request not finished within 1s", since=mark)
    finally:
        for sock in stalled.values():
            sock.close()
    for service in partial:
        assert _served(relay, service)


def test_thousands_of_idle_connections_do_not_keep_another_client_waiting(relay: Site) -> None:
    count = 2000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = count + 256
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {needed}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    idle: list[DovecotClient] = []
    try:
        for _ in range(count):
            client = DovecotClient(connect(relay.daemon.endpoint("auth")))
            idle.append(client)
        for client in idle:
            client.handshake()  # the daemon accepted and greeted every one of them
        # each service answers a newcomer while all 2000 are still open (idle_timeout is 10 min
        # here): a daemon that waited on an idle connection would leave the newcomer without
        # a reply (the client's read times out: Stream's 5 s per reply)
        for service in ("auth", "policy", "socketmap"):
            assert _served(relay, service)
        still_open = [c for c in idle[::100] if not closed_by_peer(c.stream.sock, timeout=0.01)]
        assert len(still_open) == len(idle[::100]), "idle connections were closed to serve"
    finally:
        for client in idle:
            client.close()


# == operations ================================================================================
def test_check_config_accepts_a_valid_configuration(spawn: Callable[..., Policyd]) -> None:
    daemon = spawn(start=False)
    result = subprocess.run(daemon.command("--check-config"), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"configuration {daemon.config_path} is valid" in result.stdout
    assert f"directory {daemon.directory_path} is valid" in result.stdout


@pytest.mark.parametrize(("broken", "key", "reason"), [
    ({"policyd": {"max_conections": 10}}, "policyd.max_conections",
     "unknown key; did you mean 'max_connections'?"),
    ({"policyd": {"request_timeout": "soon"}}, "policyd.request_timeout", "soon"),
    ({"policyd": {"max_request_size": 10}}, "policyd.max_request_size", "must be at least 1024"),
    ({"logging": {"format": "xml"}}, "logging.format", "must be one of 'text', 'json'"),
], ids=["unknown-key", "bad-duration", "too-small", "bad-choice"])
def test_check_config_rejects_an_invalid_configuration_with_file_key_and_reason(
    spawn: Callable[..., Policyd], broken: dict[str, Any], key: str, reason: str,
) -> None:
    daemon = spawn(start=False)
    daemon.write_config(broken)
    for args in (("--check-config",), ()):  # the daemon itself refuses to start the same way
        result = subprocess.run(daemon.command(*args), capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 1
        where = rf"keyrelay-policyd: error: {re.escape(str(daemon.config_path))}:\d+: "  # :LINE:
        assert re.match(where + re.escape(f"{key}: "), result.stderr), result.stderr
        assert reason in result.stderr
        assert "Traceback" not in result.stderr + result.stdout


def test_check_config_rejects_an_invalid_directory_naming_it(
    spawn: Callable[..., Policyd],
) -> None:
    daemon = spawn(start=False)
    daemon.directory_path.write_text("accounts:\n  acme:\n    status: sleepy\n")
    result = subprocess.run(daemon.command("--check-config"), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert f"{daemon.directory_path}:3: accounts.acme.status: " in result.stderr
    assert "Traceback" not in result.stderr


def test_help_reads_like_a_man_page() -> None:
    result = subprocess.run([str(POLICYD), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    text = result.stdout
    assert text.startswith("usage: keyrelay-policyd [-h] [--config PATH] [--check-config]")
    for section in ("options:", "services (endpoints in the policyd section",
                    "signals:", "files:", "exit status:"):
        assert f"\n{section}" in text, section
    for topic in ("smtpd_sasl_type = dovecot", "check_policy_service", "socketmap",
                  "SIGHUP", "SIGTERM", "/etc/keyrelay/keyrelay.yaml", "$KEYRELAY_CONFIG",
                  "--check-config"):
        assert topic in text, topic


def test_sighup_reloads_the_configuration_and_the_change_applies_at_once(
    spawn: Callable[..., Policyd],
) -> None:
    daemon = spawn()
    key = daemon.keys["acme"]
    rip = fresh_address()
    many = {"protocol_state": "DATA", "recipient_count": "5", "recipient": ""}
    identity = f"acme:{key.key_id}"
    assert login_reply(daemon, APIKEY, key.text, rip).status == "OK"
    assert ask(daemon, **authenticated(identity, "app@acme.example"), **many) == "DUNNO"

    daemon.write_config({"auth": {"username": "relay-login"},
                         "limits": {"recipients_per_message": 2}})
    assert "SIGHUP: configuration reloaded from" in daemon.reload()

    old = login_reply(daemon, APIKEY, key.text, rip)
    assert (old.status, old.reason) == (
        "FAIL", "log in with username 'relay-login' and an API key as the password")
    assert login_reply(daemon, "relay-login", key.text, rip).user == identity
    assert ask(daemon, **authenticated(identity, "app@acme.example"), **many) == (
        "452 4.5.3 too many recipients: at most 2 per message for acme; send the others in "
        "another message")


def test_sighup_with_an_invalid_configuration_logs_it_and_keeps_the_running_one(
    spawn: Callable[..., Policyd],
) -> None:
    daemon = spawn()
    key = daemon.keys["acme"]
    daemon.config_path.write_text("auth:\n  username: other\npolicyd:\n  max_connections: lots\n")
    line = daemon.reload()
    assert "ERROR" in line and "configuration not reloaded, keeping the running one" in line
    assert f"{daemon.config_path}:4: policyd.max_connections: expected an integer" in line
    assert daemon.running()
    assert login_reply(daemon, APIKEY, key.text, fresh_address()).status == "OK"


def test_sighup_keeps_brute_force_lockouts(spawn: Callable[..., Policyd]) -> None:
    daemon = spawn({"policyd": {"bruteforce": {"max_failures_per_address": 2}}})
    key = daemon.keys["acme"]
    attacker = fresh_address()
    for _ in range(2):
        assert login_reply(daemon, APIKEY, unknown_key_text(), attacker).status == "FAIL"
    daemon.write_config({"limits": {"messages_per_minute": 50}})  # an unrelated change
    assert "configuration reloaded" in daemon.reload()
    reply = login_reply(daemon, APIKEY, key.text, attacker)
    assert reply.reason.startswith(f"too many failed logins from {attacker}"), reply


def test_sighup_changing_bruteforce_keeps_where_keys_logged_in(
    spawn: Callable[..., Policyd],
) -> None:
    daemon = spawn()
    key = daemon.keys["acme"]
    home = fresh_address()
    assert login_reply(daemon, APIKEY, key.text, home).status == "OK"
    daemon.write_config({"policyd": {"bruteforce": {"max_failures_per_key": 2}}})
    assert "configuration reloaded" in daemon.reload()
    wrong = f"kr.{key.key_id}.{keys.generate().text.split('.')[2]}"
    for _ in range(2):  # the new limit: the key id is locked
        assert login_reply(daemon, APIKEY, wrong, fresh_address()).status == "FAIL"
    elsewhere = login_reply(daemon, APIKEY, key.text, fresh_address())
    assert elsewhere.reason.startswith(f"too many failed logins for API key {key.key_id}")
    assert login_reply(daemon, APIKEY, key.text, home).status == "OK"


def test_sigterm_finishes_the_request_in_progress_closes_idle_ones_and_exits_0(
    spawn: Callable[..., Policyd],
) -> None:
    # the grace bounds how long the request in progress is waited for: 120 s, so that the
    # rest of the request is sent in time on however slow a machine (the default is 10 s)
    daemon = spawn({"policyd": {"shutdown_grace": "120s"}})
    idle = DovecotClient(connect(daemon.endpoint("auth")))
    idle.handshake()
    busy = PolicyClient(connect(daemon.endpoint("policy")))
    unfinished = encode_policy(policy_request(server_port="25"))
    # one complete request and the start of the next in one write: once the first is answered,
    # the daemon has read the unfinished one too
    busy.stream.send(unfinished + unfinished[:60])
    assert busy.read_action() == "DUNNO"
    mark = daemon.mark()
    daemon.signal(signal.SIGTERM)
    daemon.wait_for_log("stopping: no new connections; finishing requests in progress",
                        since=mark)
    assert closed_by_peer(idle.stream.sock), "an idle connection was kept open"

    def refused() -> bool:  # "stopping" is logged just before the sockets close
        try:
            connect(daemon.endpoint("policy")).close()
        except ConnectionRefusedError:
            return True
        return False

    wait_until(refused, 30, "the policy service to stop accepting")  # generous: slow machines
    busy.stream.send(unfinished[60:])
    assert busy.read_action() == "DUNNO"  # the request in progress was answered
    assert closed_by_peer(busy.stream.sock)
    assert daemon.process is not None and daemon.process.wait(timeout=30) == 0
    assert daemon.log(mark).rstrip().endswith("keyrelay-policyd stopped")
    idle.close()
    busy.stream.close()


def test_last_used_time_is_written_to_the_directory_within_the_flush_interval(
    relay: Site,
) -> None:
    key = relay.keys["lastused"]
    before = now()
    assert relay.daemon.directory().load().keys[key.key_id].last_used is None
    relay.login(key)

    def recorded() -> bool:
        return relay.daemon.directory().load().keys[key.key_id].last_used is not None

    wait_until(recorded, 10, "the last-used time in the directory (flush interval 1s)")
    last_used = relay.daemon.directory().load().keys[key.key_id].last_used
    assert last_used is not None and before <= last_used <= now()


def test_sigterm_writes_last_used_times_before_exiting(spawn: Callable[..., Policyd]) -> None:
    daemon = spawn({"keys": {"last_used_flush_interval": "1h"}})
    key = daemon.keys["acme"]
    assert login_reply(daemon, APIKEY, key.text, fresh_address()).status == "OK"
    assert daemon.directory().load().keys[key.key_id].last_used is None  # not before 1h
    assert daemon.stop() == 0
    assert daemon.directory().load().keys[key.key_id].last_used is not None
    assert "recorded last-used times of 1 keys" in daemon.log()


def test_every_decision_is_logged_once_with_service_principal_key_id_client_and_verdict(
    relay: Site,
) -> None:
    key = relay.keys["app"]
    rip = fresh_address()
    mark = relay.daemon.mark()
    identity = relay.login(key, rip=rip)
    with relay.policy() as policy:
        action = policy.ask(**authenticated(identity, "ceo@bank.example"), client_address=rip,
                            queue_id="4XyZ9")
    with relay.socketmap() as socketmap:
        socketmap.lookup("sender_login", f"probe-{rip}@nowhere.example")
    relay.daemon.wait_for_log(rf"service=socketmap .*key=probe-{rip}@", since=mark)
    (login,) = relay.daemon.log_lines(rf"service=auth client={rip} ", since=mark)
    (decided,) = relay.daemon.log_lines(rf"service=policy .*client={rip} ", since=mark)
    (lookup,) = relay.daemon.log_lines(rf"service=socketmap .*key=probe-{rip}@", since=mark)
    assert " INFO keyrelay.policyd.auth: login " in login
    assert fields(login) == {"service": "auth", "client": rip, "mechanism": "PLAIN",
                             "verdict": "allow", "reason": "ok", "principal": "acme/app",
                             "key_id": key.key_id}
    assert fields(decided) == {
        "service": "policy", "stage": "RCPT", "queue_id": "4XyZ9", "client": rip,
        "sender": "ceo@bank.example", "recipient": "rcpt@example.net", "verdict": "refuse",
        "reason": "sender_not_owned", "reply": action, "principal": "acme/app",
        "key_id": key.key_id,
    }
    assert fields(lookup) == {"service": "socketmap", "map": "sender_login",
                              "key": f"probe-{rip}@nowhere.example", "result": "notfound"}


def test_the_log_never_contains_an_api_key_or_its_secret(relay: Site) -> None:
    made = [key for name, key in relay.keys.items() if name != "pasted"]
    spoiled = relay.daemon.create_key("acme/app", "logged-everywhere")
    made.append(spoiled)
    with relay.auth() as auth:
        for key in made:  # allowed, revoked, expired, suspended, refused address, ...
            auth.plain(APIKEY, key.text, rip=fresh_address())
            auth.login(APIKEY, key.text, rip=fresh_address(), initial=True)
        # refusals that log what was tried (on a key of this test: they count against it)
        auth.plain("someone", spoiled.text, rip=fresh_address())
        auth.plain(APIKEY, spoiled.text[:-2] + "xy", rip=fresh_address())
        auth.plain(APIKEY, spoiled.text + "\t", rip=fresh_address())
        auth.login(APIKEY, spoiled.text.replace(".", "-"), rip=fresh_address())
    last = fresh_address()
    relay.login(relay.keys["app"], rip=last)
    relay.daemon.wait_for_log(rf"service=auth client={last} ")
    log = relay.daemon.log()
    leaked = [key.key_id for key in made if key.secret[:20] in log or key.text[-20:] in log]
    assert not leaked, f"secrets of these keys are in {relay.daemon.log_path}"


def test_an_api_key_pasted_as_the_username_is_not_logged(relay: Site) -> None:
    key = relay.keys["pasted"]
    rip = fresh_address()
    mark = relay.daemon.mark()
    with relay.auth() as auth:
        reply = auth.plain(key.text, APIKEY, rip=rip)  # username and password swapped
    assert reply.status == "FAIL"
    relay.daemon.wait_for_log(rf"service=auth client={rip} ", since=mark)
    leaked = key.secret[:20] in relay.daemon.log()
    assert not leaked, f"the secret of {key.key_id} is in {relay.daemon.log_path}"


def test_json_logging_writes_one_json_object_per_line(spawn: Callable[..., Policyd]) -> None:
    daemon = spawn({"logging": {"format": "json"}}, module=True)  # python -m policyd
    key = daemon.keys["acme"]
    rip = fresh_address()
    assert login_reply(daemon, APIKEY, key.text, rip).status == "OK"
    assert ask(daemon, **authenticated(f"acme:{key.key_id}", "x@bank.example"),
               client_address=rip) is not None
    with connect(daemon.endpoint("policy")) as sock:
        sock.sendall(b"garbage\n\n")
        assert closed_by_peer(sock)
    assert daemon.stop() == 0
    lines = daemon.log().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(r, dict) and {"time", "level", "logger", "message"} <= set(r)
               for r in records)
    (login,) = [r for r in records if r.get("service") == "auth"]
    assert {k: login[k] for k in ("level", "logger", "message", "client", "verdict", "reason",
                                  "principal", "key_id")} == {
        "level": "info", "logger": "keyrelay.policyd.auth", "message": "login",
        "client": rip, "verdict": "allow", "reason": "ok", "principal": "acme",
        "key_id": key.key_id}
    (decision,) = [r for r in records if r.get("service") == "policy"]
    assert decision["verdict"] == "refuse" and decision["reply"].startswith("550 5.7.1")
    warnings = [r for r in records if r["level"] == "warning"]
    assert any("closing connection" in r["message"] for r in warnings)
    assert records[-1]["message"] == "keyrelay-policyd stopped"


def test_unix_sockets_are_created_with_socket_mode_and_removed_at_exit(
    spawn: Callable[..., Policyd],
) -> None:
    daemon = spawn({"policyd": {"socket_mode": "0640"}}, unix=True)
    key = daemon.keys["acme"]
    paths = [Path(daemon.endpoint(service)[5:]) for service in ("auth", "policy", "socketmap")]
    for path in paths:
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o640, (path, oct(mode))
    assert login_reply(daemon, APIKEY, key.text, fresh_address()).status == "OK"
    assert ask(daemon, server_port="25") == "DUNNO"
    with SocketmapClient(connect(daemon.endpoint("socketmap"))) as socketmap:
        assert socketmap.lookup("sender_login", "a@acme.example") == (
            f"OK acme:{key.key_id}")
    assert daemon.stop() == 0
    assert not any(path.exists() for path in paths)


def _make_traversable(path: Path) -> None:
    """Let another user reach ``path`` (pytest's temporary folders are 0700)."""
    for folder in (path, *path.parents):
        mode = folder.stat().st_mode
        if not mode & 0o001:
            folder.chmod(mode | 0o001)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_daemon_started_as_root_runs_as_policyd_user_once_the_sockets_are_bound(
    spawn: Callable[..., Policyd],
) -> None:
    nobody = pwd.getpwnam("nobody")
    daemon = spawn({"policyd": {"user": "nobody"}}, unix=True, start=False)
    # the daemon reads the directory as nobody; the socket folder stays root's (as Postfix's
    # private/ folder is not the daemon user's either)
    _make_traversable(daemon.sockets)
    daemon.directory_path.chmod(0o644)
    daemon.start()
    status = proc_status(daemon.pid)
    assert status["Uid"].split() == [str(nobody.pw_uid)] * 4
    assert status["Gid"].split() == [str(nobody.pw_gid)] * 4
    assert Path(daemon.endpoint("auth")[5:]).stat().st_uid == nobody.pw_uid
    assert "running as user nobody" in daemon.log()
    # no capability left in any thread, not even in the bounding set (emptied at start)
    threads = capabilities_of_every_thread(daemon.pid)
    assert threads and all(set(caps.values()) == {0} for caps in threads.values()), threads
    key = daemon.keys["acme"]
    assert login_reply(daemon, APIKEY, key.text, fresh_address()).status == "OK"
    assert daemon.stop() == 0


def test_idle_connections_are_closed_after_idle_timeout_while_busy_ones_stay(
    spawn: Callable[..., Policyd],
) -> None:
    # the busy client asks every 0.1 s, 50 times within the idle timeout of 5 s, so even a
    # machine slow enough to take seconds over one answer keeps it busy; the idle ones are
    # waited for up to 60 s (generous: a slow machine)
    daemon = spawn({"policyd": {"idle_timeout": "5s"}})
    auth = DovecotClient(connect(daemon.endpoint("auth")))
    auth.handshake()
    idle = {"auth": auth.stream.sock, "policy": connect(daemon.endpoint("policy")),
            "socketmap": connect(daemon.endpoint("socketmap"))}
    busy = PolicyClient(connect(daemon.endpoint("policy")))
    waiting = dict(idle)
    deadline = time.monotonic() + 60
    try:
        while waiting and time.monotonic() < deadline:
            assert busy.ask(server_port="25") == "DUNNO"  # keeps its connection active
            readable, _, _ = select.select(list(waiting.values()), [], [], 0.1)
            for service, sock in list(waiting.items()):
                if sock in readable and closed_by_peer(sock, timeout=0.05):
                    del waiting[service]
        assert not waiting, f"idle connections still open: {sorted(waiting)}"
        assert busy.ask(server_port="25") == "DUNNO"
    finally:
        for sock in idle.values():
            sock.close()
        busy.stream.close()


def test_connections_beyond_max_connections_are_closed_at_once(
    spawn: Callable[..., Policyd],
) -> None:
    daemon = spawn({"policyd": {"max_connections": 3}})
    key = daemon.keys["acme"]
    clients: list[DovecotClient] = []

    def one_more() -> bool:
        client = DovecotClient(connect(daemon.endpoint("auth")))
        try:
            client.handshake()
        except ConnectionError:  # the readiness probes may still count for a moment
            client.close()
            return False
        clients.append(client)
        return len(clients) == 3

    wait_until(one_more, 10, "three auth connections")
    mark = daemon.mark()
    with connect(daemon.endpoint("auth")) as refused:
        peer = peer_name(refused)
        refused.settimeout(5)
        try:
            greeting = refused.recv(4096)
        except ConnectionResetError:
            greeting = b""
    assert greeting == b"", "the fourth connection was served"
    line = daemon.wait_for_log(rf"auth: connection from {peer} refused", since=mark)
    assert "WARNING" in line and "3 connections already open (policyd.max_connections)" in line
    # the limit is per service, and the open connections are served on
    assert ask(daemon, server_port="25") == "DUNNO"
    assert clients[0].plain(APIKEY, key.text, rip=fresh_address()).status == "OK"
    clients.pop().close()

    def reconnects() -> bool:
        client = DovecotClient(connect(daemon.endpoint("auth")))
        try:
            client.handshake()
        except ConnectionError:
            client.close()
            return False
        clients.append(client)
        return True

    wait_until(reconnects, 10, "a free connection slot")
    assert clients[-1].plain(APIKEY, key.text, rip=fresh_address()).status == "OK"
    for client in clients:
        client.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to test another user's access")
def test_check_config_fails_when_policyd_user_cannot_read_the_directory(tmp_path: Path) -> None:
    daemon = Policyd(tmp_path / "pd", {"policyd": {"user": "nobody"}})
    daemon.keyrelay("account", "add", "acme")  # as root: the file is root's, mode 0640
    os.chmod(tmp_path, 0o700)
    result = subprocess.run(daemon.command("--check-config"), capture_output=True, text=True)
    assert result.returncode == 1
    assert "policyd.user nobody cannot read the directory" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the user is checked when started as root")
def test_the_default_user_is_unprivileged_and_root_is_a_warning(tmp_path: Path) -> None:
    """Issue 20: policyd.user defaulted to "" (stay root). The default is keyrelay; a missing
    user is one clear line; staying root needs an explicit setting and logs a warning."""
    defaults = parse_config({}, "keyrelay.yaml")
    assert (defaults.policyd.user, defaults.milter.user) == ("keyrelay", "keyrelay")
    daemon = Policyd(tmp_path / "pd", {"policyd": {"user": "kr-no-such-user"}})
    daemon.keyrelay("account", "add", "acme")
    result = subprocess.run(daemon.command("--check-config"), capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        "keyrelay-policyd: error: policyd.user: no user kr-no-such-user on this host: create "
        "it (adduser --system --group kr-no-such-user) and give it the directory and keys "
        "(docs/policyd.md, \"Running unprivileged\"), or name another user\n")
    root = Policyd(tmp_path / "root", {"policyd": {"user": "root"}})
    root.keyrelay("account", "add", "acme")
    root.start()
    try:
        assert proc_status(root.pid)["Uid"].split() == ["0"] * 4
        assert ("running as root (policyd.user is root): set it to an unprivileged user "
                "such as keyrelay, the default") in root.log()
    finally:
        assert root.stop() == 0


def test_login_that_postfix_reports_outside_tls_is_refused(relay: Site) -> None:
    key = relay.keys["app"]
    with relay.auth() as auth:
        reply = auth.auth("PLAIN", rip=fresh_address(), resp=b64(f"\0{APIKEY}\0{key.text}"),
                          secured=False)
    assert reply.status == "FAIL"
    assert "log in over TLS" in reply.reason
