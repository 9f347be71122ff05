"""Worker processes (policyd.workers, milter.workers; keyrelay/supervisor.py): real daemons,
real signals. Which worker serves a session is read from the session itself (the Dovecot
greeting's SPID for policyd, the process that holds the accepted socket for the milter);
a worker is held still with SIGSTOP where a test needs the other one to answer, so nothing
depends on how the kernel spreads connections."""

from __future__ import annotations

import contextlib
import io
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_dkimsign import make_selectors
from test_milter_daemon import MILTER, directory_for_everyone, write_config

from keyrelay import admin
from keyrelay.directory.yamlfile import render
from policyd.main import LineWriter
from testkit.factories import CREATED, NOW, World
from testkit.net import free_port, wait_until
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
    redis.flush()  # the server is the module's: no counts from an earlier test
    made: list[Policyd] = []

    def make(workers: int | str = 2, **policyd: Any) -> Policyd:
        daemon = Policyd(tmp_path / f"p{len(made)}", {
            "counters": redis.counters_settings(),
            "policyd": {"workers": workers, "shutdown_grace": GRACE, **policyd},
        })
        made.append(daemon)
        populate(daemon)
        daemon.start()
        count = workers if isinstance(workers, int) else len(os.sched_getaffinity(0))

        def all_ready() -> bool:  # each has its signal handlers once it says so
            ready = {int(pid) for pid in re.findall(r"ready \(pid (\d+)\)", daemon.log())}
            return len(ready & children(daemon.pid)) == count

        wait_until(all_ready, 60, "every worker to be ready")
        return daemon

    yield make
    for daemon in made:
        for pid in children(daemon.pid) if daemon.running() else ():
            os.kill(pid, signal.SIGCONT)
        if daemon.running():
            assert daemon.stop(timeout=STOP_DEADLINE) == 0, daemon.log()[-3000:]
        assert not daemon.tracebacks(), daemon.tracebacks()
        # every worker counted in Redis, none fell back to counting alone
        assert "keyrelay.counters" not in daemon.log(), daemon.log()[-3000:]


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


def test_workers_share_the_counters_a_lock_out_earned_through_one_holds_at_the_other(
    policyd: Callable[..., Policyd],
) -> None:
    daemon = policyd(workers=2, bruteforce={"max_failures_per_key": 3})
    one, two = sorted(children(daemon.pid))
    key = daemon.keys["acme"]
    head, secret = key.text.rsplit(".", 1)
    wrong = f"{head}.{'A' if secret[0] != 'A' else 'B'}{secret[1:]}"

    def through(worker: int, password: str) -> str:
        client, pid = served_by(daemon)
        with client:
            assert pid == worker
            reply = client.plain("apikey", password, rip=fresh_address())
        return reply.status if reply.status == "OK" else reply.reason

    stopped(two)  # three wrong secrets, each from a new address, all through worker one
    try:
        for _ in range(3):
            assert through(one, wrong).startswith("unknown API key")
    finally:
        os.kill(two, signal.SIGCONT)
    stopped(one)  # the right secret, through worker two, which saw none of them
    try:
        assert through(two, key.text).startswith(
            f"too many failed logins for API key {key.key_id}")
    finally:
        os.kill(one, signal.SIGCONT)


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


def test_auto_is_one_worker_where_redis_away_would_mean_counting_per_process(
    tmp_path: Path, redis: RedisServer,
) -> None:
    daemon = Policyd(tmp_path / "p", {
        "counters": redis.counters_settings(on_unavailable="local"),
        "policyd": {"shutdown_grace": GRACE},  # workers: auto
    })
    populate(daemon)
    daemon.start()
    try:
        client, pid = served_by(daemon)
        client.close()
        assert pid == daemon.pid and not children(daemon.pid)
        if len(os.sched_getaffinity(0)) > 1:
            assert "auto gives 1 worker: with counters.on_unavailable local" in daemon.log()
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
    program = POLICYD if section == "policyd" else MILTER
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


# -- the milter ------------------------------------------------------------------------------
MILTER_GRACE = 2.0
# libmilter notices a stop within 5 s, then the grace; the supervisor kills at grace + 10 s
MILTER_STOP_DEADLINE = MILTER_GRACE + 10 + 30


def milter_packet(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + command + data


def negotiated(sock: socket.socket) -> bytes:
    """One milter protocol round trip (SMFIC_OPTNEG, version 6): the milter's answer code.
    Only a worker's libmilter answers it: the supervisor accepts nothing."""
    sock.settimeout(30)
    sock.sendall(milter_packet(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF)))
    head = b""
    while len(head) < 5:
        chunk = sock.recv(5 - len(head))
        if not chunk:
            raise ConnectionError("the milter closed the connection")
        head += chunk
    return head[4:5]


