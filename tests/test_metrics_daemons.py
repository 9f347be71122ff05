"""The daemons' /metrics and /health (docs/metrics.md), against real keyrelay-policyd and
keyrelay-milter processes, one process and with workers; promtool lints every scrape.

Counters are written before the answer goes out (policyd/auth.py, policyd/policy.py,
milters/service.py ``finish``), so a scrape after a client got its answer already counts it:
the counts are compared exactly. Health changes follow the directory probe (once a second):
those are waited for, with generous deadlines.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from test_dkimsign import make_selectors
from test_workers import MilterDaemon, children, populate, served_by

from bench.milter_bench import ACCEPTED, MilterClient, inserted_headers, make_message
from keyrelay import admin
from keyrelay.directory.model import DirectoryData
from keyrelay.directory.yamlfile import render
from testkit.factories import CREATED, NOW
from testkit.net import free_port, wait_until
from testkit.policyd import Policyd, broken_directory, fresh_address
from testkit.redis import RedisServer, redis_server
from testkit.relay import guess
from testkit.slapd import Slapd

PROMTOOL = shutil.which("promtool")
HEALTH_DEADLINE = 60.0  # the probe runs every second; LDAP's copy ages out after 1.5 s here

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(base: str) -> Samples:
    """Every sample of one scrape, by name and labels; promtool's lint must pass on it."""
    status, text = get(base + "/metrics")
    assert status == 200, text
    if PROMTOOL:
        lint = subprocess.run([PROMTOOL, "check", "metrics"], input=text, text=True,
                              capture_output=True, check=False, timeout=60)
        assert lint.returncode == 0, lint.stdout + lint.stderr
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over the series whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items()
               if n == name and set(labels.items()) <= set(ls))


def series(samples: Samples, name: str) -> int:
    return sum(1 for (n, _) in samples if n == name)


def healthy(base: str) -> bool:
    return get(base + "/health") == (200, "ok\n")


# -- policyd ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture
def policyd(tmp_path: Path) -> Iterator[Callable[..., tuple[Policyd, str]]]:
    made: list[Policyd] = []

    def make(overrides: dict[str, Any] | None = None, workers: int = 1) -> tuple[Policyd, str]:
        port = free_port()
        daemon = Policyd(tmp_path / f"p{len(made)}", {
            "policyd": {"metrics_listen": f"127.0.0.1:{port}", "workers": workers,
                        "shutdown_grace": 2},
            **(overrides or {})})
        made.append(daemon)
        if "directory" not in (overrides or {}):
            populate(daemon)
        daemon.start()
        base = f"http://127.0.0.1:{port}"
        if workers > 1:
            wait_until(lambda: len(children(daemon.pid)) == workers, 60, "the workers")
        wait_until(lambda: healthy(base), HEALTH_DEADLINE, "/health to say ok")
        return daemon, base

    yield make
    for daemon in made:
        if daemon.running():
            assert daemon.stop(timeout=60) == 0, daemon.log()[-3000:]
        assert not daemon.tracebacks(), daemon.tracebacks()


def login(daemon: Policyd, password: str) -> str:
    client, _ = served_by(daemon)
    return client.plain("apikey", password, rip=fresh_address()).status


def test_policyd_counts_each_login_by_result_and_reason_and_serves_health(
    policyd: Callable[..., tuple[Policyd, str]],
) -> None:
    daemon, base = policyd()
    before = scrape(base)
    assert login(daemon, daemon.keys["acme"].text) == "OK"
    assert login(daemon, guess(daemon.keys["acme"].text)) == "FAIL"
    assert login(daemon, "not a key") == "FAIL"
    after = scrape(base)

    def moved(**labels: str) -> float:
        return (value(after, "keyrelay_auth_attempts_total", **labels)
                - value(before, "keyrelay_auth_attempts_total", **labels))

    assert moved(result="success", reason="ok") == 1
    assert moved(result="failure", reason="wrong_secret") == 1
    assert moved(result="failure", reason="malformed_key") == 1
    assert (value(after, "keyrelay_request_duration_seconds_count", service="auth")
            - value(before, "keyrelay_request_duration_seconds_count", service="auth")) == 3
    assert value(after, "keyrelay_directory_keys") == 1
    assert value(after, "keyrelay_domains", state="verified") == 1
    assert value(after, "keyrelay_domains", state="failing") == 0
    assert value(after, "keyrelay_build_info", version=_version(),
                 python_version=_python()) == 1
    assert value(after, "process_cpu_seconds_total") > 0
    # the milter's metrics are not policyd's
    assert series(after, "keyrelay_messages_total") == 0
    assert healthy(base)
    assert get(base + "/nothing")[0] == 404
    # a client that connects and sends nothing holds nothing up, and is closed (10 s)
    with socket.create_connection(("127.0.0.1", int(base.rpartition(":")[2])),
                                  timeout=60) as idle:
        assert healthy(base)
        assert idle.recv(100) == b""  # closed by the server, not by our timeout
    # no secret, no key hash, no key id in any label
    text = get(base + "/metrics")[1]
    key = daemon.keys["acme"]
    assert key.text not in text and key.secret not in text and key.key_id not in text


