"""Prometheus metrics and the ``/health`` endpoint of keyrelay-policyd and keyrelay-milter
(``policyd.metrics_listen``, ``milter.metrics_listen``; docs/metrics.md is the contract: every
name, label and value).

- ``Metrics`` (here) is what the services call for every decision; its methods do nothing,
  which is what a daemon without ``metrics_listen`` gets (``NO_METRICS``).
- recorder.py: ``Recorder``, the ``Metrics`` that counts into prometheus_client.
- exposition.py: what a scrape reads: the bounded ``account`` label, the process totals of a
  daemon with workers, the HTTP server.
- probe.py: the directory copy's age, keys and domains, and the daemon's health, refreshed
  every second.

With one process (``workers: 1``) everything lives in that process. With workers
(keyrelay/supervisor.py) prometheus_client's multiprocess mode sums the workers: each worker
writes its values to files in a folder the supervisor made (``PROMETHEUS_MULTIPROC_DIR``,
which must be set before prometheus_client is imported: hence the imports inside functions),
and the supervisor serves the sum (``exposition.serve_supervised``).
"""

from __future__ import annotations

from collections.abc import Mapping


class Metrics:
    """What the daemons count: one call per decision. This base does nothing (metrics off)."""

    __slots__ = ()

    enabled = False

    def login(self, result: str, reason: str, seconds: float | None) -> None:
        """A SASL exchange answered: ``result`` success, failure or tempfail."""

    def lockout(self, kind: str) -> None:
        """A lock-out began (``kind`` address or key)."""

    def policy(self, stage: str, action: str, reason: str, seconds: float | None,
               window: str = "") -> None:
        """A policy request answered; ``window`` names the full window of a limit's refusal."""

    def lookup(self, seconds: float) -> None:
        """A socketmap lookup answered."""

    def message(self, account: str, outcome: str, seconds: float,
                algorithms: tuple[str, ...]) -> None:
        """A message decided at end of message, with the algorithms of its signatures."""

    def reload(self, ok: bool) -> None:
        """The directory copy was rebuilt (``ok``) or could not be."""

    def directory(self, age: float, keys: int, domains: Mapping[str, int]) -> None:
        """The copy's age, keys and domains by state (the probe, every second)."""

    def lockouts_active(self, counts: Mapping[str, int]) -> None:
        """The lock-outs in force by kind (the probe of policyd)."""


NO_METRICS = Metrics()

__all__ = ["NO_METRICS", "Metrics"]
