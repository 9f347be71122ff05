"""The password bridge through real Postfix (issue 24, section 2): the relay ``make run``
starts (fixture ``demo_relay``). An application that keeps its old username and password
sends as its own sender over STARTTLS, is refused as another tenant's sender, gets the 535
naming the sunset once it passed (the real ``keyrelay legacy sunset``), and sends again with
an API key. The legacy login is made the only way there is: ``keyrelay sync`` of a
declaration with ``legacy_login``."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from keyrelay import passwords
from keyrelay.demo import Relay
from testkit.net import wait_until
from testkit.relay import (
    connect,
    kr,
    log_of,
    message,
    new_key,
    new_tenant,
    reply_of,
    wait_delivered,
)

PASSWORD = "legacy-app-password-42"


def test_a_legacy_login_sends_until_its_sunset_then_a_key_does(demo_relay: Relay) -> None:
    tenant = new_tenant(demo_relay)
    other = new_tenant(demo_relay)
    username = f"{tenant.account}-app@old-site.example"
    sunset = (datetime.now(UTC) + timedelta(days=30)).date().isoformat()
    declared = demo_relay.settings.run_dir / f"legacy-{tenant.account}.yaml"
    declared.write_text(json.dumps({"accounts": {tenant.account: {"subusers": {"app": {
        "legacy_login": {"username": username,
                         "password_hash": passwords.hash_plaintext(PASSWORD),
                         "sunset": sunset}}}}}}))
    kr(demo_relay, "sync", str(declared))

    # the old credential, unchanged, over STARTTLS on the submission port
    mid, text = message(tenant.sender, "rcpt@example.net", "legacy login")
    with connect(demo_relay, "submission") as client:
        client.login(username, PASSWORD)
        assert client.sendmail(tenant.sender, ["rcpt@example.net"], text) == {}
    wait_delivered(demo_relay, mid)
    assert "reason=legacy_password" in log_of(demo_relay, "policyd")

    # still refused as another tenant's sender, exactly as with a key
    with connect(demo_relay, "submission") as client:
        client.login(username, PASSWORD)
        client.mail(other.sender)
        code, refused = reply_of(lambda: client.rcpt("rcpt@example.net"))
    assert code == 550 and refused.startswith("5.7.1")
    # a wrong password is refused
    with connect(demo_relay, "submission") as client:
        code, refused = reply_of(lambda: client.login(username, "not-it"))
    assert code == 535 and "wrong username or password" in refused

    # after the sunset: 535 naming the date and the command that makes a key
    ended = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    kr(demo_relay, "legacy", "sunset", tenant.principal, ended)
    expected = (f"password logins for {tenant.principal} ended on {ended}; the application "
                f"must use an API key (keyrelay key create {tenant.principal})")

    def refused_with_the_sunset() -> bool:
        with connect(demo_relay, "submission") as client:
            code, text = reply_of(lambda: client.login(username, PASSWORD))
        return code == 535 and expected in text

    wait_until(refused_with_the_sunset, 30, "the relay to read the moved sunset")

    # with a new API key the application sends again
    key, _ = new_key(demo_relay, tenant.principal)
    mid, text = message(tenant.sender, "rcpt@example.net", "after the sunset")
    with connect(demo_relay, "submission") as client:
        client.login("apikey", key)
        assert client.sendmail(tenant.sender, ["rcpt@example.net"], text) == {}
    wait_delivered(demo_relay, mid)
    assert PASSWORD not in log_of(demo_relay, "policyd")