class MilterDaemon:
    def __init__(self, root: Path, listen: str, workers: int,
                 prepare: Callable[[Path], Path] | None = None, **milter: object) -> None:
        self.config = write_config(root, {"listen": listen, "workers": workers,
                                          "shutdown_grace": MILTER_GRACE, **milter})
        if prepare is not None:  # the configuration file to start with
            self.config = prepare(self.config)
        self.listen = listen
        self.log = root / "milter.log"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([str(MILTER), "--config", str(self.config)],
                                            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self.wait_ready(workers)

    def wait_ready(self, workers: int, since: int = 0) -> set[int]:
        """The pids of ``workers`` workers that logged "ready" (after log offset ``since``)."""
        ready: set[int] = set()

        def all_ready() -> bool:
            assert self.process.poll() is None, self.text()
            ready.clear()
            ready.update(int(pid) for pid in re.findall(r"ready on .* \(pid (\d+)\)",
                                                          self.text()[since:]))
            return len(ready & children(self.process.pid)) == workers

        wait_until(all_ready, 60, f"{workers} milter workers to be ready")
        return ready & children(self.process.pid)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def connect(self) -> socket.socket:
        if self.listen.startswith("unix:"):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(self.listen[5:])
            return sock
        host, _, port = self.listen[5:].rpartition(":")
        return socket.create_connection((host, int(port)), timeout=30)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=MILTER_STOP_DEADLINE)


@pytest.fixture
def milter(tmp_path: Path) -> Iterator[Callable[..., MilterDaemon]]:
    """keyrelay-milter with one verified signing domain (as tests/test_milter_daemon.py's)."""
    world = World()
    world.account("acme")
    world.key("acme")
    selectors = make_selectors(tmp_path / "dkim", "acme.example")
    admin.add_domain(world.data, "acme", "acme.example", selectors, CREATED)
    admin.mark_verified(world.data, "acme.example", NOW - timedelta(days=1))
    (tmp_path / "directory.yaml").write_text(render(world.data))
    made: list[MilterDaemon] = []

    def make(workers: int = 2, unix: bool = False, listen: str = "",
             prepare: Callable[[Path], Path] | None = None, **settings: object) -> MilterDaemon:
        listen = listen or (f"unix:{tmp_path / 'milter.sock'}" if unix
                            else f"inet:127.0.0.1:{free_port()}")
        daemon = MilterDaemon(tmp_path, listen, workers, prepare, **settings)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        if daemon.process.poll() is None:
            for pid in children(daemon.process.pid):
                os.kill(pid, signal.SIGCONT)
            assert daemon.stop() == 0, daemon.text()[-3000:]
        assert "Traceback" not in daemon.text(), daemon.text()[-3000:]


def holder(sock: socket.socket, pids: set[int]) -> int:
    """Which of ``pids`` holds the milter's end of TCP connection ``sock`` (/proc/net/tcp
    names the socket by inode; /proc/PID/fd shows who has that inode)."""
    mine = sock.getsockname()[1]
    theirs = sock.getpeername()[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(fields[i].rsplit(":", 1)[1], 16) for i in (1, 2))
        if local == theirs and remote == mine:
            inode = fields[9]
    assert inode is not None
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
    raise AssertionError(f"no worker of {pids} holds socket {inode}")


def listening_flags(pid: int, name: str) -> int:
    """The file status flags with which ``pid`` holds the listening unix socket bound as
    ``name`` (/proc/net/unix: flag 00010000 is a listening socket)."""
    inodes = {fields[6] for fields in (line.split() for line in
                                       Path("/proc/net/unix").read_text().splitlines()[1:])
              if len(fields) > 7 and fields[3] == "00010000" and fields[7].endswith(name)}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") in {f"socket:[{i}]" for i in inodes}:
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                return int(info.split("flags:")[1].split()[0], 8)
    raise AssertionError(f"pid {pid} holds no listening socket {name}")


@pytest.mark.slow
def test_two_concurrent_milter_sessions_are_served_by_two_worker_processes(
    milter: Callable[..., MilterDaemon],
) -> None:
    daemon = milter(workers=2)
    workers = children(daemon.process.pid)
    first = daemon.connect()
    assert negotiated(first) == b"O"
    first_pid = holder(first, workers)
    stopped(first_pid)  # held: the second session can only be the other worker's
    try:
        second = daemon.connect()
        assert negotiated(second) == b"O"
        assert holder(second, workers) == (workers - {first_pid}).pop()
    finally:
        os.kill(first_pid, signal.SIGCONT)
    first.close()
    second.close()


@pytest.mark.slow
def test_a_killed_milter_worker_is_replaced_and_the_socket_stays(
    milter: Callable[..., MilterDaemon],
) -> None:
    daemon = milter(workers=2, unix=True)
    path = Path(daemon.listen[5:])
    inode = path.stat().st_ino
    victim, survivor = sorted(children(daemon.process.pid))
    mark = len(daemon.text())
    os.kill(victim, signal.SIGKILL)
    (replacement,) = daemon.wait_ready(1, since=mark)
    assert replacement not in (victim, survivor)
    assert re.search(rf"worker \d \(pid {victim}\) killed by SIGKILL .*starting a new one",
                     daemon.text())
    stopped(survivor)  # only the new worker can answer now
    try:
        with daemon.connect() as sock:
            assert negotiated(sock) == b"O"
    finally:
        os.kill(survivor, signal.SIGCONT)
    assert path.stat().st_ino == inode


