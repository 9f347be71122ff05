"""How every keyrelay program takes its arguments: a usage error is one printable line, and
an argument that is not UTF-8 can be echoed on stdout.

argparse echoes some arguments as they came (``unrecognized arguments: ...``): a newline or
an escape sequence in one would split the error over several lines or drive the terminal.
"""

from __future__ import annotations

import argparse
import io
import sys
from typing import Any, NoReturn

from .errors import printable


class ArgumentParser(argparse.ArgumentParser):
    """argparse with descriptions kept as written and usage errors in one printable line;
    the exit status of a usage error stays argparse's 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        super().error(printable(message))


def echo_undecodable_arguments() -> None:
    """Let stdout write back arguments that are not UTF-8, e.g. a file name in another
    encoding. Python hands them over as lone surrogates, which the strict UTF-8 stdout of
    a UTF-8 locale other than C.UTF-8 cannot encode: ``export -o`` wrote its file, then
    died with a traceback saying where. ``surrogateescape`` writes the original bytes, as
    Python does under C.UTF-8 (stderr already escapes them: backslashreplace)."""
    if isinstance(sys.stdout, io.TextIOWrapper) and sys.stdout.errors == "strict":
        sys.stdout.reconfigure(errors="surrogateescape")
