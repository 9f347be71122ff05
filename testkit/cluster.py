"""Two keyrelay relay nodes as one: ``make run-cluster`` and the tests of issue 21 through both
nodes' real Postfix (tests/test_cluster_e2e.py).

``Cluster`` starts one private ``slapd`` (testkit/slapd.py) holding the directory, one private
``redis-server`` (testkit/redis.py) holding the counters, and two relays as ``make run`` builds
one (keyrelay.demo's ``Relay``): node A and node B, each with its own private Postfix
instance, keyrelay-policyd, keyrelay-milter and smtp-sink, in ``RUN_DIR/cluster/node-a`` and
``node-b``. Both nodes' keyrelay.yaml name the same LDAP directory (``directory.backend:
ldap``) and the same Redis (``counters.backend: redis``); the DKIM private keys node A made are
copied to node B, as the Ansible role distributes them to every node of a fleet
(docs/cluster.md). Node A makes the demo tenant (account ``demo``, subuser ``demo/app``,
domain ``demo.example``) and one API key; node B shares them through LDAP.

The daemons run as the unprivileged ``keyrelay`` user, as in production: the LDAP CA, the
LDAP bind password and the Redis password are copied to ``RUN_DIR/cluster/shared/`` (root,
group keyrelay, mode 0640). The directory and the counters are fresh on every start (slapd
and redis-server keep their data in a temporary folder, removed at the end); ``RUN_DIR/
cluster.env`` holds the key, the ports of both nodes and the configuration the ``keyrelay``
CLI uses (node A's), as ``KEY=value`` lines (mode 0600).

Ports: node A uses ``make run``'s (``KEYRELAY_SUBMISSION_PORT`` and the others, README),
node B the same plus 100 (submission 10687), each changeable with ``KEYRELAY_NODE_B_*``
variables (``python -m testkit.cluster --help``). slapd and redis-server listen on free
loopback ports, written into cluster.env.

A clock for the tests: with ``clock_file``, both nodes' keyrelay-policyd read the time through
libfaketime (Debian's ``faketime``), shifted by the offset in that file (``+0s`` to start
with); ``move_clock`` rewrites it, and within ``CLOCK_CACHE`` seconds both daemons see the new
time. That is how a test reaches the end of a day (tests/test_cluster_e2e.py). Only the policy
daemons' wall clock moves (their monotonic clock, Postfix, the milter and Redis keep the real
time).

Lives in testkit/, not in the keyrelay package: slapd and redis-server here are the test
harness's private servers, not something the package ships.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from keyrelay.demo import (
    DEMO_FROM,
    DEMO_TO,
    DemoError,
    Relay,
    Settings,
    ensure_daemon_user,
    give_to_daemons,
    run_in_foreground,
    tail,
)
from keyrelay.usage import ArgumentParser, echo_undecodable_arguments
from testkit.net import free_ports
from testkit.redis import REDIS_SERVER, RedisServer
from testkit.slapd import KEYRELAY_INDEXES, SLAPD, Slapd

# node B's ports by default: node A's (make run's) plus 100
NODE_B_OFFSET = 100
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
CLOCK_CACHE = 1  # seconds libfaketime keeps the offset it read from the clock file

ENVIRONMENT = f"""\
environment (all optional): node A as make run: KEYRELAY_HOST (127.0.0.1), KEYRELAY_SMTP_PORT
(10025), KEYRELAY_SUBMISSION_PORT (10587), KEYRELAY_ALT_SUBMISSION_PORT (12525),
KEYRELAY_SUBMISSIONS_PORT (10465), KEYRELAY_SINK_PORT (10026), KEYRELAY_POOL_ADDRESS
(127.0.0.2); node B: KEYRELAY_NODE_B_HOST (node A's), KEYRELAY_NODE_B_SMTP_PORT (node A's
plus {NODE_B_OFFSET}), and so on for every port. Ctrl-C or SIGTERM stops every process this
started.
"""


def node_settings(run_dir: Path, env: Mapping[str, str] = os.environ) -> tuple[Settings,
                                                                            Settings]:
    """Node A's and node B's settings from ``env`` (node B: ``KEYRELAY_NODE_B_*``)."""
    a = Settings.from_env(run_dir / "cluster" / "node-a", env)
    b_defaults = replace(
        a, smtp_port=a.smtp_port + NODE_B_OFFSET,
        submission_port=a.submission_port + NODE_B_OFFSET,
        alt_submission_port=a.alt_submission_port + NODE_B_OFFSET,
        submissions_port=a.submissions_port + NODE_B_OFFSET,
        sink_port=a.sink_port + NODE_B_OFFSET,
        policyd_metrics_port=a.policyd_metrics_port + NODE_B_OFFSET if
        a.policyd_metrics_port else 0,
        milter_metrics_port=a.milter_metrics_port + NODE_B_OFFSET if
        a.milter_metrics_port else 0,
        events_metrics_port=a.events_metrics_port + NODE_B_OFFSET if
        a.events_metrics_port else 0)
    b = Settings.from_env(run_dir / "cluster" / "node-b", env, prefix="KEYRELAY_NODE_B_",
                          defaults=b_defaults)
    # one directory: the pool's address is the one node A made it with
    return a, replace(b, pool_address=a.pool_address)


@dataclass
class Cluster:
    """slapd, redis-server and two relay nodes sharing them (see the module doc)."""

    run_dir: Path
    node_a: Settings
    node_b: Settings
    say: Callable[[str], None] = print
    # how often each node reads the directory again (a changed limit or a revoked key shows
    # at both nodes within it; a new key works at once: its first login reads it through)
    refresh_interval: float = 2.0
    clock_file: Path | None = None
    slapd: Slapd | None = None
    redis: RedisServer | None = None
    nodes: dict[str, Relay] = field(default_factory=dict)
    key: str = ""
    key_id: str = ""

    @property
    def folder(self) -> Path:
        return self.run_dir / "cluster"

    @property
    def env_file(self) -> Path:
        return self.run_dir / "cluster.env"

    @property
    def config(self) -> Path:
        """The configuration the ``keyrelay`` CLI uses: node A's."""
        return self.node_a.config

    # -- starting and stopping ------------------------------------------------------------
    def start(self) -> None:
        """Start slapd and redis-server, then both nodes; everything stopped on failure."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        for tool, package in ((SLAPD, "slapd"), (REDIS_SERVER, "redis-server")):
            if not tool.exists():
                raise DemoError(f"{tool} is missing: apt-get install {package} (make "
                                "run-cluster installs it)")
        if self.clock_file is not None and not LIBFAKETIME.exists():
            raise DemoError(f"{LIBFAKETIME} is missing: apt-get install faketime")
        self.folder.mkdir(parents=True, exist_ok=True)
        ensure_daemon_user(self.node_a, self.say)
        self.say("starting slapd (the shared directory) and redis-server (the shared "
                 "counters)")
        self.slapd = Slapd(indexes=KEYRELAY_INDEXES)
        self.slapd.start()
        self.redis = RedisServer().start()
        shared = self.folder / "shared"
        shared.mkdir(mode=0o750, exist_ok=True)
        give_to_daemons(self.node_a, shared, 0o750, owner=False)
        copies = {"ca.pem": self.slapd.ca_file, "ldap.secret": self.slapd.service_password_file,
                  "redis.secret": self.redis.password_file}
        for name, source in copies.items():
            shutil.copyfile(source, shared / name)
            (shared / name).chmod(0o640)
            give_to_daemons(self.node_a, shared / name, 0o640, owner=False)
        directory = self.slapd.directory_config(
            refresh_interval=self.refresh_interval, ca_file=str(shared / "ca.pem"),
            bind_password_file=str(shared / "ldap.secret"))
        counters = self.redis.counters_settings(password_file=str(shared / "redis.secret"))
        a = Relay(replace(self.node_a, directory=directory, counters=counters), say=self.say)
        b = Relay(replace(self.node_b, directory=directory, counters=counters,
                          owns_tenant=False), say=self.say)
        self.nodes = {"a": a, "b": b}
        # a fresh directory: node A makes the tenant again
        (a.settings.run_dir / "demo-state.json").unlink(missing_ok=True)
        a.prepare()
        self.key, self.key_id = a.key, a.key_id
        self.copy_dkim_keys(a.settings, b.settings)
        b.prepare()
        if self.clock_file is not None:
            self.move_clock("+0s")
        for relay in (a, b):
            if self.clock_file is not None:
                relay.children["policyd"] = relay.policyd()
                relay.children["policyd"].env = self.clock_env()
            relay.launch()
        self.write_env()

    def copy_dkim_keys(self, source: Settings, target: Settings) -> None:
        """Node A's DKIM private keys to node B, as the Ansible role distributes them."""
        here, there = source.run_dir / "dkim", target.run_dir / "dkim"
        if there.exists():
            shutil.rmtree(there)
        shutil.copytree(here, there)
        give_to_daemons(target, there, 0o700, owner=True)
        for path in there.rglob("*"):
            give_to_daemons(target, path, 0o700 if path.is_dir() else 0o600, owner=True)

    def stop(self) -> None:
        """Both nodes (Postfix first, then the daemons), then redis-server and slapd."""
        for relay in reversed(list(self.nodes.values())):
            relay.stop()
        for server in (self.redis, self.slapd):
            if server is not None:
                server.close()

    def failed(self) -> str | None:
        """What stopped, with the end of its log; None while everything runs."""
        for name, relay in self.nodes.items():
            child = relay.failed_child()
            if child is not None:
                return (f"node {name.upper()}'s {child.name} stopped; see {child.log}:\n"
                        + tail(child.log))
        if self.slapd is not None and not self.slapd.running:
            return "slapd stopped:\n" + self.slapd.log()[-2000:]
        if self.redis is not None and (self.redis.process is None
                                       or self.redis.process.poll() is not None):
            return "redis-server stopped:\n" + self.redis.log()[-2000:]
        return None

    # -- the policy daemons' clock (tests) --------------------------------------------------
    def clock_env(self) -> dict[str, str]:
        assert self.clock_file is not None
        # Only the wall clock moves: with the monotonic clock faked too, libfaketime 0.9.10
        # makes a thread's timed wait (threading.Event.wait, the LDAP copy's refresher) hang
        # for good. In this mode its time.sleep fails (EINVAL), which keyrelay-policyd never
        # calls (its waits are the event loop's and threading's).
        return {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME_TIMESTAMP_FILE": str(self.clock_file),
                "FAKETIME_CACHE_DURATION": str(CLOCK_CACHE),
                "FAKETIME_DONT_FAKE_MONOTONIC": "1"}

    def move_clock(self, offset: str) -> None:
        """Both policy daemons' clock at ``offset`` from the real time (``+3600s``)."""
        assert self.clock_file is not None
        tmp = self.clock_file.with_suffix(".tmp")
        tmp.write_text(offset + "\n")
        tmp.chmod(0o644)  # read by the daemons' user
        os.replace(tmp, self.clock_file)

    # -- what a user reads ----------------------------------------------------------------
    def env_values(self) -> dict[str, str]:
        assert self.slapd is not None and self.redis is not None
        values = {
            "KEYRELAY_CONFIG": str(self.config),
            "KEYRELAY_DEMO_KEY": self.key,
            "KEYRELAY_DEMO_KEY_ID": self.key_id,
            "KEYRELAY_DEMO_FROM": DEMO_FROM,
            "KEYRELAY_DEMO_TO": DEMO_TO,
        }
        for name, relay in self.nodes.items():
            s, prefix = relay.settings, f"KEYRELAY_NODE_{name.upper()}_"
            values.update({
                prefix + "HOST": s.host,
                prefix + "SMTP_PORT": str(s.smtp_port),
                prefix + "SUBMISSION_PORT": str(s.submission_port),
                prefix + "ALT_SUBMISSION_PORT": str(s.alt_submission_port),
                prefix + "SUBMISSIONS_PORT": str(s.submissions_port),
                prefix + "SINK_PORT": str(s.sink_port),
                prefix + "METRICS_URLS": " ".join(s.metrics_urls()),
                prefix + "CONFIG": str(s.config),
                prefix + "OUTBOX": str(s.outbox),
            })
        values.update({"KEYRELAY_POOL_ADDRESS": self.node_a.pool_address,
                       "KEYRELAY_LDAP_URL": self.slapd.url,
                       "KEYRELAY_REDIS_HOST": "127.0.0.1",
                       "KEYRELAY_REDIS_PORT": str(self.redis.port)})
        return values

    def write_env(self) -> None:
        text = ("# Written by make run-cluster; the API key is secret (mode 0600).\n"
                + "".join(f"{name}={shlex.quote(value)}\n"
                          for name, value in self.env_values().items()))
        tmp = self.env_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, self.env_file)

    def banner(self) -> str:
        assert self.slapd is not None and self.redis is not None
        env = shlex.quote(str(self.env_file))
        rows = []
        for name, relay in self.nodes.items():
            s = relay.settings
            rows.append(f"  node {name.upper()}   submission {s.host}:{s.submission_port}  "
                        f"port 25 role {s.host}:{s.smtp_port}  implicit TLS "
                        f"{s.host}:{s.submissions_port}\n"
                        f"           delivered mail in {s.outbox}/, logs in {s.logs}/")
        return f"""
keyrelay two-node demo is running (Ctrl-C stops it).

{chr(10).join(rows)}
  directory    slapd {self.slapd.url} (both nodes read it)
  counters     redis-server 127.0.0.1:{self.redis.port} (both nodes count in it)
  key, ports   {self.env_file}   (username: apikey)

The same key at node A, then at node B (in another terminal):

  . {env}
  swaks --server "$KEYRELAY_NODE_A_HOST:$KEYRELAY_NODE_A_SUBMISSION_PORT" --tls \\
    --auth PLAIN --auth-user apikey --auth-password "$KEYRELAY_DEMO_KEY" \\
    --from "$KEYRELAY_DEMO_FROM" --to "$KEYRELAY_DEMO_TO"
  swaks --server "$KEYRELAY_NODE_B_HOST:$KEYRELAY_NODE_B_SUBMISSION_PORT" --tls \\
    --auth PLAIN --auth-user apikey --auth-password "$KEYRELAY_DEMO_KEY" \\
    --from "$KEYRELAY_DEMO_FROM" --to "$KEYRELAY_DEMO_TO"

README.md, "Two nodes as one", walks through a shared limit and a shared lock-out.
"""


