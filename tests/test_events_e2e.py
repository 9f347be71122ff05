"""Delivery events from a real Postfix's own log (keyrelay/events; docs/events.md).

The session's private relay (``demo_relay``: Postfix configured by ``keyrelay postfix apply``,
keyrelay-policyd, keyrelay-milter, smtp-sink) writes its maillog_file (postlogd); the follower
reads that file as it would in production. Checked: a delivered message gives ``processed``
then ``delivered`` with the login's account, subuser and key id, the message's Message-ID and
the domain it was signed for; a message the milter refuses gives ``dropped`` with its queue id;
a session whose only recipient is refused at RCPT gives ``dropped`` with the login and a queue
id (keyrelay's submission services open the queue file at MAIL FROM). With a relay of its own
whose smtp-sink is swapped for one that refuses every recipient (``-f RCPT``) and then for one
that answers 4xx (``-r RCPT``): ``bounce`` (hard, 5.x.x) and ``deferred`` (4.x.x).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from keyrelay.demo import Relay
from keyrelay.events import maillog
from keyrelay.events.follow import Follower
from keyrelay.events.store import EventStore
from testkit.net import wait_until
from testkit.relay import (
    connect,
    maillog_line,
    message,
    new_tenant,
    private_relay,
    refusing_sink,
    reply_of,
    send,
    wait_delivered,
)


def events_of(relay: Relay, state: Path, account: str) -> list[dict[str, Any]]:
    store = EventStore(state)
    try:
        Follower.open(relay.settings.maillog, store, maillog.Parser()).run_once()
        return [e for _, e in store.events() if e["account"] == account]
    finally:
        store.close()


def test_a_real_postfix_log_gives_attributed_events(demo_relay: Relay, tmp_path: Path) -> None:
    state = tmp_path / "events.db"
    tenant = new_tenant(demo_relay)
    account, subuser = tenant.principal.split("/")

    # 1. delivered
    mid, text = message(tenant.sender, "rcpt@example.net", "events: delivered")
    send(demo_relay, "submission", tenant.key, tenant.sender, text)
    wait_delivered(demo_relay, mid)
    queue_id = maillog_line(demo_relay, "message-id=" + mid).split(": ")[1]
    maillog_line(demo_relay, queue_id + ": removed")

    # 2. the milter refuses the header From
    _, bad_text = message(tenant.sender, "rcpt@example.net", "events: refused",
                                header_from="ceo@bank.example")
    with connect(demo_relay, "submission") as client:
        client.login("apikey", tenant.key)
        code, _ = reply_of(lambda: client.sendmail(tenant.sender, ["rcpt@example.net"],
                                                   bad_text))
    assert code == 550
    maillog_line(demo_relay, "milter-reject", "ceo@bank.example")

    # 3. a session whose only recipient is refused at RCPT (an envelope sender that is not
    #    the tenant's): keyrelay's submission services open the queue file at MAIL FROM
    #    (smtpd_delay_open_until_valid_rcpt = no, keyrelay/postfixconf.py), so the refusal is
    #    logged with a queue id after the login's client= line, and is attributed
    with connect(demo_relay, "submission") as client:
        client.login("apikey", tenant.key)
        client.ehlo_or_helo_if_needed()
        assert client.mail("someone@bank.example")[0] == 250
        code, _ = reply_of(lambda: client.rcpt("refused@example.net"))
        assert code == 550
    rejected = maillog_line(demo_relay, ": reject: RCPT", "refused@example.net")
    assert "NOQUEUE" not in rejected

    def complete() -> bool:
        kinds = [e["event"] for e in events_of(demo_relay, state, account)]
        return kinds.count("delivered") == 1 and kinds.count("dropped") == 2

    wait_until(complete, 60, "the events of the three sessions")
    events = events_of(demo_relay, state, account)
    first = [e for e in events if e["queue_id"] == queue_id]
    assert [e["event"] for e in first] == ["processed", "delivered"]
    for e in first:
        assert (e["account"], e["subuser"], e["key_id"], e["message_id"]) == (
            account, subuser, tenant.key_id, mid)
        # the signing domain, from keyrelay's milter_header_checks line (postfix apply)
        assert e["dkim_domain"] == tenant.domain
    assert first[1]["email"] == "rcpt@example.net"
    assert first[1]["status"] == "2.0.0"

    milter = [e for e in events if e["event"] == "dropped" and e["stage"] == "END-OF-MESSAGE"]
    assert len(milter) == 1
    assert milter[0]["queue_id"] and milter[0]["status"] == "5.7.1"
    assert "ceo@bank.example" in milter[0]["reason"]
    assert milter[0]["dkim_domain"] is None  # refused before it was signed

    early = [e for e in events if e["event"] == "dropped" and e["stage"] == "RCPT"]
    assert len(early) == 1
    assert (early[0]["email"], early[0]["key_id"]) == ("refused@example.net", tenant.key_id)
    assert early[0]["queue_id"] and early[0]["queue_id"] in rejected
    assert [e["email"] for e in events if e["event"] == "delivered"] == ["rcpt@example.net"]

    # read again from the checkpoint: nothing new, nothing twice
    again = events_of(demo_relay, state, account)
    assert [e["event_id"] for e in again] == [e["event_id"] for e in events]


def test_real_bounces_and_deferrals_give_their_events(tmp_path: Path) -> None:
    if not Path("/usr/sbin/postfix").exists():
        pytest.skip("Postfix is not installed (make test installs it)")
    state = tmp_path / "events.db"
    with private_relay("127.0.0.3") as relay:  # its own: its sink is swapped
        tenant = new_tenant(relay)
        account = tenant.account
        refusing_sink(relay, "-f", "sink-refusing")
        _, hard = message(tenant.sender, "gone@example.net", "events: bounce")
        send(relay, "submission", tenant.key, tenant.sender, hard, "gone@example.net")
        maillog_line(relay, "to=<gone@example.net>", "status=bounced")

        refusing_sink(relay, "-r", "sink-deferring")
        _, soft = message(tenant.sender, "later@example.net", "events: deferred")
        send(relay, "submission", tenant.key, tenant.sender, soft, "later@example.net")
        maillog_line(relay, "to=<later@example.net>", "status=deferred")

        events = events_of(relay, state, account)
    by_email = {(e["event"], e["email"]): e for e in events}
    bounce = by_email[("bounce", "gone@example.net")]
    assert bounce["type"] == "hard" and bounce["status"].startswith("5.")
    assert "said: 5" in bounce["reason"]
    deferred = by_email[("deferred", "later@example.net")]
    assert deferred["status"].startswith("4.") and deferred["attempt"] == 1
    assert "said: 4" in deferred["response"]
    assert [e["event"] for e in events].count("processed") == 2
    assert all(e["key_id"] == tenant.key_id and e["subuser"] == "app" for e in events)
