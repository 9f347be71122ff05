"""``make run`` as a new user meets it: ``python -m keyrelay.demo DIR`` in the foreground.

It must print a swaks command that, pasted into a shell, sends a message that arrives
DKIM-signed in ``DIR/outbox/``; write ``DIR/demo.env`` (mode 0600) with the key and ports; stop
every process it started on SIGTERM; and on a second start reuse the demo state with a fresh
API key, the previous one revoked. Ports come from the environment (free ones here).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyrelay.demo import read_env
from testkit.net import free_port, wait_until

pytestmark = pytest.mark.skipif(not Path("/usr/sbin/postfix").exists(),
                                reason="Postfix is not installed (make test installs it)")


class Demo:
    def __init__(self, run_dir: Path, env: dict[str, str]) -> None:
        self.run_dir, self.env = run_dir, env
        self.output = run_dir.parent / f"{run_dir.name}.out"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.output.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "keyrelay.demo", str(self.run_dir)],
                stdout=out, stderr=subprocess.STDOUT, env=self.env)
        wait_until(self.ready, 90, "the demo relay to say it is running")

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"the demo exited {self.process.returncode}:\n{self.text()}")
        return "demo relay is running" in self.text()

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def pids_of(run_dir: Path) -> list[str]:
    """Processes whose command line mentions the run folder (daemons, sink, Postfix)."""
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines()[1:] if str(run_dir) in line]


@pytest.fixture
def demo_env() -> Iterator[tuple[Path, dict[str, str]]]:
    run_dir = Path(tempfile.mkdtemp(prefix="kr-run-")) / "run"
    env = dict(os.environ)
    env.update({
        "KEYRELAY_SMTP_PORT": str(free_port()),
        "KEYRELAY_SUBMISSION_PORT": str(free_port()),
        "KEYRELAY_ALT_SUBMISSION_PORT": str(free_port()),
        "KEYRELAY_SUBMISSIONS_PORT": str(free_port()),
        "KEYRELAY_SINK_PORT": str(free_port()),
        "KEYRELAY_BOUNCE_SINK_PORT": str(free_port()),
        "KEYRELAY_DEFER_SINK_PORT": str(free_port()),
        "KEYRELAY_POOL_ADDRESS": "127.0.0.4",
        "KEYRELAY_POLICYD_METRICS_PORT": str(free_port()),
        "KEYRELAY_MILTER_METRICS_PORT": str(free_port()),
        "KEYRELAY_EVENTS_METRICS_PORT": str(free_port()),
    })
    yield run_dir, env
    subprocess.run(["rm", "-rf", str(run_dir.parent)], check=False)


def test_make_run_prints_a_swaks_command_that_delivers_a_signed_message(
    demo_env: tuple[Path, dict[str, str]],
) -> None:
    run_dir, env = demo_env
    demo = Demo(run_dir, env)
    demo.start()
    try:
        values = read_env(run_dir / "demo.env")
        assert (run_dir / "demo.env").stat().st_mode & 0o777 == 0o600
        # every setting the demo was started with is in it (the README says so)
        for name in ("KEYRELAY_SMTP_PORT", "KEYRELAY_SUBMISSION_PORT",
                     "KEYRELAY_ALT_SUBMISSION_PORT", "KEYRELAY_SUBMISSIONS_PORT",
                     "KEYRELAY_SINK_PORT", "KEYRELAY_BOUNCE_SINK_PORT",
                     "KEYRELAY_DEFER_SINK_PORT", "KEYRELAY_POOL_ADDRESS"):
            assert values[name] == env[name], name
        assert (values["KEYRELAY_BOUNCE_DOMAIN"], values["KEYRELAY_DEFER_DOMAIN"]) == (
            "bounce.demo.test", "defer.demo.test")
        assert values["KEYRELAY_DEMO_KEY"].startswith("kr.")
        assert values["KEYRELAY_DEMO_KEY"] not in demo.text()  # the banner never shows the key
        (command,) = [line.strip() for line in demo.text().splitlines()
                      if line.strip().startswith(". ") and "swaks" in line]
        sent = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert re.search(r"250 2\.0\.0 Ok: queued as", sent.stdout)
        outbox = run_dir / "outbox"
        wait_until(lambda: any(outbox.iterdir()), 30, "a message in outbox/")
        (path,) = list(outbox.iterdir())
        wait_until(lambda: b"This is a test mailing" in path.read_bytes(), 30, "the whole dump")
        dump = path.read_bytes().decode()
        assert "X-Client-Addr: 127.0.0.4" in dump  # left through the demo pool
        assert "a=rsa-sha256" in dump and "a=ed25519-sha256" in dump
        assert "d=demo.example" in dump
        # the README's curl of each endpoint: all healthy, the milter counted the message
        urls = values["KEYRELAY_METRICS_URLS"].split()
        assert urls == [f"http://127.0.0.1:{env['KEYRELAY_POLICYD_METRICS_PORT']}",
                        f"http://127.0.0.1:{env['KEYRELAY_MILTER_METRICS_PORT']}",
                        f"http://127.0.0.1:{env['KEYRELAY_EVENTS_METRICS_PORT']}"]
        for url in urls:
            health = subprocess.run(["curl", "-s", f"{url}/health"], capture_output=True,
                                    text=True, timeout=60)
            assert health.stdout == "ok\n", health
        page = subprocess.run(["curl", "-s", f"{urls[1]}/metrics"], capture_output=True,
                              text=True, timeout=60).stdout
        assert re.search(r'^keyrelay_messages_total\{account="demo",outcome="signed"\} 1\.0$',
                         page, re.M), page[-2000:]
        # keyrelay-events read the message's lines from the demo Postfix's maillog

        def events_page() -> str:
            return subprocess.run(["curl", "-s", f"{urls[2]}/metrics"], capture_output=True,
                                  text=True, timeout=60).stdout
        wait_until(lambda: re.search(r'^keyrelay_events_total\{event="delivered"\} 1\.0$',
                                     events_page(), re.M) is not None, 60,
                   "keyrelay-events' count of the delivered message")
        assert re.search(r'^keyrelay_events_total\{event="processed"\} 1\.0$', events_page(),
                         re.M)
        first_key_id = values["KEYRELAY_DEMO_KEY_ID"]
        # issue 20: the daemons run unprivileged, as the production default (policyd.user and
        # milter.user: keyrelay), not as root
        ps = subprocess.run(["ps", "-ww", "-eo", "user:20,args"], capture_output=True, text=True,
                            check=True).stdout
        daemons = [line.split()[0] for line in ps.splitlines() if str(run_dir) in line
                   and ("keyrelay-policyd" in line or "keyrelay-milter" in line)]
        # policyd (one process: memory counters) and the milter's supervisor and workers
        assert len(daemons) >= 2 and set(daemons) == {"keyrelay"}, ps
        assert "running as root" not in demo.text()
        readme_events_tour(run_dir, command)
    finally:
        status = demo.stop()
    assert status == 0, demo.text()
    assert "stopped." in demo.text()
    wait_until(lambda: not pids_of(run_dir), 30, "every demo process to exit")

    # a second start: same state, a fresh key, the previous one revoked
    again = Demo(run_dir, env)
    again.start()
    try:
        assert "creating the demo tenant" not in again.text()
        values = read_env(run_dir / "demo.env")
        assert values["KEYRELAY_DEMO_KEY_ID"] != first_key_id
        keys = subprocess.run(
            [str(Path(sys.executable).parent / "keyrelay"), "--config",
             str(run_dir / "keyrelay.yaml"), "key", "list", "demo/app"],
            capture_output=True, text=True, check=True).stdout
        old = [line for line in keys.splitlines() if first_key_id in line]
        assert old and "revoked" in old[0]
    finally:
        assert again.stop() == 0
    wait_until(lambda: not pids_of(run_dir), 30, "every demo process to exit")


def readme_events_tour(run_dir: Path, swaks: str) -> None:
    """The README tour's steps 7 and 8: a webhook to the tiny receiver, which prints the
    message's events with their signatures checked; a suppressed recipient refused at RCPT,
    its dropped event printed too."""
    kr = [str(Path(sys.executable).parent / "keyrelay"), "--config",
          str(run_dir / "keyrelay.yaml")]
    port = free_port()
    made = subprocess.run([*kr, "webhook", "set", "demo", "--url",
                           f"http://127.0.0.1:{port}/hook", "--json"],
                          capture_output=True, text=True, check=True)
    secret = json.loads(made.stdout)["secret"]
    printed = run_dir.parent / "receiver.out"
    with printed.open("wb") as out:
        receiver = subprocess.Popen(
            [sys.executable, "-m", "keyrelay.webhooks.receiver", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "KEYRELAY_WEBHOOK_SECRET": secret})
    try:
        wait_until(lambda: "listening on" in printed.read_text(), 30, "the receiver")
        sent = subprocess.run(["sh", "-c", swaks], capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stdout + sent.stderr

        def events() -> list[dict[str, object]]:
            return [json.loads(line) for line in printed.read_text().splitlines()
                    if line.startswith("{")]

        wait_until(lambda: {"processed", "delivered"} <= {e["event"] for e in events()}, 120,
                   "processed and delivered printed by the README's receiver")
        subprocess.run([*kr, "suppression", "add", "demo", "gone@example.net", "--reason",
                        "tried in the tour"], capture_output=True, text=True, check=True)
        refused = subprocess.run(["sh", "-c", swaks.replace('"$KEYRELAY_DEMO_TO"',
                                                            "gone@example.net")],
                                 capture_output=True, text=True, timeout=60)
        assert "550 5.7.1 <gone@example.net>: Recipient address rejected: recipient " \
               "suppressed for account demo" in refused.stdout, refused.stdout
        wait_until(lambda: any(e["event"] == "dropped" and e["email"] == "gone@example.net"
                               for e in events()), 120, "the dropped event printed")
        # step 9: receivers that refuse, reached through the transport map by a key of the
        # account itself (no IP pool, so no FILTER): a hard bounce, and a deferral
        account_key = json.loads(subprocess.run(
            [*kr, "key", "create", "demo", "--name", "tour-events", "--json"],
            capture_output=True, text=True, check=True).stdout)["key"]
        for to in ("someone@bounce.demo.test", "someone@defer.demo.test"):
            command = swaks.replace('"$KEYRELAY_DEMO_KEY"', f"'{account_key}'").replace(
                '"$KEYRELAY_DEMO_TO"', to)
            accepted = subprocess.run(["sh", "-c", command], capture_output=True, text=True,
                                      timeout=60)
            assert accepted.returncode == 0, accepted.stdout + accepted.stderr

        def seen(kind: str, email: str) -> list[dict[str, object]]:
            return [e for e in events() if e["event"] == kind and e["email"] == email]

        wait_until(lambda: seen("bounce", "someone@bounce.demo.test")
                   and seen("deferred", "someone@defer.demo.test"), 120,
                   "the bounce and the deferral printed by the README's receiver")
        bounce = seen("bounce", "someone@bounce.demo.test")[0]
        assert bounce["type"] == "hard" and str(bounce["status"]).startswith("5.")
        assert str(seen("deferred", "someone@defer.demo.test")[0]["status"]).startswith("4.")
        assert "refused a request" not in printed.read_text()
        assert secret not in (run_dir / "logs" / "events.log").read_text()
    finally:
        receiver.terminate()
        receiver.wait(30)


@pytest.mark.parametrize("name, value, message", [
    ("KEYRELAY_SUBMISSION_PORT", "587x", "KEYRELAY_SUBMISSION_PORT='587x': expected a port"),
    ("KEYRELAY_POOL_ADDRESS", "192.0.2.1", "expected a loopback address"),
])
def test_bad_environment_gets_one_clear_error(
    demo_env: tuple[Path, dict[str, str]], name: str, value: str, message: str
) -> None:
    run_dir, env = demo_env
    env[name] = value
    result = subprocess.run([sys.executable, "-m", "keyrelay.demo", str(run_dir)], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