def test_policyd_workers_are_summed_in_one_scrape_and_survive_a_killed_worker(
    policyd: Callable[..., tuple[Policyd, str]], redis: RedisServer,
) -> None:
    redis.flush()
    daemon, base = policyd({"counters": redis.counters_settings()}, workers=2)
    before = value(scrape(base), "keyrelay_auth_attempts_total", result="success", reason="ok")
    served: set[int] = set()
    for _ in range(40):
        client, pid = served_by(daemon)
        served.add(pid)
        assert client.plain("apikey", daemon.keys["acme"].text,
                            rip=fresh_address()).status == "OK"
    assert served == children(daemon.pid), "both workers should have served logins"
    samples = scrape(base)
    assert value(samples, "keyrelay_auth_attempts_total", result="success",
                 reason="ok") - before == 40
    assert value(samples, "keyrelay_directory_keys") == 1  # the workers' max, not a sum
    assert value(samples, "keyrelay_build_info", version=_version(),
                 python_version=_python()) == 1
    cpu = value(samples, "process_cpu_seconds_total")
    victim = min(children(daemon.pid))
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(children(daemon.pid) - {victim}) == 2, 60, "a new worker")
    after = scrape(base)
    # the dead worker's counts stay in the sum, and its CPU in the daemon's
    assert value(after, "keyrelay_auth_attempts_total", result="success", reason="ok") \
        - before == 40
    assert value(after, "process_cpu_seconds_total") >= cpu
    wait_until(lambda: healthy(base), HEALTH_DEADLINE, "/health ok with the new worker")


def test_health_turns_503_naming_the_broken_file_and_back_to_200(
    policyd: Callable[..., tuple[Policyd, str]], redis: RedisServer,
) -> None:
    redis.flush()
    daemon, base = policyd({"counters": redis.counters_settings()}, workers=2)
    with broken_directory(daemon.directory_path):
        wait_until(lambda: get(base + "/health")[0] == 503, HEALTH_DEADLINE, "/health 503")
        _, text = get(base + "/health")
        assert text.startswith("directory unavailable: ")
        assert str(daemon.directory_path) in text
        assert text.count("\n") == 1
        failures = value(scrape(base), "keyrelay_directory_reloads_total", result="failure")
        assert failures >= 1
    wait_until(lambda: healthy(base), HEALTH_DEADLINE, "/health back to 200")
    samples = scrape(base)
    assert value(samples, "keyrelay_directory_age_seconds") < HEALTH_DEADLINE


@pytest.mark.skipif(not shutil.which("slapd", path="/usr/sbin:/usr/bin"),
                    reason="slapd is not installed (make test installs it)")
def test_health_turns_503_while_ldap_is_away_and_back_to_200(
    policyd: Callable[..., tuple[Policyd, str]],
) -> None:
    with Slapd() as slapd:
        directory = slapd.directory_config(refresh_interval=0.5, timeout=1)
        root = Path(slapd.dir)
        config = root / "cli.yaml"
        config.write_text(yaml.safe_dump({"directory": directory, "logging": {
            "audit_log": str(root / "audit.log")}}))
        subprocess.run([str(Path(sys.executable).parent / "keyrelay"), "--config",
                        str(config), "account", "add", "acme"], check=True,
                       capture_output=True, timeout=60)
        _, base = policyd({"directory": directory})
        slapd.pause()  # the kernel still accepts connections; nothing answers
        try:
            wait_until(lambda: get(base + "/health")[0] == 503, HEALTH_DEADLINE,
                       "/health 503 while LDAP does not answer")
            text = get(base + "/health")[1]
            assert text.startswith("directory unavailable: LDAP unreachable"), text
            assert slapd.service_password not in text
            assert value(scrape(base), "keyrelay_directory_age_seconds") > 1.5
        finally:
            slapd.resume()
        wait_until(lambda: healthy(base), HEALTH_DEADLINE, "/health back to 200")


