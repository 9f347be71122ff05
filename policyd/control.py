"""The control socket (``policyd.control_listen``): what an admin asks the running daemon, for
``keyrelay lockout list|clear`` (docs/policyd.md, "Reading and clearing lock-outs"), and the
counts of rate limits and quotas that ``keyrelay usage`` and ``keyrelay limits set`` read
(``PEEK``; docs/cli.md, "Limits and quotas").

The line protocol is keyrelay/control.py's (the CLI's side is there too). A bad line, or one
longer than ``MAX_LINE`` (dropped, not kept, up to its end), gets one ``ERROR`` line and the
connection stays open; the limits of every connection apply (``request_timeout`` ends a line
that never ends).
Lock-outs and counts live in the counter store (keyrelay/counters: this process's memory, or
Redis shared by every node); this module only reads them (the store's ``peek``, nothing
added) and clears lock-outs, and logs every clear with who asked (the peer's uid and pid).

Whoever can connect can lift lock-outs: the socket is created under a umask that keeps
everyone else out, then given mode 0600, or 0660 and ``control_group``; it stays the starting
user's (root under systemd), never the service user's or Postfix's.
"""

from __future__ import annotations

import asyncio
import collections
import grp
import logging
import os
import socket
import struct
from datetime import UTC, datetime
from typing import Any

from keyrelay import control
from keyrelay.config import PolicydConfig
from keyrelay.control import Lockout
from keyrelay.counters import CountersUnavailable

from .auth import AuthService, client_key
from .server import Connection, Endpoint, Listener

log = logging.getLogger("keyrelay.policyd.control")


class ControlService:
    """Reads and clears the lock-outs in the counter store (``auth.context.store``, read at
    each request: the context a SIGHUP builds keeps the same store), and reads its counts.
    With Redis that is every node's: a lock-out earned through another node is listed and
    cleared here too."""

    def __init__(self, auth: AuthService) -> None:
        self.auth = auth

    async def answer(self, request: control.Request, peer: str) -> bytes:
        if request.command == "LIST":
            return control.listing(await self.lockouts())
        if request.command == "PEEK":
            try:  # the policy service charges the same store (policyd/main.py)
                return control.counts(await self.auth.context.store.peek(request.windows))
            except CountersUnavailable as exc:  # Redis away (on_unavailable: tempfail)
                return control.error(f"the counts cannot be read: {exc}")
        return control.ok(await self.clear(request.kind, request.subject, peer))

    async def lockouts(self) -> list[Lockout]:
        """Every lock-out in force, the earliest first, with wall-clock times (the store's
        clock is wall-clock seconds since the epoch, keyrelay/counters/model.py)."""
        ctx = self.auth.context
        store = ctx.store
        found = []
        for lock in await store.locked():
            trusted = (await store.clients(lock.subject, ctx.settings.trusted_for)
                       if lock.kind == "key" else None)
            found.append(Lockout(lock.kind, lock.subject, _wall(lock.since), _wall(lock.until),
                                 lock.failures, trusted))
        return sorted(found, key=lambda lockout: (lockout.since, lockout.kind, lockout.subject))

    async def clear(self, kind: str, subject: str, peer: str) -> int:
        """Forget the failures of a key id, an address (IPv6: its /64) or everyone, lifting
        their lock-outs; how many lock-outs were in force."""
        store = self.auth.context.store
        if kind == "all":
            lifted = await store.clear_all()
            what = "every address and API key"
        elif kind == "key":
            lifted = int(await store.clear("key", subject))
            what = f"API key {subject}"
        else:
            subject = subject if "/" in subject else client_key(subject)
            lifted = int(await store.clear("address", subject))
            what = f"client {subject}"
        log.warning("%s: failures forgotten, %d lock-out(s) lifted, through the control "
                    "socket by %s", what, lifted, peer)
        return lifted


def _wall(moment: float) -> datetime:
    return datetime.fromtimestamp(moment, UTC)


