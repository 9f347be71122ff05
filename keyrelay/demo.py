"""``make run``: a working keyrelay relay on loopback, in the foreground, under ``run/``.

It starts a private Postfix instance (``postfix -c run/postfix/etc``; /etc/postfix is never
touched) with its smtpd services on loopback ports, keyrelay-policyd and keyrelay-milter on
unix sockets in that instance's ``private/`` folder, and ``smtp-sink`` as the outside world:
every message Postfix delivers lands in ``run/outbox/``. Postfix's settings come from
``keyrelay postfix apply``, the same command a production install uses.

The demo state (created once, kept across runs; ``make clean`` starts afresh): account
``demo`` with subuser ``demo/app``, IP pool ``demo`` on 127.0.0.2 assigned to it, domain
``demo.example`` with its DKIM keys, marked verified (the demo has no DNS), and on every start
a freshly created API key (the previous demo key is revoked). ``run/demo.env`` holds the key
and the ports as shell ``KEY=value`` lines (mode 0600).

Environment (all optional): KEYRELAY_HOST (127.0.0.1), KEYRELAY_SMTP_PORT (10025),
KEYRELAY_SUBMISSION_PORT (10587), KEYRELAY_ALT_SUBMISSION_PORT (12525),
KEYRELAY_SUBMISSIONS_PORT (10465), KEYRELAY_SINK_PORT (10026), KEYRELAY_POOL_ADDRESS
(127.0.0.2). Ctrl-C or SIGTERM stops every process this started.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .postfixconf import run_postfix
from .usage import ArgumentParser, echo_undecodable_arguments

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
BIN = Path(sys.executable).parent

DEMO_ACCOUNT, DEMO_SUBUSER, DEMO_POOL, DEMO_DOMAIN = "demo", "demo/app", "demo", "demo.example"
DEMO_FROM, DEMO_TO = "app@demo.example", "someone@example.net"
# A sockaddr_un path holds 107 bytes; Postfix's own limit is about the same.
_MAX_SOCKET_PATH = 100

# The Postfix daemons every instance needs; smtpd listeners come from `keyrelay postfix apply`.
BASE_MASTER_CF = """\
# Written by keyrelay's demo (make run); keyrelay postfix apply adds the smtpd services
# and the IP pool transports.
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
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
    pool_address: str = "127.0.0.2"
    # keyrelay's directory section; None: the embedded YAML file in the run directory (the
    # tests pass an LDAP one: tests/test_e2e_ldap.py)
    directory: Mapping[str, Any] | None = None

    @classmethod
    def from_env(cls, run_dir: Path, env: Mapping[str, str] = os.environ) -> Settings:
        def port(name: str, default: int) -> int:
            text = env.get(name, "")
            if not text:
                return default
            if not text.isdigit() or not 0 < int(text) < 65536:
                raise DemoError(f"{name}={text!r}: expected a port number (1-65535)")
            return int(text)

        def loopback(name: str, default: str) -> str:
            text = env.get(name, "") or default
            try:
                if not ipaddress.ip_address(text).is_loopback:
                    raise ValueError
            except ValueError:
                raise DemoError(f"{name}={text!r}: expected a loopback address such as "
                                f"{default}") from None
            return text

        return cls(
            run_dir=run_dir.resolve(),
            host=loopback("KEYRELAY_HOST", cls.host),
            smtp_port=port("KEYRELAY_SMTP_PORT", cls.smtp_port),
            submission_port=port("KEYRELAY_SUBMISSION_PORT", cls.submission_port),
            alt_submission_port=port("KEYRELAY_ALT_SUBMISSION_PORT", cls.alt_submission_port),
            submissions_port=port("KEYRELAY_SUBMISSIONS_PORT", cls.submissions_port),
            sink_port=port("KEYRELAY_SINK_PORT", cls.sink_port),
            pool_address=loopback("KEYRELAY_POOL_ADDRESS", cls.pool_address),
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
        return {"smtp": self.smtp_port, "submission": self.submission_port,
                "alt_submission": self.alt_submission_port,
                "submissions": self.submissions_port, "sink": self.sink_port}


# -- small helpers -----------------------------------------------------------------------------
def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``condition`` until true: a readiness check with a deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


def greets(host: str, port: int) -> bool:
    """Does an SMTP server on ``host:port`` answer with a 220 banner?"""
    try:
        with socket.create_connection((host, port), timeout=2) as conn:
            return conn.recv(512).startswith(b"220")
    except OSError:
        return False


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def unix_accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(1)
        try:
            conn.connect(str(path))
        except OSError:
            return False
    return True


def make_reachable(path: Path, say: Callable[[str], None]) -> None:
    """Give others search (x) permission on ``path`` and its parents where missing.

    Postfix's daemons and smtp-sink run as user postfix and open files under ``run/`` by
    absolute path; search permission lets them through a folder without listing it.
    """
    for folder in (path, *path.parents):
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            folder.chmod(mode | stat.S_IXOTH)
            say(f"note: added search permission (o+x) to {folder} so Postfix (user postfix) "
                "can reach the demo's queue and outbox")


def keyrelay_cli(settings: Settings, *args: str) -> str:
    """Run the real ``keyrelay`` command on the demo configuration; its stdout."""
    result = subprocess.run([str(BIN / "keyrelay"), "--config", str(settings.config), *args],
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise DemoError(f"keyrelay {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


# -- the demo state ----------------------------------------------------------------------------
def write_config(settings: Settings) -> None:
    """The demo's keyrelay.yaml, rewritten on every start (ports come from the environment)."""
    run, host = settings.run_dir, settings.host
    config = {
        "directory": (dict(settings.directory) if settings.directory is not None
                      else {"backend": "yaml", "path": str(run / "directory.yaml")}),
        "dkim": {"key_dir": str(run / "dkim")},
        "logging": {"audit_log": str(run / "audit.log")},
        "policyd": {
            "auth_listen": f"unix:{settings.socket('auth')}",
            "policy_listen": f"unix:{settings.socket('policy')}",
            "socketmap_listen": f"unix:{settings.socket('socketmap')}",
            "shutdown_grace": "2s",
        },
        "milter": {"listen": f"unix:{settings.socket('milter')}", "shutdown_grace": "2s"},
        "postfix": {
            "smtp_service": f"{host}:{settings.smtp_port}",
            "submission_services": [f"{host}:{settings.submission_port}",
                                    f"{host}:{settings.alt_submission_port}"],
            "submissions_services": [f"{host}:{settings.submissions_port}"],
            "tls_chain_files": f"{run / 'tls' / 'key.pem'}, {run / 'tls' / 'cert.pem'}",
        },
    }
    text = ("# Written by keyrelay's demo (make run) on every start; the ports come from the\n"
            "# environment (see README). JSON is YAML: keyrelay reads this file as YAML.\n"
            + json.dumps(config, indent=2) + "\n")
    settings.config.write_text(text)
    settings.config.chmod(0o600)


def init_state(settings: Settings, say: Callable[[str], None]) -> None:
    """Create the demo tenant once; a state from another pool address starts afresh."""
    run = settings.run_dir
    marker = run / "demo-state.json"
    wanted = {"version": 1, "pool_address": settings.pool_address}
    try:
        if json.loads(marker.read_text()) == wanted:
            return
    except (OSError, ValueError):
        pass
    for stale in ("directory.yaml", "directory.yaml.lock", "dkim", "demo.env", "demo-key.txt"):
        path = run / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    say(f"creating the demo tenant in {run}/")
    def kr(*args: str) -> str:
        return keyrelay_cli(settings, *args)

    kr("account", "add", DEMO_ACCOUNT)
    kr("subuser", "add", DEMO_SUBUSER)
    kr("pool", "add", DEMO_POOL, "--bind", settings.pool_address, "--helo", "relay.demo.example")
    kr("pool", "assign", DEMO_SUBUSER, DEMO_POOL)
    kr("domain", "add", DEMO_ACCOUNT, DEMO_DOMAIN)
    kr("domain", "grant", DEMO_DOMAIN, DEMO_SUBUSER)
    # The demo has no DNS server: the domain is marked verified by hand (audited as manual).
    kr("domain", "mark-verified", DEMO_DOMAIN)
    (run / "demo.example.zone").write_text(kr("domain", "dns", DEMO_DOMAIN))
    marker.write_text(json.dumps(wanted) + "\n")


def fresh_key(settings: Settings) -> tuple[str, str]:
    """A new API key for demo/app (key, key id); earlier demo keys are revoked."""
    for key in json.loads(keyrelay_cli(settings, "key", "list", DEMO_SUBUSER, "--json")):
        if key["name"].startswith("demo-") and key["state"] == "active":
            keyrelay_cli(settings, "key", "revoke", key["key_id"])
    name = time.strftime("demo-%Y%m%d-%H%M%S")
    created = json.loads(keyrelay_cli(settings, "key", "create", DEMO_SUBUSER,
                                      "--name", name, "--json"))
    return created["key"], created["key_id"]


def read_env(path: Path) -> dict[str, str]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    result = {}
    for line in lines:
        name, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            result[name.strip()] = shlex.split(value)[0] if value.strip() else ""
    return result


def write_env(settings: Settings, key: str, key_id: str) -> None:
    values = {
        "KEYRELAY_DEMO_KEY": key,
        "KEYRELAY_DEMO_KEY_ID": key_id,
        "KEYRELAY_DEMO_FROM": DEMO_FROM,
        "KEYRELAY_DEMO_TO": DEMO_TO,
        "KEYRELAY_HOST": settings.host,
        "KEYRELAY_SMTP_PORT": str(settings.smtp_port),
        "KEYRELAY_SUBMISSION_PORT": str(settings.submission_port),
        "KEYRELAY_ALT_SUBMISSION_PORT": str(settings.alt_submission_port),
        "KEYRELAY_SUBMISSIONS_PORT": str(settings.submissions_port),
        "KEYRELAY_CONFIG": str(settings.config),
        "KEYRELAY_OUTBOX": str(settings.outbox),
    }
    text = "# Written by make run; the API key is secret (mode 0600).\n" + "".join(
        f"{name}={shlex.quote(value)}\n" for name, value in values.items())
    tmp = settings.env_file.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, settings.env_file)


def make_certificate(folder: Path, name: str) -> None:
    """A self-signed certificate for STARTTLS and port 465 (kept across runs)."""
    folder.mkdir(parents=True, exist_ok=True)
    key, cert = folder / "key.pem", folder / "cert.pem"
    if key.exists() and cert.exists():
        return
    subprocess.run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
                    "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    key.chmod(0o600)


def write_postfix_base(settings: Settings) -> None:
    """main.cf and master.cf of the private instance, before keyrelay postfix apply."""
    etc, queue, data = settings.postfix_etc, settings.queue, settings.run_dir / "postfix" / "data"
    for folder in (etc, queue, data):
        folder.mkdir(parents=True, exist_ok=True)
    shutil.chown(data, "postfix")
    sink = f"[{settings.host}]:{settings.sink_port}"
    main = {
        "compatibility_level": "3.6",
        "queue_directory": str(queue),
        "data_directory": str(data),
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "inet_interfaces": settings.host,
        "inet_protocols": "ipv4",
        "myhostname": "relay.demo.example",
        "mydomain": "demo.example",
        "myorigin": "$myhostname",
        "mydestination": "",
        "local_recipient_maps": "",
        "local_transport": "error:5.1.1 this relay delivers no local mail",
        # The outside world of the demo is smtp-sink: all mail goes there, also mail
        # routed through an IP pool transport (FILTER kr-pool-demo: has no next hop).
        "relayhost": sink,
        "default_filter_nexthop": sink,
        # Port 25: only authenticated clients relay, not the whole of mynetworks.
        "smtpd_relay_restrictions": "permit_sasl_authenticated, reject_unauth_destination",
        "maillog_file": str(settings.maillog),
        "maillog_file_prefixes": str(settings.run_dir),
        "smtputf8_enable": "no",
        "biff": "no",
        "delay_warning_time": "0",
        "smtpd_banner": "$myhostname ESMTP keyrelay demo",
    }
    (etc / "main.cf").write_text(
        "# Written by keyrelay's demo (make run); keyrelay postfix apply adds its settings.\n"
        + "".join(f"{name} = {value}\n" for name, value in main.items()))
    (etc / "master.cf").write_text(BASE_MASTER_CF)


# -- processes ---------------------------------------------------------------------------------
@dataclass
class Child:
    """One long-running process of the demo, its output in ``run/logs/<name>.log``."""

    name: str
    argv: list[str]
    log: Path
    ready: Callable[[], bool]
    process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            # its own session: Ctrl-C reaches the demo, which then stops the children in order
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=log,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

        def up() -> bool:
            if not self.running():
                raise DemoError(f"{self.name} exited while starting; see {self.log}:\n"
                                + tail(self.log))
            return self.ready()

        try:
            wait_until(up, timeout, f"{self.name} to accept connections")
        except BaseException:
            self.kill()
            raise

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Relay:
    """The whole demo relay: sink, keyrelay-policyd, keyrelay-milter and Postfix."""

    settings: Settings
    say: Callable[[str], None] = print
    children: dict[str, Child] = field(default_factory=dict)
    postfix_started: bool = False
    key: str = ""
    key_id: str = ""

    def prepare(self) -> None:
        """Everything before the processes: state, certificate, Postfix's configuration."""
        s = self.settings
        s.run_dir.mkdir(parents=True, exist_ok=True)
        for path in (s.socket("auth"),):
            if len(str(path)) > _MAX_SOCKET_PATH:
                raise DemoError(f"{s.run_dir} is too deep for unix socket paths ({path} is "
                                f"longer than {_MAX_SOCKET_PATH} bytes): use a shorter run "
                                "directory (make run RUN_DIR=/tmp/keyrelay-run)")
        self.stop_leftover_postfix()
        busy = [f"{name} {port}" for name, port in s.ports().items()
                if port_in_use(s.host, port)]
        if busy:
            raise DemoError(f"port(s) in use on {s.host}: {', '.join(busy)}; is another "
                            "`make run` running? Stop it, or choose other ports with the "
                            "KEYRELAY_*_PORT variables (README)")
        write_config(s)
        init_state(s, self.say)
        make_certificate(s.run_dir / "tls", "relay.demo.example")
        write_postfix_base(s)
        for folder in (s.outbox, s.logs):
            folder.mkdir(parents=True, exist_ok=True)
        for folder in (s.run_dir, s.run_dir / "postfix", s.postfix_etc):
            folder.chmod(0o755)  # secrets inside are files of mode 0600
        shutil.chown(s.outbox, "postfix")
        make_reachable(s.outbox, self.say)
        self.say(keyrelay_cli(s, "postfix", "apply", "--config-dir", str(s.postfix_etc))
                 .splitlines()[0])
        self.key, self.key_id = fresh_key(s)
        write_env(s, self.key, self.key_id)

    def stop_leftover_postfix(self) -> None:
        etc = self.settings.postfix_etc
        if (etc / "main.cf").exists() and run_postfix(etc, "status")[0] == 0:
            self.say("stopping the Postfix instance a previous run left behind")
            self.stop_postfix()

    def start(self) -> None:
        """Start everything and wait until each part answers; stop all on failure."""
        self.prepare()
        s = self.settings
        try:
            self.children["sink"] = Child(
                "smtp-sink", [SMTP_SINK, "-u", "postfix", "-d", f"{s.outbox}/%Y%m%d-%H%M%S.",
                              f"{s.host}:{s.sink_port}", "100"],
                s.logs / "sink.log", lambda: greets(s.host, s.sink_port))
            self.children["policyd"] = Child(
                "keyrelay-policyd",
                [str(BIN / "keyrelay-policyd"), "--config", str(s.config)],
                s.logs / "policyd.log",
                lambda: all(unix_accepts(s.socket(n)) for n in ("auth", "policy", "socketmap")))
            self.children["milter"] = Child(
                "keyrelay-milter", [str(BIN / "keyrelay-milter"), "--config", str(s.config)],
                s.logs / "milter.log", lambda: unix_accepts(s.socket("milter")))
            for child in self.children.values():
                child.start()
            self.start_postfix()
        except BaseException:
            self.stop()
            raise

    def start_postfix(self) -> None:
        s = self.settings
        status, output = run_postfix(s.postfix_etc, "start")
        if status != 0:
            raise DemoError(f"postfix start failed: {output}\n--- {s.maillog} ---\n"
                            + tail(s.maillog))
        self.postfix_started = True
        for name in ("smtp", "submission", "alt_submission", "submissions"):
            port = s.ports()[name]
            # implicit TLS: no banner before the handshake, so a bound port must do
            check = port_in_use if name == "submissions" else greets
            wait_until(lambda: check(s.host, port), 30, f"Postfix on port {port}")  # noqa: B023

    def stop_postfix(self) -> None:
        etc = self.settings.postfix_etc
        run_postfix(etc, "stop")
        pid_file = self.settings.queue / "pid" / "master.pid"
        wait_until(lambda: not _alive(pid_file), 30, "the Postfix master to exit")
        self.postfix_started = False

    def stop(self) -> None:
        """Stop Postfix first (no new mail), then the daemons and the sink."""
        if self.postfix_started:
            self.stop_postfix()
        for name in ("milter", "policyd", "sink"):
            child = self.children.get(name)
            if child is not None:
                child.stop()

    def failed_child(self) -> Child | None:
        for child in self.children.values():
            if not child.running():
                return child
        return None

    def swaks_command(self) -> str:
        env = shlex.quote(str(self.settings.env_file))
        return (f". {env} && swaks --server \"$KEYRELAY_HOST:$KEYRELAY_SUBMISSION_PORT\" --tls "
                "--auth PLAIN --auth-user apikey --auth-password \"$KEYRELAY_DEMO_KEY\" "
                "--from \"$KEYRELAY_DEMO_FROM\" --to \"$KEYRELAY_DEMO_TO\"")


def _alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


def banner(relay: Relay) -> str:
    s = relay.settings
    return f"""
keyrelay demo relay is running (Ctrl-C stops it).

  port-25 role      {s.host}:{s.smtp_port}   STARTTLS offered, no relaying without AUTH
  submission        {s.host}:{s.submission_port}   STARTTLS required
  alt submission    {s.host}:{s.alt_submission_port}   STARTTLS required
  implicit TLS      {s.host}:{s.submissions_port}
  delivered mail    {s.outbox}/   (smtp-sink on {s.host}:{s.sink_port})
  logs              {s.logs}/ and {s.maillog}
  API key, ports    {s.env_file}   (username: apikey)

Send a message (in another terminal):

  {relay.swaks_command()}

Then look at the DKIM-signed message in {s.outbox}/.
"""


def main(argv: Sequence[str] | None = None) -> int:
    echo_undecodable_arguments()
    parser = ArgumentParser(
        prog="python -m keyrelay.demo",
        description="Run a keyrelay demo relay on loopback in the foreground (make run).",
        epilog=__doc__.split("Environment", 1)[1].join(("environment", "")) if __doc__ else None,
    )
    parser.add_argument("run_dir", nargs="?", default="run", help="state folder (default: run)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("keyrelay demo: error: run as root (it starts a private Postfix instance)",
              file=sys.stderr)
        return 1
    stop = {"signal": 0}

    def on_signal(number: int, _frame: object) -> None:
        stop["signal"] = number

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        relay = Relay(Settings.from_env(Path(args.run_dir)), say=lambda text: print(text,
                                                                                     flush=True))
        relay.start()
    except (DemoError, OSError, subprocess.SubprocessError) as exc:
        print(f"keyrelay demo: error: {exc}", file=sys.stderr)
        return 1
    print(banner(relay), flush=True)
    status = 0
    parent = os.getppid()
    # SIGTERM to `make` does not reach this process: a new parent (the old one exited) stops
    # the demo too, so nothing keeps running behind a stopped `make run`.
    while not stop["signal"] and os.getppid() == parent:
        failed = relay.failed_child()
        if failed is not None:
            print(f"keyrelay demo: error: {failed.name} stopped; see {failed.log}:\n"
                  + tail(failed.log), file=sys.stderr)
            status = 1
            break
        time.sleep(0.5)
    print("stopping Postfix, keyrelay-milter, keyrelay-policyd and smtp-sink ...", flush=True)
    relay.stop()
    print("stopped.", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
