"""End to end through real Postfix: the answers of docs/answers.md a client meets, as it sees them.

The relay is the one ``make run`` starts (fixture ``demo_relay``): a private Postfix set up by
``keyrelay postfix apply``, keyrelay-policyd, keyrelay-milter and smtp-sink writing delivered
mail to ``outbox/``. Clients are ``smtplib`` and ``swaks`` over STARTTLS (submission and alt
submission ports) and implicit TLS (the 465 role). Each test makes its own tenant with the
real ``keyrelay`` CLI, and tests that fail logins use their own client addresses (127.0.1.x),
so brute-force counters and limits of one test never touch another. The fault tests at the
end stop and restart the daemons and check that the client's retry is delivered exactly once.
"""

from __future__ import annotations

import smtplib
import ssl
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import dkim
import pytest

from keyrelay.demo import Relay
from keyrelay.directory import YamlDirectory
from testkit.dnsserver import (
    DKIMPROXY_VERIFY,
    DNSMASQ,
    DnsServer,
    dkimproxy_verify,
    perl_has_ed25519,
)
from testkit.net import client_tls, wait_until
from testkit.relay import (
    SUBMISSION_PORTS,
    Tenant,
    as_sent,
    connect,
    kr,
    log_of,
    maillog_line,
    message,
    never_delivered,
    new_key,
    new_tenant,
    next_source,
    published_records,
    reply_of,
    send,
    submission_greets,
    wait_delivered,
)


# -- the relay's shape -----------------------------------------------------------------------
@pytest.mark.parametrize("port_name", ["submission", "alt_submission"])
def test_auth_is_not_offered_before_starttls_and_mail_needs_it(
    demo_relay: Relay, port_name: str
) -> None:
    with connect(demo_relay, port_name, starttls=False) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")
        code, text = reply_of(lambda: client.mail("app@demo.example"))
    assert (code, text) == (530, "5.7.0 Must issue a STARTTLS command first")


def test_port_25_role_offers_starttls_but_no_auth_before_it(demo_relay: Relay) -> None:
    with connect(demo_relay, "smtp", starttls=False) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")
        client.starttls(context=client_tls())
        client.ehlo()
        assert "PLAIN" in client.esmtp_features["auth"]
        assert "LOGIN" in client.esmtp_features["auth"]


def test_port_25_role_does_not_relay_without_auth(demo_relay: Relay) -> None:
    with connect(demo_relay, "smtp") as client:
        client.mail("someone@elsewhere.example")
        code, text = reply_of(lambda: client.rcpt("rcpt@example.net"))
    assert code == 554
    assert "5.7.1" in text and "Relay access denied" in text


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("port_name", [*SUBMISSION_PORTS, "smtp"])
def test_tls_before_1_2_is_refused_by_the_server(demo_relay: Relay, port_name: str) -> None:
    context = client_tls()
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("ALL:@SECLEVEL=0")  # this client could speak TLS 1.0 and 1.1
    s = demo_relay.settings
    with pytest.raises(ssl.SSLError) as refused:
        if port_name == "submissions":
            smtplib.SMTP_SSL(s.host, s.ports()[port_name], context=context, timeout=10).quit()
        else:
            with smtplib.SMTP(s.host, s.ports()[port_name], timeout=10) as client:
                client.starttls(context=context)
    # the server's alert, not a limit of this client
    assert "ALERT_PROTOCOL_VERSION" in str(refused.value)


# -- the decision table ----------------------------------------------------------------------
@pytest.mark.parametrize("port_name", SUBMISSION_PORTS)
def test_no_auth_on_a_submission_port_is_refused_530(demo_relay: Relay, port_name: str) -> None:
    with connect(demo_relay, port_name) as client:
        client.mail("app@demo.example")
        code, text = reply_of(lambda: client.rcpt("rcpt@example.net"))
    assert code == 530
    assert text.startswith("5.7.0") and "Authentication required" in text


@pytest.mark.parametrize("port_name", SUBMISSION_PORTS)
def test_username_other_than_apikey_is_refused_535(demo_relay: Relay, port_name: str) -> None:
    tenant = new_tenant(demo_relay)
    with connect(demo_relay, port_name, source=next_source()) as client:
        code, text = reply_of(lambda: client.login(tenant.sender, tenant.key))
    assert code == 535
    assert text.startswith("5.7.8") and "apikey" in text


