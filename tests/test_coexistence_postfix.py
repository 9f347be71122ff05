"""A mailbox user and an API key through the same submission service of a real Postfix
(issue 24, section 3; docs/coexistence.md), each under its own rules.

The site: the relay ``make run`` starts (keyrelay.demo, on free loopback ports), to which the
site's own set-up is added the classic way in main.cf: Dovecot SASL (a real private Dovecot,
testkit/dovecot.py), ``smtpd_sender_login_maps`` naming the mailbox user's address and
``reject_sender_login_mismatch``. With ``auth.site_auth_socket`` pointing at that Dovecot,
``keyrelay postfix apply`` takes the submission service over beside the site's rules. Then:
the mailbox user logs in with its password and sends as itself (delivered, not signed by
keyrelay: the site's mail is the site's), is refused by the site's own mismatch check as a
tenant's sender and with a wrong password; the API key sends as its tenant (delivered,
DKIM-signed) and is refused as the mailbox user's address.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyrelay.demo import Relay
from keyrelay.demo.settings import Settings
from keyrelay.demo.state import keyrelay_cli
from testkit import dovecot as dovecot_kit
from testkit.net import free_ports
from testkit.relay import (
    connect,
    log_of,
    message,
    never_delivered,
    new_tenant,
    reply_of,
    wait_delivered,
)

pytestmark = pytest.mark.skipif(
    not (dovecot_kit.available() and Path("/usr/sbin/postfix").exists()),
    reason="dovecot-core and postfix are not installed (make test installs them)")

ALICE, PASSWORD = "alice@site.example", "alice-mailbox-password-7"


def postconf(relay: Relay, *settings: str) -> None:
    subprocess.run(["postconf", "-c", str(relay.settings.postfix_etc), "-e", *settings],
                   check=True)


@pytest.fixture(scope="module")
def site() -> Iterator[Relay]:
    with dovecot_kit.private_dovecot({ALICE: PASSWORD}) as dovecot:
        run_dir = Path(tempfile.mkdtemp(prefix="kr-co-"))  # short: unix socket paths
        ports = free_ports(7)
        settings = Settings(
            run_dir=run_dir, smtp_port=ports[0], submission_port=ports[1],
            alt_submission_port=ports[2], submissions_port=ports[3], sink_port=ports[4],
            policyd_metrics_port=ports[5], milter_metrics_port=ports[6],
            pool_address="127.0.0.2", daemon_user="keyrelay")
        relay = Relay(settings, say=lambda text: None)
        try:
            relay.prepare()
            # the site's own set-up, the classic way, in main.cf
            senders = run_dir / "site-senders"
            senders.write_text(f"{ALICE} {ALICE}\n")
            postconf(relay, f"smtpd_sasl_path = {dovecot.socket}",
                     f"smtpd_sender_login_maps = texthash:{senders}",
                     "smtpd_sender_restrictions = reject_sender_login_mismatch")
            # keyrelay beside it: the same Dovecot socket for the logins that are not its own
            text = settings.config.read_text()
            head, _, body = text.partition("{")
            config = json.loads("{" + body)
            config["auth"] = {"site_auth_socket": str(dovecot.socket)}
            settings.config.write_text(head + json.dumps(config, indent=2) + "\n")
            applied = keyrelay_cli(settings, "postfix", "apply", "--config-dir",
                                   str(settings.postfix_etc))
            assert "joined with keyrelay's: -o smtpd_sender_login_maps=unionmap:{" in applied
            relay.launch()
            yield relay
        finally:
            relay.stop()
            shutil.rmtree(run_dir, ignore_errors=True)


def test_a_mailbox_user_sends_as_itself_under_the_sites_rules(site: Relay) -> None:
    tenant = new_tenant(site)
    mid, text = message(ALICE, "rcpt@example.net", "from the mailbox user")
    with connect(site, "submission") as client:
        client.login(ALICE, PASSWORD)
        assert client.sendmail(ALICE, ["rcpt@example.net"], text) == {}
    _, delivered = wait_delivered(site, mid)
    assert delivered.get("DKIM-Signature") is None  # the site's mail is not keyrelay's to sign
    assert "reason=site_login" in log_of(site, "policyd")
    # the site's own mismatch check: the tenant's address is not the mailbox user's
    with connect(site, "submission") as client:
        client.login(ALICE, PASSWORD)
        code, text_ = reply_of(lambda: client.sendmail(
            tenant.sender, ["rcpt@example.net"], message(tenant.sender, "rcpt@example.net",
                                                         "not alice's")[1]))
    assert code == 553 and "not owned by user alice@site.example" in text_
    # Dovecot's refusal of a wrong password reaches the client
    with connect(site, "submission") as client:
        code, _ = reply_of(lambda: client.login(ALICE, "not-the-password"))
    assert code == 535
    assert PASSWORD not in log_of(site, "policyd")


def test_an_api_key_sends_as_its_tenant_through_the_same_service(site: Relay) -> None:
    tenant = new_tenant(site)
    mid, text = message(tenant.sender, "rcpt@example.net", "from the application")
    with connect(site, "submission") as client:
        client.login("apikey", tenant.key)
        assert client.sendmail(tenant.sender, ["rcpt@example.net"], text) == {}
    _, delivered = wait_delivered(site, mid)
    assert f"d={tenant.domain}" in str(delivered.get("DKIM-Signature"))
    # the mailbox user's address is not the tenant's: refused, and never delivered
    mid, text = message(ALICE, "rcpt@example.net", "not the tenant's")
    with connect(site, "submission") as client:
        client.login("apikey", tenant.key)
        code, refused = reply_of(lambda: client.sendmail(ALICE, ["rcpt@example.net"], text))
    assert code in (550, 553) and refused.startswith("5.7.1")
    never_delivered(site, mid)
