"""Worker processes (policyd.workers, milter.workers; keyrelay/supervisor.py): real daemons,
real signals. Which worker serves a session is read from the session itself (the Dovecot
greeting's SPID for policyd, the process that holds the accepted socket for the milter);
a worker is held still with SIGSTOP where a test needs the other one to answer, so nothing
depends on how the kernel spreads connections."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from keyrelay import admin
from testkit.net import wait_until
from testkit.policyd import POLICYD, Policyd, add_key, add_verified_domain, fresh_address, now
from testkit.protocols import DovecotClient, PolicyClient, connect
from testkit.redis import RedisServer, redis_server

GRACE = 2.0  # policyd.shutdown_grace in these tests
# a worker stops within the grace for requests plus the grace for the last flush; the
# supervisor waits that plus 5 s before it kills; this deadline is generous above all of it
STOP_DEADLINE = 2 * GRACE + 5 + 30


# -- processes -------------------------------------------------------------------------------
def children(pid: int) -> set[int]:
    """The live child processes of ``pid`` (from /proc: no helper library in between)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry))
    return found


def state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2:].split()[0]


def stopped(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until the kernel has it stopped (it accepts nothing more)."""
    os.kill(pid, signal.SIGSTOP)
    wait_until(lambda: state(pid) == "T", 30, f"pid {pid} to stop")


def gone(pid: int) -> bool:
    try:
        return state(pid) == "Z"
    except OSError:
        return True


# -- policyd ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture
def policyd(tmp_path: Path, redis: RedisServer) -> Iterator[Callable[..., Policyd]]:
    """A policyd with counters in Redis and two workers (account acme, key ``acme``)."""
    made: list[Policyd] = []

    def make(workers: int | str = 2, **policyd: Any) -> Policyd:
        daemon = Policyd(tmp_path / f"p{len(made)}", {
            "counters": redis.counters_settings(prefix=f"w{len(made)}{os.getpid()}:"),
            "policyd": {"workers": workers, "shutdown_grace": GRACE, **policyd},
        })
        made.append(daemon)
        populate(daemon)
        daemon.start()
        wait_until(lambda: len(children(daemon.pid)) == (workers if isinstance(workers, int)
                                                          else len(os.sched_getaffinity(0))),
                   60, "every worker to start")
        return daemon

    yield make
    for daemon in made:
        for pid in children(daemon.pid) if daemon.running() else ():
            os.kill(pid, signal.SIGCONT)
        if daemon.running():
            assert daemon.stop(timeout=STOP_DEADLINE) == 0, daemon.log()[-3000:]
        assert not daemon.tracebacks(), daemon.tracebacks()


def populate(daemon: Policyd) -> None:
    with daemon.directory().transaction() as data:
        admin.add_account(data, "acme", now())
        add_verified_domain(data, "acme", "acme.example")
        daemon.keys["acme"] = add_key(data, "acme", "main")


def served_by(daemon: Policyd) -> tuple[DovecotClient, int]:
    """A new auth session, and the pid of the worker that serves it (the greeting's SPID)."""
    client = DovecotClient(connect(daemon.endpoint("auth")))
    client.handshake()
    (spid,) = (int(fields[1]) for fields in client.server if fields[0] == "SPID")
    return client, spid


def logs_in(daemon: Policyd, client: DovecotClient) -> bool:
    key = daemon.keys["acme"]
    return client.plain("apikey", key.text, rip=fresh_address()).status == "OK"


def test_two_concurrent_auth_sessions_are_served_by_two_worker_processes(
    policyd: Callable[..., Policyd],
) -> None:
    daemon = policyd(workers=2)
    workers = children(daemon.pid)
    first, first_pid = served_by(daemon)
    assert first_pid in workers, (first_pid, workers)
    stopped(first_pid)  # the first worker is held: a second session must go to the other
    try:
        second, second_pid = served_by(daemon)
        assert second_pid in workers and second_pid != first_pid, (second_pid, workers)
        assert logs_in(daemon, second)
    finally:
        os.kill(first_pid, signal.SIGCONT)
    assert logs_in(daemon, first)  # both sessions open at once, each in its own process
    first.close()
    second.close()


def test_a_killed_worker_is_replaced_and_the_service_answers_throughout(
    policyd: Callable[..., Policyd],
) -> None:
    daemon = policyd(workers=2)
    victim, survivor = sorted(children(daemon.pid))
    held, held_pid = served_by(daemon)  # a session that stays open across the kill
    mark = daemon.mark()
    os.kill(victim, signal.SIGKILL)
    line = daemon.wait_for_log(rf"worker \d \(pid {victim}\) killed by SIGKILL .*starting a "
                               r"new one in", since=mark)
    assert "WARNING" in line
    # meanwhile every new request gets an answer: the other worker accepts them
    for _ in range(20):
        with PolicyClient(connect(daemon.endpoint("policy"))) as policy:
            assert policy.ask(protocol_state="CONNECT") == "DUNNO"
    wait_until(lambda: len(children(daemon.pid) - {survivor}) == 1, 60,
               "a new worker in place of the killed one")
    (replacement,) = children(daemon.pid) - {survivor}
    assert replacement != victim
    daemon.wait_for_log(rf"worker \d started \(pid {replacement}\)", since=mark)
    # the new worker serves: with the survivor held, only it can answer
    stopped(survivor)
    try:
        client, pid = served_by(daemon)
        assert pid == replacement
        assert logs_in(daemon, client)
        client.close()
    finally:
        os.kill(survivor, signal.SIGCONT)
    if held_pid != victim:  # the session on the surviving worker never noticed
        assert logs_in(daemon, held)
    held.close()


def test_sighup_reaches_every_worker_and_each_reloads(policyd: Callable[..., Policyd]) -> None:
    daemon = policyd(workers=3)
    workers = children(daemon.pid)
    mark = daemon.mark()
    daemon.signal(signal.SIGHUP)
    for pid in workers:
        daemon.wait_for_log(rf"SIGHUP: configuration reloaded from .* \(pid {pid}\)",
                            since=mark)
    assert children(daemon.pid) == workers  # reloaded in place, none restarted


def test_sigterm_stops_every_worker_and_the_supervisor_within_the_grace(
    policyd: Callable[..., Policyd],
) -> None:
    daemon = policyd(workers=2)
    workers = children(daemon.pid)
    idle = [served_by(daemon)[0] for _ in range(4)]  # open sessions do not hold up the stop
    daemon.signal(signal.SIGTERM)
    assert daemon.process is not None
    assert daemon.process.wait(timeout=STOP_DEADLINE) == 0
    wait_until(lambda: all(gone(pid) for pid in workers), 30, "the workers to be gone")
    log = daemon.log()
    assert "still running" not in log  # none had to be killed
    for pid in workers:
        assert re.search(rf"keyrelay-policyd worker \d stopped \(pid {pid}\)", log), log
    for client in idle:
        client.close()


def test_memory_counters_keep_policyd_to_one_process(tmp_path: Path) -> None:
    daemon = Policyd(tmp_path / "p", {"policyd": {"shutdown_grace": GRACE}})  # workers: auto
    populate(daemon)
    daemon.start()
    try:
        client, pid = served_by(daemon)
        client.close()
        assert pid == daemon.pid and not children(daemon.pid)
        if len(os.sched_getaffinity(0)) > 1:
            assert "policyd.workers: auto gives 1 worker: counters.backend is memory" in (
                daemon.log())
    finally:
        assert daemon.stop(timeout=STOP_DEADLINE) == 0


# -- --check-config ----------------------------------------------------------------------------
def check_config(program: Path, tmp_path: Path, settings: dict[str, Any]) -> tuple[int, str]:
    path = tmp_path / "keyrelay.yaml"
    path.write_text(yaml.safe_dump(settings))
    result = subprocess.run([str(program), "--config", str(path), "--check-config"],
                            capture_output=True, text=True, timeout=60)
    return result.returncode, result.stderr


@pytest.mark.parametrize("value", [0, -2, 1000, "many", 2.5, True])
@pytest.mark.parametrize("section", ["policyd", "milter"])
def test_bad_worker_counts_are_one_line_check_config_errors(
    tmp_path: Path, section: str, value: object,
) -> None:
    program = POLICYD if section == "policyd" else POLICYD.with_name("keyrelay-milter")
    status, stderr = check_config(program, tmp_path, {section: {"workers": value}})
    assert status == 1
    path = tmp_path / "keyrelay.yaml"
    assert stderr == (f"{program.name}: error: {path}:2: {section}.workers: must be auto (one "
                      "per CPU) or a whole number of processes from 1 to 64, got "
                      + {0: "an integer (0)", -2: "an integer (-2)", 1000: "an integer (1000)",
                         "many": "a string ('many')", 2.5: "a number (2.5)",
                         True: "a boolean (true)"}[value] + "\n")


def test_several_policyd_workers_with_memory_counters_are_a_check_config_error(
    tmp_path: Path,
) -> None:
    status, stderr = check_config(POLICYD, tmp_path, {"policyd": {"workers": 4}})
    assert status == 1
    assert len(stderr.splitlines()) == 1
    assert f"{tmp_path / 'keyrelay.yaml'}:2: policyd.workers: 4 workers with " in stderr
    assert "multiplying every rate limit, quota and lock-out threshold by 4" in stderr
    assert "use counters.backend redis" in stderr
