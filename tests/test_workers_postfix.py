"""Worker processes through real Postfix (issue 22, "Killing one worker loses no mail"): the
relay ``make run`` builds (keyrelay.demo, its private Postfix and smtp-sink), with
keyrelay-milter and keyrelay-policyd each running two workers under their supervisor
(keyrelay/supervisor.py) and the policy daemon's counters in a real redis-server
(testkit/redis.py; several policyd workers need ``counters.backend: redis``).

Three SMTP clients send a steady stream of messages (smtplib, STARTTLS on the submission
port, an API key, one message per session); while they send, one milter worker and one
policyd worker are killed with SIGKILL. Then:

- every message a client got a 250 for reaches the sink exactly once, with both DKIM
  signatures valid (counted by Message-ID); Postfix's queue is flushed (``postqueue -f``)
  while waiting, so that nothing it deferred is missed;
- every refusal a client saw was temporary (4xx: Postfix's ``milter_default_action =
  tempfail``, the policy service's ``default_action``, the auth service's 454), never 5xx,
  and no refused message reaches the sink;
- each killed worker was replaced (a new pid, the supervisor's warning in the log) and
  sending works afterwards.

Which worker serves what is left to the kernel; the test waits on conditions (messages
accepted, workers ready, mail at the sink) with generous deadlines, never on time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import smtplib
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dkim
import pytest
import yaml
from test_workers import children

from keyrelay.demo import Relay, Settings, give_to_daemons
from testkit.net import free_ports, reply_text, wait_until
from testkit.redis import REDIS_SERVER, RedisServer, redis_server
from testkit.relay import (
    Tenant,
    as_sent,
    connect,
    kr,
    message,
    new_tenant,
    outbox,
    published_records,
    queue_empty,
)

WORKERS = 2
CLIENTS = 3
# A loaded machine: starting the workers, a replacement after its back-off (0.5 s), Postfix
# delivering to the sink; each wait ends as soon as its condition holds.
DEADLINE = 120.0
BEFORE_KILL = 8  # messages accepted before the kill: the stream runs
AFTER_REPLACEMENT = 8  # and after both replacements: it runs on


# -- the relay --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def relay() -> Iterator[Relay]:
    """The demo relay with two workers per daemon and Redis counters, for this module."""
    if not Path("/usr/sbin/postfix").exists() or not REDIS_SERVER.exists():
        pytest.skip("Postfix and redis-server come with make test")
    run_dir = Path(tempfile.mkdtemp(prefix="kr-wp-"))  # short: unix socket paths
    try:
        with redis_server() as redis:
            yield from started(run_dir, redis)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def started(run_dir: Path, redis: RedisServer) -> Iterator[Relay]:
    """The relay in ``run_dir``, counting in ``redis``, with ``WORKERS`` workers per daemon,
    every worker ready; stopped afterwards."""
    # the daemons' user reads the Redis password: a copy of the harness's (0600, root's)
    secret = run_dir / "redis.secret"
    shutil.copyfile(redis.password_file, secret)
    smtp, submission, alt_submission, submissions, sink, policyd_metrics, milter_metrics = (
        free_ports(7))
    relay = Relay(Settings(
        run_dir=run_dir, smtp_port=smtp, submission_port=submission,
        alt_submission_port=alt_submission, submissions_port=submissions, sink_port=sink,
        policyd_metrics_port=policyd_metrics, milter_metrics_port=milter_metrics,
        pool_address="127.0.0.23", daemon_user="keyrelay",
        counters=redis.counters_settings(password_file=str(secret))), say=lambda text: None)
    try:
        relay.prepare()
        give_to_daemons(relay.settings, secret, 0o640, owner=False)
        with_workers(relay.settings.config, WORKERS)
        relay.launch()
        for name in ("milter", "policyd"):
            ready_workers(relay, name, WORKERS)
        yield relay
    finally:
        relay.stop()


def with_workers(config: Path, count: int) -> None:
    """milter.workers and policyd.workers in the demo's keyrelay.yaml (JSON is YAML), the
    file's mode and owner kept."""
    text = config.read_text()
    head = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    data = yaml.safe_load(text)
    data["milter"]["workers"] = data["policyd"]["workers"] = count
    config.write_text(head + json.dumps(data, indent=2) + "\n")


