"""Small network checks for tests of keyrelay's Postfix-facing daemons.

The private Postfix relay the end-to-end tests use is the one ``make run`` starts (fixture
``demo_relay`` in conftest.py, helpers in e2e_harness.py).
"""

from __future__ import annotations

import socket


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Does something accept TCP connections on ``host:port``?"""
    try:
        socket.create_connection((host, port), timeout=0.5).close()
    except OSError:
        return False
    return True
