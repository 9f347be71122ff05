"""The documents name the real commands: every `keyrelay` line of the README's shell tours
parses with the real argument parser, and docs/cli.md's command table lists every command the
CLI has, and nothing it does not. In process, nothing is run: the docs cannot drift again."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from keyrelay.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
# what the README writes in angle brackets, as a value the parser accepts
PLACEHOLDERS = {"<key id>": "abcdefgh23456789"}


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def real_commands() -> set[tuple[str, ...]]:
    """Every (command,) or (command, action) the CLI has."""
    found: set[tuple[str, ...]] = set()
    for name, sub in subcommands(build_parser()).items():
        actions = subcommands(sub)
        found |= {(name, action) for action in actions} if actions else {(name,)}
    return found


def readme_commands() -> list[str]:
    """The `keyrelay ...` lines of the README's ```sh blocks (comments removed)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line.startswith("keyrelay "):
                for placeholder, value in PLACEHOLDERS.items():
                    line = line.replace(placeholder, value)
                lines.append(line)
    return lines


def test_the_readme_has_a_cli_tour_to_check() -> None:
    assert len(readme_commands()) >= 10


@pytest.mark.parametrize("line", readme_commands())
def test_every_command_of_the_readme_tours_parses(line: str) -> None:
    try:
        build_parser().parse_args(shlex.split(line)[1:])
    except SystemExit as exc:
        pytest.fail(f"README: {line!r} is not a valid command (exit {exc.code})")


def documented_commands() -> set[tuple[str, ...]]:
    """The commands of docs/cli.md's table (section "Commands"): its first column,
    `a b ...` / `c ...` (a second form without the command word belongs to the command
    before), `on\\|off` two actions."""
    groups = {name for name, *_ in real_commands()}
    found: set[tuple[str, ...]] = set()
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    text = text.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]  # the commands
    for row in re.findall(r"^\| (`.*?`(?: / `.*?`)*) \|", text, re.M):
        group = ""
        for form in re.findall(r"`([^`]*)`", row):
            words = form.split()
            if words[0] in groups:
                group, words = words[0], words[1:]
            actions = [a for a in (words[0].split("\\|") if words else [])
                       if re.fullmatch(r"[a-z][a-z-]*", a)]
            found |= {(group, a) for a in actions} or {(group,)}
    return found


def test_docs_cli_md_lists_every_command_and_no_other() -> None:
    real, documented = real_commands(), documented_commands()
    assert sorted(real - documented) == [], "commands missing from docs/cli.md's table"
    assert sorted(documented - real) == [], "docs/cli.md names commands the CLI does not have"