class ControlConnection(Connection):
    """One admin's connection: request lines in, answers out, in order. Each request is
    answered by a task (the store may be Redis); requests that arrive meanwhile wait in
    ``queue``."""

    def __init__(self, listener: Listener, service: ControlService) -> None:
        super().__init__(listener)
        self.service = service
        self.buffer = b""
        self.skipping = False  # in a line too long: dropped up to its end, then answered
        self.who = "an unknown peer"
        # a request to answer, or the ERROR line of a refused one, in the order they came
        self.queue: collections.deque[control.Request | bytes] = collections.deque()
        self.working: asyncio.Future[None] | None = None

    def opened(self) -> None:
        assert self.transport is not None
        self.who = peer_credentials(self.transport.get_extra_info("socket"))

    def pending(self) -> bool:
        return bool(self.buffer) or self.skipping or self.working is not None

    def received(self, data: bytes) -> None:
        *lines, rest = (self.buffer + data).split(b"\n")
        for line in lines:
            if self.skipping or len(line) > control.MAX_LINE:
                self.skipping = False
                self.queue.append(self.refuse(f"line longer than {control.MAX_LINE} bytes"))
                continue
            try:
                self.queue.append(control.parse_request(line))
            except control.BadRequest as exc:
                self.queue.append(self.refuse(str(exc)))
        if len(rest) > control.MAX_LINE:  # kept no longer; the sweep ends a line never ended
            self.skipping, rest = True, b""
        self.buffer = rest
        if self.queue and self.working is None:
            self.working = asyncio.ensure_future(self.work())

    async def work(self) -> None:
        """Answer what is queued, in order."""
        try:
            while self.queue and not self.closing:
                item = self.queue.popleft()
                self.send(item if isinstance(item, bytes)
                          else await self.service.answer(item, self.who))
        except Exception:  # the one catch-all of this connection's task
            log.exception("control: internal error answering %s; closing the connection",
                          self.who)
            self.internal_error()
        finally:
            self.working = None

    def refuse(self, reason: str) -> bytes:
        log.warning("control: refused a request from %s: %s", self.who, reason)
        return control.error(reason)

    def internal_error(self) -> None:
        self.send(control.error("internal error in keyrelay-policyd (see its log)"))
        self.close_quietly()


def peer_credentials(sock: Any) -> str:
    """``uid N pid M`` of a unix socket's peer (SO_PEERCRED), for the log."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                              struct.calcsize("3i"))
        pid, uid, _ = struct.unpack("3i", raw)
    except (AttributeError, OSError, struct.error):
        return "an unknown peer"
    return f"uid {uid} (pid {pid})"


def listener(cfg: PolicydConfig, service: ControlService) -> Listener | None:
    """The control socket's listener, or None when ``control_listen`` is empty."""
    if not cfg.control_listen:
        return None
    return Listener("control", Endpoint.parse(cfg.control_listen),
                    lambda lst: ControlConnection(lst, service), cfg)


def owner_and_mode(cfg: PolicydConfig) -> tuple[tuple[int, int] | None, int]:
    """Who gets the control socket: the starting user (root keeps it) and, with
    ``control_group``, that group at mode 0660; else mode 0600. Raises KeyError for an unknown
    group."""
    if not cfg.control_group:
        return None, 0o600
    return (-1, grp.getgrnam(cfg.control_group).gr_gid), 0o660


async def start(lst: Listener, cfg: PolicydConfig) -> None:
    """Bind the control socket before privileges are dropped: its folder made if missing
    (mode 0755: the socket's own mode keeps others out), created under a umask that lets no
    one else connect before its mode is set."""
    owner, mode = owner_and_mode(cfg)
    folder = os.path.dirname(lst.endpoint.path)
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise OSError(f"{folder} is not a folder")
    os.makedirs(folder, mode=0o755, exist_ok=True)
    old = os.umask(0o177)
    try:
        await lst.start(owner, mode)
    finally:
        os.umask(old)