def test_a_metrics_port_already_taken_stops_the_start_with_one_line(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        daemon = Policyd(tmp_path, {"policyd": {"metrics_listen": f"127.0.0.1:{port}"}})
        populate(daemon)
        result = subprocess.run(daemon.command(), capture_output=True, text=True, timeout=60,
                                check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert f"metrics_listen: cannot serve 127.0.0.1:{port}" in lines[-1]
    assert "Traceback" not in result.stderr


# -- milter ----------------------------------------------------------------------------------
def test_milter_messages_per_account_stay_within_the_bound_with_a_thousand_accounts(
    tmp_path: Path,
) -> None:
    """1,001 accounts send through two milter workers with metrics.top_accounts 10: at most
    11 accounts' series, and every message counted once."""
    data = DirectoryData()
    admin.add_account(data, "acme", CREATED)
    selectors = make_selectors(tmp_path / "dkim", "acme.example")
    admin.add_domain(data, "acme", "acme.example", selectors, CREATED)
    admin.mark_verified(data, "acme.example", NOW - timedelta(days=1))
    acme = admin.create_key(data, "acme", "app", ("mail.send",), None, CREATED)
    logins = []
    for number in range(1000):
        admin.add_account(data, f"t{number}", CREATED)
        logins.append(f"t{number}:"
                      + admin.create_key(data, f"t{number}", "app", ("mail.send",), None,
                                         CREATED).key_id)
    (tmp_path / "directory.yaml").write_text(render(data))
    port = free_port()

    def bounded(config: Path) -> Path:
        settings = yaml.safe_load(config.read_text())
        config.write_text(yaml.safe_dump({**settings, "metrics": {"top_accounts": 10}}))
        return config

    daemon = MilterDaemon(tmp_path, f"inet:127.0.0.1:{free_port()}", 2, bounded,
                          metrics_listen=f"127.0.0.1:{port}")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: healthy(base), HEALTH_DEADLINE, "/health to say ok")
        client = MilterClient(daemon.listen)
        client.negotiate()
        client.open_session({"{client_addr}": "127.0.0.1"})
        signed = client.send(make_message(f"acme:{acme.key_id}", "app@acme.example", 2000,
                                          "Q0"))
        assert signed[-1][0] in ACCEPTED, signed
        assert len(inserted_headers(signed)) == 2  # both DKIM-Signature headers
        for number, login in enumerate(logins):
            # From: a domain that is not theirs: refused, and counted for their account
            replies = client.send(make_message(login, "app@acme.example", 200, f"Q{number + 1}"))
            assert replies[-1][0] == b"y", replies  # 550 5.7.1
        client.quit()
        samples = scrape(base)
        assert series(samples, "keyrelay_messages_total") == (10 + 1) * 4
        assert total(samples, "keyrelay_messages_total") == 1001
        assert total(samples, "keyrelay_messages_total", outcome="refused") == 1000
        assert value(samples, "keyrelay_messages_total", account="acme", outcome="signed") == 1
        assert value(samples, "keyrelay_dkim_signatures_total", algorithm="rsa-sha256") == 1
        assert value(samples, "keyrelay_dkim_signatures_total", algorithm="ed25519-sha256") == 1
        assert value(samples, "keyrelay_request_duration_seconds_count", service="milter") \
            == 1001
        assert series(samples, "keyrelay_auth_attempts_total") == 0  # policyd's
        assert value(samples, "keyrelay_directory_keys") == 1001
    finally:
        assert daemon.stop() == 0, daemon.text()[-3000:]


def _version() -> str:
    from keyrelay import __version__

    return __version__


def _python() -> str:
    import platform

    return platform.python_version()
