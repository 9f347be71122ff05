"""Coverage-guided fuzzing (atheris/libFuzzer) of every parser of peer or untrusted input.

NAME
    run.py - run keyrelay's atheris targets, one process per target, one target at a time

SYNOPSIS
    .venv/bin/python -m fuzz.run [--target NAME|all]... (--runs N | --seconds S)
        [--timeout S] [--rss-limit-mb MB] [--peak-mb MB] [--max-len BYTES] [--seed N]
        [--work-dir DIR] [--fresh]

DESCRIPTION
    Each target feeds libFuzzer's inputs to one parser the way its daemon or command reads
    them, and checks what fuzz/checks.py promises for it (the same checks as the hypothesis
    properties in tests/test_fuzz_parsers.py): the parser answers, or refuses with its own
    error type, which the daemons turn into a clean answer or a closed connection and the
    CLI into one error line. Anything else is a FINDING:

      crash    an exception other than the parser's own error, or a wrong answer
               (fuzz.checks.Finding: e.g. a request that comes out differently when sent a
               few bytes at a time, a dovecot reply of more than one line, or more memory
               allocated for one input than --peak-mb)
      timeout  one input took longer than --timeout seconds (a hang)
      oom      the process grew past --rss-limit-mb (a memory blow-up)

    libFuzzer stops a target at its first finding and writes the input to
    WORK/TARGET/findings/ (crash-*, timeout-*, oom-*; not committed). Reproduce one (from
    the repository root) with
        .venv/bin/python -m fuzz.harness TARGET WORK/TARGET/findings/crash-...

    Each target starts from its seeds in fuzz/corpus/TARGET/ (valid inputs, committed) and
    the inputs earlier runs found interesting in WORK/TARGET/corpus/ (not committed), where
    libFuzzer adds new ones. libFuzzer's output is in WORK/TARGET/libfuzzer.log (follow a
    long run with tail -f).

TARGETS
{targets}

OPTIONS
    --target NAME   a target above, or "all" (every parser target, not the self-tests);
                    repeatable; default: all
    --runs N        run N inputs per target (libFuzzer -runs=N)
    --seconds S     run each target for S seconds (libFuzzer -max_total_time=S)
    --timeout S     an input running longer is a hang (libFuzzer -timeout; default: 2)
    --rss-limit-mb MB
                    the process growing past MB is a memory blow-up (libFuzzer
                    -rss_limit_mb; default: 384). A target runs at about 70 MB (Python,
                    atheris, keyrelay and its libraries); an input is at most max_len bytes
                    and each parser keeps one request or document at a time, so a few MB
                    more is all it needs. 384 MB, about five times that, leaves room for
                    libFuzzer's growing corpus and the allocator's slack over a long run,
                    and still catches an input that makes a parser take hundreds of MB
                    (libFuzzer's own default, 2048 MB, would let a 2 GB blow-up pass).
    --peak-mb MB    also fail an input whose Python allocations peak more than MB above the
                    start (tracemalloc, fuzz.checks.peak_allocation_below): the per-input
                    bound of the hypothesis properties; makes a target 2 to 3 times slower
                    and, with tracemalloc's own bookkeeping, about 110 MB bigger (still
                    well below the default RSS limit); default: off (0)
    --max-len BYTES longest input (libFuzzer -max_len; default: the target's, above)
    --seed N        libFuzzer's random seed (default: libFuzzer picks one and logs it)
    --work-dir DIR  corpus, findings and logs (default: fuzz/work/)
    --fresh         forget WORK/TARGET/corpus/ first: start from the seeds alone

OUTPUT
    One line per target: executions, wall-clock seconds (start-up included), executions per
    second, coverage (libFuzzer's "cov": edges of the instrumented modules reached; "ft":
    features), the corpus size, libFuzzer's peak RSS and the finding, if any, with the
    input's file.

EXAMPLES
    make fuzz                                         # every target, 240 s each
    make fuzz FUZZ_SECONDS=600                        # every target, 600 s each
    .venv/bin/python -m fuzz.run --runs 100           # a smoke run (make test does this)
    .venv/bin/python -m fuzz.run --target header --seconds 600 --peak-mb 8
    .venv/bin/python -m fuzz.harness header fuzz/work/header/findings/crash-0a1b...

EXIT STATUS
    0  every target ran and found nothing
    1  a finding in at least one target
    2  usage error, or a target did not run (no libFuzzer statistics)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from fuzz.targets import FUZZ_DIR, PARSERS, TARGETS, Target

ROOT = FUZZ_DIR.parent
DEFAULT_TIMEOUT = 2
DEFAULT_RSS_LIMIT_MB = 384
# libFuzzer itself may stop only after the input running at the deadline: allow for it, and for
# the target's start-up (atheris instruments its modules first: up to about 10 s).
GRACE_SECONDS = 120

_COVERAGE = re.compile(rb"^#(\d+)\s+\S+\s+cov: (\d+) ft: (\d+) corp: (\d+)/", re.MULTILINE)
_STAT = re.compile(rb"^stat::(\w+):\s+(\d+)", re.MULTILINE)
_ARTIFACT = re.compile(rb"Test unit written to (\S+)")
_KINDS = (
    (b"ERROR: libFuzzer: timeout", "timeout"),
    (b"ERROR: libFuzzer: out-of-memory", "oom"),
    (b"ERROR: libFuzzer: fuzz target exited", "crash"),
    (b"ERROR: libFuzzer: deadly signal", "crash"),
    (b"ERROR: libFuzzer:", "crash"),
)


@dataclass
class Result:
    target: str
    status: int
    seconds: float
    executions: int | None = None
    coverage: int | None = None
    features: int | None = None
    corpus: int | None = None
    peak_rss_mb: int | None = None
    finding: str | None = None
    artifact: str | None = None

    @property
    def ran(self) -> bool:
        return self.executions is not None

    def line(self) -> str:
        if self.executions is None:
            return f"{self.target:<12} did not run (exit {self.status}): see its libfuzzer.log"
        rate = self.executions / self.seconds if self.seconds else 0.0
        text = (f"{self.target:<12} {self.executions:>9} execs {self.seconds:>7.1f} s "
                f"{rate:>7.0f}/s  cov {self.coverage} ft {self.features} "
                f"corpus {self.corpus}  rss {self.peak_rss_mb} MB  ")
        if self.finding:
            return text + f"FINDING {self.finding}: {self.artifact or '(no input written)'}"
        return text + "no finding"


def parse_log(target: str, status: int, seconds: float, log: bytes) -> Result:
    """Figures and finding from libFuzzer's output (with -print_final_stats=1)."""
    result = Result(target, status, seconds)
    stats = {name.decode(): int(value) for name, value in _STAT.findall(log)}
    if "number_of_executed_units" in stats:
        result.executions = stats["number_of_executed_units"]
        result.peak_rss_mb = stats.get("peak_rss_mb")
    pulses = _COVERAGE.findall(log)
    if pulses:
        _, cov, ft, corp = pulses[-1]
        result.coverage, result.features, result.corpus = int(cov), int(ft), int(corp)
    for marker, kind in _KINDS:
        if marker in log:
            result.finding = kind
            break
    if result.finding is None and status != 0 and result.ran:
        result.finding = f"exit status {status}"
    if result.finding == "crash":
        exception = re.search(rb"=== Uncaught Python exception: ===\n(.*)\n", log)
        if exception:
            result.finding = f"crash ({exception.group(1).decode(errors='replace')[:120]})"
    artifact = _ARTIFACT.search(log)
    if artifact:
        result.artifact = artifact.group(1).decode(errors="replace")
    return result


