"""One daemon's endpoints, wired for its shape: one process, or a supervisor and workers.

The daemons use it in this order:

1. ``Endpoint(daemon, listen, top_accounts, workers, user)`` while still root: the port is
   bound (a port taken stops the start with one line); with workers, the multiprocess folder
   is made, given to ``user``, and named in ``PROMETHEUS_MULTIPROC_DIR`` before
   prometheus_client is imported; and prometheus_client is imported now, as root: once the
   daemon runs as its own user, a virtual environment only root may read (a venv in root's
   folder) would hide it.
2. One process: ``recorder()``, then ``serve_here(probe)``.
   With workers: ``supervise(supervisor)`` before it starts them; each worker calls
   ``recorder()`` and runs a ``Probe`` with ``health_dir``; ``close()`` at the end removes the
   folder.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pwd
import shutil
import tempfile
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import Metrics
from .exposition import AccountBound, MetricsServer, ProcessTotals, start_thread
from .probe import HEALTH_PREFIX, INTERVAL, Backend, Probe
from .recorder import Recorder

if TYPE_CHECKING:
    from keyrelay.supervisor import Supervisor

log = logging.getLogger("keyrelay.metrics")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# what the daemons use of prometheus_client, imported at start (see the module doc)
_MODULES = ("prometheus_client", "prometheus_client.core", "prometheus_client.exposition",
            "prometheus_client.multiprocess", "prometheus_client.platform_collector")


class Endpoint:
    def __init__(self, daemon: str, listen: str, top_accounts: int, workers: int = 1,
                 user: str = "") -> None:
        self.daemon = daemon  # policyd or milter: which metrics it has
        self.server = MetricsServer(listen)
        self.top_accounts = top_accounts
        self.folder: str | None = None  # with workers: their multiprocess files
        if workers > 1:
            self._make_folder(user)
        for module in _MODULES:
            importlib.import_module(module)

    def recorder(self) -> Recorder:
        """The ``Metrics`` of this process (one process, or one worker after its fork)."""
        return Recorder(self.daemon)

    def probe_thread(self, recorder: Metrics, backend: Callable[[], Backend]) -> Probe:
        """A daemon without an event loop (the milter): the probe in a thread of its own."""
        probe = Probe(recorder, backend, self.folder)
        probe.run()
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(INTERVAL):
                probe.run()

        start_thread(loop, "keyrelay-metrics-probe")
        return probe

    def serve_here(self, probe: Probe) -> None:
        """One process: serve its own registry, healthy as its probe says."""
        from prometheus_client import REGISTRY

        self.server.start(AccountBound(REGISTRY, self.top_accounts), lambda: probe.problem)

    # -- with workers --------------------------------------------------------------------
    def _make_folder(self, user: str) -> None:
        """The folder where every worker writes its values, the service user's."""
        shm = "/dev/shm"  # noqa: S108 - a private folder is made inside (mkdtemp, 0700)
        base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
        self.folder = tempfile.mkdtemp(prefix="keyrelay-metrics-", dir=base)
        if os.geteuid() == 0 and user and user != "root":
            entry = pwd.getpwnam(user)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
        os.environ[MULTIPROC_ENV] = self.folder

    def supervise(self, supervisor: Supervisor) -> None:
        """Hook into ``supervisor``: serve the workers' sum from its start, forget the
        gauges of a worker that exited, and keep the listening socket out of the workers."""
        supervisor.on_started = lambda: self._serve_sum(supervisor)
        supervisor.on_reaped = self.worker_gone
        supervisor.in_child = self.server.close_socket

    def _serve_sum(self, supervisor: Supervisor) -> None:
        from prometheus_client import CollectorRegistry, PlatformCollector
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.folder)  # type: ignore[no-untyped-call]
        PlatformCollector(registry=registry)
        registry.register(ProcessTotals(lambda: list(supervisor.workers)))
        self.server.start(AccountBound(registry, self.top_accounts),
                          lambda: self.health_of(list(supervisor.workers)))

    def health_of(self, pids: list[int]) -> str:
        """The workers' health: "" when at least one serves with a fresh copy and none has
        a problem; otherwise the first problem."""
        if not pids:
            return "no worker running"
        healthy = False
        for pid in sorted(pids):
            try:
                with open(self._health_file(pid), encoding="utf-8") as text:
                    problem = text.read()
            except FileNotFoundError:
                continue  # not probed yet
            if problem and problem != "starting":
                return problem
            healthy = healthy or not problem
        return "" if healthy else "starting"

    def worker_gone(self, pid: int) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        assert self.folder is not None
        with contextlib.suppress(OSError):
            mark_process_dead(pid, self.folder)  # type: ignore[no-untyped-call]
            os.unlink(self._health_file(pid))

    def _health_file(self, pid: int) -> str:
        assert self.folder is not None
        return os.path.join(self.folder, f"{HEALTH_PREFIX}{pid}")

    def close(self) -> None:
        self.server.stop()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
