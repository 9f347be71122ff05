"""``keyrelay backup`` and ``keyrelay restore``: the directory and the private DKIM keys in
one archive (keyrelay/backup.py), restorable onto a new node."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .. import admin
from ..backup import (
    ARCHIVE_MODE,
    FORMAT_VERSION,
    Backup,
    clashes,
    counts,
    read_backup,
    restored_keys,
    write_backup,
)
from ..directory.model import DirectoryData
from ..errors import UserError
from ..output import dump_json
from .core import Context, command, path, warn


def _refuse_own_files(ctx: Context, output: str) -> None:
    """A backup never replaces a file keyrelay itself reads or writes (``--force`` or not):
    ``keyrelay backup directory.yaml --force`` would put the archive where the directory was."""
    target = os.path.realpath(output)
    own = {"the configuration file": ctx.config_path,
           "the audit log (logging.audit_log)": ctx.config.logging.audit_log}
    if ctx.config.directory.backend == "yaml":
        own["the directory file (directory.path)"] = ctx.config.directory.path
        own["the directory's lock file"] = ctx.config.directory.path + ".lock"
    for what, used in own.items():
        if used and os.path.realpath(used) == target:
            raise UserError(f"{output} is {what}: a backup must not replace a file keyrelay "
                            "uses; name another file")
    key_dir = os.path.realpath(ctx.config.dkim.key_dir)
    if target == key_dir or target.startswith(key_dir + os.sep):
        raise UserError(f"{output} is inside dkim.key_dir ({ctx.config.dkim.key_dir}), which "
                        "the backup reads: name a file elsewhere")


def backup_node(ctx: Context, args: argparse.Namespace) -> None:
    _refuse_own_files(ctx, args.file)
    data = ctx.read()
    if data == DirectoryData():
        warn(f"the directory {ctx.config.directory.location} is empty (or not created yet): "
             "the backup holds no records")
    made = write_backup(args.file, data, ctx.config.dkim.key_dir, ctx.config.directory.backend,
                        ctx.now, warn, force=args.force)
    if ctx.json:
        dump_json(ctx.out, {
            "archive": args.file, "mode": f"{ARCHIVE_MODE:04o}", "format_version": FORMAT_VERSION,
            "written": "atomically", "backend": made.backend, "key_dir": made.key_dir,
            **_numbers(data), "key_files": len(made.files),
        })
        return
    ctx.say(f"Backed up {counts(data)}, and {len(made.files)} DKIM key files from "
            f"{made.key_dir}, to {args.file}.")
    ctx.say(f"The archive was written atomically with mode {ARCHIVE_MODE:04o}: it holds the "
            "private DKIM keys; keep it as safe as dkim.key_dir.")


def restore_node(ctx: Context, args: argparse.Namespace) -> None:
    key_dir = ctx.config.dkim.key_dir
    ctx.check_key_dir()
    backup = read_backup(args.file, key_dir)  # checked whole: nothing written before
    existing = ctx.read()
    if existing != DirectoryData() and not args.force:
        raise UserError(
            f"the directory {ctx.config.directory.location} is not empty ({counts(existing)}): "
            "restore replaces it whole; run with --force to replace it, or restore into a "
            "fresh node")
    taken = clashes(backup, key_dir)
    if taken and not args.force:
        raise UserError(
            f"dkim.key_dir {key_dir} already holds {len(taken)} of the backup's key files "
            f"(e.g. {taken[0]}): run with --force to overwrite them")
    changes = admin.differences(existing, backup.data)
    if args.dry_run:
        _report(ctx, args, backup, changes, dry_run=True)
        return
    ctx.check_audit()
    with restored_keys(backup, key_dir, warn, ctx.named_key_files):
        with ctx.change("directory.restore", source=args.file, created=backup.created,
                        key_files=str(len(backup.files))) as data:
            changes = admin.differences(data, backup.data)
            admin.replace_all(data, backup.data)
    _report(ctx, args, backup, changes, dry_run=False)


def _numbers(data: DirectoryData) -> dict[str, int]:
    return {name: len(getattr(data, name))
            for name in ("accounts", "subusers", "keys", "domains", "senders", "pools")}


def _report(ctx: Context, args: argparse.Namespace, backup: Backup, changes: list[str],
            dry_run: bool) -> None:
    key_dir = os.path.abspath(ctx.config.dkim.key_dir)
    if ctx.json:
        dump_json(ctx.out, {
            "archive": args.file, "dry_run": dry_run, "format_version": backup.version,
            "created": backup.created, "written_by": backup.keyrelay, "backend": backup.backend,
            "key_dir_before": backup.key_dir, "key_dir": key_dir, **_numbers(backup.data),
            "key_files": len(backup.files), "changes": changes,
        })
        return
    verb = "Dry run: would restore" if dry_run else "Restored"
    ctx.say(f"{verb} {counts(backup.data)}, and {len(backup.files)} DKIM key files with their "
            f"modes, from {args.file} (made {backup.created} by keyrelay {backup.keyrelay} "
            f"from a {backup.backend} directory).")
    if backup.key_dir != key_dir:
        ctx.say(f"The selectors' key files were below {backup.key_dir}; they are named below "
                f"{key_dir} now.")
    if not dry_run:
        ctx.say("Next: keyrelay-policyd --check-config, keyrelay-milter --check-config, "
                "keyrelay postfix apply (the pools' transports), then restart the daemons.")


def register(sub: Any) -> None:
    bak = command(sub, "backup", backup_node,
                  "write the directory (from any backend) and the private DKIM keys "
                  "(dkim.key_dir, with modes and owners) to one archive (.tar.gz, mode 0600)",
                  json=True)
    bak.add_argument("file", metavar="FILE", type=path,
                     help="the archive to write, e.g. keyrelay-backup.tar.gz")
    bak.add_argument("--force", action="store_true", help="replace FILE if it exists")
    res = command(sub, "restore", restore_node,
                  "restore a `keyrelay backup` archive: the directory and the DKIM key files, "
                  "e.g. onto a new node; audited", json=True)
    res.add_argument("file", metavar="FILE", type=path, help="the archive keyrelay backup wrote")
    res.add_argument("--force", action="store_true",
                     help="replace a directory that is not empty and key files that exist")
    res.add_argument("--dry-run", action="store_true",
                     help="check the archive and say what would be restored; change nothing")