@contextmanager
def private_cluster(pool_address: str, *, refresh_interval: float = 0.5,
                    clock: bool = False) -> Iterator[Cluster]:
    """A started ``Cluster`` on free loopback ports in a temporary folder, stopped and removed
    afterwards (the tests' own); ``clock``: the policy daemons' clock can be moved."""
    run_dir = Path(tempfile.mkdtemp(prefix="kr-cl-"))  # short: unix socket paths
    ports = iter(free_ports(10))
    a, b = (Settings(run_dir / "cluster" / node, smtp_port=next(ports),
                     submission_port=next(ports), alt_submission_port=next(ports),
                     submissions_port=next(ports), sink_port=next(ports),
                     policyd_metrics_port=0, milter_metrics_port=0,
                     pool_address=pool_address) for node in ("node-a", "node-b"))
    cluster = Cluster(run_dir, a, b, say=lambda text: None, refresh_interval=refresh_interval,
                      clock_file=run_dir / "clock" if clock else None)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    echo_undecodable_arguments()
    parser = ArgumentParser(
        prog="python -m testkit.cluster",
        description="Run keyrelay's two-node demo on loopback in the foreground (make "
                    "run-cluster): one slapd, one redis-server, two relay nodes.",
        epilog=ENVIRONMENT)
    parser.add_argument("run_dir", nargs="?", default="run",
                        help="state folder (default: run); the nodes live in RUN_DIR/cluster/, "
                             "the key and ports are in RUN_DIR/cluster.env")
    args = parser.parse_args(argv)
    holder: list[Cluster] = []

    def start() -> str:
        run_dir = Path(args.run_dir).resolve()
        a, b = node_settings(run_dir)
        holder.append(Cluster(run_dir, a, b, say=lambda text: print(text, flush=True)))
        holder[0].start()
        return holder[0].banner()

    return run_in_foreground("keyrelay cluster", start, lambda: holder[0].failed(),
                             lambda: holder[0].stop() if holder else None,
                             "both nodes, redis-server and slapd")


if __name__ == "__main__":
    sys.exit(main())
