"""Passing the site's own logins on to its Dovecot (coexistence, docs/coexistence.md).

With ``auth.site_auth_socket`` set, a login that is not keyrelay's (neither ``auth.username``
nor an imported legacy login: keyrelay/decisions/login.py ``site_login``) is asked of the
site's Dovecot auth service, speaking the protocol Postfix speaks to it
(policyd/dovecot.py; Dovecot's doc/auth-protocol.txt): the client handshake ``VERSION`` and
``CPID``, then ``AUTH <id> PLAIN <Postfix's own parameters> resp=<base64>``. The answer's
fields after the request id (``user=...`` and whatever else Dovecot says) go back to Postfix
unchanged under Postfix's request id.

keyrelay finishes the SASL exchange itself (it holds the username and password whichever of
PLAIN or LOGIN the client used) and always asks Dovecot with PLAIN and the initial response,
the one mechanism every Dovecot offers unless ``auth_mechanisms`` leaves it out, which the
handshake checks.

One connection per process serves every login passed on, each request under its own id
(Dovecot answers them in any order); it is opened at the first login and again after it
broke. Anything that stops an answer (the socket missing or refusing, a broken line, no
answer within ``TIMEOUT``) is a ``SiteAuthUnavailable``: keyrelay's fault as far as the
client can tell, so a temporary answer (the auth connection closes, Postfix answers
454 4.7.0), never a refusal.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from dataclasses import dataclass

from .dovecot import Attempt

log = logging.getLogger("keyrelay.policyd.siteauth")

# Seconds for the handshake and for each answer. Dovecot delays a failure by
# auth_failure_delay (2 s by default) and may wait on its own passdb (LDAP, SQL).
TIMEOUT = 30.0
_MAX_LINE = 65536  # Dovecot's auth lines are far shorter; a longer one is a broken peer


class SiteAuthUnavailable(Exception):
    """The site's auth service cannot answer; the text says why (no secret in it)."""


@dataclass(frozen=True, slots=True)
class SiteReply:
    """The site's answer: ``OK`` or ``FAIL`` and its fields after the request id, as sent."""

    ok: bool
    fields: tuple[str, ...]

    @property
    def temporary(self) -> bool:
        """A ``FAIL`` saying the site could not decide (its passdb away): Dovecot 2.3's
        ``code=temp_fail``, or the older ``temp`` flag."""
        return not self.ok and ("code=temp_fail" in self.fields or "temp" in self.fields)

    @property
    def user(self) -> str:
        """The ``user=`` field: the login name Postfix will carry (empty when absent)."""
        return next((item[5:] for item in self.fields if item.startswith("user=")), "")

    def line(self, request_id: str) -> bytes:
        """The answer for Postfix under its own request id, the fields unchanged."""
        command = "OK" if self.ok else "FAIL"
        return "\t".join((command, request_id, *self.fields)).encode() + b"\n"


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.pending: dict[str, asyncio.Future[SiteReply]] = {}
        self.task: asyncio.Task[None] | None = None
        self.broken = False


