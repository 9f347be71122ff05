"""policyd's account-aware services, in process: what they decide beyond the engine."""

from __future__ import annotations

import asyncio
import itertools
import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from keyrelay.config import parse_config
from keyrelay.counters import MemoryCounters, Sliding
from keyrelay.decisions import Verdict, format_identity
from keyrelay.directory import YamlDirectory
from keyrelay.directory.model import Limits
from keyrelay.directory.yamlfile import render
from keyrelay.logs import DecisionLog
from policyd import dovecot, netstring
from policyd.auth import AuthService, client_key, loggable_username
from policyd.context import ServiceContext
from policyd.policy import PolicyService
from policyd.policy import render as render_policy
from policyd.socketmap import SocketmapService
from testkit.factories import NOW, World, key_id
from testkit.protocols import policy_request


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("not-an-address", "not-an-address"),
    ],
)
def test_failures_are_counted_per_ipv4_address_and_per_ipv6_slash_64(
    address: str, key: str
) -> None:
    assert client_key(address) == key


def test_an_api_key_typed_as_the_username_is_never_logged() -> None:
    world = World()
    world.account("acme")
    text = world.key("acme")
    assert loggable_username(text) == "<an API key>"
    assert loggable_username("kr." + "x" * 10) == "<an API key>"
    assert loggable_username("alice") == "alice"
    assert loggable_username("a" * 500) == "a" * 64


def _service(tmp_path: Path, world: World) -> SocketmapService:
    path = tmp_path / "directory.yaml"
    path.write_text(render(world.data))
    config = parse_config({"directory": {"path": str(path)}}, "test")
    log = DecisionLog(config.logging, (tmp_path / "log").open("w"))
    return SocketmapService(ServiceContext(config, YamlDirectory(str(path)), log,
                                           clock=lambda: NOW))


def test_sender_login_lists_keys_of_owners_and_grantees_but_not_suspended_ones(
    tmp_path: Path,
) -> None:
    world = World()
    world.account("acme")
    world.subuser("acme/app")
    world.subuser("acme/old")
    owner_key, app_key, old_key = world.key("acme"), world.key("acme/app"), world.key("acme/old")
    revoked = world.key("acme/app")
    world.revoke(revoked)
    world.domain("acme", "acme.example")
    world.grant("acme.example", "acme/app")
    world.grant("acme.example", "acme/old")
    world.suspend("acme/old")
    service = _service(tmp_path, world)
    reply, outcome = service.lookup(netstring.Lookup("sender_login", "News@ACME.example"))
    assert outcome == "ok"
    logins = reply.decode().split(" ", 1)[1].rstrip(",").split(",")
    assert sorted(logins) == sorted(
        [f"acme:{key_id(owner_key)}", f"acme/app:{key_id(app_key)}"]
    )
    assert all(key_id(k) not in reply.decode() for k in (old_key, revoked))


