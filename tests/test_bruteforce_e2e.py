"""Brute-force lock-out through a real Postfix (issues 10 and 20): keyrelay-policyd's counters
seen from the SMTP client's side, on the relay ``make run`` starts (fixture ``demo_relay``,
with the default limits: 10 guessing failures per address, 10 wrong secrets per key id; a
locked key id still logs in where it logged in within ``trusted_for``, 7 days).

Every attempt is a real AUTH PLAIN after STARTTLS on the submission port; each session
makes a few attempts only (Postfix itself slows a client down after
``smtpd_soft_error_limit`` errors and drops it at ``smtpd_hard_error_limit``).
"""

from __future__ import annotations

from keyrelay import keys
from keyrelay.demo import Relay
from testkit.relay import auth_plain, guess, many, new_key, new_tenant, next_source


def test_thousands_of_wrong_keys_from_one_address_lock_that_address_only(
        demo_relay: Relay) -> None:
    tenant = new_tenant(demo_relay)
    attacker, other = next_source(), next_source()
    wrong = [keys.generate().text for _ in range(2000)]  # well-formed keys nobody issued

    replies = many(demo_relay, attacker, wrong)

    assert len(replies) == 2000 and {code for code, _ in replies} == {535}
    assert all("unknown" in text for _, text in replies[:10]), replies[:10]
    locked = [text for _, text in replies[10:]]
    assert all(f"too many failed logins from {attacker}" in text for text in locked), locked[:3]
    # the right key from the locked address is refused too; from another address it works
    (code, text), = auth_plain(demo_relay, attacker, [tenant.key])
    assert code == 535 and "too many failed logins" in text
    assert auth_plain(demo_relay, other, [tenant.key])[-1][0] == 235


def test_wrong_secrets_for_one_key_from_many_addresses_lock_that_key_only(
        demo_relay: Relay) -> None:
    tenant = new_tenant(demo_relay)
    second, _ = new_key(demo_relay, tenant.principal)
    home = next_source()  # where the owner uses the key
    assert auth_plain(demo_relay, home, [tenant.key])[-1][0] == 235

    replies = [auth_plain(demo_relay, next_source(), [guess(tenant.key)])[0]
               for _ in range(30)]  # 30 addresses, one guess each: no address lock-out

    assert {code for code, _ in replies} == {535}
    assert all("too many failed logins for API key" not in t for _, t in replies[:10])
    assert all(f"too many failed logins for API key {tenant.key_id}" in t
               for _, t in replies[10:]), replies[10:13]
    # the owner's right secret is refused from an address it never logged in from...
    (code, text), = auth_plain(demo_relay, next_source(), [tenant.key])
    assert code == 535 and tenant.key_id in text
    # ...but not where it logged in before the attack (issue 20), and its other key works
    assert auth_plain(demo_relay, home, [tenant.key])[-1][0] == 235
    assert auth_plain(demo_relay, next_source(), [second])[-1][0] == 235
