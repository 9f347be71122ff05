"""The import rules of docs/ARCHITECTURE.md ("Import rules"), checked on the source with ``ast``.

- ``keyrelay`` (the shared core) imports neither ``policyd`` nor ``milters`` nor pymilter
  (``Milter``, ``milter``);
- ``policyd`` and ``milters`` never import each other.

Relative imports are resolved to absolute module names, so ``from ..policyd import x`` inside
``keyrelay`` counts, and so do ``importlib.import_module("...")`` / ``__import__("...")`` with a
literal name. Imports under ``if TYPE_CHECKING:`` count too: the rule is about dependencies.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKED_PACKAGES = ("keyrelay", "policyd", "milters")
FORBIDDEN: dict[str, frozenset[str]] = {
    "keyrelay": frozenset({"policyd", "milters", "Milter", "milter"}),
    "policyd": frozenset({"milters"}),
    "milters": frozenset({"policyd"}),
}


@dataclass(frozen=True)
class Source:
    module: str  # dotted name, e.g. keyrelay.directory.yamlfile
    is_package: bool  # an __init__.py: relative imports start from the module itself
    filename: str
    text: str


def sources(package: str) -> list[Source]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        found.append(
            Source(".".join(parts), is_package, str(path), path.read_text(encoding="utf-8"))
        )
    return found


def _resolve(source: Source, level: int, module: str | None) -> str | None:
    """The absolute name of ``from <level dots><module> import ...``; None beyond the top."""
    package = source.module.split(".") if source.is_package else source.module.split(".")[:-1]
    if level - 1 > len(package) - 1:
        return None
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, *(module.split(".") if module else [])])


def imported_modules(source: Source) -> list[tuple[int, str]]:
    """Every (line, absolute module name) that ``source`` imports, or may import."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source.text, filename=source.filename)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = (
                _resolve(source, node.level, node.module) if node.level else node.module
            )
            if base is None:
                found.append((node.lineno, "<relative import beyond the top-level package>"))
                continue
            found.append((node.lineno, base))
            # "from . import policyd" or "from pkg import submodule" imports a module too
            found.extend(
                (node.lineno, f"{base}.{alias.name}" if base else alias.name)
                for alias in node.names
                if alias.name != "*"
            )
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func):
            if node.args and isinstance(node.args[0], ast.Constant):
                name = node.args[0].value
                if isinstance(name, str):
                    found.append((node.lineno, name.lstrip(".")))
    return found


def _is_dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in {"__import__", "import_module"}
    return isinstance(func, ast.Attribute) and func.attr == "import_module"


def violations(source: Source) -> list[str]:
    """One message per offending import statement (its first forbidden module)."""
    forbidden = FORBIDDEN[source.module.split(".")[0]]
    first: dict[int, str] = {}
    for line, name in imported_modules(source):
        if name.startswith("<") or name.split(".")[0] in forbidden:
            first.setdefault(line, name)
    return [f"{source.filename}:{line}: {source.module} imports {name}"
            for line, name in first.items()]


# --- the rules, on the real source ----------------------------------------------------------


@pytest.mark.parametrize("package", CHECKED_PACKAGES)
def test_every_package_has_source_to_check(package: str) -> None:
    found = sources(package)
    assert any(s.module == package and s.is_package for s in found)
    if package == "keyrelay":
        # the core is many modules; an empty list would make the rule pass vacuously
        assert len(found) >= 10
        assert "keyrelay.directory.yamlfile" in {s.module for s in found}


def test_keyrelay_imports_neither_policyd_nor_milters_nor_pymilter() -> None:
    found = [v for s in sources("keyrelay") for v in violations(s)]
    assert found == []


def test_policyd_never_imports_milters() -> None:
    found = [v for s in sources("policyd") for v in violations(s)]
    assert found == []


def test_milters_never_imports_policyd() -> None:
    found = [v for s in sources("milters") for v in violations(s)]
    assert found == []


def test_checker_sees_the_real_imports_of_the_core() -> None:
    # the resolver must turn keyrelay's own relative imports into the modules they name
    yamlfile = next(s for s in sources("keyrelay") if s.module == "keyrelay.directory.yamlfile")
    names = {name for _, name in imported_modules(yamlfile)}
    assert {"keyrelay.yamlread", "keyrelay.errors", "keyrelay.keys",
            "keyrelay.directory.model"} <= names


