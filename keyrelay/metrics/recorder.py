"""``Recorder``: the ``Metrics`` that counts into prometheus_client (docs/metrics.md, "Metrics").

Label values are the closed sets docs/metrics.md lists; a value outside them (a stage Postfix
does not send, a kind or window this version does not know) is folded into ``other`` rather
than becoming a new series. ``account`` is counted here under an internal name, for every
account; a scrape turns it into the bounded ``keyrelay_messages_total`` (exposition.py), so the
hot path never decides which accounts have a series.

A child per label set is kept in a dict: ``labels()`` costs about a microsecond, a dict
look-up a tenth of that.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from keyrelay import __version__
from keyrelay.directory.model import DomainState

from . import Metrics

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

# seconds (docs/metrics.md, keyrelay_request_duration_seconds)
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# counted per account by every process; exposition.py exports it bounded, as
# keyrelay_messages_total{account,outcome}, and never under this name
BY_ACCOUNT = "keyrelay_internal_messages_by_account"
STAGES = frozenset({"CONNECT", "EHLO", "HELO", "MAIL", "RCPT", "DATA", "END-OF-MESSAGE",
                    "VRFY", "ETRN"})
WINDOWS = frozenset({"minute", "hour", "day", "month"})
KINDS = ("address", "key")
OUTCOMES = ("signed", "refused", "tempfail", "monitor_allowed")
ALGORITHMS = frozenset({"rsa-sha256", "ed25519-sha256"})
STATES = tuple(str(state) for state in DomainState)


class Recorder(Metrics):
    """Counts into ``registry`` (None: prometheus_client's default one, or with workers the
    multiprocess files, where gauges take the live workers' maximum). ``daemon`` (policyd or
    milter) says which metrics exist: each daemon exports only its own (docs/metrics.md,
    "exported by"); a call for another's does nothing."""

    __slots__ = (
        "_auth",
        "_by_account",
        "_decisions",
        "_dirage",
        "_dirkeys",
        "_domains",
        "_durations",
        "_locked",
        "_lockouts",
        "_quota",
        "_rate",
        "_reloads",
        "_signatures",
    )

    enabled = True

    def __init__(self, daemon: str, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        reg = REGISTRY if registry is None else registry
        milter = daemon == "milter"

        def counter(name: str, doc: str, labels: tuple[str, ...] = (), mine: bool = True
                    ) -> Any:
            # not this daemon's: not made at all (with workers, every metric made would be
            # written to the shared files and exported)
            return Counter(name, doc, labels, registry=reg) if mine else _NOTHING

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            return Gauge(name, doc, labels, registry=reg, multiprocess_mode="livemax")

        self._auth = _Children(counter(
            "keyrelay_auth_attempts_total", "SASL exchanges answered, by result and reason",
            ("result", "reason"), not milter))
        lockouts = counter("keyrelay_lockouts_total", "Lock-outs begun", ("kind",), not milter)
        self._lockouts = {kind: lockouts.labels(kind) for kind in KINDS}
        self._decisions = _Children(counter(
            "keyrelay_policy_decisions_total", "Policy requests answered",
            ("stage", "action", "reason"), not milter))
        self._by_account = _Children(counter(
            BY_ACCOUNT, "Messages by account (exported bounded, as keyrelay_messages_total)",
            ("account", "outcome"), milter))
        signatures = counter("keyrelay_dkim_signatures_total", "DKIM-Signature headers added",
                             ("algorithm",), milter)
        self._signatures = {name: signatures.labels(name) for name in ALGORITHMS}
        durations = Histogram("keyrelay_request_duration_seconds",
                              "Time from a complete request to its answer", ("service",),
                              buckets=BUCKETS, registry=reg)
        self._durations = {name: durations.labels(name) if (name == "milter") == milter
                           else _NOTHING for name in ("auth", "policy", "socketmap", "milter")}
        rate = counter("keyrelay_rate_limited_total", "Refused: a rate window full", ("window",),
                       not milter)
        self._rate = {name: rate.labels(name) for name in ("minute", "hour")}
        quota = counter("keyrelay_quota_refusals_total", "Refused: a quota used up", ("window",),
                        not milter)
        self._quota = {name: quota.labels(name) for name in ("day", "month")}
        reloads = counter("keyrelay_directory_reloads_total", "Directory copy rebuilt",
                          ("result",))
        self._reloads = {True: reloads.labels("success"), False: reloads.labels("failure")}
        self._dirage = gauge("keyrelay_directory_age_seconds",
                             "Seconds since the directory copy was last confirmed current")
        self._dirkeys = gauge("keyrelay_directory_keys", "API keys in the directory copy")
        domains = gauge("keyrelay_domains", "Sending domains in the copy by state", ("state",))
        self._domains = {state: domains.labels(state) for state in STATES}
        locked = _NOTHING if milter else gauge("keyrelay_lockouts_active", "Lock-outs in force",
                                               ("kind",))
        self._locked = {kind: locked.labels(kind) for kind in KINDS}
        build = Gauge("keyrelay_build_info", "keyrelay's version (always 1)",
                      ("version", "python_version"), registry=reg, multiprocess_mode="max")
        build.labels(__version__, platform.python_version()).set(1)
        for child in (*self._lockouts.values(), *self._signatures.values(),
                      *self._rate.values(), *self._quota.values(), *self._reloads.values()):
            child.inc(0)  # every series there from the start: an alert sees 0, not nothing

    def login(self, result: str, reason: str, seconds: float | None) -> None:
        self._auth.get(result, reason).inc()
        if seconds is not None:
            self._durations["auth"].observe(seconds)

    def lockout(self, kind: str) -> None:
        self._lockouts[kind].inc()

    def policy(self, stage: str, action: str, reason: str, seconds: float | None,
               window: str = "") -> None:
        self._decisions.get(stage if stage in STAGES else "other", action, reason).inc()
        if seconds is not None:
            self._durations["policy"].observe(seconds)
        if window and action == "tempfail":
            counted = self._rate.get(window) or self._quota.get(window)
            if counted is not None:
                counted.inc()

    def lookup(self, seconds: float) -> None:
        self._durations["socketmap"].observe(seconds)

    def message(self, account: str, outcome: str, seconds: float,
                algorithms: tuple[str, ...]) -> None:
        if account:
            self._by_account.get(account, outcome).inc()
        for name in algorithms:
            signed = self._signatures.get(name)
            if signed is not None:
                signed.inc()
        self._durations["milter"].observe(seconds)

    def reload(self, ok: bool) -> None:
        self._reloads[ok].inc()

    def directory(self, age: float, keys: int, domains: Mapping[str, int]) -> None:
        self._dirage.set(age)
        self._dirkeys.set(keys)
        for state, child in self._domains.items():
            child.set(domains.get(state, 0))

    def lockouts_active(self, counts: Mapping[str, int]) -> None:
        for kind, child in self._locked.items():
            child.set(counts.get(kind, 0))


class _Nothing:
    """A metric this daemon does not have: every call does nothing."""

    def labels(self, *values: str) -> _Nothing:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


_NOTHING = _Nothing()


class _Children:
    """A metric's children by label values, made once each."""

    __slots__ = ("_made", "_metric")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._made: dict[tuple[str, ...], Any] = {}

    def get(self, *values: str) -> Any:
        child = self._made.get(values)
        if child is None:
            child = self._made[values] = self._metric.labels(*values)
        return child
