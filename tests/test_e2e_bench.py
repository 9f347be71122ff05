"""A smoke run of the end-to-end benchmark (bench/e2e_bench.py): it runs, every message it
sent is counted at the sink, and the keyrelay-redis setup counts in its Redis. The figures
themselves are the full benchmark's business (make bench, docs/BENCHMARKS.md), never asserted
here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# setup.cfg's 300 s per test is too short here: its benchmark may take 600 s (the subprocess
# timeout)
TIMEOUT = pytest.mark.timeout(900)
pytestmark = [TIMEOUT, pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/usr/sbin/postfix").exists(),
    reason="the benchmark starts a private Postfix as root (make test installs Postfix)")]


@pytest.mark.slow
def test_a_small_run_counts_every_message_at_the_sink_exactly_once(tmp_path: Path) -> None:
    runs_file, report_file, chart = (tmp_path / "runs.json", tmp_path / "report.md",
                                     tmp_path / "chart.png")
    result = subprocess.run(
        [sys.executable, "-m", "bench.e2e_bench", "--setup", "baseline", "--setup", "keyrelay",
         "--setup", "keyrelay-redis", "--size", "2000", "--size", "30000", "--repeat", "1",
         "--messages", "24",
         "--per-session", "4", "--concurrency", "3", "--connection-cost", "6",
         "--paced-seconds", "1", "--warmup", "2", "--accounts", "2", "--subusers", "1",
         "--json", str(runs_file), "--markdown", str(report_file), "--chart", str(chart)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr

    runs = json.loads(runs_file.read_text())
    shapes = sorted((r["setup"], r["size"], r["per_session"], r["paced_rate"] is not None)
                    for r in runs)
    assert shapes == [("baseline", 2000, 1, False), ("baseline", 2000, 4, False),
                      ("baseline", 2000, 4, True), ("baseline", 2000, 4, True),
                      ("baseline", 30000, 4, False), ("keyrelay", 2000, 1, False),
                      ("keyrelay", 2000, 4, False), ("keyrelay", 2000, 4, True),
                      ("keyrelay", 30000, 4, False), ("keyrelay-redis", 2000, 1, False),
                      ("keyrelay-redis", 2000, 4, False), ("keyrelay-redis", 30000, 4, False)]
    for run in runs:
        assert run["errors"] == {}, run
        assert run["accepted"] == run["delivered"] == run["messages"], run
        assert (run["lost"], run["duplicated"], run["unexpected"], run["unsigned"]) == (
            0, 0, 0, 0), run
        assert run["cpu_ms"]["postfix"] > 0 and run["peak_rss_mb"]["policyd"] > 0, run
    assert all("milter" in r["cpu_ms"] for r in runs if r["setup"].startswith("keyrelay"))
    # the Redis setup's policyd counted in its redis-server (rate windows, recent logins)
    assert all(r["redis_keys"] > 0 and "redis" in r["cpu_ms"]
               for r in runs if r["setup"] == "keyrelay-redis")

    report = report_file.read_text()
    assert "| keyrelay complete |" in report and "#### Targets" in report
    assert "| keyrelay complete, Redis counters |" in report
    assert "keyrelay complete with Redis counters at " in report
    assert "lost, duplicated, unexpected or unsigned messages in all 12 runs: 0" in report
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the principals' keys are in the bench's directory only, never in what it prints
    assert not re.search(r"kr\.[a-z0-9]+\.", result.stdout + result.stderr + report)


def test_docs_section_replaces_only_its_own_markers(tmp_path: Path) -> None:
    from bench.e2e_bench import write_docs

    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n<!-- e2e_bench:start -->\nthe full run\n"
                   "<!-- e2e_bench:end -->\n\n## Later section\n\nkept\n")
    write_docs("first redis run\n", "e2e_bench_redis", doc)
    write_docs("second redis run\n", "e2e_bench_redis", doc)
    text = doc.read_text()
    assert "<!-- e2e_bench:start -->\nthe full run\n<!-- e2e_bench:end -->" in text
    assert "## Later section\n\nkept\n" in text
    assert ("<!-- e2e_bench_redis:start -->\nsecond redis run\n<!-- e2e_bench_redis:end -->"
            in text)
    assert "first redis run" not in text and text.count("e2e_bench_redis:start") == 1
