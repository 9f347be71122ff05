"""``keyrelay monitor``: monitor mode, where would-be refusals are logged and mail passes."""

from __future__ import annotations

import argparse
from typing import Any

from .. import admin
from ..output import dump_json
from .core import Context, Handler, command, group


def monitor_set(on: bool) -> Handler:
    def handler(ctx: Context, args: argparse.Namespace) -> None:
        scope = args.account or "all accounts"
        with ctx.change("monitor.on" if on else "monitor.off", scope=scope) as data:
            admin.set_monitor(data, args.account, on)
        if on:
            ctx.say(f"Monitor mode on for {scope}: refusals are logged, and mail passes.")
        else:
            ctx.say(f"Monitor mode off for {scope}: refusals are enforced.")

    return handler


def monitor_status(ctx: Context, args: argparse.Namespace) -> None:
    data = ctx.read()
    accounts = sorted(a.name for a in data.accounts.values() if a.monitor)
    if ctx.json:
        dump_json(ctx.out, {
            "config": ctx.config.monitor_mode, "directory": data.monitor, "accounts": accounts,
        })
        return
    ctx.out.write(
        f"monitor_mode in {ctx.config_path}: {'on' if ctx.config.monitor_mode else 'off'}\n"
        f"directory-wide (keyrelay monitor on|off): {'on' if data.monitor else 'off'}\n"
        f"accounts in monitor mode: {', '.join(accounts) or '-'}\n"
    )


def register(sub: Any) -> None:
    mon = group(sub, "monitor", "monitor mode: log would-be refusals and let mail pass")
    for name, on in (("on", True), ("off", False)):
        command(mon, name, monitor_set(on),
                f"switch monitor mode {name} for ACCOUNT, or directory-wide without ACCOUNT"
                ).add_argument("account", nargs="?", metavar="ACCOUNT")
    command(mon, "status", monitor_status, "show where monitor mode is on", json=True)