def test_last_used_flush_never_creates_an_empty_directory_in_place_of_a_missing_one(
    tmp_path: Path,
) -> None:
    world = World()
    world.account("acme")
    text = world.key("acme")
    service = _service(tmp_path, world)
    path = tmp_path / "directory.yaml"
    path.rename(tmp_path / "moved-away.yaml")  # an admin's mv, a restore in progress...
    context = service.context
    assert context.write_key_use({key_id(text): NOW}) is False
    assert not path.exists()  # answered temporarily meanwhile; the keys are not wiped out


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_new_directory_file_and_lock_belong_to_the_folders_owner(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    os.chown(folder, 65534, 65534)  # the daemons' user, as the deployment sets it up
    directory = YamlDirectory(str(folder / "directory.yaml"))
    with directory.transaction() as data:
        data.monitor = True
    for name, mode in (("directory.yaml", 0o640), ("directory.yaml.lock", 0o660)):
        st = (folder / name).stat()
        assert (st.st_uid, st.st_gid) == (65534, 65534), name
        assert stat.S_IMODE(st.st_mode) == mode, name


# -- the policy service's counting, on a clock the test moves ---------------------------------
START = 1_800_000_000.0  # the store's clock (epoch seconds), at the start of a minute


class Policy:
    """A PolicyService on a YAML directory, with the memory counter store's clock in the
    test's hand."""

    def __init__(self, tmp_path: Path, world: World, config: dict[str, object] | None = None,
                 ) -> None:
        path = tmp_path / "directory.yaml"
        path.write_text(render(world.data))
        self.config = parse_config({"directory": {"path": str(path)}, **(config or {})}, "test")
        log = DecisionLog(self.config.logging, (tmp_path / "log").open("w"))
        self.tick = START  # moved only by the test
        store = MemoryCounters(clock=lambda: self.tick,
                               zone=ZoneInfo(self.config.counters.time_zone))
        self.service = PolicyService(ServiceContext(
            self.config, YamlDirectory(str(path)), log,
            clock=lambda: datetime.fromtimestamp(self.tick, UTC), counters=store))
        self.instances = itertools.count(1)

    def message(self, identity: str, *stages: str, recipients: int = 1) -> list[str]:
        """The answers to one message's requests, as Postfix asks them at each stage."""
        instance = f"{next(self.instances):x}.0"
        answers = []
        for stage in stages:
            at_data = stage in ("DATA", "END-OF-MESSAGE")
            principal = identity.rpartition(":")[0]
            sender = f"{principal.replace('/', '.')}@acme.example"  # acme, or acme.app
            request = policy_request(
                sasl_method="PLAIN", sasl_username=identity, sender=sender,
                protocol_state=stage, instance=instance, queue_id="4XyZ1",
                recipient_count=str(recipients) if at_data else "0",
                recipient="rcpt@example.net")
            verdict = self.service.decide(request)
            assert isinstance(verdict, Verdict), "the memory store is charged synchronously"
            answers.append(render_policy(verdict))
        return answers


def _limited(tmp_path: Path, per_minute: int) -> tuple[Policy, str]:
    world = World()
    world.account("acme", limits=Limits(per_minute, None, None))
    world.domain("acme", "acme.example")
    text = world.key("acme")
    return Policy(tmp_path, world), format_identity("acme", key_id(text))


def _full(per_minute: int, wait: str) -> str:
    return (f"451 4.7.1 limit of {per_minute} messages per minute reached for account acme "
            f"(a message to N recipients counts N); try again in {wait}")


def test_a_message_beyond_the_per_minute_limit_is_deferred_451_at_data(tmp_path: Path) -> None:
    policy, identity = _limited(tmp_path, 3)
    sent = [policy.message(identity, "RCPT", "DATA") for _ in range(4)]
    assert sent[:3] == [["DUNNO", "DUNNO"]] * 3
    # 3 in this minute's bucket: room for one more once 1/3 of it has slid out of the
    # window, 20 seconds into the next minute
    assert sent[3] == ["DUNNO", _full(3, "80 seconds")]
    # a refused message is not counted; two minutes later the window has slid past all
    policy.tick += 120
    assert policy.message(identity, "RCPT", "DATA") == ["DUNNO", "DUNNO"]


def test_a_message_asked_at_data_and_end_of_message_is_counted_once(tmp_path: Path) -> None:
    policy, identity = _limited(tmp_path, 2)
    # counted twice, the second message's DATA would already be the third
    first = policy.message(identity, "RCPT", "DATA", "END-OF-MESSAGE")
    second = policy.message(identity, "RCPT", "DATA", "END-OF-MESSAGE")
    third = policy.message(identity, "RCPT", "DATA")
    assert first == second == ["DUNNO"] * 3
    assert third[1] == _full(2, "90 seconds")


def test_a_message_refused_at_data_is_charged_at_end_of_message_once_there_is_room(
        tmp_path: Path) -> None:
    policy, identity = _limited(tmp_path, 1)
    assert policy.message(identity, "DATA") == ["DUNNO"]
    refused = policy.message(identity, "DATA")
    assert refused[0].startswith("451 4.7.1"), "the refused take added nothing"
    policy.tick += 120
    assert policy.message(identity, "DATA", "END-OF-MESSAGE") == ["DUNNO", "DUNNO"]
    assert policy.message(identity, "DATA")[0].startswith("451 4.7.1"), \
        "the message above was charged once, at DATA"


def test_the_rate_window_slides_a_message_counts_less_as_it_ages(tmp_path: Path) -> None:
    policy, identity = _limited(tmp_path, 2)
    for _ in range(2):
        assert policy.message(identity, "DATA") == ["DUNNO"]
    assert policy.message(identity, "DATA") == [_full(2, "90 seconds")]
    policy.tick += 30  # still inside the minute: the two count fully or in part
    assert policy.message(identity, "DATA")[0].startswith("451 4.7.1")
    policy.tick += 61  # the first minute's messages have slid out, enough for one
    assert policy.message(identity, "DATA") == ["DUNNO"]


def _acme_and_two_subusers(tmp_path: Path, limits: Limits,
                           config: dict[str, object] | None = None,
                           ) -> tuple[Policy, str, str]:
    world = World()
    world.account("acme", limits=limits)
    world.domain("acme", "acme.example")
    world.subuser("acme/app")
    world.subuser("acme/billing")
    for subuser in ("acme/app", "acme/billing"):
        world.sender(subuser, f"{subuser.replace('/', '.')}@acme.example")
    app, billing = world.key("acme/app"), world.key("acme/billing")
    return (Policy(tmp_path, world, config), format_identity("acme/app", key_id(app)),
            format_identity("acme/billing", key_id(billing)))


def test_two_subusers_of_an_account_limited_to_1_per_minute_send_one_message_together(
        tmp_path: Path) -> None:
    # issue 21: with `keyrelay limits set acme --per-minute 1` two subusers sent one each
    policy, app, billing = _acme_and_two_subusers(tmp_path, Limits(messages_per_minute=1))
    assert policy.message(app, "RCPT", "DATA") == ["DUNNO", "DUNNO"]
    assert policy.message(billing, "RCPT", "DATA") == ["DUNNO", _full(1, "2 minutes")]
    policy.tick += 120
    assert policy.message(billing, "RCPT", "DATA") == ["DUNNO", "DUNNO"]


def test_a_message_to_3_recipients_counts_3(tmp_path: Path) -> None:
    policy, app, billing = _acme_and_two_subusers(tmp_path, Limits(messages_per_minute=5))
    assert policy.message(app, "DATA", recipients=3) == ["DUNNO"]
    assert policy.message(billing, "DATA", recipients=3)[0].startswith("451 4.7.1")
    assert policy.message(billing, "DATA", recipients=2) == ["DUNNO"]  # 3 + 2 = 5
    assert policy.message(app, "DATA")[0].startswith("451 4.7.1")


def test_a_daily_quota_answers_451_naming_the_quota_and_its_reset(tmp_path: Path) -> None:
    policy, app, billing = _acme_and_two_subusers(
        tmp_path, Limits(messages_per_day=4), {"counters": {"time_zone": "Europe/Paris"}})
    # 2027-01-15 08:00 UTC
    assert policy.message(app, "DATA", recipients=3) == ["DUNNO"]
    assert policy.message(billing, "DATA", recipients=2) == [
        "451 4.7.1 daily quota of 4 messages for account acme reached; it resets at "
        "2027-01-16 00:00 CET (a message to N recipients counts N)"]
    policy.tick += 16 * 3600  # 00:00 in Paris
    assert policy.message(billing, "DATA", recipients=2) == ["DUNNO"]


def test_monitor_mode_lets_a_message_pass_over_a_full_window_and_charges_nothing(
        tmp_path: Path) -> None:
    world = World()
    world.account("acme", limits=Limits(messages_per_minute=1))
    world.domain("acme", "acme.example")
    world.monitor("acme")
    identity = format_identity("acme", key_id(world.key("acme")))
    policy = Policy(tmp_path, world)
    assert policy.message(identity, "DATA") == ["DUNNO"]
    assert policy.message(identity, "DATA") == ["DUNNO"]  # over the limit: passes, logged
    store = policy.service.context.store
    assert isinstance(store, MemoryCounters)
    usage = asyncio.run(store.peek((Sliding("acme", 60, 1),)))
    assert usage[0].count == 1.0, "the pass over the full window took nothing"


# -- the auth service's brute-force counters, on a clock the test moves ------------------------
class Auth:
    """An AuthService on a YAML directory, with its counter store's clock in the test's
    hand."""

    def __init__(self, tmp_path: Path, world: World, bruteforce: dict[str, object]) -> None:
        path = tmp_path / "directory.yaml"
        path.write_text(render(world.data))
        config = parse_config({"directory": {"path": str(path)},
                               "policyd": {"bruteforce": bruteforce}}, "test")
        log = DecisionLog(config.logging, (tmp_path / "log").open("w"))
        self.tick = NOW.timestamp()  # the store's wall clock: seconds, moved only by the test
        self.service = AuthService(ServiceContext(
            config, YamlDirectory(str(path)), log, clock=lambda: NOW,
            counters=MemoryCounters(clock=lambda: self.tick)))

    def login(self, password: str, client: str) -> str:
        """``OK`` or the reason the client reads."""
        verdict = self.service.login(dovecot.Attempt("1", "PLAIN", "apikey", password, client,
                                                     True, "smtp"))
        assert isinstance(verdict, Verdict)
        return "OK" if verdict.allowed else verdict.text


def _wrong_secret(text: str) -> str:
    """The same key id with another secret of the same shape."""
    head, secret = text.rsplit(".", 1)
    return f"{head}.{'A' if secret[0] != 'A' else 'B'}{secret[1:]}"


def test_a_locked_key_id_lets_its_owner_in_where_it_logged_in_within_trusted_for(
    tmp_path: Path,
) -> None:
    world = World()
    world.account("acme")
    text = world.key("acme")
    wrong = _wrong_secret(text)
    auth = Auth(tmp_path, world, {"max_failures_per_key": 3, "max_failures_per_address": 2,
                                  "lockout": "1h", "trusted_for": "1d"})
    locked = f"too many failed logins for API key {key_id(text)}; try again in 60 minutes"
    assert auth.login(text, "192.0.2.1") == "OK"  # the owner, at home
    auth.tick += 23 * 3600.0
    for n in range(3):  # a stranger, from three addresses
        assert auth.login(wrong, f"198.51.100.{n}").startswith("unknown API key")
    assert auth.login(text, "192.0.2.1") == "OK"  # logged in from here 23 hours ago
    assert auth.login(text, "192.0.2.2") == locked  # the owner elsewhere: locked out
    assert auth.login(text, "198.51.100.0") == locked  # the stranger, with the right key too
    auth.tick += 30 * 60.0
    # the last login from home (a moment ago) still counts: nothing to do with the first one
    assert auth.login(text, "192.0.2.1") == "OK"
    # wrong secrets from the owner's own address still count against that address
    for _ in range(2):
        assert auth.login(wrong, "192.0.2.1").startswith("unknown API key")
    assert auth.login(text, "192.0.2.1") == (
        "too many failed logins from 192.0.2.1; try again in 60 minutes")


def test_a_key_id_locked_out_after_trusted_for_has_passed_is_locked_everywhere(
    tmp_path: Path,
) -> None:
    world = World()
    world.account("acme")
    text = world.key("acme")
    wrong = _wrong_secret(text)
    auth = Auth(tmp_path, world, {"max_failures_per_key": 2, "trusted_for": "1h"})
    assert auth.login(text, "192.0.2.1") == "OK"
    auth.tick += 3601.0
    for n in range(2):
        auth.login(wrong, f"198.51.100.{n}")
    assert auth.login(text, "192.0.2.1").startswith("too many failed logins for API key")
