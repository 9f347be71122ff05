"""Real Postfix and keyrelay-milter: where the DKIM signatures sit in the message Postfix
sends, and what the client and Postfix's log show while the milter is down.

The relay is the one ``make run`` starts (fixture ``demo_relay``, shared by the session);
test_e2e.py checks the signatures with dkimpy and dkimproxy-verify over real DNS and the
retry after a fault. Here: the two signatures (rsa-sha256 and ed25519-sha256) top the header
block and verify with dkimpy against the records ``keyrelay domain dns`` prints, without a
DNS server (test_e2e.py has the refusal of a header From that is not the principal's); with
the milter down, Postfix (``milter_default_action = tempfail``) defers the
session at STARTTLS and queues nothing. Each test makes its own tenant; the one that stops
the milter starts it again in a ``finally``.
"""

from __future__ import annotations

import smtplib

import dkim
import pytest

from keyrelay.demo import Relay, unix_accepts
from testkit.net import client_tls, wait_until
from testkit.relay import (
    connect,
    log_of,
    maillog_line,
    message,
    never_delivered,
    new_tenant,
    next_source,
    published_records,
    send,
    wait_delivered,
)


def test_mail_from_a_verified_domain_arrives_signed_twice_and_verifies(
    demo_relay: Relay,
) -> None:
    tenant = new_tenant(demo_relay)
    mid, text = message(tenant.sender, "rcpt@example.net", "signed")
    send(demo_relay, "submission", tenant.key, tenant.sender, text)
    raw, delivered = wait_delivered(demo_relay, mid)

    # smtp-sink prepends its X-* headers and a Received: of its own; below them, the two
    # signatures top the header block as Postfix sent it (above Postfix's own Received:)
    names = [name for name, value in delivered.items()
             if not name.startswith("X-") and "by smtp-sink" not in str(value)]
    assert names[:3] == ["DKIM-Signature", "DKIM-Signature", "Received"], names
    signatures = [str(value) for value in delivered.get_all("DKIM-Signature") or []]
    algorithms = sorted(tag.strip() for sig in signatures for tag in sig.replace("\n", "")
                        .replace("\r", "").split(";") if tag.strip().startswith("a="))
    assert algorithms == ["a=ed25519-sha256", "a=rsa-sha256"]
    assert all(f"d={tenant.domain}" in sig.replace(" ", "") for sig in signatures)

    records = published_records(demo_relay, tenant.domain)

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name.decode().rstrip(".").lower())

    # dkim.verify checks the first signature; DKIM checks each one on its own
    assert dkim.verify(raw, dnsfunc=dnsfunc)
    verifier = dkim.DKIM(raw)
    assert all(verifier.verify(idx=i, dnsfunc=dnsfunc) for i in range(2))
    allowed = f"verdict=allow reason=ok principal={tenant.principal} key_id={tenant.key_id} "
    wait_until(lambda: allowed in log_of(demo_relay, "milter"), 10,
               f"the milter's allow line for {tenant.principal}")


def test_milter_down_defers_the_message_and_nothing_leaves(demo_relay: Relay) -> None:
    tenant = new_tenant(demo_relay)
    mid, text = message(tenant.sender, "rcpt@example.net", "no milter")
    source = next_source()
    milter = demo_relay.children["milter"]
    socket = demo_relay.settings.socket("milter")
    milter.stop()
    try:
        assert milter.process is not None and milter.process.returncode == 0, (
            log_of(demo_relay, "milter")[-2000:])
        wait_until(lambda: not unix_accepts(socket), 10, "the milter socket to close")
        # smtpd connects to its milters when the session starts; that failing, with
        # milter_default_action = tempfail it defers every later command: STARTTLS (which
        # the encrypt-only submission service needs before AUTH and MAIL) gets Postfix's
        # 454 4.3.0, its mapping of a milter's 4xx at STARTTLS (smtpd.c starttls_cmd)
        with connect(demo_relay, "submission", source=source, starttls=False) as client:
            with pytest.raises(smtplib.SMTPResponseException) as deferred:
                client.starttls(context=client_tls())
                client.login("apikey", tenant.key)
                client.sendmail(tenant.sender, ["rcpt@example.net"], text)
        assert (deferred.value.smtp_code, deferred.value.smtp_error) == (
            454, b"4.3.0 Try again later")
        line = maillog_line(demo_relay, "milter-reject: CONNECT", f"[{source}]")
        assert "451 4.7.1 Service unavailable - try again later" in line, line
    finally:
        milter.start()
    # Postfix queued nothing (its cleanup never logged the Message-ID), so nothing can reach
    # the sink later either
    never_delivered(demo_relay, mid)
    assert mid not in demo_relay.settings.maillog.read_text(errors="replace")
