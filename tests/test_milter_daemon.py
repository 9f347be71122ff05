"""The keyrelay-milter program: options, --check-config, binding, privilege drop, SIGTERM.

The real console script runs in a subprocess against a configuration and directory written
under tmp_path; readiness is its "ready" log line, never a sleep.
"""

from __future__ import annotations

import ctypes.util
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from test_dkimsign import make_selectors

from bench.milter_bench import (
    ACCEPTED,
    FINAL,
    HDR_LEADSPC,
    MilterClient,
    inserted_headers,
    make_message,
    make_site,
)
from bench.milter_bench import Message as BenchMessage
from bench.milter_bench import MilterError as BenchMilterError
from bench.milter_bench import packet as milter_packet
from bench.milter_bench import strings as milter_strings
from keyrelay import admin
from keyrelay.directory.yamlfile import render
from milters.main import libmilter_endpoint
from testkit.factories import CREATED, NOW, World
from testkit.net import free_port, port_open, wait_until
from testkit.policyd import capabilities_of_every_thread

MILTER = Path(sys.executable).parent / "keyrelay-milter"


@pytest.mark.parametrize(
    ("listen", "libmilter"),
    [
        ("inet:127.0.0.1:8891", "inet:8891@127.0.0.1"),
        ("inet:localhost:8891", "inet:8891@localhost"),
        ("inet:[::1]:8891", "inet6:8891@[::1]"),
        ("inet:8891@127.0.0.1", "inet:8891@127.0.0.1"),
        ("inet6:8891@[::1]", "inet6:8891@[::1]"),
        ("unix:/run/keyrelay/milter.sock", "unix:/run/keyrelay/milter.sock"),
    ],
)
def test_listen_endpoint_in_postfix_or_libmilter_syntax(listen: str, libmilter: str) -> None:
    assert libmilter_endpoint(listen) == libmilter


# -- a configuration on disk ---------------------------------------------------------------
@pytest.fixture
def site(tmp_path: Path) -> Path:
    """keyrelay.yaml and a directory with one verified signing domain; returns the config."""
    world = World()
    world.account("acme")
    world.key("acme")
    selectors = make_selectors(tmp_path / "dkim", "acme.example")
    admin.add_domain(world.data, "acme", "acme.example", selectors, CREATED)
    admin.mark_verified(world.data, "acme.example", NOW - timedelta(days=1))
    (tmp_path / "directory.yaml").write_text(render(world.data))
    return write_config(tmp_path, {})


def write_config(root: Path, milter: dict[str, object]) -> Path:
    config = {
        "directory": {"path": str(root / "directory.yaml")},
        "dkim": {"key_dir": str(root / "dkim")},
        "milter": {"listen": f"inet:127.0.0.1:{free_port()}", "socket_group": "",
                   "user": "root", **milter},  # root: the test folder is root's (0700)
    }
    path = root / "keyrelay.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(MILTER), *args], capture_output=True, text=True, timeout=60)


def test_help_documents_postfix_wiring_answers_signals_and_exit_status() -> None:
    result = run("--help")
    assert result.returncode == 0
    for needle in ("smtpd_milters", "milter_default_action = tempfail", "550 5.7.1",
                   "451 4.3.0", "SIGTERM", "exit status:", "--check-config"):
        assert needle in result.stdout


def test_check_config_validates_config_directory_and_keys(site: Path) -> None:
    result = run("--config", str(site), "--check-config")
    assert result.returncode == 0, result.stderr
    assert f"configuration {site} is valid" in result.stdout
    assert "2 DKIM keys load, 0 do not" in result.stdout


def test_check_config_warns_about_a_key_that_does_not_load(site: Path) -> None:
    (site.parent / "dkim" / "acme.example" / "kr20250601-ed.pem").unlink()
    result = run("--config", str(site), "--check-config")
    assert result.returncode == 0
    assert "1 DKIM keys load, 1 do not" in result.stdout
    assert "warning: domain acme.example:" in result.stderr
    assert "kr20250601-ed.pem" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="checking for another user needs root")
def directory_for_everyone(config: Path, request: pytest.FixtureRequest) -> None:
    """Point ``config`` at a copy of its directory that every user can read, in a folder of
    its own: pytest sets /tmp/pytest-of-root back to 0700 whenever another pytest session
    starts, so opening up the test's own folder would race with other runs."""
    directory = Path(yaml.safe_load(config.read_text())["directory"]["path"])
    shared = Path(tempfile.mkdtemp(prefix="kr-nobody-"))
    shared.chmod(0o755)
    readable = shared / "directory.yaml"
    shutil.copyfile(directory, readable)
    readable.chmod(0o644)
    config.write_text(config.read_text().replace(str(directory), str(readable)))
    request.addfinalizer(lambda: shutil.rmtree(shared, ignore_errors=True))