def _expire(relay: Relay, key_id: str) -> None:
    directory = YamlDirectory(str(relay.settings.run_dir / "directory.yaml"))
    with directory.transaction() as data:
        data.keys[key_id] = replace(data.keys[key_id],
                                    expires=datetime.now(UTC) - timedelta(minutes=1))


BAD_KEYS = ["malformed", "unknown", "revoked", "expired", "without_mail_send"]


@pytest.mark.parametrize("kind", BAD_KEYS)
def test_bad_keys_are_refused_535_with_a_reason(demo_relay: Relay, kind: str) -> None:
    tenant = new_tenant(demo_relay)
    key = tenant.key
    if kind == "malformed":
        key = "not-an-api-key"
    elif kind == "unknown":
        key = tenant.key[:-6] + ("AAAAAA" if not tenant.key.endswith("AAAAAA") else "BBBBBB")
    elif kind == "revoked":
        kr(demo_relay, "key", "revoke", tenant.key_id)
    elif kind == "expired":
        _expire(demo_relay, tenant.key_id)
    else:
        key, _ = new_key(demo_relay, tenant.principal, "--scope", "stats.read")
    with connect(demo_relay, "submission", source=next_source()) as client:
        code, text = reply_of(lambda: client.login("apikey", key))
    assert code == 535
    assert text.startswith("5.7.8")
    expected = {"malformed": "not a keyrelay API key", "unknown": "unknown",
                "revoked": "revoked", "expired": "expired", "without_mail_send": "mail.send"}
    assert expected[kind] in text
    assert key not in text and key not in log_of(demo_relay, "policyd")


def test_client_outside_the_ip_access_rules_cannot_log_in_or_send(demo_relay: Relay) -> None:
    tenant = new_tenant(demo_relay)
    inside, outside = next_source(), next_source()
    # logged in from an allowed address, then the rules change under the session: 554
    with connect(demo_relay, "submission", source=outside) as client:
        client.login("apikey", tenant.key)
        kr(demo_relay, "ip", "allow", tenant.account, f"{inside}/32")
        client.mail(tenant.sender)
        code, text = reply_of(lambda: client.rcpt("rcpt@example.net"))
    assert code == 554
    assert text.startswith("5.7.1") and outside in text
    # a new login from outside: 535
    with connect(demo_relay, "submission", source=outside) as client:
        code, text = reply_of(lambda: client.login("apikey", tenant.key))
    assert code == 535 and text.startswith("5.7.8")
    # from inside, mail goes through
    mid, text = message(tenant.sender, "rcpt@example.net", "ip rules")
    send(demo_relay, "submission", tenant.key, tenant.sender, text, source=inside)
    wait_delivered(demo_relay, mid)


def test_envelope_sender_not_owned_is_refused_550(demo_relay: Relay) -> None:
    tenant = new_tenant(demo_relay)
    with connect(demo_relay, "submission") as client:
        client.login("apikey", tenant.key)
        client.mail("ceo@bank.example")
        code, text = reply_of(lambda: client.rcpt("rcpt@example.net"))
    assert code == 550
    assert text.startswith("5.7.1") and "ceo@bank.example" in text


def test_header_from_not_owned_is_refused_550_and_nothing_leaves(demo_relay: Relay) -> None:
    tenant = new_tenant(demo_relay)
    mid, text = message(tenant.sender, "rcpt@example.net", "spoofed From",
                        header_from="ceo@bank.example")
    with connect(demo_relay, "submission") as client:
        client.login("apikey", tenant.key)
        code, reply = reply_of(lambda: client.sendmail(tenant.sender, ["rcpt@example.net"], text))
    assert code == 550
    assert reply.startswith("5.7.1") and "ceo@bank.example" in reply
    # the milter refused it at end of DATA, not a policy check earlier
    maillog_line(demo_relay, "milter-reject: END-OF-MESSAGE", f"from=<{tenant.sender}>")
    never_delivered(demo_relay, mid)


