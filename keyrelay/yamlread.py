"""The one way keyrelay reads a YAML file: the configuration (keyrelay.yaml), the directory
file (directory.yaml, `keyrelay import FILE`) and a declaration (`keyrelay sync FILE`).

- Safe loading only: PyYAML's safe loader, libyaml's when PyYAML was built with it (much
  faster, and no Python recursion per nesting level).
- A key given twice in one mapping is refused: PyYAML keeps the last one silently, so a
  second ``logging:`` section would drop every setting of the first and a second ``acme:``
  under ``accounts:`` would replace the first account, keys and all. ``<<: *anchor`` merge
  keys may repeat what they merge (that is what they are for).
- Every fault is a ``ConfigError`` that reads ``FILE:LINE: KEY.PATH: reason`` on one line.
  The readers raise ``ConfigError(path, key, reason)`` from the loaded data; ``Document.build``
  adds the line of that key (or of the nearest enclosing key the file has).

The directory file is written in JSON style and read with the json module first (about 70
times faster than libyaml): JSON holds no line numbers, so only when its reader refuses it is
the text composed again as YAML to find the line.
"""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Callable, Collection, Iterator
from typing import Any, TypeVar

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import ConfigError, one_line

T = TypeVar("T")

_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE = "tag:yaml.org,2002:merge"
_STR = "tag:yaml.org,2002:str"


class _BadValue(Exception):
    """A scalar PyYAML's safe constructor refused with a plain ValueError (an impossible date
    2026-13-45, ``!!int x``): which node, and why."""

    def __init__(self, node: Node, reason: str) -> None:
        super().__init__(reason)
        self.node = node
        self.reason = reason


class _Loader(_Base):  # type: ignore[misc]  # libyaml's class is untyped
    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (_BadValue, yaml.YAMLError):
            raise
        except ValueError as exc:  # the innermost node's call sees it first
            raise _BadValue(node, str(exc)) from None


class _Duplicate(Exception):
    def __init__(self, key: str, line: int, first: int) -> None:
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


def join(prefix: str, name: str) -> str:
    """The dotted KEY.PATH of ``name`` inside ``prefix``, as every reader writes it."""
    return f"{prefix}.{name}" if prefix else name


def got(value: object) -> str:
    """What the file holds, for "expected ..., got ..." reasons: YAML words, not Python's."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__} ({value!r})"  # e.g. an unquoted date in YAML


def unknown_key(name: object, allowed: Collection[str]) -> str:
    """The reason for a key the schema does not have: a close match, then every allowed key."""
    close = difflib.get_close_matches(str(name), allowed, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key; {hint}allowed here: {', '.join(allowed)}"


class Document:
    """A loaded file: ``data`` as plain Python values, and the text to find lines in."""

    def __init__(self, path: str, text: str, data: object, root: Node | None) -> None:
        self.path = path
        self.text = text
        self.data = data
        self._root = root
        self._composed = root is not None

    def build(self, make: Callable[[Any], T]) -> T:
        """``make(self.data)``; a ConfigError it raises about this file gets its key's line."""
        try:
            return make(self.data)
        except ConfigError as exc:
            if exc.line is not None or exc.path != self.path:
                raise
            raise ConfigError(exc.path, exc.key, exc.reason, self.line_of(exc.key)) from None

    def line_of(self, key: str) -> int | None:
        """The line of dotted ``key`` (``accounts.acme.keys``, ``ip_allow[0]``; ``""``: the
        document), else of the nearest enclosing key the file has; None when unknown."""
        root = self._node()
        if root is None:
            return None
        best, best_length = None, -1
        for path, marker, _ in _walk(root, _Names()):
            if marker is None or len(path) <= best_length:
                continue
            if path == key:
                return marker.start_mark.line + 1
            if key.startswith(path) and (path == "" or key[len(path)] in ".["):
                best, best_length = marker.start_mark.line + 1, len(path)
        return best

    def _node(self) -> Node | None:
        if not self._composed:  # read as JSON: compose the same text as YAML, once
            self._composed = True
            loader = _Loader(self.text)
            try:
                self._root = loader.get_single_node()
            except (yaml.YAMLError, ValueError, RecursionError):
                self._root = None  # no line then; the reason still names the key
            finally:
                loader.dispose()
        return self._root


def read_text(path: str, *, stdin: bool = False, missing: str = "file not found") -> str:
    """The file's text; with ``stdin``, ``-`` is standard input. ConfigError says why not
    (``missing`` when the file does not exist)."""
    try:
        if stdin and path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as stream:
            return stream.read()
    except FileNotFoundError:
        raise ConfigError(path, "", missing) from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read the file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "", f"not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def load(path: str, *, stdin: bool = False, json_first: bool = False,
         missing: str = "file not found") -> Document:
    """Read and parse the file at ``path`` (see ``read_text`` and ``parse``)."""
    return parse(read_text(path, stdin=stdin, missing=missing), path, json_first=json_first)


def parse(text: str, path: str, *, json_first: bool = False) -> Document:
    """Parse ``text`` (read from ``path``, named in errors). With ``json_first``, a document
    that is JSON after its comment lines is read with the json module (what keyrelay writes);
    anything else, or JSON with a key given twice, is read as YAML."""
    if json_first:
        data = _json(text)
        if data is not None:
            return Document(path, text, data, None)
    loader = _Loader(text)
    root: Node | None = None
    try:
        root = loader.get_single_node()
        if root is None:  # an empty file, or only comments
            return Document(path, text, None, None)
        _refuse_duplicates(root)
        data = loader.construct_document(root)
    except _Duplicate as exc:
        reason = f"given twice (first at line {exc.first}); keep one"
        raise ConfigError(path, exc.key, reason, exc.line) from None
    except _BadValue as exc:
        assert root is not None  # construction comes after composing
        raise ConfigError(path, _path_of(root, exc.node), f"invalid YAML: {one_line(exc.reason)}",
                          exc.node.start_mark.line + 1) from None
    except yaml.MarkedYAMLError as exc:
        raise _syntax_error(path, root, exc) from None
    except (yaml.YAMLError, ValueError) as exc:  # not expected: every one above has a mark
        raise ConfigError(path, "", f"invalid YAML: {one_line(str(exc))}") from None
    except RecursionError:  # only PyYAML's pure Python loader recurses per nesting level
        raise ConfigError(path, "", "invalid YAML: nested too deeply") from None
    finally:
        loader.dispose()
    return Document(path, text, data, root)


