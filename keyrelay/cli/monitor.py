"""``keyrelay monitor``: monitor mode, where would-be refusals are logged and mail passes.

An account is in monitor mode when any of three flags says so (keyrelay/decisions/checks.py,
``monitored``): ``monitor_mode`` in keyrelay.yaml, the directory-wide flag, or the account's
own flag. ``monitor off`` changes only directory flags, so it says what stays in monitor mode
after it, and names the configuration file when that is the flag left on: what the command
prints is what the daemons will do.
"""

from __future__ import annotations

import argparse
from typing import Any

from .. import admin
from ..directory.model import DirectoryData
from ..errors import UserError
from ..output import dump_json
from .core import Context, Handler, command, group


def monitor_set(on: bool) -> Handler:
    def handler(ctx: Context, args: argparse.Namespace) -> None:
        every = getattr(args, "all", False)
        if every and args.account:
            raise UserError("monitor off: give ACCOUNT or --all, not both (--all ends the "
                            "directory-wide flag and every account's own)")
        scope = args.account or "all accounts"
        audited = "all accounts and their own flags" if every else scope
        with ctx.change("monitor.on" if on else "monitor.off", scope=audited) as data:
            admin.set_monitor(data, args.account, on)
            if every:
                for name in data.accounts:
                    admin.set_monitor(data, name, False)
        if on:
            ctx.say(f"Monitor mode on for {scope}: refusals are logged, and mail passes.")
        else:
            ctx.say(monitor_off_said(ctx, data, args.account))

    return handler


def monitor_off_said(ctx: Context, data: DirectoryData, account: str | None) -> str:
    """What ``monitor off`` did, and what it left in monitor mode (and why)."""
    config_on = ctx.config.monitor_mode
    config_flag = (f"monitor_mode: true in {ctx.config_path}, which this command cannot change "
                   "(set it to false there and reload the daemons)")
    if account is not None:
        still = [config_flag] if config_on else []
        if data.monitor:
            still.append("directory-wide monitor mode is on (keyrelay monitor off)")
        if not still:
            return f"Monitor mode off for {account}: refusals are enforced."
        return (f"Monitor flag of {account} off, but {account} stays in monitor mode (refusals "
                f"logged, mail passes): {'; and '.join(still)}.")
    if config_on:
        return ("Directory-wide monitor mode off, but every account stays in monitor mode "
                f"(refusals logged, mail passes): {config_flag}.")
    accounts = sorted(a.name for a in data.accounts.values() if a.monitor)
    if accounts:
        return ("Directory-wide monitor mode off. Still in monitor mode by their own flag "
                f"(refusals logged, mail passes): {', '.join(accounts)}; end it with "
                "keyrelay monitor off ACCOUNT, or for every account with keyrelay monitor off "
                "--all.")
    return "Monitor mode off for all accounts: refusals are enforced."


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
    command(mon, "on", monitor_set(True),
            "switch monitor mode on for ACCOUNT, or directory-wide without ACCOUNT"
            ).add_argument("account", nargs="?", metavar="ACCOUNT")
    off = command(mon, "off", monitor_set(False),
                  "switch monitor mode off for ACCOUNT, or directory-wide without ACCOUNT "
                  "(--all: every account's own flag too); says what stays in monitor mode")
    off.add_argument("account", nargs="?", metavar="ACCOUNT")
    off.add_argument("--all", action="store_true",
                     help="also end every account's own monitor flag")
    command(mon, "status", monitor_status, "show where monitor mode is on", json=True)
