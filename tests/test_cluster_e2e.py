"""Two relay nodes as one (issue 21), through both nodes' real Postfix: the cluster
``make run-cluster`` starts (testkit/cluster.py), each node with its own private Postfix,
keyrelay-policyd, keyrelay-milter and smtp-sink, both reading one real slapd (the directory)
and counting in one real redis-server (``counters.backend: redis``).

- a key made once sends at both nodes, each message signed;
- a per-minute limit of N admits exactly N messages in total when sending alternates between
  the nodes, and the refusal is temporary;
- a lock-out earned through node A holds at node B, for that address or key id only;
- redis-server killed and started again in the middle of a run: every answer is 2xx or 4xx
  (nothing refused permanently), and every message the client was told was queued arrives
  exactly once (nothing lost);
- a daily quota holds across the nodes and resets when the day ends: the policy daemons'
  clock is moved forward with libfaketime (testkit/cluster.py ``move_clock``). That test moves
  the clock a day and more ahead, so it runs last in this module.

The counting itself (windows, lock-outs, Redis away) is tested one layer down with a clock the
test controls: tests/test_quotas.py, tests/test_counters_redis.py, tests/test_policyd_quotas.py,
tests/test_lockout_cluster_e2e.py.
"""

from __future__ import annotations

import datetime
import smtplib
import time
from collections.abc import Iterator

import pytest

from keyrelay import keys
from keyrelay.demo import DEMO_FROM, Relay
from testkit.cluster import CLOCK_CACHE, LIBFAKETIME, Cluster, private_cluster
from testkit.net import reply_text, wait_until
from testkit.redis import REDIS_SERVER
from testkit.relay import (
    Tenant,
    auth_plain,
    connect,
    guess,
    kr,
    log_of,
    many,
    message,
    new_key,
    new_tenant,
    next_source,
    wait_delivered,
)
from testkit.slapd import SLAPD

pytestmark = pytest.mark.system

# A condition both nodes must reach (a moved clock, Redis back after the nodes' back-off of at
# most 30 s: keyrelay/counters/fallback.py): generous for a loaded machine.
DEADLINE = 120.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    for tool, package in ((SLAPD, "slapd"), (REDIS_SERVER, "redis-server"),
                          (LIBFAKETIME, "faketime")):
        if not tool.exists():
            pytest.skip(f"{tool} is missing (make test installs {package})")
    with private_cluster("127.0.0.21", clock=True) as found:
        yield found


def nodes(cluster: Cluster) -> tuple[Relay, Relay]:
    return cluster.nodes["a"], cluster.nodes["b"]


def try_send(relay: Relay, key: str, sender: str, mid_text: tuple[str, str]) -> tuple[int, str]:
    """One message through ``relay``'s submission port: (250, queue reply), or the code and text
    it was refused with at MAIL, RCPT or DATA."""
    _, text = mid_text
    with connect(relay, "submission") as client:
        client.login("apikey", key)
        try:
            client.sendmail(sender, ["rcpt@example.net"], text)
        except smtplib.SMTPRecipientsRefused as exc:
            ((code, reply),) = exc.recipients.values()
            return code, reply.decode()
        except smtplib.SMTPResponseException as exc:
            return exc.smtp_code, reply_text(exc.smtp_error)
    return 250, "queued"


def tenant_with(cluster: Cluster, *limits: str) -> tuple[Tenant, str]:
    """A fresh tenant with ``limits`` on its account, and a key made after them: each node's
    first login with that key reads the whole directory again (LDAP read-through), so the
    limits are in force at both nodes from the first message."""
    a, _ = nodes(cluster)
    tenant = new_tenant(a)
    kr(a, "limits", "set", tenant.account, *limits)
    key, _ = new_key(a, tenant.principal)
    return tenant, key


