"""The transports Postfix has: the unix services of its master.cf, re-read when the file changes.

The policy service routes an allowed message with ``FILTER kr-pool-<pool>:``. When that
transport is not in master.cf (a pool added or assigned, `keyrelay postfix apply` not run
yet), Postfix would accept the message and then defer it in its queue ("connect to transport
private/kr-pool-<pool>: No such file or directory"). The engine answers ``451 4.3.0`` instead
(``pool_not_in_postfix``, docs/answers.md) when it is told which transports exist; this module
is the I/O that tells it.

Cheap: one ``stat`` of master.cf per envelope request; the file is parsed again only when its
signature (inode, size, mtime, ctime) changes, which ``postconf -M``/``-P`` edits always do.
What counts is the file, not the running Postfix: `keyrelay postfix apply --reload` writes
the transport and makes Postfix read it at once (docs/postfix.md, "One transport per IP
pool"). A master.cf that cannot be read is logged once and checks nothing: mail is then
routed as the directory says, as before.
"""

from __future__ import annotations

import logging
import os

from keyrelay.mastercf import master_cf, unix_services

log = logging.getLogger("keyrelay.policyd.policy")

_Signature = tuple[int, int, int, int]


class PostfixTransports:
    """The unix services of ``CONFIG_DIR/master.cf``; ``None`` when not known."""

    def __init__(self, config_dir: str) -> None:
        self.config_dir = config_dir
        self.path = master_cf(config_dir) if config_dir else ""
        self._signature: _Signature | None = None
        self._services: frozenset[str] | None = None
        self._problem = ""  # the last problem logged, so that it is logged once
        self._warned: set[tuple[str, _Signature | None]] = set()

    def current(self) -> frozenset[str] | None:
        """The transports master.cf names now; None when there is no file to ask (not
        configured, or unreadable: logged once)."""
        if not self.path:
            return None
        try:
            stat = os.stat(self.path)
            signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
            if signature != self._signature:
                with open(self.path, encoding="utf-8", errors="replace") as handle:
                    self._services = unix_services(handle.read())
                self._signature = signature
        except OSError as exc:
            self._signature = self._services = None
            problem = f"{self.path}: {exc.strerror or exc}"
            if problem != self._problem:
                log.warning("cannot read Postfix's master.cf (%s): pool transports are not "
                            "checked until it can be read (postfix.config_dir)", problem)
                self._problem = problem
            return None
        if self._problem:
            log.info("read %s again: pool transports are checked", self.path)
            self._problem = ""
        return self._services

    def missing(self, pool_transport: str, pool: str) -> None:
        """Log why a message was deferred: the pool's transport is not in master.cf. Once per
        transport and version of the file (a flood of retries logs one line)."""
        seen = (pool_transport, self._signature)
        if seen in self._warned:
            return
        if len(self._warned) > 1024:
            self._warned.clear()
        self._warned.add(seen)
        log.warning("pool %s has no Postfix transport %s in %s yet: run keyrelay postfix "
                    "apply --reload; its mail is answered 451 4.3.0 until then", pool,
                    pool_transport, self.path)