def test_check_config_warns_about_keys_the_daemon_user_cannot_read(
        site: Path, request: pytest.FixtureRequest) -> None:
    # `keyrelay domain add` run as root writes root-owned 0600 keys: root reads them, nobody not
    config = yaml.safe_load(site.read_text())
    config["milter"]["user"] = "nobody"
    site.write_text(yaml.safe_dump(config))
    # the directory itself must be readable by nobody, or --check-config stops there
    directory_for_everyone(site, request)
    result = run("--config", str(site), "--check-config")
    assert result.returncode == 0
    assert "0 DKIM keys load, 2 do not" in result.stdout
    assert "unreadable for milter.user nobody; chown nobody it" in result.stderr


@pytest.mark.parametrize(
    ("milter", "error"),
    [
        ({"listen": "tcp://127.0.0.1:8891"}, "milter.listen: must be inet:host:port"),
        ({"check_sender": False, "sign": False}, "milter.sign: check_sender and sign are both"),
        ({"lisen": "inet:127.0.0.1:1"}, "milter.lisen: unknown key; did you mean 'listen'?"),
    ],
)
def test_configuration_error_is_one_line_naming_file_key_and_reason(
    site: Path, milter: dict[str, object], error: str
) -> None:
    config = yaml.safe_load(site.read_text())
    config["milter"] = milter
    site.write_text(yaml.safe_dump(config))
    result = run("--config", str(site), "--check-config")
    assert result.returncode == 1
    where = rf"keyrelay-milter: error: {re.escape(str(site))}:\d+: "  # FILE:LINE:
    assert re.match(where + re.escape(error), result.stderr), result.stderr
    assert result.stderr.count("\n") == 1


def test_control_characters_in_the_config_path_and_arguments_stay_on_one_line(
    site: Path,
) -> None:
    # found by tests/test_fuzz_cli.py: both were printed raw, a newline made two lines
    result = run("--config", f"{site.parent}/a\nb.yaml", "--check-config")
    assert (result.returncode, result.stderr) == (
        1, f"keyrelay-milter: error: {site.parent}/a\\nb.yaml: file not found\n")
    result = run("--check-config", "x\x1b[2J")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        r"keyrelay-milter: error: unrecognized arguments: x\x1b[2J")


