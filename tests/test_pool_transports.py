"""A pool Postfix has no transport for (issue 20 item 4): the engine answers 451 4.3.0
(``pool_not_in_postfix``) instead of routing to it, policyd learns the transports from
master.cf (keyrelay/mastercf.py, policyd/transports.py) and logs why, and the CLI says when
Postfix needs ``keyrelay postfix apply``.

The real Postfix case (a client's RCPT answered 4xx, then delivered after apply) is in
tests/test_postfix_policyd.py.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest
from test_reasons import text_matches

from keyrelay.config import parse_config
from keyrelay.decisions import (
    Action,
    EngineSettings,
    EnvelopeFacts,
    Reason,
    Verdict,
    decide_envelope,
    format_identity,
)
from keyrelay.directory import YamlDirectory
from keyrelay.directory.yamlfile import render
from keyrelay.logs import DecisionLog
from keyrelay.mastercf import read_transports, unix_services
from policyd.context import ServiceContext
from policyd.policy import PolicyService
from policyd.policy import render as render_policy
from policyd.transports import PostfixTransports
from testkit.factories import NOW, World, key_id
from testkit.policyd import KEYRELAY
from testkit.protocols import policy_request

INSIDE = "203.0.113.5"
MASTER_CF = """\
# ==========================================================================
# service type  private unpriv  chroot  wakeup  maxproc command + args
smtp      inet  n       -       y       -       -       smtpd
#submission inet n       -       y       -       -       smtpd
#  -o syslog_name=postfix/submission
pickup    unix  n       -       y       60      1       pickup
smtp      unix  -       -       y       -       -       smtp
relay     unix  -       -       y       -       -       smtp
        -o syslog_name=postfix/$service_name
