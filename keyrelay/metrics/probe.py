"""The directory probe: every second, the copy a daemon answers from is asked for, as a
request would (``snapshot()``), and what it says goes to the gauges and to ``/health``
(docs/metrics.md, ``keyrelay_directory_age_seconds`` and ``/health``).

- The copy's age: with LDAP the time since LDAP last answered a poll
  (``LdapDirectory.contact_age``); with YAML the time since the file was last found readable
  and valid (by this probe: a stat per second, the file parsed again only when it changed).
- Healthy while ``snapshot()`` gives a copy; otherwise the reason, the backend's own error
  (it names the file and line, or the LDAP servers; never a password: those never reach a
  ``DirectoryUnavailable``).

A daemon with workers has a probe in every worker; each writes its health to a file in the
metrics folder (``health_PID``), which the supervisor reads for ``/health``.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable
from typing import Protocol

from keyrelay.directory import Directory
from keyrelay.errors import DirectoryUnavailable

from . import Metrics

log = logging.getLogger("keyrelay.metrics")

INTERVAL = 1.0  # seconds between two probes
HEALTH_PREFIX = "health_"


class Backend(Protocol):
    def snapshot(self) -> Directory: ...


class Probe:
    """Asks ``backend()`` (called each time: a SIGHUP may replace the backend) for its copy."""

    def __init__(self, metrics: Metrics, backend: Callable[[], Backend],
                 health_dir: str | None = None, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.metrics = metrics
        self.backend = backend
        self.health_dir = health_dir
        self.clock = clock
        self.problem = "starting"  # "" while healthy
        self._confirmed = clock()
        self._counted: tuple[Directory | None, int, dict[str, int]] = (None, 0, {})
        self._written: str | None = None

    def run(self) -> None:
        """One probe; never raises (a bug here must not stop a daemon)."""
        try:
            self._probe()
        except Exception:
            log.exception("metrics: the directory probe failed")
            self.problem = "the directory probe failed (see the daemon's log)"
        if self.health_dir is not None and self.problem != self._written:
            self._write_health()

    def _probe(self) -> None:
        backend = self.backend()
        now = self.clock()
        contact_age = getattr(backend, "contact_age", None)
        try:
            snapshot = backend.snapshot()
        except DirectoryUnavailable as exc:
            self.problem = f"directory unavailable: {exc}"
            snapshot = None
        else:
            self.problem = ""
            self._confirmed = now
        age = contact_age() if callable(contact_age) else now - self._confirmed
        counted, keys, domains = self._counted
        if snapshot is not None and snapshot is not counted:
            keys = len(snapshot.keys)
            domains = dict(collections.Counter(str(d.state) for d in snapshot.domains.values()))
            self._counted = (snapshot, keys, domains)
        self.metrics.directory(min(age, 1e9), keys, domains)

    def _write_health(self) -> None:
        assert self.health_dir is not None
        path = os.path.join(self.health_dir, f"{HEALTH_PREFIX}{os.getpid()}")
        try:
            with open(path + ".new", "w", encoding="utf-8") as out:
                out.write(self.problem)
            os.replace(path + ".new", path)
        except OSError as exc:
            log.warning("metrics: cannot write %s: %s", path, exc.strerror or exc)
            return
        self._written = self.problem
