"""The coverage-guided fuzzer (fuzz/run.py, atheris): a smoke run of every target, so that the
harness cannot rot unnoticed, and its self-test targets, so that a finding is reported.

The long runs are ``make fuzz``; their figures are in docs/RELIABILITY.md.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz.targets import PARSERS

ROOT = Path(__file__).resolve().parent.parent
RUNS = 100
_LINE = re.compile(r"^(\S+) +(\d+) execs .* (no finding|FINDING .*)$", re.MULTILINE)


def fuzz(work: Path, *args: str) -> tuple[int, dict[str, tuple[int, str]]]:
    """fuzz/run.py's exit status and, per target, its executions and finding."""
    result = subprocess.run(
        [sys.executable, "-m", "fuzz.run", "--work-dir", str(work), *args], cwd=ROOT,
        capture_output=True, text=True, timeout=900, check=False)
    lines = {name: (int(execs), finding) for name, execs, finding in _LINE.findall(result.stdout)}
    return result.returncode, lines


def test_every_target_runs_its_inputs_and_finds_nothing(tmp_path: Path) -> None:
    # a generous hang bound per input (fuzz/run.py's default is 2 s): this smoke run looks for
    # crashes, and a loaded machine must not turn a slow input into a "hang"
    status, lines = fuzz(tmp_path, "--runs", str(RUNS), "--seed", "1", "--timeout", "60")

    assert sorted(lines) == sorted(PARSERS), lines
    assert all(execs >= RUNS and finding == "no finding" for execs, finding in lines.values())
    assert status == 0


@pytest.mark.parametrize(("target", "kind"), [
    ("selftest-crash", "crash (RuntimeError: selftest-crash: a finding on purpose)"),
    ("selftest-hang", "timeout"),
    ("selftest-oom", "oom"),
])
def test_a_finding_is_reported_with_its_input_and_exit_status_1(
        tmp_path: Path, target: str, kind: str) -> None:
    status, lines = fuzz(tmp_path, "--target", target, "--runs", "10", "--timeout", "1",
                         "--rss-limit-mb", "128")

    _, finding = lines[target]
    assert finding.startswith(f"FINDING {kind}: {tmp_path / target / 'findings'}/"), finding
    assert Path(finding.split(": ")[-1]).is_file()
    assert status == 1