class SiteAuth:
    """The client of one site auth socket: an absolute unix socket path or ``inet:HOST:PORT``."""

    def __init__(self, target: str, timeout: float = TIMEOUT) -> None:
        self.target = target
        self.timeout = timeout
        self._connection: _Connection | None = None
        self._connecting: asyncio.Lock | None = None
        self._next_id = 0

    def __repr__(self) -> str:
        return f"SiteAuth({self.target!r})"

    async def login(self, attempt: Attempt) -> SiteReply:
        """Dovecot's answer to the attempt's username and password."""
        connection = await self._connect()
        self._next_id = self._next_id % 0xFFFFFFFF + 1
        request_id = str(self._next_id)
        initial = b"\0" + attempt.username.encode() + b"\0" + attempt.password.encode()
        line = "\t".join(("AUTH", request_id, "PLAIN", *attempt.params,
                          "resp=" + base64.b64encode(initial).decode("ascii")))
        answer: asyncio.Future[SiteReply] = asyncio.get_running_loop().create_future()
        connection.pending[request_id] = answer
        try:
            connection.writer.write(line.encode() + b"\n")
            return await asyncio.wait_for(asyncio.shield(answer), self.timeout)
        except TimeoutError:
            raise SiteAuthUnavailable(
                f"{self.target} did not answer within {self.timeout:g} s") from None
        finally:
            connection.pending.pop(request_id, None)

    async def check(self) -> None:
        """Open a connection, handshake, close it (keyrelay-policyd --check-config)."""
        try:
            connection = await asyncio.wait_for(self._open(), self.timeout)
        except TimeoutError:
            raise SiteAuthUnavailable(
                f"{self.target} did not finish its handshake within {self.timeout:g} s"
            ) from None
        connection.writer.close()

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            self._break(connection, "keyrelay-policyd is stopping")
            if connection.task is not None:
                await asyncio.gather(connection.task, return_exceptions=True)

    async def _connect(self) -> _Connection:
        if self._connection is not None and not self._connection.broken:
            return self._connection
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._connection is not None and not self._connection.broken:
                return self._connection
            try:
                connection = await asyncio.wait_for(self._open(), self.timeout)
            except TimeoutError:
                raise SiteAuthUnavailable(
                    f"{self.target} did not finish its handshake within {self.timeout:g} s"
                ) from None
            connection.task = asyncio.ensure_future(self._read(connection))
            self._connection = connection
            log.info("connected to the site's auth service at %s", self.target)
            return connection

    async def _open(self) -> _Connection:
        try:
            if self.target.startswith("inet:"):
                host, _, port = self.target[5:].rpartition(":")
                reader, writer = await asyncio.open_connection(
                    host.strip("[]"), int(port), limit=_MAX_LINE)
            else:
                reader, writer = await asyncio.open_unix_connection(self.target, limit=_MAX_LINE)
        except (OSError, ValueError) as exc:
            raise SiteAuthUnavailable(f"cannot connect to {self.target}: "
                                      f"{exc.strerror or exc}" if isinstance(exc, OSError)
                                      else f"cannot connect to {self.target}: {exc}") from None
        connection = _Connection(reader, writer)
        try:
            writer.write(f"VERSION\t1\t2\nCPID\t{os.getpid()}\n".encode())
            mechanisms = set()
            while True:
                line = await self._line(connection)
                command, _, rest = line.partition("\t")
                if command == "VERSION" and rest.partition("\t")[0] != "1":
                    raise SiteAuthUnavailable(f"{self.target} speaks auth protocol version "
                                              f"{rest[:20]!r}, not 1")
                if command == "MECH":
                    mechanisms.add(rest.partition("\t")[0].upper())
                if command == "DONE":
                    break
            if "PLAIN" not in mechanisms:
                raise SiteAuthUnavailable(
                    f"{self.target} does not offer PLAIN (it offers "
                    f"{', '.join(sorted(mechanisms)) or 'nothing'}): add plain to Dovecot's "
                    "auth_mechanisms")
        except BaseException:
            writer.close()
            raise
        return connection

    async def _line(self, connection: _Connection) -> str:
        try:
            raw = await connection.reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            raise SiteAuthUnavailable(f"{self.target} closed the connection") from None
        except asyncio.LimitOverrunError:
            raise SiteAuthUnavailable(f"{self.target} sent a line longer than "
                                      f"{_MAX_LINE} bytes") from None
        except OSError as exc:
            raise SiteAuthUnavailable(f"reading from {self.target}: {exc.strerror}") from None
        try:
            return raw[:-1].decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError:
            raise SiteAuthUnavailable(f"{self.target} sent a line that is not UTF-8") from None

    async def _read(self, connection: _Connection) -> None:
        """Hand each answer to the login that waits for it, until the connection breaks."""
        try:
            while True:
                line = await self._line(connection)
                command, _, rest = line.partition("\t")
                request_id, _, fields = rest.partition("\t")
                answer = connection.pending.get(request_id)
                if answer is None or answer.done():
                    continue  # a login that gave up waiting (TIMEOUT), or not ours
                if command in ("OK", "FAIL"):
                    answer.set_result(SiteReply(command == "OK",
                                                tuple(fields.split("\t")) if fields else ()))
                elif command == "CONT":
                    # PLAIN with the initial response needs no further step: a broken peer
                    answer.set_exception(SiteAuthUnavailable(
                        f"{self.target} asked for another SASL step after PLAIN"))
                else:
                    log.warning("%s sent an unknown answer %r; ignored", self.target,
                                command[:20])
        except SiteAuthUnavailable as exc:
            self._break(connection, str(exc))
        except Exception:  # a bug of ours: every waiting login gets a temporary answer
            log.exception("reading from the site's auth service at %s failed", self.target)
            self._break(connection, "internal error")

    def _break(self, connection: _Connection, why: str) -> None:
        connection.broken = True
        if connection.pending:
            log.error("the site's auth service at %s: %s; %d login(s) answered temporarily",
                      self.target, why, len(connection.pending))
        for answer in connection.pending.values():
            if not answer.done():
                answer.set_exception(SiteAuthUnavailable(f"{self.target}: {why}"))
        connection.pending.clear()
        connection.writer.close()
        if connection.task is not None and connection.task is not asyncio.current_task():
            connection.task.cancel()
