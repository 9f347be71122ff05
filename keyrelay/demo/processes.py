"""The demo's long-running processes (``Child``) and the readiness probes they wait on."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .settings import DemoError

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
BIN = Path(sys.executable).parent  # keyrelay, keyrelay-policyd, keyrelay-milter


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``condition`` until true: a readiness check with a deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


def greets(host: str, port: int) -> bool:
    """Does an SMTP server on ``host:port`` answer with a 220 banner?"""
    try:
        with socket.create_connection((host, port), timeout=2) as conn:
            return conn.recv(512).startswith(b"220")
    except OSError:
        return False


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def unix_accepts(path: Path) -> bool:
    """Does something accept connections on the unix socket ``path``?"""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(1)
        try:
            conn.connect(str(path))
        except OSError:
            return False
    return True


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def alive(pid_file: Path) -> bool:
    """Is the process whose pid ``pid_file`` holds still there?"""
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


@dataclass
class Child:
    """One long-running process of the demo, its output in ``run/logs/<name>.log``."""

    name: str
    argv: list[str]
    log: Path
    ready: Callable[[], bool]
    process: subprocess.Popen[bytes] | None = None
    # variables added to the demo's own environment (the two-node demo's tests move the
    # policy daemons' clock with libfaketime: testkit/cluster.py)
    env: Mapping[str, str] | None = None
    # a unix socket the process binds: ready only once it is a new one (the file a killed
    # process left behind, or anything still answering on it, is not this start's)
    fresh_socket: Path | None = None

    def start(self, timeout: float = 30.0) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        left = _inode(self.fresh_socket) if self.fresh_socket is not None else None
        with self.log.open("ab") as log:
            # its own session: Ctrl-C reaches the demo, which then stops the children in order
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=None if self.env is None else {**os.environ, **self.env})

        def up() -> bool:
            if not self.running():
                raise DemoError(f"{self.name} exited while starting; see {self.log}:\n"
                                + tail(self.log))
            if self.fresh_socket is not None and _inode(self.fresh_socket) in (None, left):
                return False  # not bound by this process yet
            return self.ready()

        try:
            wait_until(up, timeout, f"{self.name} to accept connections")
        except BaseException:
            self.kill()
            raise

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL to the process and every process of its session (a daemon's worker
        processes, which outlive their supervisor for a moment otherwise, still accepting on
        its socket), as systemd's final SIGKILL reaches a unit's whole cgroup; returns once
        they are gone."""
        if self.process is None:
            return
        group = self.process.pid  # its own session: start_new_session=True

        def gone() -> bool:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                return True
            return not _running_in_group(group)  # zombies no longer accept anything

        gone()
        self.process.wait()
        wait_until(gone, 30, f"every process of {self.name} to exit")


def _inode(path: Path) -> tuple[int, int, int] | None:
    """Which file ``path`` is: device, inode and change time (a socket bound anew may get
    the inode number of the file it replaced, never its change time)."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino, found.st_ctime_ns


def _running_in_group(group: int) -> bool:
    """Is a process of process group ``group`` still running (not a zombie)? /proc's stat:
    ``pid (comm) state ppid pgrp ...``, the command name in parentheses."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if len(fields) > 2 and fields[2] == str(group) and fields[0] != "Z":
            return True
    return False
