"""Fixtures shared by several test modules."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from policyd_harness import free_port

from keyrelay.demo import Relay, Settings


@pytest.fixture(scope="session")
def demo_relay() -> Iterator[Relay]:
    """The relay ``make run`` starts (keyrelay.demo), on free loopback ports, for the session.

    A private Postfix configured by ``keyrelay postfix apply``, keyrelay-policyd and
    keyrelay-milter on unix sockets in its queue, smtp-sink writing to ``outbox/``. Every
    start step waits for readiness (banners, sockets); ``stop`` stops all of it.
    """
    if not Path("/usr/sbin/postfix").exists():
        pytest.skip("Postfix is not installed (make test installs it)")
    # a short folder: unix socket paths inside the queue must stay under 108 bytes
    run_dir = Path(tempfile.mkdtemp(prefix="kr-e2e-"))
    settings = Settings(
        run_dir=run_dir,
        smtp_port=free_port(),
        submission_port=free_port(),
        alt_submission_port=free_port(),
        submissions_port=free_port(),
        sink_port=free_port(),
        pool_address="127.0.0.2",
    )
    said: list[str] = []
    relay = Relay(settings, say=said.append)
    relay.start()
    try:
        yield relay
    finally:
        relay.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
