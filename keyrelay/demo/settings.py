"""Where the demo lives and listens: ``Settings``, read from the environment, and the demo
tenant's names."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

DEMO_ACCOUNT, DEMO_SUBUSER, DEMO_POOL, DEMO_DOMAIN = "demo", "demo/app", "demo", "demo.example"
DEMO_FROM, DEMO_TO = "app@demo.example", "someone@example.net"
# receivers that refuse, reached through the demo Postfix's transport_maps (docs/events.md)
BOUNCE_DOMAIN, DEFER_DOMAIN = "bounce.demo.test", "defer.demo.test"
# make run's ports for them (KEYRELAY_BOUNCE_SINK_PORT, KEYRELAY_DEFER_SINK_PORT)
BOUNCE_SINK_PORT, DEFER_SINK_PORT = 10027, 10028
# make run's port for keyrelay-events' /metrics and /health (KEYRELAY_EVENTS_METRICS_PORT)
EVENTS_METRICS_PORT = 19466

# what `python -m keyrelay.demo --help` says after its options
ENVIRONMENT = """\
environment (all optional): KEYRELAY_HOST (127.0.0.1), KEYRELAY_SMTP_PORT (10025),
KEYRELAY_SUBMISSION_PORT (10587), KEYRELAY_ALT_SUBMISSION_PORT (12525),
KEYRELAY_SUBMISSIONS_PORT (10465), KEYRELAY_SINK_PORT (10026), KEYRELAY_POOL_ADDRESS
(127.0.0.2), KEYRELAY_POLICYD_METRICS_PORT (19464), KEYRELAY_MILTER_METRICS_PORT (19465),
KEYRELAY_EVENTS_METRICS_PORT (19466).
Ctrl-C or SIGTERM stops every process this started.
"""


class DemoError(Exception):
    """The demo cannot start; the message says what to do."""


@dataclass(frozen=True)
class Settings:
    """Where the demo lives and listens; every field but ``directory`` can come from the
    environment."""

    run_dir: Path
    host: str = "127.0.0.1"
    smtp_port: int = 10025
    submission_port: int = 10587
    alt_submission_port: int = 12525
    submissions_port: int = 10465
    sink_port: int = 10026
    # smtp-sink refusing every recipient with 550 (BOUNCE_DOMAIN) and one answering 451
    # (DEFER_DOMAIN); 0: none (make run has both: from_env; tests ask for them)
    bounce_sink_port: int = 0
    defer_sink_port: int = 0
    pool_address: str = "127.0.0.2"
    # the daemons' /metrics and /health (policyd.metrics_listen, milter.metrics_listen), on
    # the host; 0: off
    policyd_metrics_port: int = 19464
    milter_metrics_port: int = 19465
    # keyrelay-events' (events.metrics_listen); 0: off (make run has it: from_env; tests ask
    # for it)
    events_metrics_port: int = 0
    # keyrelay's directory section; None: the embedded YAML file in the run directory (the
    # tests pass an LDAP one: tests/test_e2e_ldap.py)
    directory: Mapping[str, Any] | None = None
    # keyrelay's counters section; None: the embedded default (in-process counters). The
    # two-node demo and its tests pass a Redis one (testkit/cluster.py)
    counters: Mapping[str, Any] | None = None
    # the user keyrelay-policyd and keyrelay-milter become once their sockets are bound (when
    # the demo runs as root): the production default. The LDAP tests pass "root": their
    # slapd's bind password file is root's
    daemon_user: str = "keyrelay"
    # False: another relay, sharing this one's LDAP directory, made the demo tenant and its
    # key; this one makes neither and writes no demo.env (node B of the two-node demo,
    # testkit/cluster.py)
    owns_tenant: bool = True

    @classmethod
    def from_env(cls, run_dir: Path, env: Mapping[str, str] = os.environ, *,
                 prefix: str = "KEYRELAY_", defaults: Settings | None = None) -> Settings:
        """The settings in ``env``'s ``<prefix>HOST``, ``<prefix>SMTP_PORT``, ... variables;
        one not set (or empty) keeps its value in ``defaults`` (default: the class's)."""
        base = defaults if defaults is not None else cls(run_dir)

        def port(suffix: str, default: int) -> int:
            name = prefix + suffix
            text = env.get(name, "")
            if not text:
                return default
            if not text.isdigit() or not 0 < int(text) < 65536:
                raise DemoError(f"{name}={text!r}: expected a port number (1-65535)")
            return int(text)

        def loopback(suffix: str, default: str) -> str:
            name = prefix + suffix
            text = env.get(name, "") or default
            try:
                if not ipaddress.ip_address(text).is_loopback:
                    raise ValueError
            except ValueError:
                raise DemoError(f"{name}={text!r}: expected a loopback address such as "
                                f"{default}") from None
            return text

        return replace(
            base,
            run_dir=run_dir.resolve(),
            host=loopback("HOST", base.host),
            smtp_port=port("SMTP_PORT", base.smtp_port),
            submission_port=port("SUBMISSION_PORT", base.submission_port),
            alt_submission_port=port("ALT_SUBMISSION_PORT", base.alt_submission_port),
            submissions_port=port("SUBMISSIONS_PORT", base.submissions_port),
            sink_port=port("SINK_PORT", base.sink_port),
            bounce_sink_port=port("BOUNCE_SINK_PORT", base.bounce_sink_port or BOUNCE_SINK_PORT),
            defer_sink_port=port("DEFER_SINK_PORT", base.defer_sink_port or DEFER_SINK_PORT),
            policyd_metrics_port=port("POLICYD_METRICS_PORT", base.policyd_metrics_port),
            milter_metrics_port=port("MILTER_METRICS_PORT", base.milter_metrics_port),
            events_metrics_port=port("EVENTS_METRICS_PORT",
                                     base.events_metrics_port or EVENTS_METRICS_PORT),
            pool_address=loopback("POOL_ADDRESS", base.pool_address),
        )

    # -- paths --------------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.run_dir / "keyrelay.yaml"

    @property
    def postfix_etc(self) -> Path:
        return self.run_dir / "postfix" / "etc"

    @property
    def queue(self) -> Path:
        return self.run_dir / "postfix" / "queue"

    @property
    def maillog(self) -> Path:
        return self.run_dir / "postfix" / "maillog"

    @property
    def events_state(self) -> Path:
        return self.run_dir / "events.db"

    @property
    def outbox(self) -> Path:
        return self.run_dir / "outbox"

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    @property
    def env_file(self) -> Path:
        return self.run_dir / "demo.env"

    def socket(self, name: str) -> Path:
        return self.queue / "private" / f"keyrelay-{name}"

    def ports(self) -> dict[str, int]:
        ports = {"smtp": self.smtp_port, "submission": self.submission_port,
                 "alt_submission": self.alt_submission_port,
                 "submissions": self.submissions_port, "sink": self.sink_port,
                 "bounce sink": self.bounce_sink_port, "defer sink": self.defer_sink_port,
                 "policyd metrics": self.policyd_metrics_port,
                 "milter metrics": self.milter_metrics_port,
                 "events metrics": self.events_metrics_port}
        return {name: port for name, port in ports.items() if port}

    def metrics_urls(self) -> list[str]:
        """The base URLs of the daemons' endpoints (KEYRELAY_METRICS_URLS)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return [f"http://{host}:{port}" for port in (self.policyd_metrics_port,
                                                     self.milter_metrics_port,
                                                     self.events_metrics_port) if port]
