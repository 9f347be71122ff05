"""The Redis counter store against a real redis-server (testkit/redis.py): every key has a
TTL, ``take`` is atomic across tasks and processes, Redis away (killed, frozen) is
``CountersUnavailable`` within the timeout and the in-process fallback, Redis back is used
again without a restart, and ``check_counters`` says in one line what is wrong
(docs/cluster.md)."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

from keyrelay.config import Config, parse_config
from keyrelay.counters import (
    Calendar,
    CountersUnavailable,
    RedisCounters,
    Resilient,
    Sliding,
    check_counters,
    open_counters,
)
from testkit.net import free_port, wait_until
from testkit.redis import REDIS_SERVER, RedisServer

T = TypeVar("T")
# A bound on how long an operation may take with Redis away, far above the 0.5 s timeout
# of these stores: it only catches a hang, it does not time the store.
HANG = 30.0
ROOT = Path(__file__).resolve().parent.parent
# A Sentinel's forced failover takes a few seconds; the wait ends as soon as it is done.
FAILOVER = 120.0


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    if not REDIS_SERVER.exists():
        pytest.skip("redis-server is not installed (make test installs it)")
    with RedisServer(tls=True) as found:
        yield found


def config(tmp_path: Path, settings: dict[str, Any]) -> Config:
    return parse_config({"counters": settings}, str(tmp_path / "keyrelay.yaml"))


def run(work: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(work, HANG))


def redis_store(tmp_path: Path, server: RedisServer, **extra: Any) -> RedisCounters:
    store = open_counters(config(tmp_path, server.counters_settings(**extra)))
    assert isinstance(store, Resilient)
    return store.shared


# -- keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["tcp", "unix", "tls"])
def test_every_key_has_a_ttl_and_the_prefix(tmp_path: Path, server: RedisServer,
                                            via: str) -> None:
    server.flush()
    store = redis_store(tmp_path, server, via=via)
    windows = (Sliding("acme/app", 60, 100), Sliding("acme/app", 3600, 1000),
               Sliding("acme", 60, 100), Calendar("acme/app", "day", 1000),
               Calendar("acme", "month", 10000))

    async def work() -> None:
        try:
            for _ in range(5):
                assert await store.take(windows) is None
            await store.peek(windows)
            for n in range(3):
                await store.fail("address", f"192.0.2.{n}", 2, 600, 900)
                await store.fail("address", f"192.0.2.{n}", 2, 600, 900)
            await store.fail("key", "kr_abc", 5, 600, 900)
            await store.succeeded("kr_abc", "192.0.2.1", 7 * 86400)
            await store.clear("address", "192.0.2.0")
            await store.locked()
        finally:
            await store.close()

    run(work())
    keys = server.keys()
    assert len(keys) >= 10, keys
    assert all(key.startswith("keyrelay:") for key in keys), keys
    assert {key: ttl for key, ttl in keys.items() if ttl <= 0} == {}
    assert keys["keyrelay:login:kr_abc"] <= 7 * 86400 * 1000


# -- atomicity -------------------------------------------------------------------------------


def test_concurrent_takes_never_admit_more_than_the_limit(tmp_path: Path,
                                                          server: RedisServer) -> None:
    server.flush()
    store = redis_store(tmp_path, server)
    minute = (Sliding("acme/app", 60, 20), Calendar("acme", "day", 1000))

    async def work() -> list[object]:
        try:
            return list(await asyncio.gather(*(store.take(minute) for _ in range(50))))
        finally:
            await store.close()

    answers = run(work())
    assert answers.count(None) == 20


HAMMER = """
import asyncio, json, sys
from keyrelay.config import parse_config
from keyrelay.counters import Calendar, open_counters

async def main():
    store = open_counters(parse_config({"counters": json.loads(sys.argv[1])}, "k.yaml"))
    sys.stdin.readline()  # start together
    answers = await asyncio.gather(*(store.take((Calendar("acme", "day", 20),))
                                     for _ in range(50)))
    await store.close()
    print(sum(1 for answer in answers if answer is None))

