"""``keyrelay export``, ``import`` and ``sync``: the whole directory to and from files."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .. import admin, declare, dkimkeys
from ..decisions import EngineSettings
from ..directory import YamlDirectory
from ..directory.model import DirectoryData, SelectorState
from ..directory.yamlfile import render as render_directory
from ..errors import UserError
from ..limits import check_effective_limits
from .core import Context, command, delete_key_files, path, warn
from .pool import postfix_needs_apply


def export_directory(ctx: Context, args: argparse.Namespace) -> None:
    data = ctx.read()
    text = render_directory(data)
    if args.output in (None, "-"):
        ctx.out.write(text)
        return
    # it holds the keys' hashes: readable by the owner only
    fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    ctx.say(f"Exported {len(data.accounts)} accounts, {len(data.subusers)} subusers, "
            f"{len(data.keys)} keys, {len(data.domains)} domains, {len(data.senders)} senders "
            f"and {len(data.pools)} pools to {args.output}.")


def import_directory(ctx: Context, args: argparse.Namespace) -> None:
    new = YamlDirectory(args.file).load()  # ConfigError names the file, key and reason
    touched: tuple[set[str], set[str]] = (set(), set())
    if args.dry_run:
        changes = admin.differences(ctx.read(), new)
    else:
        with ctx.change("directory.import", source=args.file) as data:
            changes = admin.differences(data, new)
            touched = _pools_touched(data, new)
            admin.replace_all(data, new)
    _warn_missing_keys(new)
    verb = "would make" if args.dry_run else "made"
    if not changes:
        ctx.say(f"Nothing to do: the directory already equals {args.file}.")
        return
    ctx.say(f"{'Dry run: ' if args.dry_run else ''}{verb} {len(changes)} change(s):")
    for line in changes:
        ctx.say(f"  {line}")
    if not args.dry_run:
        postfix_needs_apply(ctx, *touched)


def _warn_missing_keys(data: DirectoryData) -> None:
    """An exported file names the DKIM key files but does not hold them: the domains whose
    files are not on this node cannot sign here (``keyrelay backup`` carries the keys)."""
    missing = sorted(s.key_file for d in data.domains.values() for s in d.selectors
                     if not os.path.isfile(s.key_file))
    if missing:
        warn(f"{len(missing)} DKIM key files the directory names do not exist on this node "
             f"(e.g. {missing[0]}): their domains cannot sign here until they do; an export "
             "holds no private key: keyrelay backup and restore carry them")


def sync_directory(ctx: Context, args: argparse.Namespace) -> None:
    declared = declare.load(args.file)  # ConfigError names the file, key and reason
    existing = ctx.read()
    trial = existing.copy()  # refuse a clash before any DKIM key is made
    declare.apply(trial, declared, ctx.now, {n: () for n in declared.new_domains(existing)})
    _check_limits(ctx, declared, trial)
    changes = admin.differences(existing, trial)
    if not changes:
        ctx.say(f"Nothing to do: the directory already holds what {args.file} declares.")
        return
    if args.dry_run:
        ctx.say(f"Dry run: would make {len(changes)} change(s):")
        for line in changes:
            ctx.say(f"  {line}")
        return
    with ctx.new_keys(making=bool(declared.new_domains(existing))) as keys:
        made = {
            name: keys.create(
                name, dkimkeys.selector_names(ctx.config.dkim.selector_prefix, ctx.now, set()),
                SelectorState.ACTIVE, ctx.now)
            for name in declared.new_domains(existing)
        }
        with ctx.change("directory.sync", keys=keys, source=args.file) as data:
            before = data.copy()
            removed = declare.apply(data, declared, ctx.now, made)
            _check_limits(ctx, declared, data)
            changes = admin.differences(before, data)
    delete_key_files([s.key_file for dom in removed for s in dom.selectors])
    ctx.say(f"Made {len(changes)} change(s):")
    for line in changes:
        ctx.say(f"  {line}")
    used, changed = _pools_touched(before, data)
    postfix_needs_apply(ctx, used, changed)
    for name in made:
        ctx.say(f"Domain {name} is pending: publish its records (keyrelay domain dns {name}), "
                f"then run keyrelay domain verify {name}.")


def _pools_touched(before: DirectoryData, after: DirectoryData) -> tuple[set[str], set[str]]:
    """(pools added or newly assigned to a principal, pools whose bind or HELO changed):
    what Postfix may lack until `keyrelay postfix apply`."""
    used = set(after.pools) - set(before.pools)
    for now, then in ((after.accounts, before.accounts), (after.subusers, before.subusers)):
        for name, record in now.items():
            old = then.get(name)
            if record.pool and (old is None or old.pool != record.pool):
                used.add(record.pool)
    changed = {name for name, pool in after.pools.items()
               if name in before.pools and (before.pools[name].bind, before.pools[name].helo)
               != (pool.bind, pool.helo)}
    return used, changed


def _check_limits(ctx: Context, declared: declare.Declaration, data: DirectoryData) -> None:
    """The limits the declaration sets must not contradict each other where they apply
    (``limits.check_effective_limits``), as with ``keyrelay limits set``."""
    pids = [p.pid for p in declared.principals if not p.absent and p.limits is not None]
    try:
        check_effective_limits(data, EngineSettings.from_config(ctx.config), pids)
    except UserError as exc:
        raise UserError(f"{declared.path}: {exc}") from None


def register(sub: Any) -> None:
    exp = command(sub, "export", export_directory,
                  "write the whole directory as a YAML directory file (from any backend); "
                  "it names the DKIM key files but holds no private key: `keyrelay backup` "
                  "makes a backup")
    exp.add_argument("--output", "-o", metavar="FILE", type=path,
                     help="write to FILE (mode 0600: it holds the keys' hashes); default: stdout")
    imp = command(sub, "import", import_directory,
                  "make the directory equal to a YAML directory file (e.g. one `keyrelay export` "
                  "wrote from another backend); a second run changes nothing")
    imp.add_argument("file", metavar="FILE", type=path)
    imp.add_argument("--dry-run", action="store_true",
                     help="list what would be added, changed and removed; change nothing")

    syn = command(sub, "sync", sync_directory,
                  "make the directory hold what a declaration file says (pools, accounts, "
                  "subusers, IP rules, senders, limits, domains; never API keys); objects it "
                  "does not name are left alone; a second run changes nothing")
    syn.add_argument("file", metavar="FILE", type=path,
                     help="the declaration (YAML); - reads standard input")
    syn.add_argument("--dry-run", action="store_true",
                     help="list what would be added, changed and removed; change nothing")
