"""``make run-cluster`` as a new user meets it: ``python -m testkit.cluster DIR`` in the
foreground, then README.md's walk-through ("Two nodes as one") run as written in a second
shell, then Ctrl-C.

It must write ``DIR/cluster.env`` (mode 0600) with the key, both nodes' ports and the CLI's
configuration; the walk-through must show a key made once sending at both nodes, a limit of 4
a minute holding across them, and a lock-out earned at node A holding at node B (for that
address only), listed and lifted through node B; Ctrl-C (SIGINT to the foreground process
group, as a terminal sends it) must stop both nodes, slapd and redis-server. The only change to
the README's block: the key it tells the reader to paste is taken from ``key create --json``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyrelay.demo import read_env
from testkit.net import free_ports, wait_until
from testkit.redis import REDIS_SERVER
from testkit.slapd import SLAPD

pytestmark = [pytest.mark.system, pytest.mark.skipif(
    not (Path("/usr/sbin/postfix").exists() and SLAPD.exists() and REDIS_SERVER.exists()),
    reason="Postfix, slapd or redis-server is not installed (make test installs them)")]

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
START_DEADLINE = 240.0  # slapd, redis-server, two Postfix instances and four daemons, loaded
PORTS = ("SMTP_PORT", "SUBMISSION_PORT", "ALT_SUBMISSION_PORT", "SUBMISSIONS_PORT", "SINK_PORT")


def readme_walkthrough(run_dir: Path) -> str:
    """The second ``sh`` block of README.md's "Two nodes as one", for ``run_dir``."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Two nodes as one", 1)[1].split("\n## ", 1)[0]
    block = str(re.findall(r"```sh\n(.*?)```", section, re.S)[1])
    block = block.replace("run/", f"{run_dir}/").replace(".venv/bin/", f"{BIN}/")
    create = "keyrelay key create demo/app --name cluster-tour\n"
    paste = re.search(r"^KEY=kr\.x+.*\n", block, re.M)
    assert create in block and paste is not None, block
    return block.replace(create, "").replace(
        paste.group(0), f"KEY=$({BIN}/keyrelay --config \"$KEYRELAY_CONFIG\" key create "
        "demo/app --name cluster-tour --json | "
        f"{sys.executable} -c 'import json, sys; print(json.load(sys.stdin)[\"key\"])')\n")

def listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def cluster_env() -> Iterator[tuple[Path, dict[str, str]]]:
    run_dir = Path(tempfile.mkdtemp(prefix="kr-rc-")) / "run"
    env = dict(os.environ)
    ports = iter(free_ports(2 * len(PORTS)))
    for prefix in ("KEYRELAY_", "KEYRELAY_NODE_B_"):
        env.update({prefix + name: str(next(ports)) for name in PORTS})
    env["KEYRELAY_POOL_ADDRESS"] = "127.0.0.22"
    yield run_dir, env
    subprocess.run(["rm", "-rf", str(run_dir.parent)], check=False)


def test_make_run_cluster_and_the_readme_walkthrough(
        cluster_env: tuple[Path, dict[str, str]]) -> None:
    run_dir, env = cluster_env
    output = run_dir.parent / "cluster.out"
    with output.open("wb") as out:
        # its own process group, as a shell's foreground job: Ctrl-C is SIGINT to that group
        demo = subprocess.Popen([sys.executable, "-m", "testkit.cluster", str(run_dir)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)

    def text() -> str:
        return output.read_text(errors="replace")

    def ready() -> bool:
        if demo.poll() is not None:
            raise AssertionError(f"make run-cluster exited {demo.returncode}:\n{text()}")
        return "two-node demo is running" in text()

    try:
        wait_until(ready, START_DEADLINE, "the two-node demo to say it is running")
        env_file = run_dir / "cluster.env"
        assert env_file.stat().st_mode & 0o777 == 0o600
        values = read_env(env_file)
        for name in PORTS:  # the ports it was started with, for each node
            assert values[f"KEYRELAY_NODE_A_{name}"] == env[f"KEYRELAY_{name}"]
            assert values[f"KEYRELAY_NODE_B_{name}"] == env[f"KEYRELAY_NODE_B_{name}"]
        assert values["KEYRELAY_CONFIG"] == values["KEYRELAY_NODE_A_CONFIG"]
        assert values["KEYRELAY_DEMO_KEY"].startswith("kr.")
        assert values["KEYRELAY_DEMO_KEY"] not in text()  # the banner never shows the key
        servers = [int(values["KEYRELAY_LDAP_URL"].rsplit(":", 1)[1]),
                   int(values["KEYRELAY_REDIS_PORT"])]
        assert all(listening(port) for port in servers)

        walk = subprocess.run(["bash", "-c", "shopt -s expand_aliases\n"
                               + readme_walkthrough(run_dir)],
                              capture_output=True, text=True, timeout=300, cwd=REPO)
        said = walk.stdout + walk.stderr
        # 1. one key, both nodes: four messages queued in all, two at each node
        assert len(re.findall(r"250 2\.0\.0 Ok: queued as", said)) == 4, said
        for node in ("node-a", "node-b"):
            outbox = run_dir / "cluster" / node / "outbox"
            wait_until(lambda outbox=outbox: len(list(outbox.iterdir())) == 2,  # type: ignore[misc]
                       60, f"two messages in {outbox}")
            for dump in outbox.iterdir():
                wait_until(lambda dump=dump: b"DKIM-Signature" in dump.read_bytes()  # type: ignore[misc]
                           and b"d=demo.example" in dump.read_bytes(), 30, f"{dump} signed")
        # 2. the fifth message of the minute, wherever it is sent
        assert len(re.findall(r"451 4\.7\.1 .*limit of 4 messages per minute reached for "
                              r"account demo", said)) == 1, said
        assert re.search(r"per minute\s+all of demo\s+4\s+4", said), said
        assert "Counts from Redis at 127.0.0.1:" in said
        # 3. the lock-out earned at A holds at B, for 127.0.0.9 only; B lists and lifts it
        assert "too many failed logins from 127.0.0.9" in said, said
        assert len(re.findall(r"235 2\.7\.0 Authentication successful", said)) >= 5, said
        assert re.search(r"address\s+127\.0\.0\.9\s+10\s", said), said
        assert "Cleared 1 lock-out(s) of address 127.0.0.9" in said, said
        assert "Traceback" not in said
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGINT)
        status = demo.wait(timeout=120)
    assert status == 0, text()
    assert "stopped." in text()
    wait_until(lambda: not any(listening(port) for port in servers), 30,
               "slapd and redis-server to stop")
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert not [line for line in ps.splitlines() if str(run_dir) in line], ps


def test_bad_node_b_port_gets_one_clear_error(
        cluster_env: tuple[Path, dict[str, str]]) -> None:
    run_dir, env = cluster_env
    env["KEYRELAY_NODE_B_SUBMISSION_PORT"] = "587x"
    result = subprocess.run([sys.executable, "-m", "testkit.cluster", str(run_dir)], env=env,
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 1
    assert result.stderr.strip() == ("keyrelay cluster: error: "
                                     "KEYRELAY_NODE_B_SUBMISSION_PORT='587x': expected a port "
                                     "number (1-65535)")

