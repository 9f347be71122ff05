"""Sockets and connections: the asyncio plumbing shared by the three services.

Each service listens on a unix socket or a loopback/TCP address. Connections are plain
``asyncio.Protocol`` objects (no per-request coroutine: a request is decided synchronously
from an in-memory snapshot, so the event loop's only work is bytes in and bytes out; only an
LDAP key look-up, a login counted in Redis and a message charged to Redis wait, in a task,
reading paused). Every
connection is bounded: request size, idle time, time to finish a started request, pending
output (reading pauses while the client does not read), and the number of connections.

A protocol violation closes that connection only; an unexpected exception is logged with its
traceback, answered temporarily where the protocol allows it, and also closes only that
connection. The daemon keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast

from keyrelay import daemon
from keyrelay.config import PolicydConfig
from keyrelay.decisions import Reason, Verdict, temporary

from . import attributes, auth, dovecot, netstring, policy
from .auth import AuthService
from .errors import BadRequest
from .policy import PolicyService
from .socketmap import SocketmapService

log = logging.getLogger("keyrelay.policyd")

# Pending output above which we stop reading from a client that does not read its answers.
_HIGH_WATER = 256 * 1024


@dataclass(frozen=True, slots=True)
class Endpoint:
    """``unix:/path`` or ``inet:host:port`` (Postfix's own notation)."""

    kind: str
    path: str = ""
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        if text.startswith("unix:"):
            return cls("unix", path=text[5:])
        host, _, port = text[5:].rpartition(":")
        return cls("inet", host=host.strip("[]"), port=int(port))

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        return f"inet:[{self.host}]:{self.port}" if ":" in self.host else (
            f"inet:{self.host}:{self.port}"
        )


class Listener:
    """One service's listening socket and the connections it accepted."""

    def __init__(self, name: str, endpoint: Endpoint, factory: Callable[[Listener], Connection],
                 limits: PolicydConfig) -> None:
        self.name = name
        self.endpoint = endpoint
        self.factory = factory
        self.limits = limits
        self.connections: set[Connection] = set()
        self.accepted = 0
        self.server: asyncio.base_events.Server | None = None

    async def start(self, socket_owner: tuple[int, int] | None, mode: int) -> None:
        loop = asyncio.get_running_loop()
        if self.endpoint.kind == "unix":
            path = self.endpoint.path
            daemon.remove_stale_socket(path)
            self.server = await loop.create_unix_server(lambda: self.factory(self), path)
            if socket_owner is not None:
                os.chown(path, *socket_owner)
            os.chmod(path, mode)
        else:
            self.server = await loop.create_server(
                lambda: self.factory(self), self.endpoint.host, self.endpoint.port,
                reuse_address=True, backlog=1024,
            )
        log.info("%s service listening on %s", self.name, self.endpoint)

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.endpoint.kind == "unix":
            try:
                os.unlink(self.endpoint.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                # After dropping privileges the socket's folder (Postfix's private/) is not
                # ours to change; the next start, as root, replaces the stale socket.
                log.info("%s: leaving socket %s in place: %s", self.name, self.endpoint.path,
                         exc.strerror or exc)

    def sweep(self, now: float) -> None:
        """Close connections idle too long or stuck in the middle of a request."""
        idle, request = self.limits.idle_timeout, self.limits.request_timeout
        for conn in list(self.connections):
            if conn.request_started and now - conn.request_started > request:
                conn.abort(f"request not finished within {request:g}s")
            elif now - conn.last_active > idle:
                conn.close_quietly()


class Connection(asyncio.Protocol):
    """Bytes in, answers out, with the limits of ``Listener``; subclasses parse and answer."""

    loop: asyncio.AbstractEventLoop  # the connection's, from connection_made on

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.last_active = 0.0
        self.request_started = 0.0  # monotonic time the unfinished request began; 0: none
        self.closing = False

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = stream = cast(asyncio.Transport, transport)
        # kept: asyncio.get_running_loop() costs a getpid() system call on CPython 3.11, and
        # data_received needs the loop's time for every request (docs/policyd-path.md)
        self.loop = asyncio.get_running_loop()
        self.last_active = self.loop.time()
        listener = self.listener
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        if len(listener.connections) >= listener.limits.max_connections:
            log.warning("%s: connection from %s refused: %d connections already open "
                        "(policyd.max_connections)", listener.name, self.peer,
                        len(listener.connections))
            stream.abort()
            return
        listener.connections.add(self)
        listener.accepted += 1
        stream.set_write_buffer_limits(high=_HIGH_WATER)
        self.opened()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.last_active = now = self.loop.time()
        if not self.guarded(self.received, data):
            return
        if self.pending():
            if not self.request_started:
                self.request_started = now
        else:
            self.request_started = 0.0

    def guarded(self, action: Callable[[bytes], None], data: bytes) -> bool:
        """Run ``action(data)``; a bad request or a fault of ours closes this connection
        only (False)."""
        try:
            action(data)
        except BadRequest as exc:
            self.abort(str(exc))
            return False
        except Exception:  # the one catch-all per connection (docs/ARCHITECTURE.md, "Failures")
            log.exception("%s: internal error on connection from %s; closing it",
                          self.listener.name, self.peer)
            self.internal_error()
            return False
        return True

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.connections.discard(self)
        self.closing = True

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()

    # -- for subclasses ------------------------------------------------------------------
    def opened(self) -> None:
        """Called once the connection is accepted."""

    def received(self, data: bytes) -> None:
        raise NotImplementedError

    def pending(self) -> bool:
        """A request has begun and not ended."""
        raise NotImplementedError

    def internal_error(self) -> None:
        """Our fault: the default drops the connection, which Postfix treats as temporary."""
        self.close_quietly()

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.closing:
            self.transport.write(data)

    def abort(self, reason: str) -> None:
        log.warning("%s: closing connection from %s: %s", self.listener.name, self.peer, reason)
        self.close_quietly()

    def close_quietly(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()


# -- the three services ----------------------------------------------------------------------
class AuthConnection(Connection):
    """Dovecot auth protocol: LF-terminated lines, handshake first. A login whose answer
    waits (the counter store over the network, or an LDAP key look-up: ``AuthService.login``
    hands back a coroutine) pauses reading; lines that arrive meanwhile wait in ``backlog``
    and are answered in order once it is decided."""

    def __init__(self, listener: Listener, service: AuthService, cuid: int) -> None:
        super().__init__(listener)
        self.service = service
        self.session = dovecot.ServerSession()
        self.cuid = cuid
        self.reader = dovecot.LineReader(listener.limits.max_request_size)
        self.waiting: asyncio.Future[None] | None = None
        self.backlog: list[str] = []
        self.started = 0.0  # perf_counter() when the login being decided was complete

    def opened(self) -> None:
        self.send(dovecot.greeting(os.getpid(), self.cuid, secrets.token_hex(16)))

    def pending(self) -> bool:
        return self.reader.pending or self.waiting is not None or bool(self.backlog)

    def received(self, data: bytes) -> None:
        for line in self.reader.feed(data):
            self.line(line)
            if self.closing:
                break

    def line(self, text: str) -> None:
        if self.waiting is not None:
            self.backlog.append(text)
            return
        event = self.session.receive(text)
        if event is None:
            return
        if isinstance(event, dovecot.Reply):
            if event.failure:
                self.service.log_exchange_failure(event)
            self.send(event.data)
            return
        self.started = time.perf_counter()
        result = self.service.login(event)
        if isinstance(result, Verdict | auth.SiteAnswer):
            self.answer(event, result)
            return
        if self.transport is not None:
            self.transport.pause_reading()
        self.waiting = asyncio.ensure_future(self.settle(event, result))

    def answer(self, event: dovecot.Attempt, verdict: auth.Outcome) -> None:
        self.service.log(event, verdict, time.perf_counter() - self.started)
        reply = auth.render(event.request_id, verdict)
        if reply is None:
            self.close_quietly()  # Postfix answers 454 4.7.0: the client retries
        else:
            self.send(reply)

    async def settle(self, event: dovecot.Attempt,
                     deciding: Coroutine[Any, Any, auth.Outcome]) -> None:
        """Await the login's verdict (the event loop serves everyone else meanwhile; an LDAP
        look-up runs in a worker thread), answer, and go on with what arrived meanwhile."""
        try:
            verdict = await deciding
        except Exception:  # e.g. the executor shut down while stopping: our fault, temporary
            log.exception("%s: deciding a login from %s failed; closing the connection",
                          self.listener.name, self.peer)
            self.service.metrics.login("tempfail", str(Reason.INTERNAL_ERROR), None)
            self.internal_error()  # closed: Postfix answers 454 4.7.0
            return
        finally:
            self.waiting = None
        if self.closing:
            return  # the sweep closed it (request_timeout): Postfix answered 454

        def answer_and_go_on(_: bytes) -> None:
            self.answer(event, verdict)
            while self.backlog and self.waiting is None and not self.closing:
                self.line(self.backlog.pop(0))

        if not self.guarded(answer_and_go_on, b""):
            return
        if self.waiting is None and not self.closing:
            if not self.pending():
                self.request_started = 0.0
            if self.transport is not None:
                self.transport.resume_reading()


class PolicyConnection(Connection):
    """The policy protocol: one request at a time, answered in order. A message charged to a
    counter store over the network (``policy.Charge``), a recipient looked up in a
    suppression list over the network (``policy.Recipient``), or whose session's key must first be
    looked up in LDAP (``policy.Lookup``), pauses reading until it is settled; requests that
    arrived meanwhile wait in ``backlog`` (as ``AuthConnection``'s key look-ups)."""

    def __init__(self, listener: Listener, service: PolicyService) -> None:
        super().__init__(listener)
        self.service = service
        self.reader = attributes.RequestReader(listener.limits.max_request_size)
        self.request: dict[str, str] = {}
        self.charging: asyncio.Future[None] | None = None
        self.backlog: collections.deque[dict[str, str]] = collections.deque()
        self.started = 0.0  # perf_counter() when the request being decided was complete

    def pending(self) -> bool:
        return self.reader.pending or self.charging is not None or bool(self.backlog)

    def received(self, data: bytes) -> None:
        requests = self.reader.feed(data)
        if self.charging is None and not self.backlog:
            for number, request in enumerate(requests):  # the common case: all at once
                if self.closing:
                    break
                if not self.decide(request):
                    self.backlog.extend(requests[number + 1:])
                    break
        else:
            self.backlog.extend(requests)
        if self.charging is None:
            self.request = {}

    def decide(self, request: dict[str, str]) -> bool:
        """Decide and answer ``request``; False when it waits for the counter store."""
        self.request = request
        self.started = time.perf_counter()
        result = self.service.decide(request)
        if isinstance(result, policy.Charge | policy.Lookup | policy.Recipient):
            if self.transport is not None:
                self.transport.pause_reading()
            self.charging = asyncio.ensure_future(self.settle(result))
            return False
        self.answer(request, result)
        return True

    def answer(self, request: dict[str, str], verdict: Verdict) -> None:
        self.service.log(request, verdict, time.perf_counter() - self.started)
        self.send(attributes.encode_action(policy.render(verdict)))

    async def settle(self, pending: policy.Charge | policy.Lookup | policy.Recipient) -> None:
        """Look the session's key up in the directory (off the event loop) and decide again,
        and/or charge the message to the store (the event loop serves everyone else
        meanwhile); answer, and go on with what arrived meanwhile."""
        request = pending.request
        try:
            if isinstance(pending, policy.Lookup):
                await asyncio.get_running_loop().run_in_executor(None, pending.lookup.run)
                again = self.service.decide(request, looked_up=True)
                assert not isinstance(again, policy.Lookup)
                pending_or_verdict: policy.Charge | policy.Recipient | Verdict = again
            else:
                pending_or_verdict = pending
            verdict = (pending_or_verdict if isinstance(pending_or_verdict, Verdict)
                       else await self.service.settle(pending_or_verdict))
        except Exception:  # a bug of ours: answered temporarily, this connection closed
            log.exception("%s: deciding a message for %s failed; closing the connection",
                          self.listener.name, self.peer)
            self.internal_error()
            return
        finally:
            self.charging = None
        if self.closing:
            return  # the sweep closed it (request_timeout): Postfix answered on its own

        def answer_and_go_on(_: bytes) -> None:
            self.answer(request, verdict)
            while self.backlog and self.charging is None and not self.closing:
                self.decide(self.backlog.popleft())
            if self.charging is None:
                self.request = {}

        if not self.guarded(answer_and_go_on, b""):
            return
        if self.charging is None and not self.closing:
            if not self.pending():
                self.request_started = 0.0
            if self.transport is not None:
                self.transport.resume_reading()

    def internal_error(self) -> None:
        # The policy protocol can carry a temporary answer: better than a dropped connection,
        # which Postfix would retry and then answer with its own default action.
        verdict = temporary(Reason.INTERNAL_ERROR)
        if self.request:
            self.service.log(self.request, verdict)
            self.send(attributes.encode_action(policy.render(verdict)))
        self.close_quietly()


class SocketmapConnection(Connection):
    def __init__(self, listener: Listener, service: SocketmapService) -> None:
        super().__init__(listener)
        self.service = service
        self.reader = netstring.NetstringReader(listener.limits.max_request_size)

    def pending(self) -> bool:
        return self.reader.pending

    def received(self, data: bytes) -> None:
        for lookup in self.reader.feed(data):
            started = time.perf_counter()
            reply, outcome = self.service.lookup(lookup)
            self.service.log(lookup, outcome, time.perf_counter() - started)
            self.send(reply)

    def internal_error(self) -> None:
        self.send(netstring.temp("internal error in the relay's socketmap service"))
        self.close_quietly()


def listeners(
    cfg: PolicydConfig, auth_service: AuthService, policy_service: PolicyService,
    socketmap_service: SocketmapService,
) -> list[Listener]:
    """A listener for every service with a configured endpoint."""
    made: list[Listener] = []
    counter = itertools.count(1)
    if cfg.auth_listen:
        made.append(Listener("auth", Endpoint.parse(cfg.auth_listen),
                             lambda lst: AuthConnection(lst, auth_service, next(counter)), cfg))
    if cfg.policy_listen:
        made.append(Listener("policy", Endpoint.parse(cfg.policy_listen),
                             lambda lst: PolicyConnection(lst, policy_service), cfg))
    if cfg.socketmap_listen:
        made.append(Listener("socketmap", Endpoint.parse(cfg.socketmap_listen),
                             lambda lst: SocketmapConnection(lst, socketmap_service), cfg))
    return made