def supervisor_pid(relay: Relay, name: str) -> int:
    process = relay.children[name].process
    assert process is not None and process.poll() is None
    return process.pid


def log_text(relay: Relay, name: str) -> str:
    return (relay.settings.logs / f"{name}.log").read_text(errors="replace")


READY = {"milter": r"ready on .* \(pid (\d+)\)", "policyd": r"ready \(pid (\d+)\)"}


def ready_workers(relay: Relay, name: str, count: int) -> set[int]:
    """Wait until ``count`` live workers of daemon ``name`` logged that they are ready; their
    pids (each has its signal handling in place once it says so)."""
    found: set[int] = set()

    def all_ready() -> bool:
        supervisor = supervisor_pid(relay, name)
        ready = {int(pid) for pid in re.findall(READY[name], log_text(relay, name))}
        found.clear()
        found.update(ready & children(supervisor))
        return len(found) == count

    wait_until(all_ready, DEADLINE, f"{count} {name} workers to be ready")
    return set(found)


# -- the clients ------------------------------------------------------------------------------
@dataclass
class Outcomes:
    accepted: list[str] = field(default_factory=list)  # Message-IDs that got a 250
    refused: list[tuple[str, int, str]] = field(default_factory=list)  # (mid, code, text)
    lock: threading.Lock = field(default_factory=threading.Lock)


def send_one(relay: Relay, tenant: Tenant, subject: str, outcomes: Outcomes) -> None:
    """One message in one session; its outcome recorded: 250, or the code a step was
    refused with (AUTH, MAIL, RCPT, DATA or the end of data)."""
    mid, text = message(tenant.sender, "rcpt@example.net", subject)
    try:
        with connect(relay, "submission") as client:
            client.login("apikey", tenant.key)
            client.sendmail(tenant.sender, ["rcpt@example.net"], text)
    except smtplib.SMTPRecipientsRefused as exc:
        ((code, reply),) = exc.recipients.values()
        with outcomes.lock:
            outcomes.refused.append((mid, code, reply.decode()))
        return
    except smtplib.SMTPResponseException as exc:
        with outcomes.lock:
            outcomes.refused.append((mid, exc.smtp_code, reply_text(exc.smtp_error)))
        return
    with outcomes.lock:
        outcomes.accepted.append(mid)


def stream(relay: Relay, tenant: Tenant, outcomes: Outcomes, stop: threading.Event,
           index: int) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        send_one(relay, tenant, f"stream {index}.{n}", outcomes)


# -- the sink ---------------------------------------------------------------------------------
def flush_queue(relay: Relay) -> None:
    """``postqueue -f`` of the private instance: anything deferred is tried again now."""
    subprocess.run(["postqueue", "-c", str(relay.settings.postfix_etc), "-f"],
                   capture_output=True, check=True, timeout=60)


def delivered(relay: Relay) -> dict[str, list[bytes]]:
    """The messages at the sink by Message-ID: each one's file contents."""
    found: dict[str, list[bytes]] = {}
    for path, parsed in outbox(relay):
        dump = path.read_bytes()
        # smtp-sink writes a file as the message arrives: only whole ones count
        if "smtp-sink" in str(parsed.get("Received", "")) and b"\n\n" in dump.replace(
                b"\r\n", b"\n"):
            found.setdefault(str(parsed.get("Message-ID")), []).append(dump)
    return found


def all_delivered(relay: Relay, mids: set[str]) -> dict[str, list[bytes]]:
    """Wait until every one of ``mids`` is at the sink and Postfix's queue is empty,
    flushing the queue now and then (mail deferred after a temporary failure waits for its
    next try otherwise); what the sink holds then."""
    last_flush = [time.monotonic()]

    def arrived() -> bool:
        if mids <= delivered(relay).keys() and queue_empty(relay):
            return True
        if time.monotonic() - last_flush[0] > 5:
            flush_queue(relay)
            last_flush[0] = time.monotonic()
        return False

    wait_until(arrived, DEADLINE, f"{len(mids)} accepted messages at the sink")
    return delivered(relay)


