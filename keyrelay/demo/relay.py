"""The whole demo relay: smtp-sink, keyrelay-policyd, keyrelay-milter and Postfix, started in
order, each waited for, stopped in the reverse order."""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field

from ..postfixconf import run_postfix
from .postfix import make_certificate, make_reachable, write_postfix_base
from .processes import (
    BIN,
    SMTP_SINK,
    Child,
    alive,
    greets,
    port_in_use,
    tail,
    unix_accepts,
    wait_until,
)
from .settings import BOUNCE_DOMAIN, DEFER_DOMAIN, DemoError, Settings
from .state import (
    ensure_daemon_user,
    fresh_key,
    give_to_daemons,
    init_state,
    keyrelay_cli,
    write_config,
    write_env,
)

# A sockaddr_un path holds 107 bytes; Postfix's own limit is about the same.
_MAX_SOCKET_PATH = 100


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
        ensure_daemon_user(s, self.say)
        # the daemons' user writes the directory file (keys' last-used times, atomically)
        give_to_daemons(s, s.run_dir, 0o775, owner=False)
        write_config(s)
        if s.owns_tenant:
            init_state(s, self.say)
        make_certificate(s.run_dir / "tls", "relay.demo.example")
        write_postfix_base(s)
        for folder in (s.outbox, s.logs):
            folder.mkdir(parents=True, exist_ok=True)
        for folder in (s.run_dir / "postfix", s.postfix_etc):
            folder.chmod(0o755)  # secrets inside are files of mode 0600
        if s.run_dir.stat().st_mode & 0o777 not in (0o755, 0o775):
            s.run_dir.chmod(0o755)  # not given to the daemons' group (not root): as before
        shutil.chown(s.outbox, "postfix")
        make_reachable(s.outbox, self.say)
        self.say(keyrelay_cli(s, "postfix", "apply", "--config-dir", str(s.postfix_etc))
                 .splitlines()[0])
        if s.owns_tenant:
            self.key, self.key_id = fresh_key(s)
            write_env(s, self.key, self.key_id)

    def stop_leftover_postfix(self) -> None:
        etc = self.settings.postfix_etc
        if (etc / "main.cf").exists() and run_postfix(etc, "status")[0] == 0:
            self.say("stopping the Postfix instance a previous run left behind")
            self.stop_postfix()

    # -- the processes (not started) ------------------------------------------------------
    def sink(self, file_pattern: str = "%Y%m%d-%H%M%S.", backlog: int = 100) -> Child:
        """smtp-sink on the sink port, each message a file ``outbox/<file_pattern>...``."""
        s = self.settings
        return Child("smtp-sink", [SMTP_SINK, "-u", "postfix", "-d",
                                   f"{s.outbox}/{file_pattern}", f"{s.host}:{s.sink_port}",
                                   str(backlog)],
                     s.logs / "sink.log", lambda: greets(s.host, s.sink_port))

    def refusing_sinks(self) -> dict[str, Child]:
        """smtp-sink refusing every recipient with 550 (``-f RCPT``, BOUNCE_DOMAIN's) and one
        answering 451 (``-r RCPT``, DEFER_DOMAIN's), those whose ports are set."""
        s = self.settings
        found = {}
        for name, flag, port in (("bounce-sink", "-f", s.bounce_sink_port),
                                 ("defer-sink", "-r", s.defer_sink_port)):
            if port:
                found[name] = Child(name, [SMTP_SINK, "-u", "postfix", flag, "RCPT",
                                           f"{s.host}:{port}", "100"], s.logs / f"{name}.log",
                                    lambda port=port: greets(s.host, port))  # type: ignore[misc]
        return found

    def policyd(self) -> Child:
        s = self.settings
        return Child("keyrelay-policyd",
                     [str(BIN / "keyrelay-policyd"), "--config", str(s.config)],
                     s.logs / "policyd.log",
                     lambda: all(unix_accepts(s.socket(n))
                                 for n in ("auth", "policy", "socketmap")),
                     fresh_socket=s.socket("auth"))

    def milter(self) -> Child:
        s = self.settings
        return Child("keyrelay-milter", [str(BIN / "keyrelay-milter"), "--config", str(s.config)],
                     s.logs / "milter.log", lambda: unix_accepts(s.socket("milter")),
                     fresh_socket=s.socket("milter"))

    def events(self) -> Child:
        """keyrelay-events following the demo Postfix's maillog into ``events.db``; ready
        once it says so (it runs as root here: postlogd's maillog is root's, mode 0600)."""
        s = self.settings
        log = s.logs / "events.log"
        mark = log.stat().st_size if log.exists() else 0

        def following() -> bool:
            with log.open("rb") as handle:
                handle.seek(mark)
                return b"keyrelay-events" in handle.read() and s.events_state.exists()
        return Child("keyrelay-events", [str(BIN / "keyrelay-events"), "--config", str(s.config)],
                     log, following)

    # -- starting and stopping ------------------------------------------------------------
    def start(self) -> None:
        """Start everything and wait until each part answers; stop all on failure."""
        self.prepare()
        self.launch()

    def launch(self) -> None:
        """After ``prepare``: the sink, the daemons (those already in ``children`` as they
        are) and Postfix, each waited for; everything stopped on failure."""
        try:
            self.children.setdefault("sink", self.sink())
            for name, child in self.refusing_sinks().items():
                self.children.setdefault(name, child)
            self.children.setdefault("policyd", self.policyd())
            self.children.setdefault("milter", self.milter())
            self.children.setdefault("events", self.events())
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
        wait_until(lambda: not alive(pid_file), 30, "the Postfix master to exit")
        self.postfix_started = False

    def stop(self) -> None:
        """Stop Postfix first (no new mail), then the daemons and the sink."""
        if self.postfix_started:
            self.stop_postfix()
        for name in ("events", "milter", "policyd", "sink", "bounce-sink", "defer-sink"):
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

    def refusing_lines(self) -> str:
        """The banner's lines for the receivers that refuse (none when they are off)."""
        s = self.settings
        sinks = ((BOUNCE_DOMAIN, s.bounce_sink_port, "550"),
                 (DEFER_DOMAIN, s.defer_sink_port, "451"))
        lines = [f"  {domain:17} smtp-sink on {s.host}:{port}, {code} to every recipient\n"
                 for domain, port, code in sinks if port]
        return "".join(lines)

    def metrics_lines(self) -> str:
        """The banner's lines for the metrics endpoints (none when they are off)."""
        urls = self.settings.metrics_urls()
        names = [name for name, port in (("policyd", self.settings.policyd_metrics_port),
                                         ("milter", self.settings.milter_metrics_port),
                                         ("events", self.settings.events_metrics_port)) if port]
        return "".join(f"  {name + ' metrics':17} {url}/metrics  {url}/health\n"
                       for name, url in zip(names, urls, strict=True))

    def banner(self) -> str:
        """What ``make run`` prints once everything runs."""
        s = self.settings
        return f"""
keyrelay demo relay is running (Ctrl-C stops it).

  port-25 role      {s.host}:{s.smtp_port}   STARTTLS offered, no relaying without AUTH
  submission        {s.host}:{s.submission_port}   STARTTLS required
  alt submission    {s.host}:{s.alt_submission_port}   STARTTLS required
  implicit TLS      {s.host}:{s.submissions_port}
  delivered mail    {s.outbox}/   (smtp-sink on {s.host}:{s.sink_port})
{self.refusing_lines()}  logs              {s.logs}/ and {s.maillog}
  delivery events   {s.events_state}   (keyrelay-events, docs/events.md)
  API key, ports    {s.env_file}   (username: apikey)
{self.metrics_lines()}
Send a message (in another terminal):

  {self.swaks_command()}

Then look at the DKIM-signed message in {s.outbox}/.
"""
