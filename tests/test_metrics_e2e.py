"""Metrics through real Postfix (the demo relay, which turns the endpoints on as `make run`
does): a good send, a failed login and a spoofed From move the counters by exactly those
amounts. The session's relay serves this test module alone at a time (one per pytest worker),
and each step's counters are written before Postfix gets its answer, so the differences of two
scrapes are exact."""

from __future__ import annotations

from test_metrics_daemons import Samples, get, healthy, scrape, total, value

from keyrelay.demo import Relay
from testkit.relay import (
    auth_plain,
    connect,
    message,
    new_tenant,
    next_source,
    reply_of,
    send,
    wait_delivered,
)
from testkit.relay import guess as wrong_secret


def test_a_send_a_failed_login_and_a_spoofed_from_move_the_counters_exactly(
    demo_relay: Relay,
) -> None:
    relay = demo_relay
    policyd_url, milter_url, events_url = relay.settings.metrics_urls()
    assert healthy(policyd_url) and healthy(milter_url) and healthy(events_url)
    tenant = new_tenant(relay)
    before = scrape(policyd_url), scrape(milter_url)

    # a good send: one login, one message signed with both selectors
    good_id, text = message(tenant.sender, "rcpt@example.net", "metrics")
    send(relay, "submission", tenant.key, tenant.sender, text)
    wait_delivered(relay, good_id)
    # a failed login: the right key id, a wrong secret
    (reply,) = auth_plain(relay, next_source(), [wrong_secret(tenant.key)])
    assert reply[0] == 535
    # a spoofed From: logged in (a second login), refused at end of message by the milter
    with connect(relay, "submission") as client:
        client.login("apikey", tenant.key)
        _, spoofed = message(tenant.sender, "rcpt@example.net", "spoof",
                             header_from="ceo@bank.example")
        code, answer = reply_of(lambda: client.sendmail(tenant.sender, ["rcpt@example.net"],
                                                        spoofed))
    assert code == 550, answer
    after = scrape(policyd_url), scrape(milter_url)

    def moved(which: int, name: str, **labels: str) -> float:
        return total(after[which], name, **labels) - total(before[which], name, **labels)

    assert moved(0, "keyrelay_auth_attempts_total", result="success") == 2
    assert moved(0, "keyrelay_auth_attempts_total", result="failure",
                 reason="wrong_secret") == 1
    assert moved(0, "keyrelay_auth_attempts_total", result="failure") == 1
    assert moved(0, "keyrelay_auth_attempts_total", result="tempfail") == 0
    # the policy service let both messages through (the From is the milter's to check)
    assert moved(0, "keyrelay_policy_decisions_total", action="refuse") == 0
    assert moved(0, "keyrelay_policy_decisions_total", action="tempfail") == 0
    assert moved(0, "keyrelay_policy_decisions_total", action="allow", reason="ok") >= 2
    # the milter: one message signed, one refused, both the new tenant's
    assert moved(1, "keyrelay_messages_total", outcome="signed") == 1
    assert moved(1, "keyrelay_messages_total", outcome="refused") == 1
    assert moved(1, "keyrelay_messages_total", outcome="tempfail") == 0
    assert moved(1, "keyrelay_messages_total") == 2
    assert _own(after[1], tenant.account) in (2, 0)  # its own series, or (bound) "other"
    assert moved(1, "keyrelay_dkim_signatures_total", algorithm="rsa-sha256") == 1
    assert moved(1, "keyrelay_dkim_signatures_total", algorithm="ed25519-sha256") == 1
    assert moved(1, "keyrelay_request_duration_seconds_count", service="milter") == 2
    # no key, secret or key id in either page
    for url in (policyd_url, milter_url):
        page = get(url + "/metrics")[1]
        assert tenant.key not in page and tenant.key_id not in page


def _own(samples: Samples, account: str) -> float:
    return sum(value(samples, "keyrelay_messages_total", account=account, outcome=outcome)
               for outcome in ("signed", "refused", "tempfail", "monitor_allowed"))