def signed_by(relay: Relay, domain: str, dump: bytes) -> bool:
    """Both DKIM signatures (RSA and Ed25519) verify against the records keyrelay publishes."""
    records = published_records(relay, domain)

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name.decode().rstrip(".").lower())

    wire = as_sent(dump)
    signatures = [line for line in wire.split(b"\r\n") if line.startswith(b"DKIM-Signature:")]
    return len(signatures) == 2 and all(
        dkim.DKIM(wire).verify(idx=index, dnsfunc=dnsfunc) for index in range(2))


# -- the test ---------------------------------------------------------------------------------
@dataclass
class Kill:
    name: str
    victim: int
    survivors: set[int]
    mark: int  # the length of the daemon's log before the kill


def kill_one_worker(relay: Relay, name: str) -> Kill:
    """SIGKILL one worker of daemon ``name``."""
    workers = children(supervisor_pid(relay, name))
    victim = min(workers)
    kill = Kill(name, victim, workers - {victim}, len(log_text(relay, name)))
    os.kill(victim, signal.SIGKILL)
    return kill


def replaced(relay: Relay, kill: Kill) -> int:
    """Wait until the supervisor logged the death of the killed worker and runs a new, ready
    worker in its place; the new worker's pid."""
    wait_until(lambda: re.search(rf"worker \d \(pid {kill.victim}\) killed by SIGKILL .*starting "
                                 r"a new one in", log_text(relay, kill.name)[kill.mark:])
               is not None,
               DEADLINE, f"the {kill.name} supervisor to log the death of worker {kill.victim}")
    workers = ready_workers(relay, kill.name, WORKERS)
    assert kill.victim not in workers
    (new,) = workers - kill.survivors
    return new


def test_killing_a_milter_worker_and_a_policyd_worker_mid_stream_loses_no_mail(
        relay: Relay) -> None:
    tenant = new_tenant(relay)
    # the stream is not meant to meet the default rate limit (600 a minute)
    kr(relay, "limits", "set", tenant.account, "--per-minute", "100000", "--per-hour",
       "1000000")
    outcomes = Outcomes()
    stop = threading.Event()
    clients = [threading.Thread(target=stream, args=(relay, tenant, outcomes, stop, i),
                                daemon=True) for i in range(CLIENTS)]
    for client in clients:
        client.start()
    try:
        wait_until(lambda: len(outcomes.accepted) >= BEFORE_KILL, DEADLINE,
                   f"{BEFORE_KILL} messages accepted before the kill")
        kills = [kill_one_worker(relay, "milter"), kill_one_worker(relay, "policyd")]
        replacements = [replaced(relay, kill) for kill in kills]
        after = len(outcomes.accepted)
        wait_until(lambda: len(outcomes.accepted) >= after + AFTER_REPLACEMENT, DEADLINE,
                   f"{AFTER_REPLACEMENT} more messages accepted after the replacements")
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=DEADLINE)
    assert not any(client.is_alive() for client in clients)
    assert set(replacements).isdisjoint(kill.victim for kill in kills)
    for kill in kills:  # a warning each
        line = re.search(rf".*worker \d \(pid {kill.victim}\) killed by SIGKILL .*", log_text(
            relay, kill.name))
        assert line is not None and "WARNING" in line.group(0), line

    # sending works afterwards: one more message, from a quiet relay
    send_one(relay, tenant, "after the kills", outcomes)
    last = outcomes.accepted[-1]

    # nothing refused for good; every refusal temporary
    assert all(400 <= code < 500 for _, code, _ in outcomes.refused), outcomes.refused
    accepted = set(outcomes.accepted)
    assert len(accepted) == len(outcomes.accepted)  # a Message-ID per message
    assert last in accepted

    # nothing accepted lost: each at the sink exactly once, signed; nothing refused there
    at_sink = all_delivered(relay, accepted)
    for mid in accepted:
        assert len(at_sink[mid]) == 1, f"{mid} delivered {len(at_sink[mid])} times"
        assert signed_by(relay, tenant.domain, at_sink[mid][0]), f"{mid} not signed"
    refused = {mid for mid, _, _ in outcomes.refused}
    assert not refused & at_sink.keys(), refused & at_sink.keys()
