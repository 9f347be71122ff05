"""Reading ``keyrelay.yaml``: which file, and its validation against the schema.

The loader walks the schema's dataclasses (keyrelay/config/sections.py and services.py): a
new key is a new field and nothing else. Every fault is a ``ConfigError`` naming the file,
the line (keyrelay/yamlread.py), the dotted key and the reason; a ``TypeError`` from here means
the schema itself uses an unsupported type.
"""

from __future__ import annotations

import os
import types
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    Literal,
    TypeVar,
    Union,
    cast,
    get_args,
    get_origin,
    get_type_hints,
)

from ..durations import format_duration, parse_duration
from ..errors import ConfigError
from ..yamlread import got, join, unknown_key
from ..yamlread import load as load_yaml
from .base import AUTO_WORKERS, Duration, InvalidField, Workers
from .sections import Config, default_config

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

DEFAULT_CONFIG_PATH = "/etc/keyrelay/keyrelay.yaml"
CONFIG_ENV = "KEYRELAY_CONFIG"


def resolve_config_path(cli_value: str | None) -> str:
    """The config file to read: ``--config``, else ``$KEYRELAY_CONFIG``, else the default.

    An empty value counts as not given, so ``KEYRELAY_CONFIG=`` cannot select the file "".
    """
    return cli_value or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH


def load_config(path: str) -> Config:
    """Read, parse and validate the YAML file at ``path``; raise ConfigError on any fault."""
    return load_yaml(path).build(lambda data: parse_config(data, path))


def parse_config(data: object, path: str) -> Config:
    """Validate already-loaded YAML ``data``; ``path`` is only used in error messages."""
    if data is None:  # an empty file
        return default_config()
    if not isinstance(data, dict):
        raise ConfigError(path, "", f"the top level must be a mapping of keys, got {got(data)}")
    return _section(Config, data, path, "")


_D = TypeVar("_D", bound="DataclassInstance")


def _section(cls: type[_D], data: object, path: str, prefix: str) -> _D:
    """Build dataclass ``cls`` from mapping ``data``, whose dotted key is ``prefix``."""
    if data is None:  # "section:" with every key commented out loads as null
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, prefix, f"expected a mapping of keys, got {got(data)}")
    schema = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in schema:
            raise ConfigError(path, join(prefix, str(key)), unknown_key(key, schema))
    hints = get_type_hints(cls)
    values = {
        name: _value(hints[name], data[name], schema[name].metadata, path, join(prefix, name))
        for name in schema
        if name in data
    }
    try:
        return cast(Any, cls)(**values)  # type: ignore[no-any-return]
    except InvalidField as exc:
        raise ConfigError(path, join(prefix, exc.key), exc.reason) from None


def _value(tp: Any, value: object, meta: Mapping[str, Any], path: str, key: str) -> object:
    """Check ``value`` against type ``tp`` and the rules in ``meta``; return the typed value."""
    declared = tp  # kept for messages: "a duration or null", not just "a duration"

    def wrong_type() -> ConfigError:
        return ConfigError(path, key, f"expected {_describe(declared)}, got {got(value)}")

    if get_origin(tp) in (Union, types.UnionType):
        if value is None:
            return None
        tp = without_none(tp)
    result: object
    if is_dataclass(tp):
        return _section(cast(Any, tp), value, path, key)
    if tp is Duration:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise wrong_type()
        try:
            result = parse_duration(value)
        except ValueError as exc:
            raise ConfigError(path, key, str(exc)) from None
    elif tp is Workers:
        if value == "auto":
            return AUTO_WORKERS
        if isinstance(value, bool) or not isinstance(value, int) or not (
                meta["min"] <= value <= meta["max"]):
            raise ConfigError(path, key, f"must be auto (one per CPU) or a whole number of "
                              f"processes from {meta['min']} to {meta['max']}, got {got(value)}")
        return Workers(value)
    elif get_origin(tp) is Literal:
        if not any(type(value) is type(c) and value == c for c in get_args(tp)):
            raise ConfigError(path, key, f"must be {_describe(tp)}, got {got(value)}")
        result = value
    elif get_origin(tp) is tuple:
        if not isinstance(value, list | tuple):
            raise wrong_type()
        item_tp = get_args(tp)[0]
        return tuple(_value(item_tp, v, meta, path, f"{key}[{i}]") for i, v in enumerate(value))
    elif tp is bool or tp is str:
        if not isinstance(value, tp):
            raise wrong_type()
        result = value
    elif tp is int or tp is float:
        accepted = (int, float) if tp is float else (int,)
        # bool is an int subclass in Python, but `true` is not a count.
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise wrong_type()
        result = tp(value)
    else:
        raise TypeError(f"{key}: unsupported type in the config schema: {tp!r}")
    _check(result, meta, path, key, format_duration if tp is Duration else str)
    return result


def _check(value: object, meta: Mapping[str, Any], path: str, key: str, show: Any) -> None:
    """Apply the ``min``/``max``/``pattern``/``absolute_path`` rules of a field."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "min" in meta and value < meta["min"]:
            raise ConfigError(path, key, f"must be at least {show(meta['min'])}, got {show(value)}")
        if "max" in meta and value > meta["max"]:
            raise ConfigError(path, key, f"must be at most {show(meta['max'])}, got {show(value)}")
    if not isinstance(value, str) or (value == "" and meta.get("allow_empty")):
        return
    if "pattern" in meta:
        regex, description = meta["pattern"]
        if not regex.fullmatch(value):
            raise ConfigError(path, key, f"must be {description}, got {value!r}")
    if meta.get("absolute_path") and not os.path.isabs(value):
        raise ConfigError(path, key, f"must be an absolute path, got {value!r}")


def without_none(tp: Any) -> Any:
    """``X`` for ``X | None``; only optional single types are supported, so no real unions."""
    (inner,) = (arg for arg in get_args(tp) if arg is not type(None))
    return inner


def _describe(tp: Any) -> str:
    """What a value of schema type ``tp`` looks like, for "expected ..." messages."""
    if get_origin(tp) in (Union, types.UnionType):
        return f"{_describe(without_none(tp))} or null"
    if tp is Duration:
        return "a duration (seconds, or a string such as 72h)"
    if tp is Workers:
        return "auto or a whole number"
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(choice) for choice in get_args(tp))
    if get_origin(tp) is tuple:
        return f"a list (each item {_describe(get_args(tp)[0])})"
    if is_dataclass(tp):
        return "a mapping of keys"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, repr(tp))