def test_a_sibling_subusers_domain_is_refused_550(demo_relay: Relay) -> None:
    tenant = new_tenant(demo_relay)
    sibling, sibling_domain = f"{tenant.account}/other", f"other-{tenant.domain}"
    kr(demo_relay, "subuser", "add", sibling)
    kr(demo_relay, "domain", "add", sibling, sibling_domain)
    kr(demo_relay, "domain", "mark-verified", sibling_domain)
    with connect(demo_relay, "submission") as client:
        client.login("apikey", tenant.key)
        client.mail(f"news@{sibling_domain}")
        code, text = reply_of(lambda: client.rcpt("rcpt@example.net"))
    assert code == 550
    assert text.startswith("5.7.1") and sibling_domain in text
    # and the header From of the sibling's domain under the subuser's own envelope: 550 too
    mid, msg = message(tenant.sender, "rcpt@example.net", "sibling From",
                       header_from=f"news@{sibling_domain}")
    with connect(demo_relay, "submission") as client:
        client.login("apikey", tenant.key)
        code, text = reply_of(lambda: client.sendmail(tenant.sender, ["rcpt@example.net"], msg))
    assert code == 550 and sibling_domain in text
    never_delivered(demo_relay, mid)


def test_rate_limit_is_a_temporary_451(demo_relay: Relay) -> None:
    tenant = new_tenant(demo_relay)
    kr(demo_relay, "limits", "set", tenant.principal, "--per-minute", "1")
    first, text = message(tenant.sender, "rcpt@example.net", "rate 1")
    send(demo_relay, "submission", tenant.key, tenant.sender, text)
    second, text2 = message(tenant.sender, "rcpt@example.net", "rate 2")
    with connect(demo_relay, "submission") as client:
        client.login("apikey", tenant.key)
        code, reply = reply_of(lambda: client.sendmail(tenant.sender, ["rcpt@example.net"],
                                                       text2))
    assert code == 451
    assert reply.startswith("4.7.1")
    wait_delivered(demo_relay, first)
    never_delivered(demo_relay, second)


# -- the good path ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dns_for(demo_relay: Relay, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        Callable[[str], DnsServer]]:
    """A real DNS server (dnsmasq on loopback) serving what `keyrelay domain dns` prints."""
    if DKIMPROXY_VERIFY is None or DNSMASQ is None:
        pytest.skip("needs dkimproxy-verify and dnsmasq (make deps installs them)")
    servers: list[DnsServer] = []

    def start(domain: str) -> DnsServer:
        records = published_records(demo_relay, domain)
        server = DnsServer({name: value.decode() for name, value in records.items()},
                           tmp_path_factory.mktemp("dns") / "dnsmasq.log", [domain])
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def _check_signatures(relay: Relay, dump: bytes, domain: str, dns: DnsServer) -> None:
    wire = as_sent(dump)
    records = published_records(relay, domain)

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name.decode().rstrip(".").lower())

    signatures = [line for line in wire.split(b"\r\n") if line.startswith(b"DKIM-Signature:")]
    assert len(signatures) == 2
    assert b"a=rsa-sha256" in signatures[0] and b"a=ed25519-sha256" in signatures[1]
    for index in range(2):
        assert dkim.DKIM(wire).verify(idx=index, dnsfunc=dnsfunc), f"dkimpy, signature {index}"
    results, output = dkimproxy_verify(wire, dns)
    assert len(results) == 2, output
    assert results[0] == "pass", output
    if perl_has_ed25519():
        assert results[1] == "pass", output
    else:  # Debian 12's Mail::DKIM has no ed25519-sha256 (test_dkim_independent.py)
        assert results[1] == "invalid (unsupported algorithm ed25519-sha256)", output


@pytest.mark.parametrize("port_name", SUBMISSION_PORTS)
def test_good_path_is_delivered_once_signed_and_through_the_pool(
    demo_relay: Relay, dns_for: Callable[[str], DnsServer], port_name: str
) -> None:
    tenant = new_tenant(demo_relay)
    dns = dns_for(tenant.domain)
    mid, text = message(tenant.sender, "rcpt@example.net", f"good path {port_name}")
    send(demo_relay, port_name, tenant.key, tenant.sender, text)
    dump, parsed = wait_delivered(demo_relay, mid)
    assert parsed["X-Client-Addr"] == "127.0.0.2"  # the demo pool's bind address
    assert "relay.demo.example" in parsed["X-Helo-Args"]
    _check_signatures(demo_relay, dump, tenant.domain, dns)
    assert tenant.key.split(".")[-1] not in demo_relay.settings.maillog.read_text()