# --- the checker itself (so the rules above cannot pass vacuously) --------------------------

VIOLATING = [
    # (module, is_package, source)
    ("keyrelay.engine", False, "import policyd\n"),
    ("keyrelay.engine", False, "import policyd.server as server\n"),
    ("keyrelay.engine", False, "from milters import dkim\n"),
    ("keyrelay.engine", False, "from milters.dkim import sign\n"),
    ("keyrelay.engine", False, "import Milter\n"),
    ("keyrelay.engine", False, "from Milter.utils import parse_addr\n"),
    ("keyrelay.engine", False, "import milter\n"),
    ("keyrelay.engine", False, "from .. import policyd\n"),
    ("keyrelay.engine", False, "from ..milters.sender import SenderMilter\n"),
    ("keyrelay.directory.model", False, "from ...policyd import auth\n"),
    ("keyrelay", True, "from .. import milters\n"),
    ("keyrelay.engine", False, "from ... import policyd\n"),  # beyond the top: also refused
    ("keyrelay.engine", False, "def f():\n    import Milter\n"),
    ("keyrelay.engine", False,
     "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from policyd import x\n"),
    ("keyrelay.engine", False, "import importlib\nm = importlib.import_module('milters.dkim')\n"),
    ("keyrelay.engine", False, "m = __import__('policyd')\n"),
    ("policyd.server", False, "import milters.dkim\n"),
    ("policyd.server", False, "from ..milters import sender\n"),
    ("policyd", True, "from ..milters import sender\n"),
    ("milters.dkim", False, "from policyd.auth import AuthService\n"),
    ("milters.dkim", False, "from .. import policyd\n"),
]


@pytest.mark.parametrize(("module", "is_package", "text"), VIOLATING)
def test_checker_flags_a_forbidden_import(module: str, is_package: bool, text: str) -> None:
    source = Source(module, is_package, f"<synthetic {module}>", text)
    assert len(violations(source)) == 1, imported_modules(source)


ALLOWED = [
    ("keyrelay.engine", False, "import yaml\nfrom . import keys\nfrom .directory import model\n"),
    ("keyrelay.directory.model", False, "from ..names import IPAddress\nfrom . import yamlfile\n"),
    ("keyrelay", True, "from .directory import open_directory\n"),
    ("keyrelay.engine", False, "import policyd_helper\nimport milters_tools\n"),  # other names
    ("policyd.server", False,
     "import asyncio\nfrom keyrelay import decisions\nfrom . import sasl\n"),
    ("policyd", True, "from .server import main\n"),
    ("milters.dkim", False, "import Milter\nfrom keyrelay.dkimkeys import DnsRecord\n"),
    ("milters", True, "from . import dkim\n"),
]


@pytest.mark.parametrize(("module", "is_package", "text"), ALLOWED)
def test_checker_accepts_an_allowed_import(module: str, is_package: bool, text: str) -> None:
    source = Source(module, is_package, f"<synthetic {module}>", text)
    assert violations(source) == []


def test_checker_resolves_relative_imports() -> None:
    module = Source("keyrelay.directory.yamlfile", False, "<synthetic>",
                    "from . import model\nfrom ..keys import KEY_ID_RE\nfrom .. import names\n")
    assert [name for _, name in imported_modules(module)] == [
        "keyrelay.directory", "keyrelay.directory.model",
        "keyrelay.keys", "keyrelay.keys.KEY_ID_RE",
        "keyrelay", "keyrelay.names",
    ]
    package = Source("keyrelay.directory", True, "<synthetic>", "from .yamlfile import x\n")
    assert imported_modules(package)[0] == (1, "keyrelay.directory.yamlfile")


# --- front ends never decide (docs/ARCHITECTURE.md, "Where each decision lives") ------------
# A front end (policyd, milters) parses, asks the engine (keyrelay.decisions), renders and
# logs. It never builds a verdict: no ``Verdict(...)``, no ``verdict._replace(...)``, and no
# import of the engine's builders and internal checks.
ENGINE_INTERNALS = ("keyrelay.decisions.verdict", "keyrelay.decisions.checks")


