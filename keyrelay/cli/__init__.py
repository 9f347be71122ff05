"""``keyrelay``: the admin command line for accounts, subusers, keys, domains, senders and pools.

Exit codes: 0 done, 1 refused or failed (one line on stderr says why), 2 usage error.
Every change is written atomically to the directory and appended to the audit log.

One module per command group registers its arguments beside its handlers (``register``);
``core`` holds what they share (``Context``, the retries of a conflicting write). Handlers
parse, call ``keyrelay.admin`` (and ``dkimkeys``, ``domaincheck``, ...) and print. This module
builds the whole parser and runs a command (``main``, the console script).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from .. import __version__, usage
from ..config import Config, load_config, resolve_config_path
from ..directory import open_directory
from ..errors import ConfigError, KeyrelayError
from ..usage import ArgumentParser, echo_undecodable_arguments, error_line
from . import (
    account,
    backup,
    config,
    domain,
    init,
    ip,
    key,
    legacy,
    limits,
    lockout,
    migrate,
    monitor,
    pool,
    postfix,
    sender,
    subuser,
    suppression,
    sync,
    usage_command,
    webhook,
)
from .core import (
    CONFLICT_SECONDS,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Context,
    Handler,
    retrying_conflicts,
    run_handler,
)

__all__ = [
    "CONFLICT_SECONDS", "EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "Context", "Handler",
    "build_parser", "main", "retrying_conflicts", "run_handler",
]

_DESCRIPTION = """\
Manage the keyrelay directory: accounts and their subusers, API keys, IP access
rules, sending domains with their DKIM keys, verified single senders, outbound IP
pools, sending limits and monitor mode.

Applications log in to Postfix over TLS with username "apikey" and an API key as
the password. Principals are named ACCOUNT or ACCOUNT/SUBUSER."""

_EPILOG = """\
examples:
  keyrelay init                          # a new install: an empty directory
  keyrelay account add acme
  keyrelay subuser add acme/marketing
  keyrelay key create acme/marketing --name newsletter --expires 90d
  keyrelay pool add mkt --bind 192.0.2.10 --helo mkt.relay.example.net
  keyrelay pool assign acme/marketing mkt
  keyrelay domain add acme example.com
  keyrelay domain grant example.com acme/marketing
  keyrelay key revoke <key id>
  keyrelay postfix apply --config-dir /etc/postfix --reload

files:
  /etc/keyrelay/keyrelay.yaml   configuration (--config, or $KEYRELAY_CONFIG)
  /etc/keyrelay/directory.yaml  the directory (directory.path in the configuration)
  /etc/keyrelay/dkim/           private DKIM keys (dkim.key_dir), mode 0600

exit status:
  0 done; 1 refused or failed (one line on stderr says why); 2 usage error"""

# the command groups in the order --help lists them
_GROUPS = (init, config, account, subuser, key, ip, domain, sender, pool, limits, usage_command,
           webhook, sync, migrate, legacy, backup, postfix, monitor, lockout, suppression)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="keyrelay", description=_DESCRIPTION, epilog=_EPILOG)
    parser.add_argument("--config", metavar="PATH",
                        help="configuration file (default: $KEYRELAY_CONFIG or "
                             "/etc/keyrelay/keyrelay.yaml)")
    parser.add_argument("--version", action="version", version=f"keyrelay {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=ArgumentParser)
    for module in _GROUPS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    echo_undecodable_arguments()
    typed = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    usage.COMMAND_LINE.set(typed)
    args = parser.parse_args(typed)
    config_path = resolve_config_path(args.config)
    try:
        without_config = getattr(args, "without_config", None)
        if without_config is not None:  # `config example`
            without_config(args)
            return EXIT_OK
        loaded = _load_config(config_path)
        ctx = Context(
            config=loaded,
            config_path=config_path,
            directory=open_directory(loaded),
            now=datetime.now(UTC).replace(microsecond=0),
            out=sys.stdout,
            json=getattr(args, "json", False),
        )
        run_handler(args.handler, ctx, args)
    except KeyrelayError as exc:
        _error(str(exc), typed)
        return EXIT_FAILED
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        _error(f"cannot access{where}: {exc.strerror}", typed)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    return EXIT_OK


def _error(message: str, typed: Sequence[str]) -> None:
    """The one line of a refusal: every error goes through here, so none repeats what could
    be a secret of the command line, whatever its shape (``usage.error_line``)."""
    print(f"keyrelay: error: {error_line(message, typed)}", file=sys.stderr)


# Top-level keys of a directory file (keyrelay/directory/yamlfile.py) or a sync declaration
# that keyrelay.yaml does not have: a file with one of them was given in place of the
# configuration.
_DIRECTORY_KEYS = ("version", "accounts", "pools", "monitor")


def _load_config(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        if exc.path == path and exc.key in _DIRECTORY_KEYS:
            what = "a directory file" if exc.key == "version" else (
                "a directory file or a sync declaration")
            raise ConfigError(
                path, "", f"this is {what} (it has {exc.key}:), not keyrelay's configuration: "
                "--config (or $KEYRELAY_CONFIG) names the configuration, e.g. "
                "/etc/keyrelay/keyrelay.yaml, whose directory.path names the directory file"
            ) from None
        raise
