"""Real Postfix and keyrelay-policyd: what Postfix logs of an API-key login, the exact
reasons policyd gives that reach the client, and AUTH while policyd is down.

The relay is the one ``make run`` starts (fixture ``demo_relay``, shared by the session):
SASL over the Dovecot protocol, policy over check_policy_service, FILTER routing to the
principal's IP pool. The decision table as the client sees it (codes, TLS, pools, faults) is
in test_e2e.py; this module adds Postfix's own log of a login, the wording of policyd's
refusals, what swaks shows for a revoked key, the 454 an smtpd that already offered AUTH
answers when policyd has stopped, and the 451 for a pool Postfix has no transport for yet.
Each test makes its own tenant, and tests that fail logins use their own client address; the
test that stops policyd starts it again in a ``finally``.
"""

from __future__ import annotations

import smtplib
import subprocess

import pytest

from keyrelay.demo import Relay
from testkit.net import wait_until
from testkit.relay import (
    connect,
    kr,
    log_of,
    maillog_line,
    message,
    never_delivered,
    new_tenant,
    next_source,
    reply_of,
    send,
    submission_greets,
    wait_delivered,
)


def test_api_key_login_sends_mail_out_through_the_principals_ip_pool(demo_relay: Relay) -> None:
    tenant = new_tenant(demo_relay)
    mid, text = message(tenant.sender, "rcpt@example.net", "pool test")
    send(demo_relay, "submission", tenant.key, tenant.sender, text)
    _, delivered = wait_delivered(demo_relay, mid)
    assert delivered["Subject"] == "pool test"
    # smtp-sink records the client address and HELO it got: the demo pool's transport
    # (127.0.0.2), not Postfix's default smtp client (127.0.0.1)
    assert delivered["X-Client-Addr"] == "127.0.0.2"
    assert "relay.demo.example" in delivered["X-Helo-Args"]
    # Postfix logs the SASL login under the principal and key id policyd answered with
    line = maillog_line(demo_relay, f"sasl_username={tenant.principal}:{tenant.key_id}")
    assert "sasl_method=PLAIN" in line or "sasl_method=LOGIN" in line, line
    secret = tenant.key.split(".")[-1]
    assert secret not in demo_relay.settings.maillog.read_text(errors="replace")
    assert secret not in log_of(demo_relay, "policyd")


def test_unknown_key_is_refused_with_535_and_the_policyd_reason(demo_relay: Relay) -> None:
    tenant = new_tenant(demo_relay)
    wrong = tenant.key[:-4] + ("AAAA" if not tenant.key.endswith("AAAA") else "BBBB")
    with (
        connect(demo_relay, "submission", source=next_source()) as client,
        pytest.raises(smtplib.SMTPAuthenticationError) as refused,
    ):
        client.login("apikey", wrong)
    assert refused.value.smtp_code == 535
    error = refused.value.smtp_error
    assert isinstance(error, bytes) and error.startswith(b"5.7.8")
    assert b"unknown API key" in error


def test_username_other_than_apikey_is_refused(demo_relay: Relay) -> None:
    tenant = new_tenant(demo_relay)
    with (
        connect(demo_relay, "submission", source=next_source()) as client,
        pytest.raises(smtplib.SMTPAuthenticationError) as refused,
    ):
        client.login("alice", tenant.key)
    assert refused.value.smtp_code == 535
    error = refused.value.smtp_error
    assert isinstance(error, bytes) and error.startswith(b"5.7.8")
    assert b"log in with username 'apikey'" in error


def test_sender_outside_the_principals_domains_is_refused_550(demo_relay: Relay) -> None:
    tenant = new_tenant(demo_relay)
    mid, text = message("ceo@bank.example", "rcpt@example.net", "spoof")
    with connect(demo_relay, "submission") as client:
        client.login("apikey", tenant.key)
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail("ceo@bank.example", ["rcpt@example.net"], text)
    code, reply = refused.value.recipients["rcpt@example.net"]
    assert code == 550
    assert reply.startswith(b"5.7.1")
    assert (f"ceo@bank.example is not a verified domain or sender of {tenant.principal}"
            .encode() in reply), reply
    never_delivered(demo_relay, mid)


