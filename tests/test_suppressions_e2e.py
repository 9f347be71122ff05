"""Bounces, suppressions and deferrals end to end (issue 25, sections 2-4): a relay of this
test's own (keyrelay.demo, so its configuration is the demo's: keyrelay-events on the Postfix
maillog, loopback webhooks allowed, the suppression list in the run folder), real Postfix,
real smtp-sinks standing in for bad receivers (``-f RCPT``: every recipient refused 5xx;
``-r RCPT``: 4xx), and a real HTTP receiver that checks every signature.

- a message to a receiver that refuses it gives ``processed`` then ``bounce`` (hard, 5.x.x)
  at the webhook, and keyrelay-events suppresses the recipient for the account;
- the next message to that address is refused at RCPT with the suppression's text, and gives
  ``dropped`` with the login;
- a receiver that answers 4xx gives ``deferred`` (4.x.x);
- every event arrives once.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keyrelay.demo import Relay
from testkit.net import wait_until
from testkit.relay import (
    connect,
    kr,
    message,
    new_tenant,
    private_relay,
    refusing_sink,
    reply_of,
    send,
)
from testkit.webhooks import Receiver

DEADLINE = 120  # seconds: delivery attempts, the events daemon's rounds, the webhook batches


@pytest.fixture(scope="module")
def relay() -> Iterator[Relay]:
    if not Path("/usr/sbin/postfix").exists():
        pytest.skip("Postfix is not installed (make test installs it)")
    with private_relay("127.0.0.4") as running:  # its own: its sink is swapped
        yield running


def test_a_hard_bounce_suppresses_and_the_next_message_is_dropped(relay: Relay) -> None:
    tenant = new_tenant(relay)
    with Receiver() as hook:
        secret = json.loads(kr(relay, "webhook", "set", tenant.account, "--url", hook.url,
                               "--json"))["secret"]
        refusing_sink(relay, "-f", "sink-refusing")
        mid, text = message(tenant.sender, "gone@example.net", "to a dead address")
        send(relay, "submission", tenant.key, tenant.sender, text, "gone@example.net")

        def bounced() -> list[dict[str, Any]]:
            return [e for e in hook.signed_events(secret)
                    if e["event"] == "bounce" and e["email"] == "gone@example.net"]

        wait_until(bounced, DEADLINE, "the bounce at the webhook")
        bounce = bounced()[0]
        assert bounce["type"] == "hard" and bounce["status"].startswith("5.")
        assert (bounce["key_id"], bounce["message_id"]) == (tenant.key_id, mid)

        def suppressed() -> bool:
            listed = json.loads(kr(relay, "suppression", "list", tenant.account, "--json"))
            return any(s["email"] == "gone@example.net" for s in listed)

        wait_until(suppressed, DEADLINE, "keyrelay-events to suppress the bounced address")
        listed = json.loads(kr(relay, "suppression", "list", tenant.account, "--json"))
        entry = next(s for s in listed if s["email"] == "gone@example.net")
        assert entry["source"] == "bounce" and entry["status"] == bounce["status"]

        # the next message to it: refused at RCPT, naming the suppression; a dropped event
        _, again = message(tenant.sender, "gone@example.net", "once more")
        with connect(relay, "submission") as client:
            client.login("apikey", tenant.key)
            code, refused = reply_of(lambda: client.sendmail(tenant.sender,
                                                             ["gone@example.net"], again))
        assert code == 550
        assert f"recipient suppressed for account {tenant.account} since" in refused
        assert f"keyrelay suppression remove {tenant.account} gone@example.net" in refused

        def dropped() -> list[dict[str, Any]]:
            return [e for e in hook.signed_events(secret)
                    if e["event"] == "dropped" and e["email"] == "gone@example.net"]

        wait_until(dropped, DEADLINE, "the dropped event at the webhook")
        assert dropped()[0]["key_id"] == tenant.key_id
        assert dropped()[0]["status"] == "5.7.1"

        # a receiver that answers 4xx: deferred
        refusing_sink(relay, "-r", "sink-deferring")
        _, later = message(tenant.sender, "later@example.net", "try later")
        send(relay, "submission", tenant.key, tenant.sender, later, "later@example.net")

        def deferred() -> list[dict[str, Any]]:
            return [e for e in hook.signed_events(secret)
                    if e["event"] == "deferred" and e["email"] == "later@example.net"]

        wait_until(deferred, DEADLINE, "the deferral at the webhook")
        assert deferred()[0]["status"].startswith("4.")
        events = hook.signed_events(secret)
    ids = Counter(e["event_id"] for e in events)
    assert all(n == 1 for n in ids.values()), ids
    assert {e["account"] for e in events} == {tenant.account}
    assert secret not in (relay.settings.logs / "events.log").read_text()