asyncio.run(main())
"""


def test_two_processes_never_admit_more_than_the_limit(tmp_path: Path,
                                                       server: RedisServer) -> None:
    server.flush()
    settings = json.dumps(server.counters_settings(via="unix", timeout=10))
    processes = [subprocess.Popen([sys.executable, "-c", HAMMER, settings], cwd=ROOT,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                 for _ in range(2)]
    for process in processes:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    admitted = [int(process.communicate(timeout=120)[0]) for process in processes]
    assert sum(admitted) == 20, admitted


# -- Redis away ------------------------------------------------------------------------------


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    """A server of the test's own, to kill and freeze."""
    if not REDIS_SERVER.exists():
        pytest.skip("redis-server is not installed (make test installs it)")
    with RedisServer() as found:
        yield found


def test_redis_killed_then_restarted_with_local_fallback(
        tmp_path: Path, own_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    # 3 s: the first take must reach the live server even on a loaded machine (a killed one
    # refuses at once, so the outage costs no waiting)
    store = open_counters(config(tmp_path, own_server.counters_settings(
        on_unavailable="local", timeout=3)))
    assert isinstance(store, Resilient)
    store.retry_first = 0.05
    window = (Sliding("acme/app", 60, 1000),)

    async def back_to_redis() -> None:
        deadline = time.monotonic() + HANG
        while store.away is not None or store.outages == 0:
            assert time.monotonic() < deadline, "the store never went back to Redis"
            await asyncio.sleep(0.05)
            assert await store.take(window) is None

    async def work() -> list[object]:
        seen: list[object] = [await store.take(window)]
        own_server.kill()
        seen += [await store.take(window), await store.take(window),
                 await store.fail("address", "192.0.2.1", 1, 60, 300),
                 store.outages, store.local_answers]
        own_server.start()
        await back_to_redis()
        seen += [await store.locked_for("address", "192.0.2.1") > 0, store.outages]
        await store.close()
        return seen

    with caplog.at_level(logging.WARNING, logger="keyrelay.counters"):
        first, during, during2, locked, outages, local, held, outages_after = run(work())
    assert (first, during, during2, locked) == (None, None, None, True)
    assert outages == 1 and local == 3
    assert held is True  # a lock-out counted locally holds after Redis is back
    assert outages_after == 1
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2, messages
    assert messages[0].startswith("counters.redis: ")
    assert "until it answers again" in messages[0]
    assert messages[1].startswith(f"counters.redis: 127.0.0.1:{own_server.port} answers again")
    # counting goes on in the restarted server
    assert any(key.startswith("keyrelay:rate:acme/app:60s:") for key in own_server.keys())


def test_redis_away_is_a_temporary_answer_for_limits_by_default(
        tmp_path: Path, own_server: RedisServer) -> None:
    store = open_counters(config(tmp_path, own_server.counters_settings(timeout=0.5)))
    own_server.kill()

    async def work() -> list[object]:
        with pytest.raises(CountersUnavailable, match=r"counters\.redis: cannot connect"):
            await store.take((Sliding("acme/app", 60, 10),))
        with pytest.raises(CountersUnavailable):  # at once, while backing off
            await store.peek((Sliding("acme/app", 60, 10),))
        # failed logins are always counted, locally meanwhile
        return [await store.fail("key", "kr_abc", 1, 60, 300),
                await store.locked_for("key", "kr_abc") > 0]

    assert run(work()) == [True, True]


def test_redis_away_every_brute_force_operation_answers_locally_even_with_tempfail(
        tmp_path: Path, own_server: RedisServer) -> None:
    """What the auth service and the control socket ask never raises while Redis is away
    (on_unavailable: tempfail, the default, is for limits and quotas only)."""
    store = open_counters(config(tmp_path, own_server.counters_settings(timeout=0.5)))
    own_server.kill()

    async def work() -> list[object]:
        await store.succeeded("kr_abc", "192.0.2.1", 3600)
        counted = [await store.fail("address", "192.0.2.9", 1, 60, 300),
                   await store.since("kr_abc", "192.0.2.1") is not None,
                   await store.clients("kr_abc", 3600),
                   [(lock.kind, lock.subject) for lock in await store.locked()],
                   await store.clear("address", "192.0.2.9"),
                   await store.fail("key", "kr_abc", 1, 60, 300),
                   await store.clear_all(),
                   await store.locked_for("key", "kr_abc")]
        await store.close()
        return counted

    assert run(work()) == [True, True, 1, [("address", "192.0.2.9")], True, True, 1, 0.0]


def test_a_frozen_redis_is_unavailable_within_the_timeout(
        tmp_path: Path, own_server: RedisServer) -> None:
    store = redis_store(tmp_path, own_server, timeout=3)  # the live answer fits on a loaded machine
    window = (Sliding("acme/app", 60, 10),)

    async def work() -> object:
        assert await store.take(window) is None  # a pooled connection to the frozen server
        own_server.pause()
        try:
            with pytest.raises(CountersUnavailable, match=r"no answer from redis .* within 3s"):
                await store.take(window)
        finally:
            own_server.resume()
        answer = await store.take(window)  # the interrupted connection was not reused
        await store.close()
        return answer

    assert run(work()) is None


# -- check_counters --------------------------------------------------------------------------


def check_error(tmp_path: Path, settings: dict[str, Any]) -> str:
    with pytest.raises(CountersUnavailable) as info:
        check_counters(config(tmp_path, settings))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_check_passes(tmp_path: Path, server: RedisServer) -> None:
    for via in ("tcp", "unix", "tls"):
        check_counters(config(tmp_path, server.counters_settings(via=via)))
    check_counters(config(tmp_path, {"backend": "memory"}))  # nothing to connect to


def test_check_names_a_wrong_address(tmp_path: Path, server: RedisServer) -> None:
    port = free_port()
    message = check_error(tmp_path, server.counters_settings(port=port))
    assert message == (f"counters.redis: cannot connect to redis at 127.0.0.1:{port}: "
                       "Connection refused")


def test_check_names_a_wrong_password(tmp_path: Path, server: RedisServer) -> None:
    wrong = tmp_path / "wrong.secret"
    wrong.write_text("not-the-password-4d3f\n")
    message = check_error(tmp_path, server.counters_settings(password_file=str(wrong)))
    assert message.startswith(
        "counters.redis: authentication failed for user keyrelay: WRONGPASS ")
    assert "not-the-password" not in message and server.password not in message


def test_check_names_an_unknown_user(tmp_path: Path, server: RedisServer) -> None:
    message = check_error(tmp_path, server.counters_settings(username="nobody"))
    assert message.startswith("counters.redis: authentication failed for user nobody: ")


def test_check_names_a_missing_password_file(tmp_path: Path, server: RedisServer) -> None:
    absent = tmp_path / "absent.secret"
    message = check_error(tmp_path, server.counters_settings(password_file=str(absent)))
    assert message == (f"counters.redis.password_file: cannot read {absent}: "
                       "No such file or directory")


def test_check_names_a_tls_failure(tmp_path: Path, server: RedisServer) -> None:
    settings = server.counters_settings(via="tls")
    settings["redis"]["tls"] = {"enabled": True}  # the system's CA store: not our test CA
    message = check_error(tmp_path, settings)
    assert message.startswith(f"counters.redis: TLS with redis at 127.0.0.1:{server.tls_port} "
                              "failed: CERTIFICATE_VERIFY_FAILED"), message


def test_check_names_missing_permissions(tmp_path: Path, server: RedisServer) -> None:
    message = check_error(tmp_path, server.counters_settings(prefix="elsewhere:"))
    assert message.startswith("counters.redis: redis user keyrelay lacks a permission "
                              "keyrelay needs"), message
    assert "NOPERM" in message


# -- Sentinel --------------------------------------------------------------------------------


def test_the_primary_is_found_through_sentinel(tmp_path: Path, own_server: RedisServer) -> None:
    port = own_server.start_sentinel("counters")
    settings = own_server.counters_settings(sentinels=[f"127.0.0.1:{port}"],
                                            service_name="counters")
    check_counters(config(tmp_path, settings))
    store = open_counters(config(tmp_path, settings))

    async def work() -> object:
        try:
            return await store.take((Calendar("acme", "day", 5),))
        finally:
            await store.close()

    assert run(work()) is None
    assert any(key.startswith("keyrelay:quota:acme:day:") for key in own_server.keys())
    wrong = own_server.counters_settings(sentinels=[f"127.0.0.1:{port}"], service_name="nope")
    assert check_error(tmp_path, wrong) == (
        f"counters.redis: connection to redis at sentinel nope via 127.0.0.1:{port} failed: "
        "No master found for 'nope'")


def test_after_a_sentinel_failover_the_new_primary_is_used(tmp_path: Path,
                                                           own_server: RedisServer) -> None:
    with RedisServer(replica_of=own_server) as replica:
        port = own_server.start_sentinel()
        sentinel: Any = redis.Redis(host="127.0.0.1", port=port, socket_timeout=10)

        def replica_in_sync() -> bool:
            found = sentinel.execute_command("SENTINEL", "REPLICAS", "mymaster")
            fields = dict(zip(found[0][::2], found[0][1::2], strict=True)) if found else {}
            return fields.get(b"master-link-status") == b"ok"

        wait_until(replica_in_sync, FAILOVER, "the Sentinel knowing the replica in sync")
        settings = own_server.counters_settings(sentinels=[f"127.0.0.1:{port}"], timeout=10)
        store = open_counters(config(tmp_path, settings))
        assert isinstance(store, Resilient)
        store.retry_first = 0.05
        window = (Sliding("acme/app", 60, 1000),)

        async def work() -> list[object]:
            seen: list[object] = [await store.take(window)]
            primary: Any = own_server.admin()
            assert primary.execute_command("WAIT", 1, int(FAILOVER * 1000)) == 1
            primary.close()
            sentinel.execute_command("SENTINEL", "FAILOVER", "mymaster")
            deadline = time.monotonic() + FAILOVER
            while replica.admin().info("replication")["role"] != "master":
                assert time.monotonic() < deadline, "no failover"
                await asyncio.sleep(0.1)
            while True:  # answered temporarily until the client finds the new primary
                assert time.monotonic() < deadline, "the new primary was never used"
                try:
                    seen.append(await store.take(window))
                    break
                except CountersUnavailable:
                    await asyncio.sleep(0.1)
            seen.append((await store.peek(window))[0].count)
            await store.close()
            return seen

        first, after, count = asyncio.run(asyncio.wait_for(work(), 2 * FAILOVER))
        sentinel.close()
    assert first is None and after is None
    # the count taken before the failover (replicated: WAIT) and the one after; a take
    # answered "unavailable" that the server did run (its answer lost) would count too
    assert isinstance(count, float) and count >= 2.0


def test_the_programs_check_config_name_a_wrong_password(tmp_path: Path,
                                                         server: RedisServer) -> None:
    """`keyrelay check-config`, `keyrelay init` (a new host's first step, which the Ansible
    role runs) and `keyrelay-policyd --check-config` connect to Redis and say what is wrong in
    one line, without the password."""
    wrong = tmp_path / "wrong.secret"
    wrong.write_text("not-the-password-4d3f\n")
    settings = server.counters_settings(password_file=str(wrong))
    (tmp_path / "directory.yaml").write_text("version: 1\n")
    path = tmp_path / "keyrelay.yaml"
    path.write_text(json.dumps({
        "directory": {"path": str(tmp_path / "directory.yaml")},
        "logging": {"audit_log": ""},
        "policyd": {"user": "root", "control_listen": "", "socket_group": ""},
        "counters": settings,
    }))
    bin_dir = Path(sys.executable).parent
    for program in (["keyrelay", "--config", str(path), "check-config"],
                    ["keyrelay", "--config", str(path), "init"],
                    ["keyrelay-policyd", "--config", str(path), "--check-config"]):
        done = subprocess.run([str(bin_dir / program[0]), *program[1:]], capture_output=True,
                              text=True, timeout=120, check=False)
        assert (done.returncode, done.stdout) == (1, ""), done
        *before, error = done.stderr.splitlines()
        assert error.startswith(
            f"{program[0]}: error: counters.redis: authentication failed for user keyrelay: "
            "WRONGPASS "), done.stderr
        assert "not-the-password" not in done.stderr and server.password not in done.stderr
        # and the daemon says what the store counts (docs/cluster.md)
        assert before == ([] if program[0] == "keyrelay" else [before[0]]), done.stderr
        if before:
            assert ("counters.backend: redis counts rates and quotas, failed logins, lock-outs "
                    "and recent logins, shared by every node") in before[0]