def run_target(target: Target, args: argparse.Namespace, work: Path) -> Result:
    folder = work / target.name
    corpus, findings = folder / "corpus", folder / "findings"
    if args.fresh:
        shutil.rmtree(corpus, ignore_errors=True)
    corpus.mkdir(parents=True, exist_ok=True)
    findings.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "fuzz.harness", target.name,
        f"-rss_limit_mb={args.rss_limit_mb}", f"-timeout={args.timeout}",
        f"-max_len={args.max_len or target.max_len}", f"-artifact_prefix={findings}/",
        "-print_final_stats=1",
    ]
    if args.peak_mb:
        command.append(f"--peak-bytes={args.peak_mb << 20}")
    if args.runs is not None:
        command.append(f"-runs={args.runs}")
        limit = None
    else:
        command.append(f"-max_total_time={args.seconds}")
        limit = args.seconds + GRACE_SECONDS
    if args.seed is not None:
        command.append(f"-seed={args.seed}")
    command += [str(corpus), str(target.seeds)] if target.seeds.is_dir() else [str(corpus)]
    log_path = folder / "libfuzzer.log"
    # The files a target writes per input (fuzz.checks.scratch_folder) go to memory where
    # there is /dev/shm; libFuzzer ends the process without Python's clean-up, so remove them
    # here.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # noqa: S108 - mkdtemp in it
    with (tempfile.TemporaryDirectory(prefix=f"keyrelay-fuzz-{target.name}-", dir=shm)
          as scratch, open(log_path, "wb") as log):
        env = {**os.environ, "TMPDIR": scratch}  # -m from ROOT: fuzz is importable
        started = time.monotonic()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
        try:
            status = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            process.kill()
            status = process.wait()
            log.write(b"\nERROR: libFuzzer: timeout (run.py: the whole run overran)\n")
        seconds = time.monotonic() - started
    return parse_log(target.name, status, seconds, log_path.read_bytes())


