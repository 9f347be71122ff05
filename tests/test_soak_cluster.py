"""A short fault-injection soak of two relay nodes sharing one slapd and one redis-server
(bench/soak_cluster.py): 1,000 messages, half of every round through each node's real
Postfix, while redis-server is killed, hung and stopped (and started again empty) and one
node's keyrelay-policyd is killed and restarted. Every accepted message must arrive exactly
once and signed; no valid message may get a permanent answer; while Redis is away the
answer is temporary (451 4.3.0) and the message is sent again. A full run's figures are in
docs/RELIABILITY.md."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from test_soak import MAX_SECONDS, REPO, SUBPROCESS_SECONDS
from test_soak import pytestmark as soak_marks

from testkit.redis import REDIS_SERVER
from testkit.slapd import SLAPD

pytestmark = [*soak_marks, pytest.mark.skipif(
    not (SLAPD.exists() and REDIS_SERVER.exists()),
    reason="slapd or redis-server is not installed (make test installs them)")]

MESSAGES = 1000


@pytest.mark.slow
def test_a_short_two_node_soak_keeps_every_promise_while_redis_fails() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.soak_cluster", "--messages", str(MESSAGES),
         "--faults-every", "0.5", "--fault-seconds", "8", "--concurrency", "3",
         "--max-seconds", str(MAX_SECONDS)],
        cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_SECONDS)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "RESULT: every promise kept" in output
    assert f"accepted by the relay           {MESSAGES}\n" in output
    assert "lost (accepted, not at sink)    0\n" in output
    assert "refused permanently (5xx)       0 \n" in output
    for fault in ("redis-server killed (SIGKILL) and started again, empty",
                  "redis-server hung (SIGSTOP) for a while",
                  "redis-server stopped (SIGTERM) and started again, empty",
                  "keyrelay-policyd killed (SIGKILL) and restarted"):
        assert fault in output, output
    # both nodes delivered part of the mail
    per_node = re.search(r"files per node \{'node-a': (\d+), 'node-b': (\d+)\}", output)
    assert per_node is not None and all(int(n) > 0 for n in per_node.groups()), output
