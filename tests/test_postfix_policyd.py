"""A real private Postfix authenticates real SMTP clients through keyrelay-policyd and applies
its policy verdicts; mail leaves through the principal's IP pool to a real sink.

This is the one end-to-end check of issue 3 (SASL over the Dovecot protocol, policy over
check_policy_service, FILTER routing); the full end-to-end suite lives elsewhere.
"""

from __future__ import annotations

import json
import smtplib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from policyd_harness import Policyd
from postfix_harness import (
    PostfixInstance,
    Sink,
    add_demo_tenant,
    free_port,
    make_certificate,
    submission_client,
    text_message,
)

pytestmark = pytest.mark.skipif(
    not Path("/usr/sbin/postfix").exists(),
    reason="Postfix is not installed (make test installs it)",
)


@dataclass
class Relay:
    postfix: PostfixInstance
    sink: Sink
    policyd: Policyd
    submission_port: int
    key: str

    def keyrelay(self, *args: str) -> str:
        return self.policyd.keyrelay(*args)


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    root = tmp_path_factory.mktemp("relay")
    policyd = Policyd(root / "policyd")
    kr = policyd.keyrelay
    add_demo_tenant(kr)
    key = policyd.create_key("acme/app", "e2e").text
    auth_port = policyd.endpoint("auth").rpartition(":")[2]
    policy_port = policyd.endpoint("policy").rpartition(":")[2]
    submission_port = free_port()

    sink = Sink(root / "sink")
    tls_key, tls_cert = make_certificate(root / "tls", "relay.test.example")
    policy = f"check_policy_service {{ inet:127.0.0.1:{policy_port}, policy_context=submission }}"
    postfix = PostfixInstance(
        root / "postfix",
        main={
            "smtpd_tls_chain_files": f"{tls_key}, {tls_cert}",
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": f"inet:127.0.0.1:{auth_port}",
            "smtpd_sasl_security_options": "noanonymous, noplaintext",
            "smtpd_sasl_tls_security_options": "noanonymous",
            "mua_relay_restrictions": f"{policy}, permit_sasl_authenticated, reject",
            "mua_data_restrictions": policy,
            # FILTER kr-pool-app: has no next hop: it goes to default_filter_nexthop, here the
            # sink (in production it is empty, and mail goes to the recipient's MX).
            "default_filter_nexthop": f"[127.0.0.1]:{sink.port}",
            "relayhost": f"[127.0.0.1]:{sink.port}",
            "smtp_bind_address_enforce": "yes",
        },
        services=(
            f"127.0.0.1:{submission_port} inet n - n - - smtpd\n"
            "  -o syslog_name=postfix/submission\n"
            "  -o smtpd_tls_security_level=encrypt\n"
            "  -o smtpd_sasl_auth_enable=yes\n"
            "  -o smtpd_tls_auth_only=yes\n"
            "  -o smtpd_relay_restrictions=$mua_relay_restrictions\n"
            "  -o smtpd_data_restrictions=$mua_data_restrictions\n"
            "kr-pool-app unix - - n - - smtp\n"
            "  -o smtp_bind_address=127.0.0.1\n"
            "  -o smtp_helo_name=pool-app.test.example\n"
        ),
    )
    try:
        sink.start()
        policyd.start()
        postfix.start(submission_port)
        yield Relay(postfix, sink, policyd, submission_port, key)
    finally:
        postfix.stop()
        sink.stop()
        if policyd.running():
            policyd.stop()


def test_api_key_login_sends_mail_out_through_the_principals_ip_pool(relay: Relay) -> None:
    with submission_client(relay.submission_port) as client:
        client.login("apikey", relay.key)
        refused = client.sendmail("app@acme.example", ["rcpt@example.net"],
                                  text_message("app@acme.example", "rcpt@example.net", "pool test"))
    assert refused == {}
    (message,) = relay.sink.wait_for(1)
    assert message["Subject"] == "pool test"
    # smtp-sink records the HELO it got: the pool's transport, not the default smtp client
    assert "pool-app.test.example" in message["X-Helo-Args"]
    assert message["X-Client-Addr"] == "127.0.0.1"
    log = relay.postfix.wait_for_log("sasl_username=acme/app:")
    assert "sasl_method=PLAIN" in log or "sasl_method=LOGIN" in log
    assert relay.key.split(".")[2] not in log  # the secret never reaches Postfix's log


def test_unknown_key_is_refused_with_535_and_the_policyd_reason(relay: Relay) -> None:
    wrong = relay.key[:-4] + ("AAAA" if not relay.key.endswith("AAAA") else "BBBB")
    with (
        submission_client(relay.submission_port) as client,
        pytest.raises(smtplib.SMTPAuthenticationError) as refused,
    ):
        client.login("apikey", wrong)
    assert refused.value.smtp_code == 535
    assert b"5.7.8" in refused.value.smtp_error
    assert b"unknown API key" in refused.value.smtp_error


def test_username_other_than_apikey_is_refused(relay: Relay) -> None:
    with (
        submission_client(relay.submission_port) as client,
        pytest.raises(smtplib.SMTPAuthenticationError) as refused,
    ):
        client.login("alice", relay.key)
    assert refused.value.smtp_code == 535
    assert b"log in with username 'apikey'" in refused.value.smtp_error


def test_sender_outside_the_principals_domains_is_refused_550(relay: Relay) -> None:
    with submission_client(relay.submission_port) as client:
        client.login("apikey", relay.key)
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail("ceo@bank.example", ["rcpt@example.net"],
                            text_message("ceo@bank.example", "rcpt@example.net", "spoof"))
    code, text = refused.value.recipients["rcpt@example.net"]
    assert code == 550
    assert b"5.7.1" in text and b"not a verified domain or sender of acme/app" in text


def test_submission_without_login_gets_530_authentication_required(relay: Relay) -> None:
    with submission_client(relay.submission_port) as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail("app@acme.example", ["rcpt@example.net"],
                            text_message("app@acme.example", "rcpt@example.net", "no auth"))
    code, text = refused.value.recipients["rcpt@example.net"]
    assert code == 530
    assert b"5.7.0" in text and b"Authentication required" in text


def test_swaks_key_revoked_after_creation_cannot_log_in(relay: Relay) -> None:
    created = json.loads(relay.keyrelay("key", "create", "acme/app", "--name", "gone", "--json"))
    relay.keyrelay("key", "revoke", created["key_id"])
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{relay.submission_port}", "--tls",
         "--auth", "PLAIN", "--auth-user", "apikey", "--auth-password", created["key"],
         "--from", "app@acme.example", "--to", "rcpt@example.net", "--timeout", "30"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "535 5.7.8" in result.stdout and "was revoked" in result.stdout


def test_policyd_down_makes_auth_a_temporary_454_failure(relay: Relay) -> None:
    # last test of the module: it stops policyd
    assert relay.policyd.stop() == 0
    with (
        submission_client(relay.submission_port) as client,
        pytest.raises(smtplib.SMTPAuthenticationError) as refused,
    ):
        client.login("apikey", relay.key)
    assert refused.value.smtp_code == 454
    assert b"4.7.0" in refused.value.smtp_error