@pytest.mark.parametrize("port_name, tls_option", [("submission", "--tls"),
                                                    ("submissions", "--tlsc")])
def test_swaks_sends_with_the_api_key(
    demo_relay: Relay, dns_for: Callable[[str], DnsServer], port_name: str, tls_option: str
) -> None:
    tenant = new_tenant(demo_relay)
    dns = dns_for(tenant.domain)
    mid = f"<{uuid.uuid4().hex}@swaks.test>"
    s = demo_relay.settings
    result = subprocess.run(
        ["swaks", "--server", f"{s.host}:{s.ports()[port_name]}", tls_option,
         "--auth", "PLAIN", "--auth-user", "apikey", "--auth-password", tenant.key,
         "--from", tenant.sender, "--to", "rcpt@example.net",
         "--header", f"Message-Id: {mid}", "--header", "Subject: swaks"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235 2.7.0 Authentication successful" in result.stdout
    dump, _ = wait_delivered(demo_relay, mid)
    _check_signatures(demo_relay, dump, tenant.domain, dns)


def test_port_25_role_relays_for_an_api_key_after_starttls(demo_relay: Relay) -> None:
    tenant = new_tenant(demo_relay)
    mid, text = message(tenant.sender, "rcpt@example.net", "port 25 role")
    send(demo_relay, "smtp", tenant.key, tenant.sender, text)
    _, parsed = wait_delivered(demo_relay, mid)
    assert len(parsed.get_all("DKIM-Signature") or []) == 2


def test_two_subusers_leave_through_their_own_pools(demo_relay: Relay) -> None:
    first = new_tenant(demo_relay)
    kr(demo_relay, "pool", "add", "second", "--bind", "127.0.0.3",
       "--helo", "second.demo.example")
    second = new_tenant(demo_relay, pool="second")
    applied = kr(demo_relay, "postfix", "apply", "--config-dir",
                 str(demo_relay.settings.postfix_etc), "--reload")
    assert "kr-pool-second" in applied and "reloaded" in applied
    ids = []
    for tenant in (first, second):
        mid, text = message(tenant.sender, "rcpt@example.net", f"pool of {tenant.principal}")
        # a reload restarts smtpd processes: a fresh connection per message
        wait_until(lambda: submission_greets(demo_relay), 30, "smtpd after the reload")
        send(demo_relay, "submission", tenant.key, tenant.sender, text)
        ids.append(mid)
    _, one = wait_delivered(demo_relay, ids[0])
    _, two = wait_delivered(demo_relay, ids[1])
    assert (one["X-Client-Addr"], two["X-Client-Addr"]) == ("127.0.0.2", "127.0.0.3")
    assert "relay.demo.example" in one["X-Helo-Args"]
    assert "second.demo.example" in two["X-Helo-Args"]


def test_a_key_revoked_with_the_cli_stops_at_the_next_login(demo_relay: Relay) -> None:
    tenant = new_tenant(demo_relay)
    mid, text = message(tenant.sender, "rcpt@example.net", "before revocation")
    send(demo_relay, "submission", tenant.key, tenant.sender, text)
    wait_delivered(demo_relay, mid)
    kr(demo_relay, "key", "revoke", tenant.key_id)
    with connect(demo_relay, "submission", source=next_source()) as client:
        code, reply = reply_of(lambda: client.login("apikey", tenant.key))
    assert code == 535 and "revoked" in reply


def test_monitor_mode_lets_would_be_refusals_through_and_logs_them(demo_relay: Relay) -> None:
    tenant = new_tenant(demo_relay)
    kr(demo_relay, "monitor", "on", tenant.account)
    mid, text = message("ceo@bank.example", "rcpt@example.net", "monitored",
                        header_from="ceo@bank.example")
    send(demo_relay, "submission", tenant.key, "ceo@bank.example", text)
    _, parsed = wait_delivered(demo_relay, mid)
    assert parsed.get_all("DKIM-Signature") is None  # not the principal's domain: not signed
    policyd = log_of(demo_relay, "policyd")
    assert any("monitor" in line and "ceo@bank.example" in line and tenant.principal in line
               for line in policyd.splitlines()), policyd[-2000:]
    milter = log_of(demo_relay, "milter")
    assert any("monitor" in line and tenant.principal in line
               for line in milter.splitlines()), milter[-2000:]


# -- faults: temporary answers, and the retry is delivered exactly once ----------------------
def _retry_delivers_once(relay: Relay, tenant: Tenant, mid: str, text: str) -> None:
    """The client retries until Postfix takes the message (only temporary failures allowed:
    after a daemon came back, Postfix may still throttle a service it saw failing), then the
    message must arrive exactly once."""

    def sent() -> bool:
        try:
            send(relay, "submission", tenant.key, tenant.sender, text)
        except (smtplib.SMTPServerDisconnected, ConnectionError):
            return False
        except smtplib.SMTPResponseException as exc:
            assert 400 <= exc.smtp_code < 500, f"a permanent refusal on retry: {exc}"
            return False
        return True

    # Postfix's master throttles a service whose process failed for service_throttle_time
    # (60 s by default): 180 s covers that, a slow restart and a slow machine
    wait_until(sent, 180, "the client's retry to be accepted")
    wait_delivered(relay, mid)


def _attempt(relay: Relay, tenant: Tenant, text: str) -> tuple[int, str]:
    """A new session: login and send; (code, text) of the refusal, or (0, why) when the
    server closed the connection instead of answering."""
    def go() -> None:
        with connect(relay, "submission") as client:
            client.login("apikey", tenant.key)
            client.sendmail(tenant.sender, ["rcpt@example.net"], text)

    try:
        return reply_of(go)
    except (smtplib.SMTPServerDisconnected, ConnectionError) as exc:
        return 0, repr(exc)


def test_policyd_stopped_gives_4xx_and_the_retry_is_delivered_once(demo_relay: Relay) -> None:
    tenant = new_tenant(demo_relay)
    mid, text = message(tenant.sender, "rcpt@example.net", "policyd down")
    policyd = demo_relay.children["policyd"]
    with connect(demo_relay, "submission") as logged_in:
        logged_in.login("apikey", tenant.key)
        policyd.stop()
        try:
            # a session logged in before: the policy check cannot be made, so the policy
            # default action that keyrelay postfix apply configured answers
            logged_in.mail(tenant.sender)
            policy_code, policy_reply = reply_of(lambda: logged_in.rcpt("rcpt@example.net"))
            # a new session: an smtpd process that already runs answers AUTH with 454; a new
            # one exits ("fatal: no SASL authentication mechanisms") and the client sees the
            # connection close. Both make the client retry later.
            auth_code, auth_reply = _attempt(demo_relay, tenant, text)
        finally:
            policyd.start()
    assert (policy_code, policy_reply) == (
        451, "4.3.0 <rcpt@example.net>: Recipient address rejected: keyrelay policy service "
        "unavailable, try again later")
    assert (auth_code, auth_reply[:5]) == (454, "4.7.0") or auth_code == 0, auth_reply
    never_delivered(demo_relay, mid)
    _retry_delivers_once(demo_relay, tenant, mid, text)


def test_milter_stopped_gives_4xx_and_the_retry_is_delivered_once(demo_relay: Relay) -> None:
    tenant = new_tenant(demo_relay)
    mid, text = message(tenant.sender, "rcpt@example.net", "milter down")
    milter = demo_relay.children["milter"]
    milter.stop()
    try:
        code, reply = _attempt(demo_relay, tenant, text)
    finally:
        milter.start()
    assert 400 <= code < 500, (code, reply)
    never_delivered(demo_relay, mid)
    _retry_delivers_once(demo_relay, tenant, mid, text)


def test_unreadable_directory_gives_4xx_and_the_retry_is_delivered_once(
    demo_relay: Relay,
) -> None:
    tenant = new_tenant(demo_relay)
    mid, text = message(tenant.sender, "rcpt@example.net", "directory broken")
    path = demo_relay.settings.run_dir / "directory.yaml"
    good = path.read_bytes()
    path.write_bytes(b"{ this is not a directory")
    try:
        code, reply = _attempt(demo_relay, tenant, text)
    finally:
        path.write_bytes(good)
    assert 400 <= code < 500, (code, reply)
    never_delivered(demo_relay, mid)
    _retry_delivers_once(demo_relay, tenant, mid, text)
