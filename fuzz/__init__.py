"""Fuzzing of every parser that reads peer or untrusted input (issue 10; docs/RELIABILITY.md).

- ``checks``: what each parser must do with any input (answer, or refuse with its own error
  type), shared by the hypothesis properties (tests/test_fuzz_parsers.py) and the atheris
  targets, and the per-input memory bound;
- ``targets``: the atheris targets: names, what they feed, libFuzzer's input size;
- ``harness``: one target under atheris/libFuzzer (one process per target);
- ``run``: the runner (``python -m fuzz.run --help``), which ``make fuzz`` calls.
"""