def test_a_key_made_once_sends_at_both_nodes_each_message_signed(cluster: Cluster) -> None:
    for relay in nodes(cluster):
        mid, text = message(DEMO_FROM, "rcpt@example.net", f"via {relay.settings.run_dir.name}")
        assert try_send(relay, cluster.key, DEMO_FROM, (mid, text)) == (250, "queued")
        _, parsed = wait_delivered(relay, mid)
        assert "d=demo.example" in str(parsed["DKIM-Signature"])


def test_a_per_minute_limit_of_4_admits_exactly_4_messages_alternating_the_nodes(
        cluster: Cluster) -> None:
    tenant, key = tenant_with(cluster, "--per-minute", "4")
    relays = nodes(cluster)
    started = time.monotonic()
    answers = []
    for n in range(10):
        relay = relays[n % 2]
        mid_text = message(tenant.sender, "rcpt@example.net", f"minute {n}")
        answers.append((relay, mid_text, try_send(relay, key, tenant.sender, mid_text)))
    elapsed = time.monotonic() - started
    # the window slides over 60 s: ten sessions take a few seconds even on a loaded machine
    assert elapsed < 60, f"ten sessions took {elapsed:.0f}s, longer than the window"
    accepted = [(relay, mid) for relay, (mid, _), (code, _) in answers if code == 250]
    refused = [reply for _, _, reply in answers if reply[0] != 250]
    assert len(accepted) == 4, answers
    assert {relay.settings.run_dir.name for relay, _ in accepted} == {"node-a", "node-b"}
    assert all(code == 451 and "limit of 4 messages per minute reached for account "
               f"{tenant.account}" in text for code, text in refused), refused
    for relay, mid in accepted:
        wait_delivered(relay, mid)


def test_a_lockout_earned_through_node_a_holds_at_node_b_for_that_address_only(
        cluster: Cluster) -> None:
    a, b = nodes(cluster)
    tenant = new_tenant(a)
    attacker, other = next_source(), next_source()
    replies = many(a, attacker, [keys.generate().text for _ in range(12)])
    assert [code for code, _ in replies] == [535] * 12
    assert f"too many failed logins from {attacker}" in replies[-1][1]
    # node B: the right key from the locked address is refused, from another address it works
    (code, text), = auth_plain(b, attacker, [tenant.key])
    assert code == 535 and f"too many failed logins from {attacker}" in text
    assert auth_plain(b, other, [tenant.key])[-1][0] == 235


def test_a_key_id_locked_through_node_a_is_locked_at_node_b_and_no_other_key(
        cluster: Cluster) -> None:
    a, b = nodes(cluster)
    tenant = new_tenant(a)
    second, _ = new_key(a, tenant.principal)
    replies = [auth_plain(a, next_source(), [guess(tenant.key)])[0] for _ in range(11)]
    assert {code for code, _ in replies} == {535}
    assert f"too many failed logins for API key {tenant.key_id}" in replies[-1][1]
    (code, text), = auth_plain(b, next_source(), [tenant.key])
    assert code == 535 and tenant.key_id in text
    assert auth_plain(b, next_source(), [second])[-1][0] == 235