#kr-pool-commented unix - - n - - smtp
"""


@pytest.fixture
def world() -> World:
    w = World()
    w.pool("mkt", "198.51.100.3")
    w.account("acme")
    w.subuser("acme/marketing", pool="mkt")
    w.subuser("acme/billing")
    w.domain("acme", "acme.example")
    w.grant("acme.example", "acme/marketing")
    w.grant("acme.example", "acme/billing")
    return w


def ask(world: World, principal: str, transports: frozenset[str] | None, *,
        sender: str = "app@acme.example", settings: EngineSettings | None = None) -> Verdict:
    ident = format_identity(principal, key_id(world.key(principal)))
    facts = EnvelopeFacts(ident, True, INSIDE, sender, NOW, transports)
    return decide_envelope(world.snapshot(), settings or EngineSettings(), facts)


# -- the engine ------------------------------------------------------------------------------
def test_a_pool_postfix_has_is_routed(world: World) -> None:
    verdict = ask(world, "acme/marketing", frozenset({"smtp", "kr-pool-mkt"}))
    assert verdict.action is Action.ALLOW and verdict.transport == "kr-pool-mkt"


def test_a_pool_postfix_lacks_is_temporary_451_4_3_0(world: World) -> None:
    verdict = ask(world, "acme/marketing", frozenset({"smtp", "relay"}))
    assert (verdict.action, verdict.code, verdict.status, verdict.reason) == (
        Action.TEMPFAIL, 451, "4.3.0", Reason.POOL_NOT_IN_POSTFIX)
    assert verdict.text == ("relay configuration incomplete (IP pool 'mkt' is not set up in "
                            "Postfix yet); try again later")
    assert text_matches("pool_not_in_postfix", verdict.text)
    assert (verdict.principal, verdict.transport) == ("acme/marketing", "kr-pool-mkt")
    assert verdict.log_fields()["reason"] == "pool_not_in_postfix"


def test_unknown_transports_are_not_checked(world: World) -> None:
    assert ask(world, "acme/marketing", None).transport == "kr-pool-mkt"


def test_a_principal_without_a_pool_needs_no_transport(world: World) -> None:
    verdict = ask(world, "acme/billing", frozenset())
    assert verdict.action is Action.ALLOW and verdict.transport is None


def test_the_default_pool_and_prefix_are_checked_too(world: World) -> None:
    settings = EngineSettings(default_pool="mkt", transport_prefix="out-")
    lacking = ask(world, "acme/billing", frozenset({"kr-pool-mkt"}), settings=settings)
    assert lacking.reason is Reason.POOL_NOT_IN_POSTFIX and "'mkt'" in lacking.text
    having = ask(world, "acme/billing", frozenset({"out-mkt"}), settings=settings)
    assert having.transport == "out-mkt" and having.allowed


def test_monitor_mode_does_not_let_a_missing_transport_pass(world: World) -> None:
    # our configuration's fault: temporary, never "would be" (nothing could deliver it)
    verdict = ask(world, "acme/marketing", frozenset(), sender="ceo@bank.example",
                  settings=EngineSettings(monitor_mode=True))
    assert verdict.reason is Reason.POOL_NOT_IN_POSTFIX and verdict.monitored is None


def test_a_refusal_stays_the_refusal(world: World) -> None:
    verdict = ask(world, "acme/marketing", frozenset(), sender="ceo@bank.example")
    assert verdict.reason is Reason.SENDER_NOT_OWNED


def test_a_remembered_allow_is_checked_against_the_transports_of_each_request(
    world: World,
) -> None:
    # decide_envelope remembers plain allows per snapshot: the transports must not be
    ident = format_identity("acme/marketing", key_id(world.key("acme/marketing")))
    snapshot, settings = world.snapshot(), EngineSettings()

    def answer(transports: frozenset[str]) -> Reason:
        facts = EnvelopeFacts(ident, True, INSIDE, "app@acme.example", NOW, transports)
        return decide_envelope(snapshot, settings, facts).reason

    assert answer(frozenset({"kr-pool-mkt"})) is Reason.OK
    assert answer(frozenset()) is Reason.POOL_NOT_IN_POSTFIX
    assert answer(frozenset({"kr-pool-mkt"})) is Reason.OK


# -- master.cf --------------------------------------------------------------------------------
def test_unix_services_are_the_uncommented_unix_entries() -> None:
    assert unix_services(MASTER_CF) == {"pickup", "smtp", "relay"}


def test_read_transports_of_a_folder_without_master_cf_is_unknown(tmp_path: Path) -> None:
    assert read_transports(str(tmp_path)) is None
    assert read_transports("") is None
    (tmp_path / "master.cf").write_text(MASTER_CF)
    assert read_transports(str(tmp_path)) == frozenset({"pickup", "smtp", "relay"})


def test_policyd_rereads_master_cf_when_it_changes(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "keyrelay.policyd.policy")
    transports = PostfixTransports(str(tmp_path))
    assert transports.current() is None  # no master.cf yet: not checked, and said once
    assert transports.current() is None
    unreadable = [r for r in caplog.records if "cannot read Postfix's master.cf" in r.message]
    assert len(unreadable) == 1
    master = tmp_path / "master.cf"
    master.write_text(MASTER_CF)
    assert transports.current() == frozenset({"pickup", "smtp", "relay"})
    master.write_text(MASTER_CF + "kr-pool-mkt unix - - n - - smtp\n")
    assert transports.current() == frozenset({"pickup", "smtp", "relay", "kr-pool-mkt"})
    assert PostfixTransports("").current() is None


# -- the policy service -----------------------------------------------------------------------
def test_policy_service_answers_451_and_logs_why_until_master_cf_has_the_transport(
    tmp_path: Path, world: World, caplog: pytest.LogCaptureFixture,
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "master.cf").write_text(MASTER_CF)
    path = tmp_path / "directory.yaml"
    identity = format_identity("acme/marketing", key_id(world.key("acme/marketing")))
    path.write_text(render(world.data))
    config = parse_config({"directory": {"path": str(path)},
                           "postfix": {"config_dir": str(etc)}}, "test")
    log = DecisionLog(config.logging, (tmp_path / "log").open("w"))
    service = PolicyService(ServiceContext(config, YamlDirectory(str(path)), log,
                                           clock=lambda: NOW))
    request = policy_request(sasl_method="PLAIN", sasl_username=identity,
                             sender="app@acme.example", instance="1.0")
    caplog.set_level(logging.WARNING, "keyrelay.policyd.policy")
    def decide() -> str:
        verdict = service.decide(request)  # an RCPT: nothing charged
        assert isinstance(verdict, Verdict)
        return render_policy(verdict)

    answers = [decide() for _ in range(3)]
    assert answers == ["451 4.3.0 relay configuration incomplete (IP pool 'mkt' is not set up "
                       "in Postfix yet); try again later"] * 3
    why = [r.message for r in caplog.records if "has no Postfix transport" in r.message]
    assert why == [f"pool mkt has no Postfix transport kr-pool-mkt in {etc}/master.cf yet: run "
                   "keyrelay postfix apply --reload; its mail is answered 451 4.3.0 until "
                   "then"]  # once, however often the client retries
    with (etc / "master.cf").open("a") as handle:
        handle.write("kr-pool-mkt unix - - n - - smtp\n  -o smtp_bind_address=198.51.100.3\n")
    assert decide() == "FILTER kr-pool-mkt:"


# -- the CLI ------------------------------------------------------------------------------------
def keyrelay(config: Path, *args: str) -> str:
    result = subprocess.run([str(KEYRELAY), "--config", str(config), *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def cli(tmp_path: Path) -> tuple[Path, Path]:
    """(keyrelay config, Postfix master.cf) with a Postfix that has no pool transport yet."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "master.cf").write_text(MASTER_CF)
    config = tmp_path / "keyrelay.yaml"
    config.write_text(f"directory: {{path: {tmp_path}/directory.yaml}}\n"
                      f"logging: {{audit_log: ''}}\n"
                      f"postfix: {{config_dir: {etc}}}\n")
    keyrelay(config, "account", "add", "acme")
    keyrelay(config, "subuser", "add", "acme/marketing")
    return config, etc / "master.cf"


