"""Which transports Postfix has: the ``unix`` services of a master.cf.

keyrelay routes a principal's mail with ``FILTER kr-pool-<pool>:``; that works only once
`keyrelay postfix apply` has written the pool's transport into master.cf. keyrelay-policyd
asks this module before it routes (policyd/transports.py; otherwise it answers 451 4.3.0,
``pool_not_in_postfix``), and the CLI before it tells the admin to run `postfix apply`.
"""

from __future__ import annotations

import os


def unix_services(text: str) -> frozenset[str]:
    """The names of master.cf's ``unix`` services (the transports FILTER can name).

    master.cf(5): a logical line starts with non-whitespace; a line that starts with
    whitespace continues it; a line whose first non-whitespace character is ``#`` is a
    comment, as is an empty line. The first two fields are the service name and its type.
    """
    found = set()
    for line in text.splitlines():
        if not line or line[0].isspace() or line.startswith("#"):
            continue
        fields = line.split(None, 2)
        if len(fields) >= 2 and fields[1] == "unix":
            found.add(fields[0])
    return frozenset(found)


def master_cf(config_dir: str) -> str:
    """The master.cf of a Postfix configuration directory."""
    return os.path.join(config_dir, "master.cf")


def read_transports(config_dir: str) -> frozenset[str] | None:
    """The unix services of ``CONFIG_DIR/master.cf``; None when it is not configured ("")
    or cannot be read."""
    if not config_dir:
        return None
    try:
        with open(master_cf(config_dir), encoding="utf-8", errors="replace") as handle:
            return unix_services(handle.read())
    except OSError:
        return None