def test_check_config_names_a_config_path_that_is_not_utf8_without_a_traceback(
    site: Path,
) -> None:
    # found by tests/test_fuzz_cli.py: the strict stdout of a UTF-8 locale other than C.UTF-8
    # could not print "configuration <path> is valid"
    config = os.fsencode(site.parent) + b"/keyrelay-\x80.yaml"
    shutil.copy(os.fsencode(site), config)
    result = subprocess.run([str(MILTER), "--config", config, "--check-config"],
                            capture_output=True, timeout=60, check=False,
                            env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert result.returncode == 0, result
    assert b"keyrelay-milter: configuration " + config + b" is valid\n" in result.stdout


def test_missing_directory_is_an_error_at_start(site: Path) -> None:
    (site.parent / "directory.yaml").unlink()
    result = run("--config", str(site), "--check-config")
    assert result.returncode == 1
    missing = site.parent / "directory.yaml"
    assert result.stderr == (f"keyrelay-milter: error: directory.path: {missing} does not exist; "
                             "create an empty directory with `keyrelay init`, or correct the "
                             "path\n")


# -- the running daemon ----------------------------------------------------------------------
class Daemon:
    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.log = config.parent / "milter.log"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([str(MILTER), "--config", str(config)],
                                            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                            env=None if env is None else {**os.environ, **env})
        try:
            wait_until(lambda: "ready on" in self.text() or self.process.poll() is not None,
                       20, "keyrelay-milter to be ready")
        except BaseException:
            self.process.kill()
            raise
        assert self.process.poll() is None, self.text()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def uid(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        (line,) = [line for line in status.splitlines() if line.startswith("Uid:")]
        return int(line.split()[2])  # the effective uid

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


def worker_pids(supervisor: int) -> set[int]:
    """The child processes of ``supervisor`` (keyrelay/supervisor.py's workers)."""
    found = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat_line = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat_line[stat_line.rfind(")") + 2:].split()[1]) == supervisor:
            found.add(int(entry))
    return found


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()


@pytest.mark.slow
def test_daemon_listens_then_stops_cleanly_on_sigterm(site: Path, daemons: list[Daemon]) -> None:
    config = yaml.safe_load(site.read_text())
    port = int(config["milter"]["listen"].rpartition(":")[2])
    daemon = Daemon(site)
    daemons.append(daemon)
    assert port_open(port)
    assert "2 DKIM keys loaded" in daemon.text()
    assert daemon.stop() == 0, daemon.text()[-3000:]  # libmilter notices the stop within 5 s
    assert "keyrelay-milter stopped" in daemon.text()
    assert not port_open(port)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
@pytest.mark.parametrize("workers", [1, 2])
def test_daemon_binds_a_unix_socket_as_root_then_runs_as_the_configured_user(
    tmp_path: Path, site: Path, daemons: list[Daemon], request: pytest.FixtureRequest,
    workers: int,
) -> None:
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    socket_path = sockets / "milter.sock"
    config = write_config(tmp_path, {"listen": f"unix:{socket_path}", "user": "nobody",
                                     "socket_mode": "0640", "workers": workers})
    # nobody must be able to read the directory, or the daemon refuses to start
    directory_for_everyone(config, request)
    daemon = Daemon(config)
    daemons.append(daemon)
    assert daemon.uid() == 65534
    assert "running as user nobody" in daemon.text()
    # the workers (workers 2) are forked once the supervisor is nobody: each serves in
    # libmilter's threads
    wait_until(lambda: daemon.text().count("ready on") == workers, 60, "every worker")
    servers = worker_pids(daemon.process.pid) if workers > 1 else {daemon.process.pid}
    assert len(servers) == workers
    # no capability left in any thread (libmilter's included), not even in the bounding set
    for pid in {daemon.process.pid} | servers:
        threads = capabilities_of_every_thread(pid)
        assert all(set(caps.values()) == {0} for caps in threads.values()), threads
        assert int(Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[1]) == 65534
    for pid in servers:
        assert len(capabilities_of_every_thread(pid)) > 1  # libmilter's threads
    mode = socket_path.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o640
    # the keys are root's (0600): nobody cannot preload them, which is a warning, not a
    # reason to stop serving the other domains
    assert "will not sign" in daemon.text() or "directory unavailable at start" in daemon.text()
    assert daemon.stop() == 0, daemon.text()[-3000:]


def test_a_second_milter_on_the_same_socket_refuses_to_start_and_leaves_the_first_alone(
    tmp_path: Path, site: Path, daemons: list[Daemon]
) -> None:
    socket_path = tmp_path / "sockets" / "milter.sock"
    socket_path.parent.mkdir()
    config = write_config(tmp_path, {"listen": f"unix:{socket_path}"})
    first = Daemon(config)
    daemons.append(first)
    inode = socket_path.stat().st_ino
    second = run("--config", str(config))
    assert second.returncode == 1
    assert "in use by another running process" in second.stderr
    assert socket_path.stat().st_ino == inode  # still the first milter's socket
    with socket.socket(socket.AF_UNIX) as probe:
        probe.connect(str(socket_path))  # and it still answers


# -- a stop under load -----------------------------------------------------------------------
# libmilter's own stop (its signal thread sets a flag, then closes the listening socket) races
# with its listener, which reads the flag at the top of its loop and takes its lock after: a
# stop in between leaves the listener a closed socket, smfi_main() fails and pymilter raises
# (keyrelay-milter said "cannot start on ..." and exited with status 1 after a plain SIGTERM
# under load). This library, preloaded into the daemon, widens that window in the listener
# thread (the one that calls smfi_main) to 20 ms per turn of its loop, so that a stop
# through libmilter lands in it nearly every time; keyrelay-milter must stop cleanly anyway
# (milters/main.py ``run_milter``).
STOP_WINDOW_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <unistd.h>
static pthread_t listener;
static volatile int known;
static void *libmilter(void) { return dlopen(LIBMILTER, RTLD_NOLOAD | RTLD_LAZY); }
int smfi_main(void) {
    int (*real)(void) = (int (*)(void)) dlsym(libmilter(), "smfi_main");
    listener = pthread_self();
    known = 1;
    return real();
}
int mi_stop(void) {
    static int (*real)(void);
    if (!real) real = (int (*)(void)) dlsym(libmilter(), "mi_stop");
    int v = real();
    if (v == 0 && known && pthread_equal(pthread_self(), listener)) usleep(20000);
    return v;
}
"""


@pytest.fixture(scope="module")
def stop_window_shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    library = ctypes.util.find_library("milter")  # libmilter's soname, as pymilter loads it
    if compiler is None or library is None:
        pytest.skip("needs a C compiler and libmilter (make deps installs gcc, libmilter-dev)")
    folder = tmp_path_factory.mktemp("shim")
    (folder / "shim.c").write_text(STOP_WINDOW_SHIM)
    subprocess.run([compiler, "-shared", "-fPIC", "-O2", f'-DLIBMILTER="{library}"', "-o",
                    str(folder / "shim.so"), str(folder / "shim.c"), "-ldl", "-lpthread"],
                   check=True, capture_output=True, timeout=120)
    return folder / "shim.so"


def all_but_the_end(client: MilterClient, message: BenchMessage) -> None:
    """A message up to its last body chunk, as Postfix sends it (bench/milter_bench.py
    ``MilterClient.send`` without end-of-message)."""
    client._values = message.macros
    client._event("M", milter_strings(f"<{message.sender}>"))
    client._event("R", milter_strings(f"<{message.recipient}>"))
    client._event("T")
    space = b" " if client.negotiated.protocol & HDR_LEADSPC else b""
    for name, value in message.headers:
        client._event("L", milter_strings(name, space + value), stage="N")
    client._event("N")
    client._event("B", message.body, stage="E")
    client._flush()


def the_end(client: MilterClient) -> list[tuple[bytes, bytes]]:
    client._macros("E", "E")
    client.pending.append(milter_packet(b"E"))
    client._flush()
    replies: list[tuple[bytes, bytes]] = []
    while not replies or replies[-1][0] not in FINAL:
        replies.append(client._read())
    return replies


def signatures(replies: list[tuple[bytes, bytes]]) -> int:
    return sum(1 for name, _ in inserted_headers(replies) if name.lower() == "dkim-signature")


@pytest.mark.slow
def test_sigterm_under_load_stops_cleanly_and_the_message_in_flight_gets_its_answer(
    tmp_path: Path, stop_window_shim: Path,
) -> None:
    site = make_site(tmp_path)
    config = yaml.safe_load(site.config.read_text())
    config["milter"].update(workers=1, shutdown_grace=30)  # the grace ends once nothing is left
    site.config.write_text(yaml.safe_dump(config))
    daemon = Daemon(site.config, env={"LD_PRELOAD": str(stop_window_shim)})
    stop = threading.Event()  # the load's end
    try:
        # a message whose end comes after the SIGTERM
        in_flight = MilterClient(site.endpoint)
        in_flight.negotiate()
        message = make_message(site.login, site.sender, 2000, "INFLIGHT1")
        in_flight.open_session(message.macros)
        all_but_the_end(in_flight, message)
        # and new sessions all along, one message each: libmilter's listener keeps turning
        outcomes: list[str] = []

        def load(index: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    client = MilterClient(site.endpoint, timeout=60)
                except OSError:
                    outcomes.append("refused")  # not listening any more: Postfix says 451
                    time.sleep(0.01)
                    continue
                try:
                    client.negotiate()
                    each = make_message(site.login, site.sender, 2000, f"L{index}N{n}")
                    client.open_session(each.macros)
                    replies = client.send(each)
                    outcomes.append("signed" if replies[-1][0] in ACCEPTED
                                    and signatures(replies) == 2 else repr(replies[-1]))
                    client.quit()
                except (OSError, BenchMilterError) as exc:
                    # the connection ended before an answer: Postfix's milter_default_action
                    # (tempfail) answers 451 for it
                    outcomes.append("cut" if isinstance(exc, OSError)
                                    or "closed the connection" in str(exc) else str(exc))
                finally:
                    client.close()

        threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(3)]
        for thread in threads:
            thread.start()
        wait_until(lambda: outcomes.count("signed") >= 10, 60, "ten messages signed under load")
        daemon.process.send_signal(signal.SIGTERM)
        wait_until(lambda: "stopping" in daemon.text() or daemon.process.poll() is not None,
                   60, "the stop to begin")
        try:
            replies = the_end(in_flight)
        except (OSError, BenchMilterError) as exc:
            replies = [(b"", f"no answer: {exc}".encode())]
        in_flight.close()
        status = daemon.process.wait(timeout=90)  # the grace (30 s) ends with the last message
        stop.set()
        for thread in threads:
            thread.join(timeout=90)
    finally:
        stop.set()
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()
    text = daemon.text()
    assert status == 0, text[-3000:]
    assert replies[-1][0] in ACCEPTED and signatures(replies) == 2, replies
    assert "keyrelay-milter stopped" in text
    assert "cannot start" not in text and "Traceback" not in text
    # every message was signed, or ended unanswered (a temporary answer from Postfix)
    assert set(outcomes) <= {"signed", "cut", "refused"}, set(outcomes)