def test_redis_killed_and_started_again_mid_run_loses_nothing_and_refuses_nothing_for_good(
        cluster: Cluster) -> None:
    """20 messages alternating the nodes, each sent once; Redis killed after the 5th, started
    again (empty) after the 10th. Those refused temporarily are sent again afterwards, as a
    client's queue would, until queued. Each one queued arrives exactly once."""
    assert cluster.redis is not None
    tenant, key = tenant_with(cluster, "--per-minute", "1000")
    relays = nodes(cluster)
    answers: dict[int, tuple[int, str]] = {}
    queued: list[tuple[Relay, str]] = []
    pending: list[tuple[int, Relay, tuple[str, str]]] = []
    for n in range(20):
        if n == 5:
            cluster.redis.kill()
        if n == 10:
            cluster.redis.start()
        relay, mid_text = relays[n % 2], message(tenant.sender, "rcpt@example.net", f"out {n}")
        answers[n] = code, reply = try_send(relay, key, tenant.sender, mid_text)
        if code == 250:
            queued.append((relay, mid_text[0]))
        else:
            pending.append((n, relay, mid_text))
    assert all(code == 250 or 400 <= code < 500 for code, _ in answers.values()), answers
    # Redis away: the rate limit cannot be counted, so the answer is temporary
    # (counters.on_unavailable: tempfail); logins still work (failures counted in process)
    for n in range(5, 10):
        code, reply = answers[n]
        assert code == 451 and "4.3.0" in reply and "temporarily unavailable" in reply, answers
    for n, relay, mid_text in pending:
        deadline = time.monotonic() + DEADLINE
        while (answer := try_send(relay, key, tenant.sender, mid_text))[0] != 250:
            assert 400 <= answer[0] < 500, f"message {n}: {answer}"
            assert time.monotonic() < deadline, f"message {n} still refused: {answer}"
            time.sleep(1)
        queued.append((relay, mid_text[0]))
    assert len(queued) == 20
    for relay, mid in queued:
        wait_delivered(relay, mid)


def test_a_daily_quota_holds_across_the_nodes_and_resets_when_the_day_ends(
        cluster: Cluster) -> None:
    """Runs last: it moves both policy daemons' clock forward, to 00:05 UTC of the next day
    (so that filling the quota never straddles a midnight), then a day further."""
    tenant, key = tenant_with(cluster, "--per-day", "3")
    relays = nodes(cluster)
    now = datetime.datetime.now(datetime.UTC)
    next_day = (now + datetime.timedelta(days=1)).replace(hour=0, minute=5, second=0,
                                                          microsecond=0)
    offset = int((next_day - now).total_seconds())
    cluster.move_clock(f"+{offset}s")
    # every policyd process (each node's workers too) reads the clock file again once its
    # libfaketime cache (CLOCK_CACHE seconds of real time) has run out
    time.sleep(2 * CLOCK_CACHE)

    def answer(n: int, relay: Relay) -> tuple[int, str]:
        mid_text = message(tenant.sender, "rcpt@example.net", f"day {n}")
        return try_send(relay, key, tenant.sender, mid_text)

    # both nodes on the new day before anything is counted in it
    for relay in relays:
        source = next_source()  # one address per node: the polls' logins never run out of them
        wait_until(lambda relay=relay, source=source: clock_reads(  # type: ignore[misc]
                       relay, key, source, next_day.date()),
                   DEADLINE, f"{relay.settings.run_dir.name}'s keyrelay-policyd on the new day")
    answers = [answer(n, relays[n % 2]) for n in range(6)]
    assert [code for code, _ in answers] == [250, 250, 250, 451, 451, 451], answers
    for _, text in answers[3:]:
        assert f"daily quota of 3 messages for account {tenant.account} reached" in text
    # the day ends: both nodes accept again
    cluster.move_clock(f"+{offset + 86400}s")
    time.sleep(2 * CLOCK_CACHE)
    after = next_day.date() + datetime.timedelta(days=1)
    assert all(f"resets at {after.isoformat()} 00:00" in text for _, text in answers[3:]), \
        answers[3:]
    for n, relay in enumerate(relays):
        wait_until(lambda relay=relay, n=n: answer(10 + n, relay)[0] == 250,  # type: ignore[misc]
                   DEADLINE, f"node {'AB'[n]} to accept on the next day")


def clock_reads(relay: Relay, key: str, source: str, day: datetime.date) -> bool:
    """Does ``relay``'s keyrelay-policyd see ``day``? It logs a login from ``source`` with its
    own clock's time (the log's time stamps come from that clock); the latest such line."""
    assert auth_plain(relay, source, [key])[-1][0] == 235
    time.sleep(0.2)  # a poll is a whole SMTP session: no need to hammer the relay
    lines = [line for line in log_of(relay, "policyd").splitlines()
             if "login service=auth" in line and f"client={source} " in line]
    return bool(lines) and lines[-1].startswith(day.isoformat())
