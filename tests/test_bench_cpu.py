"""The benchmarks' CPU accounting (testkit/stats.py, used by bench/postfix_milter_bench.py and
bench/e2e_bench.py): exact, not in clock ticks. A short run of Postfix spreads a few
milliseconds over several processes; counted in 10 ms ticks that read 0 (issue 18).

And the load of bench/policyd_bench.py (testkit/policydload.py), whose CPU per request
compares the counter stores (issue 21): a message is an RCPT then a DATA request of one
``instance`` of its own, and the bench runs one load against memory and Redis."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.policydload import PolicydConnection
from testkit.redis import REDIS_SERVER
from testkit.stats import process_cpu_ns, process_tree_cpu

REPO = Path(__file__).resolve().parent.parent

# A child that burns a little CPU in a thread that ends, reports its own CPU time (as exact as
# the kernel keeps it), then waits to be measured.
CHILD = """
import sys, threading, time
def burn():
    start = time.thread_time()
    while time.thread_time() - start < 0.004:
        pass
worker = threading.Thread(target=burn)
worker.start()
worker.join()
print(time.process_time_ns(), flush=True)
sys.stdin.read()
"""


def test_a_few_milliseconds_of_cpu_in_a_thread_that_ended_are_counted_exactly() -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        own = int(child.stdout.readline())  # type: ignore[union-attr]
        measured = process_cpu_ns(child.pid)
        tree = process_tree_cpu(child.pid)
    finally:
        child.communicate("")
    assert measured is not None
    # the child's own figure came first, and nothing it does afterwards is work: what we
    # read is at least that, and the thread's 4 ms are in it though the thread is gone
    assert measured >= own >= 4_000_000
    assert tree >= own / 1e9


def test_a_process_that_is_gone_reads_none() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_cpu_ns(child.pid) is None


def attributes(request: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in request.decode().strip().split("\n"))


def test_the_message_stage_sends_rcpt_then_data_of_one_instance_per_message() -> None:
    issued = [(f"bench/s{i}", f"kr.key{i}.secret{i}") for i in range(5)]
    connections = [PolicydConnection("policy", "unix:/nowhere", issued, "message")
                   for _ in range(2)]
    instances = []
    for connection in connections:
        for _ in range(3):
            rcpt, data = (attributes(connection.request()) for _ in range(2))
            assert (rcpt["protocol_state"], data["protocol_state"]) == ("RCPT", "DATA")
            assert (rcpt["recipient_count"], data["recipient_count"]) == ("0", "1")
            # the same message: one instance, one login, the login's own sender domain
            assert rcpt["instance"] == data["instance"]
            assert rcpt["sasl_username"] == data["sasl_username"]
            assert rcpt["sender"] == data["sender"]
            instances.append(data["instance"])
    # every message is charged once: no instance repeats, across connections either
    assert len(set(instances)) == len(instances) == 6


@pytest.mark.slow
@pytest.mark.skipif(not REDIS_SERVER.exists(), reason="redis-server is not installed")
def test_the_policyd_bench_runs_one_load_against_memory_and_redis() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.policyd_bench", "--keys", "200", "--service", "policy",
         "--stage", "message", "--seconds", "1", "--counters", "memory", "--counters",
         "redis", "--rounds", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    # each store answered every request (an unexpected answer stops the bench), with
    # policyd's CPU per request, and the Redis one with redis-server's
    assert re.search(r"^policy message \[memory\] +\d+ req/s .* policyd CPU \d+ us/request",
                     out, re.M), out
    assert re.search(r"^policy message \[redis\] +\d+ req/s .* redis-server CPU \d+ "
                     r"us/request", out, re.M), out
    assert re.search(r"^policy +redis +\d+ +\d+%", out, re.M), out
    assert "target: redis >= 70% of memory's policy requests/s" in out

