"""The argument parser of every keyrelay program: a usage error is one printable line.

argparse echoes some arguments as they came (``unrecognized arguments: ...``): a newline or
an escape sequence in one would split the error over several lines or drive the terminal.
"""

from __future__ import annotations

import argparse
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
