"""A lock-out earned through node A holds at node B (issue 21): two real keyrelay-policyd
processes, each with its own sockets and control socket, sharing one directory and one real
redis-server (``counters.backend: redis``). Wrong secrets through A lock the key id at B, for
that key id only; guesses through A lock the address at B, for that address only; the owner's
address still gets in at B (recent logins are shared too); ``keyrelay lockout list|clear``
against B's control socket lists and lifts what A counted. Redis killed: logins are still
decided and failures counted in each process; Redis back: shared again, without a restart.

The counting itself, on a clock the test moves, is tests/test_policyd_services.py's and
tests/test_lockout.py's; Redis's side of it tests/test_counters_redis.py's.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from testkit.net import wait_until
from testkit.policyd import KEYRELAY, Key, Policyd, fresh_address
from testkit.protocols import DovecotClient, connect
from testkit.redis import REDIS_SERVER, RedisServer

THRESHOLD = 3  # wrong secrets per key id, and guesses per address, before a lock-out
# Redis back: each node tries it again after a back-off of at most 30 s (counters/fallback.py
# ``retry_most``); generous for a loaded machine
BACK_DEADLINE = 120.0


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    if not REDIS_SERVER.exists():
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with RedisServer() as found:
        yield found


@pytest.fixture
def nodes(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[Policyd, Policyd]]:
    settings: dict[str, Any] = {
        "counters": redis_server.counters_settings(),
        # one process per node: the outage test counts in "A's process only" (workers
        # sharing Redis within a node are tests/test_workers.py's)
        "policyd": {"workers": 1, "bruteforce": {"max_failures_per_key": THRESHOLD,
                                   "max_failures_per_address": THRESHOLD,
                                   "window": "10m", "lockout": "15m", "trusted_for": "1d"}}}
    a = Policyd(tmp_path / "a", settings)
    # the second node: its own process and sockets, the same directory and Redis
    b = Policyd(tmp_path / "b", {**settings, "directory": {"path": str(a.directory_path)}})
    a.keyrelay("account", "add", "acme")
    started: list[Policyd] = []
    try:
        for node in (a, b):
            node.start()
            started.append(node)
        yield a, b
    finally:
        for node in started:
            if node.running():
                assert node.stop() == 0, node.log()[-3000:]
            assert node.tracebacks() == [], node.tracebacks()


def login(node: Policyd, password: str, client: str) -> str:
    """``OK``, ``CLOSED`` (a temporary answer: Postfix says 454 4.7.0) or the reason of a
    ``FAIL`` (Postfix's 535 5.7.8), over the Dovecot auth protocol."""
    with DovecotClient(connect(node.endpoint("auth"))) as auth:
        auth.handshake()
        reply = auth.plain("apikey", password, rip=client)
    return reply.status if reply.status in ("OK", "CLOSED") else reply.reason


def wrong(key: Key) -> str:
    head, secret = key.text.rsplit(".", 1)
    return f"{head}.{'A' if secret[0] != 'A' else 'B'}{secret[1:]}"


def cli(node: Policyd, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `keyrelay` console script against the node's configuration (and so its
    control socket)."""
    return subprocess.run([str(KEYRELAY), "--config", str(node.config_path), *args],
                          capture_output=True, text=True, timeout=60)


def listed(node: Policyd) -> list[dict[str, Any]]:
    result = cli(node, "lockout", "list", "--json")
    assert (result.returncode, result.stderr) == (0, ""), result
    found: list[dict[str, Any]] = json.loads(result.stdout)
    return found


def lock_key(node: Policyd, key: Key) -> None:
    """Wrong secrets for ``key`` through ``node``, each from a new address (so that no
    address reaches its own threshold)."""
    for _ in range(THRESHOLD):
        assert login(node, wrong(key), fresh_address()).startswith("unknown API key")


def locked_key(key: Key) -> Callable[[str], bool]:
    return lambda reason: reason.startswith(f"too many failed logins for API key {key.key_id}")


def test_a_lock_out_earned_through_one_node_holds_lists_and_clears_at_the_other(
        nodes: tuple[Policyd, Policyd]) -> None:
    a, b = nodes
    key, other = a.create_key("acme", "app"), a.create_key("acme", "billing")
    home = fresh_address()
    assert login(a, key.text, home) == "OK"  # the owner, at home, through A
    lock_key(a, key)  # a stranger, through A
    assert locked_key(key)(login(b, key.text, fresh_address())), "locked at B too"
    assert login(b, key.text, home) == "OK", "the owner's address still gets in at B"
    assert login(b, other.text, fresh_address()) == "OK", "another key is not locked"

    attacker = fresh_address()
    for _ in range(THRESHOLD):  # guesses that are no key at all: they count per address
        assert login(a, "kr.nonsense", attacker) != "OK"
    assert login(b, other.text, attacker) == (
        f"too many failed logins from {attacker}; try again in 15 minutes")
    assert login(b, other.text, fresh_address()) == "OK", "another address is not locked"

    found = {(lock["kind"], lock["subject"]): lock for lock in listed(b)}
    assert set(found) == {("key", key.key_id), ("address", attacker)}, found
    assert found["key", key.key_id]["failures"] == THRESHOLD
    assert found["key", key.key_id]["let_in_from"] == 1  # home
    assert listed(a) == listed(b)

    cleared = cli(b, "lockout", "clear", "--key", key.key_id)
    assert cleared.returncode == 0, cleared
    assert login(a, key.text, fresh_address()) == "OK", "cleared at B, lifted at A"
    assert [lock["subject"] for lock in listed(a)] == [attacker]
    cleared = cli(b, "lockout", "clear", "--address", attacker)
    assert cleared.returncode == 0, cleared
    assert login(a, other.text, attacker) == "OK"


def test_redis_away_logins_are_decided_and_counted_locally_then_shared_again(
        nodes: tuple[Policyd, Policyd], redis_server: RedisServer) -> None:
    a, b = nodes
    key, other, third = (a.create_key("acme", name) for name in ("app", "billing", "ops"))
    redis_server.kill()  # an outage; on_unavailable: tempfail, the default, for limits only
    assert login(a, key.text, fresh_address()) == "OK", "no temporary answer for a right key"
    assert login(a, wrong(key), fresh_address()).startswith("unknown API key")  # 535
    lock_key(a, other)  # the first failure above was key's, not other's
    assert locked_key(other)(login(a, other.text, fresh_address())), "counted at A"
    assert login(b, other.text, fresh_address()) == "OK", "counted in A's process only"
    assert "failed logins are counted in this process" in a.log()

    redis_server.start()  # empty: nothing was persisted

    def shared_again(node: Policyd) -> Callable[[], bool]:
        def answers() -> bool:
            assert login(node, key.text, fresh_address()) == "OK"  # each login tries Redis
            return "answers again; counting there again" in node.log()
        return answers

    for node in (a, b):
        wait_until(shared_again(node), BACK_DEADLINE, "the node to count in Redis again")
    lock_key(b, third)
    assert locked_key(third)(login(a, third.text, fresh_address())), "shared again"
    # the lock-out A counted while Redis was away still holds there
    assert locked_key(other)(login(a, other.text, fresh_address()))