def verdicts_built(source: Source) -> list[str]:
    """One message per place where ``source`` builds or alters a verdict itself."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source.text, filename=source.filename)):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else (
                func.attr if isinstance(func, ast.Attribute) else "")
            if name in {"Verdict", "_replace"}:
                found.append(f"{source.filename}:{node.lineno}: {source.module} calls {name}")
    first: dict[int, str] = {}
    for line, name in imported_modules(source):
        if name.startswith(ENGINE_INTERNALS):
            first.setdefault(line, name)
    found.extend(f"{source.filename}:{line}: {source.module} imports {name}"
                 for line, name in first.items())
    return found


@pytest.mark.parametrize("package", ["policyd", "milters"])
def test_front_ends_never_build_a_verdict(package: str) -> None:
    found = [v for s in sources(package) for v in verdicts_built(s)]
    assert found == []


@pytest.mark.parametrize("text", [
    "from keyrelay.decisions import Verdict\nv = Verdict('allow', 'ok')\n",
    "import keyrelay.decisions as d\nv = d.Verdict('refuse', 'x', 550)\n",
    "def f(verdict):\n    return verdict._replace(code=451)\n",
    "from keyrelay.decisions.verdict import refuse\n",
    "from keyrelay.decisions.checks import monitored\n",
])
def test_checker_flags_a_front_end_that_builds_a_verdict(text: str) -> None:
    source = Source("policyd.policy", False, "<synthetic policyd.policy>", text)
    assert len(verdicts_built(source)) == 1


def test_checker_accepts_a_front_end_that_asks_the_engine() -> None:
    text = ("from keyrelay.decisions import Reason, decide_envelope, temporary\n"
            "v = decide_envelope(d, s, f)\nw = temporary(Reason.INTERNAL_ERROR)\n"
            "if v.action is Action.ALLOW:\n    pass\n")
    assert verdicts_built(Source("policyd.policy", False, "<synthetic>", text)) == []


# -- imports after a daemon stops being root ---------------------------------------------------
# Modules that import inside a function only on the admin CLI's paths, never in a daemon
CLI_ONLY = {
    "keyrelay.postfixconf",  # keyrelay postfix show|apply
    "keyrelay.directory.yamlrender",  # imports yamlfile, which every daemon has loaded
}


def late_imports(source: Source) -> list[tuple[int, str]]:
    """(line, module) of each import of a keyrelay module inside a function of ``source``
    (not under ``if TYPE_CHECKING:``)."""
    tree = ast.parse(source.text, filename=source.filename)
    found: list[tuple[int, str]] = []
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(source, node.level, node.module) if node.level else node.module
                if base and base.split(".")[0] in CHECKED_PACKAGES:
                    found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
            elif isinstance(node, ast.Import):
                found += [(node.lineno, a.name) for a in node.names
                          if a.name.split(".")[0] in CHECKED_PACKAGES]
    return found


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def test_every_late_import_of_a_daemon_is_loaded_before_it_drops_root() -> None:
    """A module first imported after a daemon became its user fails in a fresh clone (the
    virtual environment in a folder of mode 0700): each one must be loaded at start, by
    the entry modules or keyrelay/daemon.py's LATE_IMPORTS."""
    import subprocess
    import sys

    loaded = set(subprocess.run(
        [sys.executable, "-c", "import sys, policyd.main, milters.main, "
         "keyrelay.events.daemon, keyrelay.daemon as d; d.preload(); "
         "print('\\n'.join(sys.modules))"],
        capture_output=True, text=True, check=True, cwd=ROOT).stdout.split())
    missing = []
    for package in CHECKED_PACKAGES:
        for source in sources(package):
            if source.module in CLI_ONLY:
                continue
            for line, name in late_imports(source):
                # "from .. import admin" names a module; "from ..x import f" a name in x
                module = name if importlib.util.find_spec(name.rpartition(".")[0]) and \
                    _is_module(name) else name.rpartition(".")[0]
                if module not in loaded:
                    missing.append(f"{source.filename}:{line}: {module}")
    assert missing == [], "load these at start (keyrelay/daemon.py LATE_IMPORTS): " + \
        ", ".join(missing)