@pytest.mark.slow
def test_sighup_replaces_every_milter_worker_and_keeps_the_socket(
    milter: Callable[..., MilterDaemon],
) -> None:
    daemon = milter(workers=2, unix=True)
    path = Path(daemon.listen[5:])
    inode = path.stat().st_ino
    old = children(daemon.process.pid)
    mark = len(daemon.text())
    daemon.process.send_signal(signal.SIGHUP)
    new = daemon.wait_ready(2, since=mark)
    assert not new & old
    # the old workers stop gracefully (libmilter's clean-up runs in them) ...
    wait_until(lambda: all(gone(pid) for pid in old), MILTER_STOP_DEADLINE,
               "the replaced workers to stop")
    text = daemon.text()[mark:]
    assert "SIGHUP: configuration reloaded from" in text
    for pid in old:
        assert re.search(rf"worker \d \(pid {pid}\), replaced, exited with status 0", text)
    # ... and the socket they leave is still the one every new worker accepts on
    assert path.stat().st_ino == inode
    for held in new:
        stopped(held)
        try:
            with daemon.connect() as sock:
                assert negotiated(sock) == b"O"
        finally:
            os.kill(held, signal.SIGCONT)


@pytest.mark.slow
def test_sigterm_stops_every_milter_worker_and_the_supervisor_within_the_grace(
    milter: Callable[..., MilterDaemon],
) -> None:
    daemon = milter(workers=2, unix=True)
    workers = children(daemon.process.pid)
    # sessions left open; each connection wakes every worker, and the ones that lose the
    # race for it must not be left blocking in accept() (the socket is non-blocking)
    idle = [daemon.connect() for _ in range(6)]
    for sock in idle:
        assert negotiated(sock) == b"O"
    for pid in workers:
        assert listening_flags(pid, Path(daemon.listen[5:]).name) & os.O_NONBLOCK
    assert daemon.stop() == 0  # waits at most MILTER_STOP_DEADLINE
    assert all(gone(pid) for pid in workers)
    text = daemon.text()
    assert "still running" not in text
    for pid in workers:
        assert re.search(rf"keyrelay-milter worker \d stopped \(pid {pid}\)", text)
    assert not Path(daemon.listen[5:]).exists()
    for sock in idle:
        sock.close()


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="running as another user needs root")
def test_unprivileged_milter_workers_that_stop_leave_the_socket_to_the_others(
    milter: Callable[..., MilterDaemon], request: pytest.FixtureRequest,
) -> None:
    """libmilter removes its socket's path when a milter that is not root stops: replaced
    workers (SIGHUP) must not take it from the workers still serving. The socket's folder
    is nobody's here, so a removal would succeed."""
    folder = Path(tempfile.mkdtemp(prefix="kr-msock-"))
    request.addfinalizer(lambda: shutil.rmtree(folder, ignore_errors=True))
    os.chown(folder, 65534, 65534)
    folder.chmod(0o755)

    def readable(config: Path) -> Path:
        """The configuration where nobody reads it too (the supervisor does at SIGHUP)."""
        directory_for_everyone(config, request)
        copy = folder / "keyrelay.yaml"
        shutil.copyfile(config, copy)
        copy.chmod(0o644)
        return copy

    daemon = milter(workers=2, listen=f"unix:{folder / 'milter.sock'}", user="nobody",
                    prepare=readable)
    path = folder / "milter.sock"
    inode = path.stat().st_ino
    old = children(daemon.process.pid)
    mark = len(daemon.text())
    daemon.process.send_signal(signal.SIGHUP)
    new = daemon.wait_ready(2, since=mark)
    wait_until(lambda: all(gone(pid) for pid in old), MILTER_STOP_DEADLINE,
               "the replaced workers to stop")
    assert path.stat().st_ino == inode
    for held in new:  # each new worker serves on it
        stopped(held)
        try:
            with daemon.connect() as sock:
                assert negotiated(sock) == b"O"
        finally:
            os.kill(held, signal.SIGCONT)


def test_policyd_workers_write_their_log_in_whole_lines_no_longer_than_pipe_buf() -> None:
    """Workers share stderr: a write of whole lines up to PIPE_BUF bytes is never torn by
    another's (a seqpacket socket keeps each write() apart, to look at them one by one)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stream = io.TextIOWrapper(io.BufferedWriter(LineWriter(os.dup(ours.fileno())), 1 << 16))
    lines = [f"decision {i} " + "x" * (i % 300) + "\n" for i in range(400)]
    stream.write("".join(lines))
    stream.close()
    ours.close()
    writes = []
    while chunk := theirs.recv(1 << 20):
        writes.append(chunk)
    assert b"".join(writes).decode() == "".join(lines)
    assert len(writes) > 1
    assert all(w.endswith(b"\n") and len(w) <= select.PIPE_BUF for w in writes)