NEEDS_APPLY = ("Postfix needs the transport kr-pool-mkt: run `keyrelay postfix apply "
               "--reload`; mail through this pool waits until then.")


def test_pool_add_and_assign_say_that_postfix_needs_apply(cli: tuple[Path, Path]) -> None:
    config, master = cli
    added = keyrelay(config, "pool", "add", "mkt", "--bind", "192.0.2.10", "--helo",
                     "mkt.relay.example.net")
    assert added.splitlines()[-1] == NEEDS_APPLY
    assigned = keyrelay(config, "pool", "assign", "acme/marketing", "mkt")
    assert assigned.splitlines() == ["acme/marketing now sends through pool mkt.", NEEDS_APPLY]
    # once Postfix has the transport, nothing more to say
    with master.open("a") as handle:
        handle.write("kr-pool-mkt unix - - n - - smtp\n")
    assigned = keyrelay(config, "pool", "assign", "acme", "mkt")
    assert assigned.splitlines() == ["acme now sends through pool mkt."]
    keyrelay(config, "pool", "assign", "acme", "none")
    keyrelay(config, "pool", "assign", "acme/marketing", "none")
    removed = keyrelay(config, "pool", "remove", "mkt")
    assert "`keyrelay postfix apply --reload` removes it" in removed


def test_sync_says_which_pools_postfix_needs(cli: tuple[Path, Path], tmp_path: Path) -> None:
    config, master = cli
    declared = tmp_path / "declared.yaml"
    declared.write_text("pools:\n  mkt: {bind: [192.0.2.10], helo: mkt.relay.example.net}\n"
                        "accounts:\n  acme:\n    subusers:\n      marketing: {pool: mkt}\n")
    synced = keyrelay(config, "sync", str(declared))
    assert synced.splitlines()[-1] == NEEDS_APPLY
    with master.open("a") as handle:
        handle.write("kr-pool-mkt unix - - n - - smtp\n")
    declared.write_text("pools:\n  mkt: {bind: [192.0.2.11], helo: mkt.relay.example.net}\n")
    changed = keyrelay(config, "sync", str(declared))
    assert changed.splitlines()[-1] == (
        "Postfix still has the old settings of kr-pool-mkt (bind address or HELO changed): "
        "run `keyrelay postfix apply --reload`.")
    assert "Nothing to do" in keyrelay(config, "sync", str(declared))


def test_import_says_which_pools_postfix_needs(cli: tuple[Path, Path], tmp_path: Path) -> None:
    config, _ = cli
    keyrelay(config, "pool", "add", "mkt", "--bind", "192.0.2.10", "--helo",
             "mkt.relay.example.net")
    keyrelay(config, "export", "--output", str(tmp_path / "export.yaml"))
    keyrelay(config, "pool", "remove", "mkt")
    imported = keyrelay(config, "import", str(tmp_path / "export.yaml"))
    assert imported.splitlines()[-1] == NEEDS_APPLY


def test_without_a_readable_master_cf_the_cli_says_apply_is_needed(tmp_path: Path) -> None:
    config = tmp_path / "keyrelay.yaml"
    config.write_text(f"directory: {{path: {tmp_path}/directory.yaml}}\n"
                      f"logging: {{audit_log: ''}}\npostfix: {{config_dir: ''}}\n")
    added = keyrelay(config, "pool", "add", "mkt", "--bind", "192.0.2.10", "--helo",
                     "mkt.relay.example.net")
    assert added.splitlines()[-1] == (
        "Postfix needs the transport kr-pool-mkt: run `keyrelay postfix apply --config-dir DIR "
        "--reload`; mail through this pool waits until then.")
