"""keyrelay's benchmarks and the fault-injection soak (bench/README.md), each a module run
from the repository root as ``.venv/bin/python -m bench.NAME`` (``--help``); what they share
is in testkit/. Not shipped in the wheel."""
