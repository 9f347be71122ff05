"""Webhooks in process (docs/webhooks.md): the URL policy that guards against SSRF (names
resolved through a stub resolver), the signature and its documented ``verify``, one batch
delivered to a real HTTP(S) receiver on 127.0.0.1 (testkit/webhooks.py), and the retry
schedule. The CLI's side is tests/test_webhook_cli.py."""

from __future__ import annotations

import ipaddress
import json
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from keyrelay.config import Duration, WebhooksConfig
from keyrelay.directory.ldap.mapping import records_of
from keyrelay.directory.model import Webhook
from keyrelay.directory.yamlfile import parse_text
from keyrelay.errors import ConfigError
from keyrelay.webhooks import sign, target
from keyrelay.webhooks.delivery import (
    USER_AGENT,
    Result,
    body_of,
    deliver,
    make_test_event,
    next_attempt,
)
from keyrelay.webhooks.target import TargetRefused, TargetUnresolved, check, parse_url
from testkit.webhooks import Answer, Receiver

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
SECRET = sign.new_secret()
EVENTS: list[dict[str, Any]] = [
    {"event": "delivered", "email": "bob@example.com", "timestamp": 1796472000,
     "account": "acme", "response": "250 2.0.0 Ok: queued as 4XyZ — ünïcode"},
    {"event": "bounce", "email": "nobody@example.net", "status": "5.1.1", "account": "acme",
     "type": "hard"}]
OPEN = WebhooksConfig(allow_private_targets=True, timeout=Duration(10.0))


def resolver(table: dict[str, Sequence[str]]) -> target.Resolver:
    """A stub of the system resolver: names from ``table``, others do not resolve."""
    def resolve(host: str, port: int) -> Sequence[str]:
        if host not in table:
            raise OSError(-2, "Name or service not known")
        return table[host]
    return resolve


# -- the URL policy --------------------------------------------------------------------------
FORBIDDEN = [
    ("127.0.0.1", "a loopback address"),
    ("127.8.9.10", "a loopback address"),
    ("::1", "a loopback address"),
    ("10.0.0.5", "a private address"),
    ("172.16.3.4", "a private address"),
    ("192.168.1.1", "a private address"),
    ("fd12:3456::1", "a private address"),
    ("169.254.169.254", "a link-local address"),  # the cloud metadata service
    ("fe80::1", "a link-local address"),
    ("100.64.0.1", "a shared (CGNAT, RFC 6598) address"),
    ("100.127.255.254", "a shared (CGNAT, RFC 6598) address"),
    ("240.0.0.1", "a reserved address"),
    ("192.0.2.7", "a special-purpose address (not globally routable)"),
    ("::ffff:10.0.0.5", "a private address (10.0.0.5, IPv4 inside IPv6)"),
    ("::ffff:127.0.0.1", "a loopback address (127.0.0.1, IPv4 inside IPv6)"),
    ("64:ff9b::a9fe:a9fe", "a link-local address (169.254.169.254, IPv4 inside IPv6)"),
]
NEVER = [("0.0.0.0", "an unspecified address"), ("::", "an unspecified address"),
         ("224.0.0.1", "a multicast address"), ("ff02::1", "a multicast address")]


@pytest.mark.parametrize(("address", "kind"), FORBIDDEN + NEVER)
def test_a_non_public_address_is_refused_by_name_and_as_a_literal(address: str,
                                                                   kind: str) -> None:
    hint = "" if (address, kind) in NEVER else (
        "; set webhooks.allow_private_targets: true to allow it")
    host = f"[{address}]" if ":" in address else address
    shown = str(ipaddress.ip_address(address))  # ::ffff:10.0.0.5 is ::ffff:a00:5
    with pytest.raises(TargetRefused) as literal:
        check(f"https://{host}/hook", False, resolver({}))
    assert str(literal.value) == f"webhook URL https://{host}/hook: {shown} is {kind}{hint}"

    stub = resolver({"hooks.example.com": ["93.184.215.14", address]})  # one bad one is enough
    with pytest.raises(TargetRefused) as named:
        check("https://hooks.example.com/in", False, stub)
    assert str(named.value) == ("webhook URL https://hooks.example.com/in: hooks.example.com "
                                f"resolves to {shown}, {kind}{hint}")


