"""``keyrelay check-config`` and ``keyrelay config example``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..config import render_example
from ..counters import check_counters
from ..directorycheck import check_directory
from .core import Context, command, group


def check_config(ctx: Context, args: argparse.Namespace) -> None:
    # the daemons' --check-config make the same check of the directory
    directory = check_directory(ctx.config)
    check_counters(ctx.config)  # Redis: a real connection, login and write
    ctx.say(f"{ctx.config_path}: OK; directory {ctx.config.directory.location}: "
            f"{len(directory.accounts)} accounts, {len(directory.keys)} keys, "
            f"{len(directory.domains)} domains")


def config_example(args: argparse.Namespace) -> None:
    """Needs no configuration file (run before one is loaded)."""
    sys.stdout.write(render_example())


def register(sub: Any) -> None:
    command(sub, "check-config", check_config,
            "validate the configuration and the directory (the daemons' own check); exit 1 "
            "on any error")
    config = group(sub, "config", "show configuration help")
    command(config, "example", None,
            "print the annotated example configuration with every key and its default"
            ).set_defaults(without_config=config_example)
