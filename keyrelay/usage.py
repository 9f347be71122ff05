"""How every keyrelay program takes its arguments: a usage error is one printable line that
repeats nothing that could be a secret, a value may start with "-", and an argument that is
not UTF-8 can be echoed on stdout.

argparse echoes some arguments as they came (``unrecognized arguments: ...``): a newline or
an escape sequence in one would split the error over several lines or drive the terminal,
and an API key pasted in the wrong place would be printed back.
"""

from __future__ import annotations

import argparse
import contextvars
import io
import re
import sys
from collections.abc import Iterable
from typing import Any, NoReturn

from .errors import one_line, printable
from .keys import hide_secrets, holds_secret

# An argument that starts with "-" and a digit is a value, never an option (no keyrelay
# option looks like that): `--expires -5d` gives "-5d" to --expires, which refuses it
# clearly, where argparse took it for an option and said "expected one argument".
_VALUE_WITH_MINUS = re.compile(r"^-\d")


def error_line(message: str, typed: Iterable[str] = ()) -> str:
    """An error message as a program prints it: one printable line, with everything that
    could be a secret hidden (``keys.hide_secrets``; ``typed``: the command line)."""
    return hide_secrets(one_line(message), typed)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with descriptions kept as written, values that may start with "-" and a
    digit, and usage errors in one printable line that hides what could be a secret; the
    exit status of a usage error stays argparse's 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _VALUE_WITH_MINUS

    def _parse_optional(self, arg_string: str) -> Any:
        # an API key's secret may start with "-" (base64url): pasted where a value belongs it
        # is that value, which the command then refuses without repeating it, never an
        # unknown option (argparse: "the following arguments are required")
        if ("=" not in arg_string and arg_string not in self._option_string_actions
                and holds_secret(arg_string)):
            return None
        return super()._parse_optional(arg_string)

    def error(self, message: str) -> NoReturn:
        # argparse quotes arguments as they came: hide what could be a secret among the
        # arguments being parsed (``COMMAND_LINE``, set by the caller of parse_args; else the
        # console script's own sys.argv)
        argv = COMMAND_LINE.get()
        super().error(printable(hide_secrets(message, sys.argv[1:] if argv is None else argv)))


# The arguments an in-process ``main(argv)`` is parsing, for ArgumentParser.error.
COMMAND_LINE: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "COMMAND_LINE", default=None)


def echo_undecodable_arguments() -> None:
    """Let stdout write back arguments that are not UTF-8, e.g. a file name in another
    encoding. Python hands them over as lone surrogates, which the strict UTF-8 stdout of
    a UTF-8 locale other than C.UTF-8 cannot encode: ``export -o`` wrote its file, then
    died with a traceback saying where. ``surrogateescape`` writes the original bytes, as
    Python does under C.UTF-8 (stderr already escapes them: backslashreplace)."""
    if isinstance(sys.stdout, io.TextIOWrapper) and sys.stdout.errors == "strict":
        sys.stdout.reconfigure(errors="surrogateescape")
