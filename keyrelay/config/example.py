"""The annotated example file, written from the schema: ``python -m keyrelay.config``
(postfix-conf/keyrelay.yaml.example is its output)."""

from __future__ import annotations

import json
import textwrap
import types
from dataclasses import fields, is_dataclass
from typing import TYPE_CHECKING, Any, Literal, Union, cast, get_args, get_origin, get_type_hints

from ..durations import format_duration
from .base import AUTO_WORKERS, Duration, Workers
from .loader import without_none
from .sections import Config, default_config

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_HEADER = """\
# keyrelay configuration. keyrelay programs read /etc/keyrelay/keyrelay.yaml, or the file
# named by their --config option or else by the KEYRELAY_CONFIG environment variable.
#
# Every key is shown with its default value and what it does; keep only what you change.
# A missing key, section or an empty file means the defaults. Unknown keys and wrong types are
# errors: run any keyrelay daemon with --check-config after editing, before restarting it.
# Durations are a number of seconds or a string such as 30s, 5m, 72h, 90d, 2w or 1h30m.
#
# Generated from the schema in keyrelay/config/ by `python -m keyrelay.config`; to change
# a key or its documentation, change the schema and regenerate this file.
"""


def render_example() -> str:
    """The annotated example file: every key, its default and its documentation."""
    lines = _HEADER.splitlines()
    _render(Config, default_config(), 0, lines)
    return "\n".join(lines) + "\n"


def _render(cls: type[DataclassInstance], values: object, depth: int, lines: list[str]) -> None:
    indent = "  " * depth
    hints = get_type_hints(cls)
    for i, f in enumerate(fields(cls)):
        if i or depth == 0:
            lines.append("")
        doc = f.metadata["doc"]
        tp = hints[f.name]
        if get_origin(tp) is Literal:
            doc += " One of: " + ", ".join(str(choice) for choice in get_args(tp)) + "."
        prefix = indent + "# "
        lines.extend(textwrap.wrap(doc, 96, initial_indent=prefix, subsequent_indent=prefix))
        value = getattr(values, f.name)
        if isinstance(tp, type) and is_dataclass(tp):
            lines.append(f"{indent}{f.name}:")
            _render(tp, value, depth + 1, lines)
        else:
            lines.append(f"{indent}{f.name}: {_yaml_scalar(value, tp)}")


def _yaml_scalar(value: object, tp: Any) -> str:
    """``value`` as YAML text that loads back to the same value of type ``tp``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if get_origin(tp) in (Union, types.UnionType):
        tp = without_none(tp)
    if tp is Workers and value == AUTO_WORKERS:
        return "auto"
    if tp is Duration:
        return format_duration(cast(float, value))  # always has a unit, so YAML keeps a string
    if isinstance(value, tuple):
        return "[" + ", ".join(_yaml_scalar(item, str) for item in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid YAML double-quoted scalar
    return repr(value)