def _json(text: str) -> object:
    """The document when ``text`` is a JSON object after its comment lines, else None."""
    body = text
    while body.startswith("#") or body.startswith("\n"):
        body = body.partition("\n")[2]  # keyrelay's comment header: JSON has no comments
    if not body.lstrip().startswith("{"):
        return None
    try:
        return json.loads(body, object_pairs_hook=_unique)
    except (ValueError, RecursionError):
        return None  # not strict JSON (YAML flow style), or a key twice: YAML judges it


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    mapping = dict(pairs)
    if len(mapping) != len(pairs):
        raise ValueError("a key given twice")
    return mapping


def _syntax_error(path: str, root: Node | None, exc: yaml.MarkedYAMLError) -> ConfigError:
    """``FILE:LINE: [KEY.PATH: ]invalid YAML at column C: problem (context at line N)``."""
    mark = exc.problem_mark or exc.context_mark
    problem = exc.problem or exc.context or "not a YAML document"
    if mark is None:  # PyYAML always gives one; just in case
        return ConfigError(path, "", one_line(f"invalid YAML: {problem}"))
    reason = f"invalid YAML at column {mark.column + 1}: {problem}"
    context = exc.context_mark
    if exc.problem and exc.context and context is not None and context.line != mark.line:
        reason += f" ({exc.context} at line {context.line + 1})"
    # composed already: a constructor refused a node (a tag no safe constructor knows)
    key = _path_at(root, mark.line, mark.column) if root is not None else ""
    return ConfigError(path, key, one_line(reason), mark.line + 1)


class _Names:
    """The names of mapping keys in KEY.PATHs: what the readers see (``str()`` of the loaded
    key), so ``0x10:`` is ``16`` and ``yes:`` is ``True``, as they are in the loaded data."""

    def __init__(self) -> None:
        self._constructor = SafeConstructor()

    def value(self, node: ScalarNode) -> Any:
        """The key as loaded; a scalar that does not load is its own text (for its tag)."""
        if node.tag == _STR:
            return node.value
        try:
            value = self._constructor.construct_object(node, deep=True)
            hash(value)
        except (yaml.YAMLError, ValueError, TypeError):
            return (node.tag, node.value)  # the real load refuses it, at its line
        return value

    def name(self, node: Node) -> str:
        if isinstance(node, ScalarNode):
            value = self.value(node)
            return node.value if isinstance(value, tuple) else str(value)
        return "?"  # a list or mapping as a key: the safe constructor refuses it


def _walk(root: Node, names: _Names) -> Iterator[tuple[str, Node | None, Node]]:
    """``(KEY.PATH, marker, node)`` for the document and every node under it, in document
    order. ``marker`` is where the KEY.PATH is written: a mapping's key, a list's item; None
    for a mapping merged with ``<<``, which sits at the path of the mapping merging it. A node
    repeated by an alias is walked once (anchors can even form a cycle)."""
    stack: list[tuple[str, Node | None, Node]] = [("", root, root)]
    expanded: set[int] = set()
    while stack:
        path, marker, node = stack.pop()
        yield path, marker, node
        if id(node) in expanded:
            continue
        expanded.add(id(node))
        children: list[tuple[str, Node | None, Node]] = []
        if isinstance(node, MappingNode):
            for key, value in node.value:
                if key.tag == _MERGE:
                    merged = value.value if isinstance(value, SequenceNode) else [value]
                    children += [(path, None, m) for m in merged]
                else:
                    children.append((join(path, names.name(key)), key, value))
        elif isinstance(node, SequenceNode):
            children = [(f"{path}[{i}]", item, item) for i, item in enumerate(node.value)]
        stack += reversed(children)


def _refuse_duplicates(root: Node) -> None:
    """Raise ``_Duplicate`` at the first key, in document order, that repeats an earlier key
    of its mapping (equal as loaded: ``1`` and ``0x1`` are the same key)."""
    names = _Names()
    checked: set[int] = set()
    for path, _, node in _walk(root, names):
        if not isinstance(node, MappingNode) or id(node) in checked:
            continue
        checked.add(id(node))
        first: dict[Any, Node] = {}
        for key, _value in node.value:
            if key.tag == _MERGE or not isinstance(key, ScalarNode):
                continue
            earlier = first.setdefault(names.value(key), key)
            if earlier is not key:
                raise _Duplicate(join(path, names.name(key)), key.start_mark.line + 1,
                                 earlier.start_mark.line + 1)


def _path_of(root: Node, target: Node) -> str:
    """The KEY.PATH of ``target`` under ``root`` ("" when it is not found)."""
    return next((path for path, _, node in _walk(root, _Names()) if node is target), "")


def _path_at(root: Node, line: int, column: int) -> str:
    """The KEY.PATH of the node that starts at ``line``, ``column`` (0-based), else ""."""
    for path, _, node in _walk(root, _Names()):
        if (node.start_mark.line, node.start_mark.column) == (line, column):
            return path
    return ""

