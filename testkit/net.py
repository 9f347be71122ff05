"""Small network helpers every harness uses: free loopback ports, waiting on a condition,
readiness probes and the TLS context of a client that trusts a test relay's self-signed
certificate."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable

from keyrelay.demo import greets, unix_accepts

__all__ = ["client_tls", "free_port", "free_ports", "free_udp_port", "greets", "port_open",
           "reply_text", "unix_accepts", "wait_until"]


def free_ports(count: int) -> list[int]:
    """``count`` different TCP ports free on 127.0.0.1 (all probed at once, then released)."""
    sockets = []
    try:
        for _ in range(count):
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            sockets.append(probe)
        return [int(probe.getsockname()[1]) for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def free_port() -> int:
    """A TCP port free on 127.0.0.1."""
    return free_ports(1)[0]


def free_udp_port() -> int:
    """A UDP port free on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
