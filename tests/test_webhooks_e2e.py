"""Events to the tenant's webhook through real Postfix (issue 25, section 3; docs/webhooks.md):
the relay ``make run`` starts runs keyrelay-events on its Postfix's maillog, with loopback
webhook targets allowed as the demo does; the receiver is a real HTTP server in the test
(testkit/webhooks.py) that checks each request's signature with the function docs/webhooks.md
gives receivers.

- a message sent with a key gives ``processed`` and ``delivered`` at the account's webhook,
  signed with the secret ``keyrelay webhook set`` printed, and nothing of another account;
- a receiver that is not there when the events are made gets them once it comes up (the
  outbox retries with backoff), every event exactly once.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

from keyrelay.demo import Relay
from keyrelay.events.store import EventStore
from keyrelay.webhooks import sign
from testkit.net import free_port, wait_until
from testkit.relay import kr, message, new_tenant, send, wait_delivered
from testkit.webhooks import Receiver, Request

# webhooks.retry_initial is 10 s, doubling: the first retries come within a minute or two
DEADLINE = 300


def set_webhook(relay: Relay, account: str, url: str) -> str:
    return str(json.loads(kr(relay, "webhook", "set", account, "--url", url, "--json"))["secret"])


def events_in(requests: list[Request], secret: str) -> list[dict[str, Any]]:
    """Every event of the requests, each request's signature checked as a receiver would."""
    found: list[dict[str, Any]] = []
    for request in requests:
        header = request.headers["x-keyrelay-signature"]
        assert sign.verify(secret, header, request.body, int(time.time())), header
        assert request.headers["content-type"] == "application/json"
        batch = json.loads(request.body)
        assert isinstance(batch, list) and batch
        found += batch
    return found


def test_a_tenants_events_reach_its_webhook_signed(demo_relay: Relay) -> None:
    tenant, other = new_tenant(demo_relay), new_tenant(demo_relay)
    with Receiver() as hook:
        secret = set_webhook(demo_relay, tenant.account, hook.url)
        mid, text = message(tenant.sender, "rcpt@example.net", "to the webhook")
        send(demo_relay, "submission", tenant.key, tenant.sender, text)
        wait_delivered(demo_relay, mid)
        # the other tenant, without a webhook, sends too: none of its events may arrive here
        other_mid, other_text = message(other.sender, "rcpt@example.net", "no webhook")
        send(demo_relay, "submission", other.key, other.sender, other_text)
        wait_delivered(demo_relay, other_mid)

        def kinds() -> set[str]:
            return {e["event"] for e in events_in(list(hook.received), secret)
                    if e.get("message_id") == mid}

        wait_until(lambda: {"processed", "delivered"} <= kinds(), DEADLINE,
                   "processed and delivered at the webhook")
        events = events_in(list(hook.received), secret)
    assert {e["account"] for e in events} == {tenant.account}
    delivered = next(e for e in events if e["event"] == "delivered")
    assert (delivered["email"], delivered["key_id"], delivered["status"]) == (
        "rcpt@example.net", tenant.key_id, "2.0.0")
    assert secret not in (demo_relay.settings.logs / "events.log").read_text()


def test_a_receiver_that_comes_up_late_gets_every_event_once(demo_relay: Relay) -> None:
    tenant = new_tenant(demo_relay)
    port = free_port()
    secret = set_webhook(demo_relay, tenant.account, f"http://127.0.0.1:{port}/hook")
    first_mid, text = message(tenant.sender, "rcpt@example.net", "while the receiver is down")
    send(demo_relay, "submission", tenant.key, tenant.sender, text)
    wait_delivered(demo_relay, first_mid)

    def failed_once() -> bool:
        store = EventStore(demo_relay.settings.events_state)
        try:
            rows = store.db.execute(
                "SELECT COUNT(*) FROM events WHERE account = ? AND attempts > 0 AND "
                "state = 'pending'", (tenant.account,)).fetchone()
        finally:
            store.close()
        return bool(rows[0])

    wait_until(failed_once, DEADLINE, "a failed delivery to the receiver that is not there")
    assert "not delivered (attempt 1)" in (demo_relay.settings.logs / "events.log").read_text()
    with Receiver(port=port) as hook:
        second_mid, text = message(tenant.sender, "rcpt@example.net", "receiver is back")
        send(demo_relay, "submission", tenant.key, tenant.sender, text)
        wait_delivered(demo_relay, second_mid)

        def arrived() -> Counter[tuple[str, str]]:
            return Counter((e["event"], e.get("message_id") or "")
                           for e in events_in(list(hook.received), secret))

        wanted = {(kind, mid) for kind in ("processed", "delivered")
                  for mid in (first_mid, second_mid)}
        wait_until(lambda: wanted <= set(arrived()), DEADLINE,
                   "both messages' events at the receiver once it is up")
        events = events_in(list(hook.received), secret)
    ids = Counter(e["event_id"] for e in events)
    assert all(n == 1 for n in ids.values()), ids
    assert {e["account"] for e in events} == {tenant.account}