def _targets_help() -> str:
    lines = []
    for target in TARGETS.values():
        text = f"{target.name} (max_len {target.max_len}): {target.summary}"
        lines += textwrap.wrap(text, 88, initial_indent="    ", subsequent_indent="        ")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fuzz.run",
        description=__doc__.format(targets=_targets_help()) if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=argparse.SUPPRESS,
    )
    parser.add_argument("--target", action="append", choices=[*TARGETS, "all"],
                        metavar="NAME")
    amount = parser.add_mutually_exclusive_group(required=True)
    amount.add_argument("--runs", type=int, metavar="N")
    amount.add_argument("--seconds", type=int, metavar="S")
    parser.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT, metavar="S")
    parser.add_argument("--rss-limit-mb", type=int, default=DEFAULT_RSS_LIMIT_MB, metavar="MB")
    parser.add_argument("--peak-mb", type=int, default=0, metavar="MB")
    parser.add_argument("--max-len", type=int, metavar="BYTES")
    parser.add_argument("--seed", type=int, metavar="N")
    parser.add_argument("--work-dir", type=Path, default=FUZZ_DIR / "work", metavar="DIR")
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args(argv)
    names = args.target or ["all"]
    args.targets = [TARGETS[n] for n in dict.fromkeys(
        n for name in names for n in (PARSERS if name == "all" else [name]))]
    for option in ("runs", "seconds", "timeout", "rss_limit_mb"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work_dir.resolve()
    amount = f"{args.runs} runs" if args.runs is not None else f"{args.seconds} s"
    print(f"fuzzing {len(args.targets)} target(s), {amount} each; -timeout={args.timeout} "
          f"-rss_limit_mb={args.rss_limit_mb}" + (f", peak {args.peak_mb} MB per input"
                                                   if args.peak_mb else "")
          + f"; work dir {work}", flush=True)
    results = []
    for target in args.targets:
        result = run_target(target, args, work)
        print(result.line(), flush=True)
        results.append(result)
    if any(r.finding for r in results):
        return 1
    if not all(r.ran for r in results):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
