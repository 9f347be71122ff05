"""Small network helpers every harness uses: free loopback ports, waiting on a condition,
readiness probes and the TLS context of a client that trusts a test relay's self-signed
certificate."""

from __future__ import annotations

import os
import random
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from keyrelay.demo import greets, unix_accepts

__all__ = ["client_tls", "free_port", "free_ports", "free_udp_port", "greets", "port_open",
           "reply_text", "unix_accepts", "wait_until"]


# Ports are picked below the kernel's ephemeral range: a port from that range (what binding
# to port 0 gives) can be taken, between the probe and the server's own bind, as the local
# port of any outgoing connection on the machine (seen: dnsmasq "Address already in use").
# Below _FIRST_PORT: left to fixed ports of the tests. Each pytest-xdist worker (make test
# runs two) picks from its own slice of the range, and so does every process it starts (the
# variables are inherited): two workers never hand out the same port.
_FIRST_PORT = 11000
_ports = random.Random()  # noqa: S311 - which port to try, not a secret
_given: set[int] = set()  # never the same port twice in one process (two servers' ports)


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _range() -> tuple[int, int]:
    """The ports this process may pick from: its worker's slice, or the whole range."""
    first, last = _FIRST_PORT, _ephemeral_start() - 1
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    try:
        index = int(worker.removeprefix("gw"))
        count = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    except (KeyError, ValueError):
        return first, last
    size = (last - first + 1) // max(count, 1)
    return first + index * size, first + (index + 1) * size - 1


def _claim(port: int, kinds: tuple[int, ...]) -> list[socket.socket]:
    """Sockets bound to ``127.0.0.1:port`` for each socket kind, or [] when one is taken."""
    claimed: list[socket.socket] = []
    try:
        for kind in kinds:
            probe = socket.socket(socket.AF_INET, kind)
            claimed.append(probe)
            probe.bind(("127.0.0.1", port))
    except OSError:
        for probe in claimed:
            probe.close()
        return []
    return claimed


def free_ports(count: int, *, udp: bool = False) -> list[int]:
    """``count`` different ports free on 127.0.0.1 for TCP (with ``udp``, for UDP too), all
    probed at once and then released, picked at random below the ephemeral port range and
    never handed out before by this process."""
    kinds = (socket.SOCK_STREAM, socket.SOCK_DGRAM) if udp else (socket.SOCK_STREAM,)
    first, last = _range()
    held: list[socket.socket] = []
    found: list[int] = []
    try:
        for _ in range(100 * count):
            if len(found) == count:
                break
            port = _ports.randint(first, last)
            if port in found or port in _given:
                continue
            claimed = _claim(port, kinds)
            if claimed:
                held += claimed
                found.append(port)
        if len(found) < count:
            raise OSError(f"no {count} free ports found between {first} and {last}")
        _given.update(found)
        return found
    finally:
        for probe in held:
            probe.close()


def free_port() -> int:
    """A TCP port free on 127.0.0.1."""
    return free_ports(1)[0]


def free_udp_port() -> int:
    """A port free on 127.0.0.1 for UDP and TCP (a DNS server listens on both)."""
    return free_ports(1, udp=True)[0]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Does something accept TCP connections on ``host:port``?"""
    try:
        socket.create_connection((host, port), timeout=0.5).close()
    except OSError:
        return False
    return True


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``condition`` until it is true; a readiness check with a deadline, not a sleep.
    TimeoutError (naming ``what``) after ``timeout`` seconds.

    The pause between polls starts at 20 ms and doubles up to 0.25 s, so a condition that
    costs something (an SMTP session, a login) is not asked thousands of times while a slow
    machine catches up."""
    deadline = time.monotonic() + timeout
    pause = 0.02
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(pause)
        pause = min(0.25, pause * 2)


def client_tls() -> ssl.SSLContext:
    """TLS as an application that trusts this relay's (self-signed) certificate would do:
    no verification, TLS 1.2 or later."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def reply_text(value: bytes | str) -> str:
    """The text of an SMTP reply as smtplib hands it over (typeshed: ``bytes | str``; smtplib
    gives the reply's bytes)."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value
