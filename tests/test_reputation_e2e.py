"""The reputation guard end to end (docs/reputation.md): a relay of this test's own
(keyrelay.demo, the reputation file in its run folder beside the suppression list), real
Postfix, a real smtp-sink that refuses every recipient (``-f RCPT``), and a real HTTP receiver
that checks every signature. keyrelay-events runs with ``reputation.min_volume: 4``:

- four messages of one subuser bounce: it is paused (the warning line in keyrelay-events' log,
  a signed ``paused`` event at the account's webhook);
- its next message is refused at RCPT with ``451 4.7.1`` naming the pause;
- ``keyrelay subuser resume`` ends it: the next message is accepted.
"""

from __future__ import annotations

import json
import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from keyrelay.demo import Relay
from testkit.net import wait_until
from testkit.relay import connect, kr, message, new_tenant, private_relay, refusing_sink, send
from testkit.webhooks import Receiver

DEADLINE = 120  # seconds: delivery attempts, keyrelay-events' rounds, policyd's refresh


@pytest.fixture(scope="module")
def relay() -> Iterator[Relay]:
    if not Path("/usr/sbin/postfix").exists():
        pytest.skip("Postfix is not installed (make test installs it)")
    with private_relay("127.0.0.5") as running:  # its own: its sink and settings change
        yield running


def guarded(relay: Relay) -> None:
    """keyrelay-events restarted with a small min_volume (the demo writes its config on
    start); the sink swapped for one that refuses every recipient with 5xx."""
    s = relay.settings
    config = yaml.safe_load(s.config.read_text())
    config["reputation"] = {"min_volume": 4}
    s.config.write_text(json.dumps(config, indent=2) + "\n")  # keeps its owner and mode
    relay.children["events"].stop()
    relay.children["events"] = relay.events()
    relay.children["events"].start()
    refusing_sink(relay, "-f", "sink-refusing")


def rcpt(relay: Relay, key: str, sender: str) -> tuple[int, str]:
    """The answer to RCPT TO (keyrelay's policy service is asked there: postfix apply puts
    it in smtpd_relay_restrictions)."""
    with connect(relay, "submission") as client:
        client.login("apikey", key)
        client.mail(sender)
        code, text = client.rcpt("someone@example.net")
        return code, text.decode()


def test_a_bouncing_subuser_is_paused_refused_at_mail_and_resumed(relay: Relay) -> None:
    tenant = new_tenant(relay)
    with Receiver() as hook:
        secret = json.loads(kr(relay, "webhook", "set", tenant.account, "--url", hook.url,
                               "--json"))["secret"]
        guarded(relay)
        for n in range(4):
            dead = f"gone{n}@example.net"
            _, text = message(tenant.sender, dead, f"to dead address {n}")
            send(relay, "submission", tenant.key, tenant.sender, text, dead)
        log = relay.settings.logs / "events.log"
        wait_until(lambda: f"reputation: paused {tenant.principal}:" in log.read_text(),
                   DEADLINE, "keyrelay-events to pause the subuser")
        line = next(x for x in log.read_text().splitlines()
                    if f"reputation: paused {tenant.principal}:" in x)
        assert line.endswith(f"bounce rate 100 % (4 of 4) over 24h is above 5 %; resume with "
                             f"keyrelay subuser resume {tenant.principal}")

        def paused() -> list[dict[str, Any]]:
            return [e for e in hook.signed_events(secret) if e["event"] == "paused"]

        wait_until(paused, DEADLINE, "the paused event at the webhook")
        event = paused()[0]
        assert (event["account"], f"{event['account']}/{event['subuser']}",
                event["bounced"], event["delivered"]) == (
                    tenant.account, tenant.principal, 4, 0)

        # policyd reads the pauses every reputation.refresh (5 s): refused at RCPT
        wait_until(lambda: rcpt(relay, tenant.key, tenant.sender)[0] == 451, DEADLINE,
                   "policyd to refuse the paused subuser's recipient")
        code, text = rcpt(relay, tenant.key, tenant.sender)
        assert code == 451
        assert text.startswith("4.7.1 <someone@example.net>: Recipient address rejected: "
                               f"sending paused for {tenant.principal} since "), text
        assert text.endswith(f"the account's admin resumes it with keyrelay subuser resume "
                             f"{tenant.principal}"), text

        out = kr(relay, "subuser", "resume", tenant.principal)
        assert f"Ended the reputation pause of {tenant.principal}" in out
        wait_until(lambda: rcpt(relay, tenant.key, tenant.sender)[0] == 250, DEADLINE,
                   "policyd to let the resumed subuser send")
        _, text = message(tenant.sender, "again@example.net", "after the resume")
        try:
            send(relay, "submission", tenant.key, tenant.sender, text, "again@example.net")
        except smtplib.SMTPException as exc:  # pragma: no cover - shown on failure
            pytest.fail(f"the resumed subuser's message was refused: {exc}")
