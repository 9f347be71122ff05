"""A smoke run of the end-to-end benchmark (bench/e2e_bench.py): it runs, and every message
it sent is counted at the sink. The figures themselves are the full benchmark's business
(make bench, docs/BENCHMARKS.md), never asserted here."""

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
         "--size", "2000", "--size", "30000", "--repeat", "1", "--messages", "24",
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
                      ("keyrelay", 30000, 4, False)]
    for run in runs:
        assert run["errors"] == {}, run
        assert run["accepted"] == run["delivered"] == run["messages"], run
        assert (run["lost"], run["duplicated"], run["unexpected"], run["unsigned"]) == (
            0, 0, 0, 0), run
        assert run["cpu_ms"]["postfix"] > 0 and run["peak_rss_mb"]["policyd"] > 0, run
    assert all("milter" in r["cpu_ms"] for r in runs if r["setup"] == "keyrelay")

    report = report_file.read_text()
    assert "| keyrelay complete |" in report and "#### Targets" in report
    assert "lost, duplicated, unexpected or unsigned messages in all 9 runs: 0" in report
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the principals' keys are in the bench's directory only, never in what it prints
    assert not re.search(r"kr\.[a-z0-9]+\.", result.stdout + result.stderr + report)
