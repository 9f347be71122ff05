"""The benchmarks' CPU accounting (testkit/stats.py, used by bench/postfix_milter_bench.py and
bench/e2e_bench.py): exact, not in clock ticks. A short run of Postfix spreads a few
milliseconds over several processes; counted in 10 ms ticks that read 0 (issue 18)."""

from __future__ import annotations

import subprocess
import sys

from testkit.stats import process_cpu_ns, process_tree_cpu

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