def test_swaks_key_revoked_after_creation_cannot_log_in(demo_relay: Relay) -> None:
    tenant = new_tenant(demo_relay)
    kr(demo_relay, "key", "revoke", tenant.key_id)
    s = demo_relay.settings
    result = subprocess.run(
        ["swaks", "--server", f"{s.host}:{s.submission_port}", "--tls",
         "--local-interface", next_source(),
         "--auth", "PLAIN", "--auth-user", "apikey", "--auth-password", tenant.key,
         "--from", tenant.sender, "--to", "rcpt@example.net", "--timeout", "30"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "535 5.7.8" in result.stdout and "was revoked" in result.stdout, result.stdout


def test_recipients_beyond_the_limit_get_452_4_5_3_and_the_others_get_the_message(
    demo_relay: Relay,
) -> None:
    # issue 20: RFC 5321's "too many recipients", as Postfix's own smtpd_recipient_limit; the
    # client keeps the recipients accepted so far and sends the rest in another transaction
    tenant = new_tenant(demo_relay)
    kr(demo_relay, "limits", "set", tenant.principal, "--recipients", "2")
    recipients = [f"rcpt{n}@example.net" for n in range(3)]
    mid, text = message(tenant.sender, recipients[0], "three recipients")
    with connect(demo_relay, "submission") as client:
        client.login("apikey", tenant.key)
        refused = client.sendmail(tenant.sender, recipients, text)
    assert list(refused) == ["rcpt2@example.net"]
    code, reply = refused["rcpt2@example.net"]
    assert code == 452 and reply.startswith(b"4.5.3 "), reply
    assert (f"too many recipients: at most 2 per message for {tenant.principal}; send the "
            "others in another message").encode() in reply, reply
    dump, _ = wait_delivered(demo_relay, mid)
    for accepted in recipients[:2]:
        assert f"<{accepted}>".encode() in dump, dump[:600]
    assert b"<rcpt2@example.net>" not in dump


def test_nineteen_recipients_beyond_the_limit_pass_twenty_end_the_session_before_data(
    demo_relay: Relay,
) -> None:
    # what docs/policyd.md says of Postfix's error counters: each refused RCPT is a client
    # error, forgiven once a message is accepted; at smtpd_hard_error_limit (20) smtpd answers
    # 421 and hangs up before DATA (from the 10th error on, each reply is delayed by
    # smtpd_error_sleep_time, 1s: this test takes some 20 seconds)
    tenant = new_tenant(demo_relay)
    kr(demo_relay, "limits", "set", tenant.principal, "--recipients", "1")
    recipients = [f"rcpt{n}@example.net" for n in range(21)]
    first, text = message(tenant.sender, recipients[0], "nineteen too many")
    second, text2 = message(tenant.sender, recipients[0], "twenty too many")
    with connect(demo_relay, "submission") as client:
        client.login("apikey", tenant.key)
        refused = client.sendmail(tenant.sender, recipients[:20], text)
        assert sorted(refused) == sorted(recipients[1:20])
        with pytest.raises(smtplib.SMTPDataError) as dropped:
            client.sendmail(tenant.sender, recipients, text2)
    assert dropped.value.smtp_code == 421
    assert b"too many errors" in dropped.value.smtp_error
    wait_delivered(demo_relay, first)
    never_delivered(demo_relay, second)


def test_policyd_down_makes_auth_a_temporary_454_failure(demo_relay: Relay) -> None:
    tenant = new_tenant(demo_relay)
    policyd = demo_relay.children["policyd"]
    # the session's smtpd has fetched the SASL mechanisms from policyd (AUTH is offered);
    # a new smtpd started while policyd is down exits instead (test_e2e.py accepts both)
    with connect(demo_relay, "submission", source=next_source()) as client:
        client.ehlo()
        assert "PLAIN" in client.esmtp_features["auth"]
        policyd.stop()
        try:
            assert policyd.process is not None and policyd.process.returncode == 0, (
                log_of(demo_relay, "policyd")[-2000:])
            with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
                client.login("apikey", tenant.key)
        finally:
            policyd.start()
    assert refused.value.smtp_code == 454
    error = refused.value.smtp_error
    assert isinstance(error, bytes) and error.startswith(b"4.7.0"), error


def test_a_pool_without_its_postfix_transport_gets_451_at_rcpt_until_postfix_apply(
    demo_relay: Relay,
) -> None:
    # issue 20 item 4: Postfix used to accept the message and then defer it ("connect to
    # transport private/kr-pool-late: No such file or directory"); now the client hears 451 at
    # RCPT and keeps the message, and after `keyrelay postfix apply` it goes out
    added = kr(demo_relay, "pool", "add", "late", "--bind", "127.0.0.5",
               "--helo", "late.demo.example")
    assert "Postfix needs the transport kr-pool-late: run `keyrelay postfix apply" in added
    tenant = new_tenant(demo_relay, pool="late")
    mid, text = message(tenant.sender, "rcpt@example.net", "late pool")
    with connect(demo_relay, "submission") as client:
        client.login("apikey", tenant.key)
        code, reply = reply_of(
            lambda: client.sendmail(tenant.sender, ["rcpt@example.net"], text))
    assert code == 451, reply
    assert reply.startswith("4.3.0 "), reply
    assert ("relay configuration incomplete (IP pool 'late' is not set up in Postfix yet); "
            "try again later") in reply
    never_delivered(demo_relay, mid)  # nothing was accepted, so nothing waits in the queue
    assert (f"pool late has no Postfix transport kr-pool-late in "
            f"{demo_relay.settings.postfix_etc}/master.cf yet: run keyrelay postfix apply"
            in log_of(demo_relay, "policyd"))
    # postfix.config_dir of the demo's configuration names its Postfix: no --config-dir
    applied = kr(demo_relay, "postfix", "apply", "--reload")
    assert "kr-pool-late" in applied and "reloaded" in applied
    wait_until(lambda: submission_greets(demo_relay), 30, "smtpd after the reload")
    send(demo_relay, "submission", tenant.key, tenant.sender, text)
    _, delivered = wait_delivered(demo_relay, mid)
    assert delivered["X-Client-Addr"] == "127.0.0.5"
    assert "late.demo.example" in delivered["X-Helo-Args"]
