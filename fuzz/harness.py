"""One atheris target under libFuzzer, in this process (fuzz/run.py starts one per target).

    python -m fuzz.harness TARGET [--peak-bytes=N] [LIBFUZZER_OPTION | CORPUS_DIR | INPUT]...

Only the functions of the target's ``instrument`` modules (and their submodules) are
instrumented for coverage, after an ordinary import: atheris's import hook can only select
whole top-level packages, and instrumenting all of keyrelay and Python's email package for a
netstring reader would cost seconds of start-up and guide nothing. With ``--peak-bytes=N``
every input also runs under fuzz.checks.peak_allocation_below(N). Everything else goes to
libFuzzer: a crash, a timeout or an out-of-memory ends the run with libFuzzer's report and
exit status.
"""

from __future__ import annotations

import gc
import sys
import types

import atheris

from fuzz import checks, entries
from fuzz.targets import TARGETS


def instrument(modules: tuple[str, ...]) -> int:
    """Add atheris's coverage and comparison hooks to every function defined in ``modules``
    or their submodules; the number of functions."""
    def wanted(name: str) -> bool:
        return any(name == m or name.startswith(m + ".") for m in modules)

    functions = [f for f in gc.get_objects()
                 if isinstance(f, types.FunctionType) and wanted(f.__module__ or "")]
    for function in functions:
        atheris.instrument_func(function)
    return len(functions)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: python -m fuzz.harness TARGET [LIBFUZZER_ARGS...]; "
                 f"targets: {', '.join(TARGETS)}")
    target = TARGETS[argv[1]]
    peak = [int(a.split("=", 1)[1]) for a in argv[2:] if a.startswith("--peak-bytes=")]
    rest = [a for a in argv[2:] if not a.startswith("--peak-bytes=")]
    count = instrument(target.instrument)
    print(f"INFO: keyrelay: instrumented {count} functions of "
          f"{', '.join(target.instrument) or 'nothing'}", file=sys.stderr)
    entry = entries.build(target.name)
    if peak:
        entry = checks.memory_bounded(peak[0])(entry)
    atheris.Setup([argv[0], *rest], entry)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