@pytest.mark.parametrize(("address", "kind"), FORBIDDEN)
def test_allow_private_targets_lets_a_private_address_in(address: str, kind: str) -> None:
    stub = resolver({"hooks.internal": [address]})
    found = check("http://hooks.internal/", True, stub).addresses
    assert found == (ipaddress.ip_address(address),)


@pytest.mark.parametrize(("address", "kind"), NEVER)
def test_multicast_and_unspecified_are_refused_even_when_private_targets_are_allowed(
        address: str, kind: str) -> None:
    with pytest.raises(TargetRefused, match=f", {kind}$"):
        check("http://hooks.internal/", True, resolver({"hooks.internal": [address]}))


def test_a_public_address_is_allowed_and_is_what_the_delivery_connects_to() -> None:
    stub = resolver({"hooks.example.com": ["93.184.215.14",
                                           "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]})
    found = check("https://Hooks.Example.com:8443/in?token=1", False, stub)
    assert [str(a) for a in found.addresses] == ["93.184.215.14",
                                                 "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]
    assert (found.url.host, found.url.port, found.url.path) == ("hooks.example.com", 8443,
                                                                "/in?token=1")
    assert found.url.host_header == "hooks.example.com:8443"


@pytest.mark.parametrize(("url", "reason"), [
    ("ftp://hooks.example.com/in", "only http:// and https:// URLs are allowed, got ftp://"),
    ("file:///etc/passwd", "only http:// and https:// URLs are allowed, got file://"),
    ("gopher://hooks.example.com/", "only http:// and https:// URLs are allowed, got gopher://"),
    ("hooks.example.com/in", "only http:// and https:// URLs are allowed, got no scheme"),
    ("https://user:pw@hooks.example.com/in", "a URL with credentials (user:password@) is not "
     "allowed: the deliveries are signed (X-Keyrelay-Signature) instead"),
    ("https://user@hooks.example.com/in", "a URL with credentials (user:password@) is not "
     "allowed"),
    ("https:///in", "the URL has no host"),
    ("http://", "the URL has no host"),
    ("https://hooks.example.com:99999/", "not a valid URL"),
    ("https://hooks.example.com/in#frag", "a URL with a fragment"),
    ("https://hooks.exämple.com/in", "a URL is written in ASCII without spaces"),
    ("https://hooks.example.com/a b", "a URL is written in ASCII without spaces"),
    ("", "expected an http:// or https:// URL"),
])
def test_a_url_of_the_wrong_shape_is_refused_in_one_line(url: str, reason: str) -> None:
    with pytest.raises(TargetRefused) as refused:
        check(url, True, resolver({"hooks.example.com": ["93.184.215.14"]}))
    line = str(refused.value)
    assert line.startswith("webhook URL ") and reason in line and "\n" not in line


def test_a_name_that_does_not_resolve_is_refused_as_passing() -> None:
    with pytest.raises(TargetUnresolved, match=r"^webhook URL https://nowhere\.example/in: "
                       r"nowhere\.example does not resolve \(Name or service not known\)$"):
        check("https://nowhere.example/in", False, resolver({}))


def test_numeric_tricks_are_judged_by_what_the_system_resolver_makes_of_them() -> None:
    # 2130706433 and 0x7f.1 are 127.0.0.1 to getaddrinfo: the check sees what it would connect to
    for url in ("http://2130706433/", "http://0x7f.1/", "http://localhost/"):
        with pytest.raises(TargetRefused, match="a loopback address"):
            check(url, False)


# -- signing ---------------------------------------------------------------------------------
def test_a_secret_is_new_each_time_and_long() -> None:
    one, two = sign.new_secret(), sign.new_secret()
    assert one != two and one.startswith(sign.SECRET_PREFIX) and len(one) >= 40
    assert sign.secret_problem(one) is None
    assert sign.secret_problem("short") is not None and "short" not in str(
        sign.secret_problem("short"))


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    import hashlib
    import hmac
    body = b'[{"event":"test"}]'
    header = sign.signature("krwhsec_0123456789abcdef", 1796472000, body)
    expected = hmac.new(b"krwhsec_0123456789abcdef", b"1796472000." + body,
                        hashlib.sha256).hexdigest()
    assert header == f"t=1796472000,v1={expected}"


def test_verify_takes_a_good_signature_and_refuses_a_tampered_or_old_one() -> None:
    body = body_of(EVENTS)
    header = sign.signature(SECRET, 1796472000, body)
    assert sign.verify(SECRET, header, body, now=1796472000 + 299)
    assert not sign.verify(SECRET, header, body.replace(b"hard", b"soft"), now=1796472000)
    assert not sign.verify(sign.new_secret(), header, body, now=1796472000)
    assert not sign.verify(SECRET, header, body, now=1796472000 + 301)  # replayed later
    assert not sign.verify(SECRET, header, body, now=1796472000 - 301)  # from the future
    assert not sign.verify(SECRET, "v1=" + header.partition("v1=")[2], body, now=1796472000)
    assert not sign.verify(SECRET, "t=1796472000,v1=ünï", body, now=1796472000)
    assert not sign.verify(SECRET, "", body, now=1796472000)


def test_the_receiver_example_of_the_docs_is_the_verify_function() -> None:
    """docs/webhooks.md gives a receiver to copy: its verify is sign.verify's code."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "webhooks.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    assert blocks, "docs/webhooks.md has no Python receiver"
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], "docs/webhooks.md", "exec"), namespace)
    documented = namespace["verify"]
    assert callable(documented)
    body = body_of(EVENTS)
    header = sign.signature(SECRET, int(time.time()), body)
    assert documented(SECRET, header, body, time.time())
    assert not documented(SECRET, header, body + b" ", time.time())
    assert not documented(SECRET, header, body, time.time() + 600)


# -- one delivery ----------------------------------------------------------------------------
@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as running:
        yield running


@pytest.fixture
def tls_receiver() -> Iterator[Receiver]:
    with Receiver(tls=True) as running:
        yield running


def hook(url: str) -> Webhook:
    return Webhook(url, SECRET, NOW, NOW)


def test_a_batch_is_posted_signed_as_one_compact_json_array(tls_receiver: Receiver) -> None:
    settings = replace(OPEN, ca_file=str(tls_receiver.ca_file))
    outcome = deliver(hook(tls_receiver.url), EVENTS, settings, NOW)
    assert outcome.result is Result.DELIVERED and outcome.status == 200, outcome.reason
    assert outcome.reason == f"webhook {tls_receiver.url}: HTTP 200 OK"
    (got,) = tls_receiver.wait_for(1)
    assert got.method == "POST" and got.path == "/hook"
    assert got.headers["content-type"] == "application/json"
    assert got.headers["user-agent"] == USER_AGENT
    assert got.headers["host"] == f"127.0.0.1:{tls_receiver.port}"
    assert json.loads(got.body.decode("utf-8")) == EVENTS
    assert b", " not in got.body and "ünïcode".encode() in got.body  # compact, UTF-8
    assert got.headers["x-keyrelay-signature"].startswith(f"t={int(NOW.timestamp())},v1=")
    assert sign.verify(SECRET, got.headers["x-keyrelay-signature"], got.body,
                       now=NOW.timestamp())
    assert not sign.verify(SECRET, got.headers["x-keyrelay-signature"], got.body + b" ",
                           now=NOW.timestamp())
    assert SECRET not in repr(hook(tls_receiver.url)) and SECRET not in repr(outcome)


def test_the_connection_goes_to_the_checked_address_with_the_urls_host(
        receiver: Receiver) -> None:
    calls: list[str] = []

    def rebinding(host: str, port: int) -> Sequence[str]:
        calls.append(host)  # the only resolution: the HTTP library never resolves again
        return ["127.0.0.1"]

    url = receiver.url_for("hooks.test")
    outcome = deliver(hook(url), EVENTS, OPEN, NOW, resolver=rebinding)
    assert outcome.delivered and outcome.address == "127.0.0.1", outcome.reason
    assert calls == ["hooks.test"]
    assert receiver.wait_for(1)[0].headers["host"] == f"hooks.test:{receiver.port}"


def test_a_name_that_now_resolves_to_a_private_address_is_given_up_unsent(
        receiver: Receiver) -> None:
    """DNS rebinding: public when the webhook was set, loopback at delivery."""
    url = receiver.url_for("hooks.test")
    outcome = deliver(hook(url), EVENTS, replace(OPEN, allow_private_targets=False), NOW,
                      resolver=resolver({"hooks.test": ["127.0.0.1"]}))
    assert outcome.result is Result.GIVE_UP
    assert outcome.reason == (f"webhook URL {url}: hooks.test resolves to 127.0.0.1, a loopback "
                              "address; set webhooks.allow_private_targets: true to allow it")
    assert receiver.received == []


def test_a_name_that_does_not_resolve_at_delivery_is_retried(receiver: Receiver) -> None:
    outcome = deliver(hook(receiver.url_for("gone.test")), EVENTS, OPEN, NOW,
                      resolver=resolver({}))
    assert outcome.result is Result.RETRY and "gone.test does not resolve" in outcome.reason


@pytest.mark.parametrize(("status", "result"), [
    (200, Result.DELIVERED), (202, Result.DELIVERED), (204, Result.DELIVERED),
    (500, Result.RETRY), (502, Result.RETRY), (503, Result.RETRY), (429, Result.RETRY),
    (408, Result.RETRY), (400, Result.GIVE_UP), (401, Result.GIVE_UP), (404, Result.GIVE_UP),
    (410, Result.GIVE_UP),
])
def test_the_receivers_status_says_delivered_retry_or_give_up(
        receiver: Receiver, status: int, result: Result) -> None:
    receiver.answer = lambda _request: Answer(status)
    outcome = deliver(hook(receiver.url), EVENTS, OPEN, NOW)
    assert (outcome.result, outcome.status) == (result, status)
    assert outcome.reason.startswith(f"webhook {receiver.url}: HTTP {status}")
    assert SECRET not in outcome.reason and "bounce" not in outcome.reason  # no secret, no body


def test_a_redirect_is_not_followed_and_says_where_it_pointed(receiver: Receiver) -> None:
    receiver.answer = lambda request: Answer(302, {"Location": "http://169.254.169.254/latest"}) \
        if request.path == "/hook" else Answer(200)
    outcome = deliver(hook(receiver.url), EVENTS, OPEN, NOW)
    assert outcome.result is Result.GIVE_UP and outcome.status == 302
    assert "a redirect to http://169.254.169.254/latest" in outcome.reason
    assert "redirects are not followed" in outcome.reason
    assert [r.path for r in receiver.wait_for(1)] == ["/hook"]


def test_a_certificate_that_does_not_verify_is_a_retry_with_the_reason(
        tls_receiver: Receiver) -> None:
    # the system's CA store does not know the test CA
    outcome = deliver(hook(tls_receiver.url), EVENTS, OPEN, NOW)
    assert outcome.result is Result.RETRY
    assert outcome.reason.startswith(f"webhook {tls_receiver.url}: the TLS certificate of "
                                     "127.0.0.1 (127.0.0.1) does not verify: ")
    assert "unable to get local issuer certificate" in outcome.reason
    # the name checked is the URL's host, not the address connected to
    named = deliver(hook(tls_receiver.url_for("hooks.test")), EVENTS,
                    replace(OPEN, ca_file=str(tls_receiver.ca_file)), NOW,
                    resolver=resolver({"hooks.test": ["127.0.0.1"]}))
    assert named.result is Result.RETRY and "Hostname mismatch" in named.reason, named.reason
    assert tls_receiver.received == []


def test_a_receiver_that_does_not_answer_in_time_is_a_retry(receiver: Receiver) -> None:
    receiver.answer = lambda _request: Answer(200, delay=30)
    settings = replace(OPEN, timeout=Duration(0.5))
    outcome = deliver(hook(receiver.url), EVENTS, settings, NOW)
    assert outcome.result is Result.RETRY
    assert outcome.reason == f"webhook {receiver.url}: no answer within 0.5s (127.0.0.1)"


def test_a_receiver_that_is_down_is_a_retry() -> None:
    with Receiver() as gone:
        url = gone.url
    outcome = deliver(hook(url), EVENTS, OPEN, NOW)
    assert outcome.result is Result.RETRY
    assert "cannot connect to 127.0.0.1 port" in outcome.reason and "refused" in outcome.reason


def test_the_test_event_is_small() -> None:
    assert make_test_event("acme", NOW) == {"event": "test", "timestamp": 1796472000,
                                       "account": "acme"}


def test_parse_url_keeps_path_and_query() -> None:
    assert parse_url("http://[2001:db8::1]:8080").path == "/"
    assert parse_url("http://[2001:db8::1]:8080").host_header == "[2001:db8::1]:8080"


# -- the retry schedule ----------------------------------------------------------------------
def test_retries_back_off_exponentially_with_jitter_up_to_the_cap() -> None:
    settings = WebhooksConfig()  # 10 s doubling to 1 h, for 24 h
    first = NOW
    pauses = [(next_attempt(n, first, NOW, settings, jitter=lambda: 0.5) or NOW) - NOW
              for n in (1, 2, 3, 4, 10, 50)]
    assert [p.total_seconds() for p in pauses] == [10, 20, 40, 80, 3600, 3600]
    low = next_attempt(1, first, NOW, settings, jitter=lambda: 0.0)
    high = next_attempt(1, first, NOW, settings, jitter=lambda: 1.0)
    assert low is not None and high is not None
    assert (low - NOW, high - NOW) == (timedelta(seconds=7.5), timedelta(seconds=12.5))


def test_retries_end_when_retry_for_has_passed_since_the_first_failure() -> None:
    settings = WebhooksConfig()
    first = NOW
    late = first + timedelta(hours=23, minutes=59)
    assert next_attempt(40, first, late, settings) == first + timedelta(hours=24)  # the last
    assert next_attempt(41, first, first + timedelta(hours=24), settings) is None
    assert next_attempt(41, first, first + timedelta(days=3), settings) is None


# -- in the directory ------------------------------------------------------------------------
def _file(webhook: dict[str, Any]) -> str:
    return json.dumps({"version": 1, "accounts": {"acme": {"webhook": webhook}}})


def test_a_broken_webhook_in_the_directory_file_is_named_never_quoting_the_secret() -> None:
    good: dict[str, Any] = {"url": "https://hooks.example.com/in", "secret": SECRET,
                            "created": "2026-12-05T12:00:00Z", "updated": "2026-12-05T12:00:00Z"}
    data = parse_text(_file(good), "directory.yaml")
    assert data.accounts["acme"].webhook == Webhook(good["url"], SECRET, NOW, NOW)
    assert SECRET not in repr(data) and SECRET not in repr(data.accounts["acme"])

    typed_in = "my webhook password"  # a space: not a secret keyrelay made
    with pytest.raises(ConfigError) as bad_secret:
        parse_text(_file({**good, "secret": typed_in}), "directory.yaml")
    assert "accounts.acme.webhook.secret" in str(bad_secret.value)
    assert typed_in not in str(bad_secret.value)
    with pytest.raises(ConfigError) as bad_url:
        parse_text(_file({**good, "url": "ftp://hooks.example.com/in"}), "directory.yaml")
    assert "accounts.acme.webhook.url" in str(bad_url.value) and "got ftp://" in str(
        bad_url.value) and SECRET not in str(bad_url.value)
    with pytest.raises(ConfigError, match=r"accounts\.acme\.subusers\.app\.webhook: unknown key"):
        parse_text(json.dumps({"accounts": {"acme": {"subusers": {"app": {"webhook": good}}}}}),
                   "directory.yaml")


def test_a_broken_webhook_in_ldap_is_left_out_never_quoting_the_secret() -> None:
    attrs = {"objectclass": ["top", "krAccount"], "krname": ["acme"], "krstatus": ["active"],
             "krwebhookurl": ["gopher://hooks.example.com/"], "krwebhooksecret": [SECRET]}
    problems: list[str] = []
    data = records_of([("krName=acme,ou=accounts,dc=x", attrs)], problems)
    assert data.accounts["acme"].webhook is None  # the account stays
    assert len(problems) == 1 and problems[0].startswith("webhook of acme: ")
    assert SECRET not in problems[0]
    problems.clear()
    attrs |= {"krwebhookurl": ["https://hooks.example.com/"],
              "krwebhooksecret": ["hunter2 hunter2 x"]}
    assert records_of([("krName=acme,ou=accounts,dc=x", attrs)], problems).accounts[
        "acme"].webhook is None
    assert problems and "hunter2" not in problems[0]
