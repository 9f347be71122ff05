"""The Redis counter store (``counters.backend: redis``): what several relay nodes share.

Each operation is one Lua script (keyrelay/counters/scripts.py), run with EVALSHA and, after
a NOSCRIPT (a restarted or flushed server), once with EVAL, which loads it again: one atomic
round trip. Every key starts with the prefix and carries a TTL (docs/cluster.md). The commands
of one event-loop turn are sent together on one connection (``RedisCounters._flush``): the
cost of a round trip's system calls is shared under load, and each command stays atomic.

Only what the ``redis`` client 4.3 (Debian 12's python3-redis) has is used: the asyncio
connection pool, its connections' ``send_packed_command`` and ``read_response``. A connection
whose commands were interrupted (timeout, cancellation) is closed, never reused with an answer
still pending. Every fault becomes ``CountersUnavailable`` within ``timeout`` of the turn the
command was sent in.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import os
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast
from zoneinfo import ZoneInfo

from redis import exceptions as redis_errors
from redis.asyncio import connection as redis_connection
from redis.asyncio.sentinel import Sentinel

from .model import (
    KINDS,
    Calendar,
    CountersUnavailable,
    Kind,
    Locked,
    Sliding,
    Usage,
    Window,
    check_windows,
)
from .scripts import CHECK, CLEAR, CLEAR_ALL, FAIL, LOCKED, PEEK, SUCCEEDED, TAKE, Script

# redis 4.3 wants a command name for a pool's connection, 5.3 warns when one is given
_NAMED = inspect.signature(redis_connection.ConnectionPool.get_connection).parameters[
    "command_name"].default is inspect.Parameter.empty

# A calendar period's key lives this long past the period's end: a node whose clock is a
# little behind still finds the count of the period it believes current.
CALENDAR_GRACE = 3600.0
# windows whose keys ``RedisCounters.take`` remembers; more: forgotten
_NAMED_MAX = 65536


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where and how to connect (built from ``counters.redis`` by keyrelay/counters/open.py;
    the password is read from its file and never shown: ``repr=False``)."""

    host: str = "127.0.0.1"
    port: int = 6379
    socket: str = ""  # a unix socket path; takes the place of host and port
    db: int = 0
    username: str = ""
    password: str = ""
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    timeout: float = 2.0
    prefix: str = "keyrelay:"
    sentinels: tuple[tuple[str, int], ...] = ()
    service_name: str = ""

    def __repr__(self) -> str:
        return f"RedisTarget({self.where})"

    @property
    def where(self) -> str:
        if self.sentinels:
            hosts = ",".join(f"{host}:{port}" for host, port in self.sentinels)
            return f"sentinel {self.service_name} via {hosts}"
        if self.socket:
            return f"unix:{self.socket}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def connection_pool(target: RedisTarget) -> Any:
    """The redis client's asyncio connection pool for ``target``."""
    # no socket_timeout: every operation runs under one asyncio.timeout of its own
    # (RedisCounters.run), which also covers connecting; the client's per-read timeouts would
    # cost an asyncio.wait_for task per command
    common: dict[str, Any] = {
        "db": target.db, "username": target.username or None,
        "password": target.password or None, "socket_timeout": None,
        "socket_connect_timeout": target.timeout,
    }
    tls: dict[str, Any] = {}
    if target.tls:
        tls = {"ssl_ca_certs": target.ca_file or None, "ssl_certfile": target.cert_file or None,
               "ssl_keyfile": target.key_file or None, "ssl_cert_reqs": "required",
               "ssl_check_hostname": True}
    if target.sentinels:
        sentinel = cast(Any, Sentinel)(list(target.sentinels),
                            sentinel_kwargs={"socket_timeout": target.timeout,
                                             "socket_connect_timeout": target.timeout},
                            ssl=target.tls, **tls, **common)
        return sentinel.master_for(target.service_name).connection_pool
    if target.socket:
        return redis_connection.ConnectionPool(
            connection_class=redis_connection.UnixDomainSocketConnection, path=target.socket,
            **common)
    if target.tls:
        return redis_connection.ConnectionPool(
            connection_class=redis_connection.SSLConnection, host=target.host,
            port=target.port, **tls, **common)
    return redis_connection.ConnectionPool(host=target.host, port=target.port, **common)


def describe(exc: BaseException, target: RedisTarget) -> str:
    """One line saying why ``target`` did not answer; never the password."""
    where = target.where
    text = str(exc)
    if isinstance(exc, redis_errors.AuthenticationError) or text.startswith(
            ("WRONGPASS", "NOAUTH", "invalid username-password")):
        code = "" if text.startswith(("WRONGPASS", "NOAUTH")) else "WRONGPASS "
        user = target.username or "default"
        reason = f"authentication failed for user {user}: {code}{text}"
    elif isinstance(exc, redis_errors.NoPermissionError) or text.startswith("NOPERM"):
        code = "" if text.startswith("NOPERM") else "NOPERM "
        reason = (f"redis user {target.username or 'default'} lacks a permission keyrelay "
                  f"needs for keys {target.prefix}* (docs/cluster.md, \"Redis ACL\"): "
                  f"{code}{text}")
    elif isinstance(exc, redis_errors.ResponseError):
        reason = f"redis at {where} answered an error: {text}"
    else:
        cause = _os_error(exc)
        if isinstance(cause, ssl.SSLError):
            reason = f"TLS with redis at {where} failed: {cause.reason or cause}"
        elif isinstance(cause, ssl.CertificateError):
            reason = f"TLS with redis at {where} failed: {cause}"
        elif isinstance(exc, TimeoutError | redis_errors.TimeoutError) or isinstance(
                cause, TimeoutError):
            reason = f"no answer from redis at {where} within {target.timeout:g}s"
        elif cause is not None and (cause.errno or cause.strerror):
            # asyncio's "Connect call failed (...)" says less than the errno's own text
            why = os.strerror(cause.errno) if cause.errno else cause.strerror
            reason = f"cannot connect to redis at {where}: {why}"
        else:
            reason = f"connection to redis at {where} failed: {text or type(exc).__name__}"
    if target.password:
        reason = reason.replace(target.password, "********")
    return reason


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError (refused, reset, TLS) behind a redis client error, if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and not isinstance(current, TimeoutError):
            return current
        current = current.__cause__ or current.__context__
    return None


def pack(command: Sequence[Any]) -> bytes:
    """``command`` in the Redis protocol (RESP), as one buffer: what the client's own
    ``pack_command`` does, at a fraction of its cost for the many short arguments of a
    script call."""
    parts = [b"*%d\r\n" % len(command)]
    for arg in command:
        parts.append(_bulk(arg if isinstance(arg, bytes) else str(arg).encode()))
    return b"".join(parts)


def _bulk(data: bytes) -> bytes:
    """One argument of a command, in RESP."""
    return b"$%d\r\n%b\r\n" % (len(data), data)


_HEADS: dict[str, tuple[bytes, bytes]] = {}


def script_call(script: Script, count: int, keys: bytes,
                args: Sequence[Any]) -> tuple[bytes, Callable[[], bytes]]:
    """``EVALSHA`` of ``script`` with ``count`` keys already in RESP (``keys``) and ``args``,
    and how to make its ``EVAL`` (after a NOSCRIPT): what ``pack`` makes of each, byte for
    byte, with the script's name and source packed once."""
    heads = _HEADS.get(script.sha)
    if heads is None:
        heads = _HEADS[script.sha] = (_bulk(b"EVALSHA") + _bulk(script.sha.encode()),
                                      _bulk(b"EVAL") + _bulk(script.source.encode()))
    start = b"*%d\r\n" % (3 + count + len(args))
    tail = b"".join([_bulk(b"%d" % count), keys,
                     *[_bulk(a if isinstance(a, bytes) else str(a).encode()) for a in args]])
    return start + heads[0] + tail, lambda: start + heads[1] + tail


class _Call(NamedTuple):
    """One command of a batch: the command as sent, the one to send instead after a
    NOSCRIPT (a script's EVAL; None for a plain command), and who waits for the answer."""

    packed: bytes
    fallback: Callable[[], bytes] | None
    future: asyncio.Future[Any]


async def _answer(conn: Any, call: _Call, retry: bool = True) -> bool:
    """Read ``call``'s answer from ``conn`` and hand it over (an error answer as the
    command's error: the connection is in order). True: a NOSCRIPT to send again as EVAL."""
    try:
        answer = await conn.read_response()
    except redis_errors.NoScriptError as exc:
        if retry and call.fallback is not None:
            return True
        _fail((call,), exc)
        return False
    except redis_errors.ResponseError as exc:
        _fail((call,), exc)
        return False
    if not call.future.done():  # its caller may have gone (cancelled)
        call.future.set_result(answer)
    return False


def _fail(calls: Sequence[_Call], exc: BaseException) -> None:
    for call in calls:
        if not call.future.done():
            call.future.set_exception(exc)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisCounters:
    """``model.CounterStore`` in Redis, shared by every node that names the same server and
    prefix."""

    def __init__(self, target: RedisTarget, *, max_tracked: int = 100_000, per_key: int = 8,
                 zone: ZoneInfo | None = None, clock: Callable[[], float] = time.time) -> None:
        self.target = target
        self.max_tracked = max_tracked
        self.per_key = per_key
        self.zone = zone or ZoneInfo("UTC")
        self.clock = clock
        self.prefix = target.prefix
        self._pool: Any = None
        self._batch: list[_Call] = []  # commands of this turn, not sent yet
        self._exchanges: set[asyncio.Future[None]] = set()  # batches on their way
        # what ``take`` sends for a window, made once per bucket or period (``_named``)
        self._sliding: dict[Sliding, tuple[int, bytes, str, str]] = {}
        self._calendar: dict[Calendar, tuple[str, bytes, str]] = {}

    def __repr__(self) -> str:
        return f"RedisCounters({self.target.where}, prefix {self.prefix!r})"

    # -- one round trip ------------------------------------------------------------------
    #
    # Every command waits in ``_batch`` until the event loop's next turn, then all those of
    # the turn go out together on one connection (one write, their answers read in order):
    # under load, many policy requests charge in the same turn, and a batch costs one
    # system call each way instead of one per command. Each command is still one script or
    # one command on its own, so each stays atomic; a batch is no transaction.

    async def _command(self, *args: Any) -> Any:
        """Send one command and read its answer; CountersUnavailable within the timeout."""
        return await self._queued(pack(args), None)

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run ``script`` (EVALSHA, EVAL after a NOSCRIPT); CountersUnavailable within the
        timeout."""
        return await self._queued(*script_call(
            script, len(keys), b"".join([_bulk(key.encode()) for key in keys]), args))

    async def _queued(self, packed: bytes, fallback: Callable[[], bytes] | None) -> Any:
        """Queue one packed command for this turn's batch and wait for its answer."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._batch.append(_Call(packed, fallback, future))
        if len(self._batch) == 1:
            loop.call_soon(self._flush)
        try:
            return await future
        except (redis_errors.RedisError, OSError, TimeoutError) as exc:
            raise CountersUnavailable(f"counters.redis: {describe(exc, self.target)}") from None

    def _flush(self) -> None:
        """Send the batch of this turn (a task of its own, bounded by the timeout)."""
        batch, self._batch = self._batch, []
        if batch:
            task = asyncio.ensure_future(self._exchange(batch))
            self._exchanges.add(task)
            task.add_done_callback(self._exchanges.discard)

    async def _exchange(self, batch: list[_Call]) -> None:
        """``batch`` sent and answered within the timeout (connecting included); whatever
        stops it is every unanswered command's error."""
        try:
            async with asyncio.timeout(self.target.timeout):
                await self._send(batch)
        except asyncio.CancelledError:
            _fail(batch, redis_errors.ConnectionError("the counter store was closed"))
            raise
        except Exception as exc:  # noqa: BLE001 - each waiting command gets it
            _fail(batch, exc)
        except BaseException as exc:
            _fail(batch, exc)
            raise

    async def _send(self, batch: list[_Call]) -> None:
        if self._pool is None:
            self._pool = connection_pool(self.target)
        pool = self._pool
        conn = await (pool.get_connection("EVALSHA") if _NAMED else pool.get_connection())
        try:
            await conn.send_packed_command(b"".join([call.packed for call in batch]))
            again = [call for call in batch if await _answer(conn, call)]
            if again:  # NOSCRIPT: a restarted or flushed server; EVAL loads the script
                await conn.send_packed_command(b"".join([call.fallback() for call in again
                                                         if call.fallback is not None]))
                for call in again:
                    await _answer(conn, call, retry=False)
        except BaseException:
            # interrupted (timeout, cancelled) or broken: never reuse it with answers pending
            await asyncio.shield(conn.disconnect())
            raise
        finally:
            await pool.release(conn)

    async def close(self) -> None:
        self._flush()
        if self._exchanges:  # each ends within the timeout
            await asyncio.gather(*self._exchanges, return_exceptions=True)
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.disconnect()

    # -- keys ----------------------------------------------------------------------------

    def _window_keys(self, window: Window, now: float) -> tuple[list[str], str, str]:
        """The keys of ``window`` at ``now``, the fraction of its bucket gone by, its TTL."""
        if isinstance(window, Sliding):
            number, elapsed = window.bucket(now)
            base = f"{self.prefix}rate:{window.subject}:{window.seconds}s:"
            ttl = math.ceil(2 * window.seconds * 1000) + 1000
            return [base + str(number), base + str(number - 1)], repr(elapsed), str(ttl)
        label, ends_in = window.period(now, self.zone)
        key = f"{self.prefix}quota:{window.subject}:{window.unit}:{label}"
        return [key], "0", str(math.ceil((ends_in + CALENDAR_GRACE) * 1000))

    def _name_sliding(self, window: Sliding, number: int) -> tuple[int, bytes, str, str]:
        """Bucket ``number`` of ``window``: its two keys in RESP, the words of TAKE's spec
        before and after the fraction gone by."""
        keys, _, ttl = self._window_keys(window, window.seconds * number)
        if len(self._sliding) >= _NAMED_MAX:
            self._sliding.clear()
        found = self._sliding[window] = (number, b"".join([_bulk(k.encode()) for k in keys]),
                                         f"s {window.limit} ", f" {ttl}")
        return found

    def _name_calendar(self, window: Calendar, label: str) -> tuple[str, bytes, str]:
        """Period ``label`` of ``window``: its key in RESP, the words of TAKE's spec before
        the TTL."""
        key = f"{self.prefix}quota:{window.subject}:{window.unit}:{label}"
        if len(self._calendar) >= _NAMED_MAX:
            self._calendar.clear()
        found = self._calendar[window] = (label, _bulk(key.encode()), f"c {window.limit} 0 ")
        return found

    def _usage(self, window: Window, now: float, current: int, previous: int,
               amount: int) -> Usage:
        if isinstance(window, Sliding):
            _, elapsed = window.bucket(now)
            return Usage(window, window.estimate(current, previous, elapsed), window.limit,
                         window.resets_in(current, previous, elapsed, amount))
        _, ends_in = window.period(now, self.zone)
        return Usage(window, float(current), window.limit, ends_in)

    def _records(self, kind: Kind) -> str:
        return f"{self.prefix}fail:{kind}:"

    def _failure_keys(self, kind: Kind, key: str) -> list[str]:
        return [self._records(kind) + key, f"{self.prefix}failing:{kind}",
                f"{self.prefix}locks:{kind}"]

    def _logins(self, key_id: str) -> str:
        return f"{self.prefix}login:{key_id}"

    # -- rates and quotas ----------------------------------------------------------------

    async def take(self, windows: tuple[Window, ...], amount: int = 1) -> Usage | None:
        check_windows(windows, amount)
        now = self.clock()
        # the keys and arguments of _window_keys, in RESP: a window's key names and the
        # words that stay the same are made once per bucket or period (the hot path of a
        # counted message)
        keys: list[bytes] = []
        spec: list[str] = []
        count = 0
        for window in windows:
            if isinstance(window, Sliding):
                number, elapsed = window.bucket(now)
                sliding = self._sliding.get(window)
                if sliding is None or sliding[0] != number:
                    sliding = self._name_sliding(window, number)
                keys.append(sliding[1])
                count += 2
                spec.append(f"{sliding[2]}{elapsed!r}{sliding[3]}")
            else:
                label, ends_in = window.period(now, self.zone)
                calendar = self._calendar.get(window)
                if calendar is None or calendar[0] != label:
                    calendar = self._name_calendar(window, label)
                keys.append(calendar[1])
                count += 1
                spec.append(f"{calendar[2]}{math.ceil((ends_in + CALENDAR_GRACE) * 1000)}")
        answer = await self._queued(*script_call(TAKE, count, b"".join(keys),
                                                 (amount, " ".join(spec))))
        index = int(answer[0])
        if index == 0:
            return None
        return self._usage(windows[index - 1], now, int(answer[1]), int(answer[2]), amount)

    async def peek(self, windows: tuple[Window, ...]) -> list[Usage]:
        check_windows(windows, 1)
        now = self.clock()
        keys: list[str] = []
        for window in windows:
            keys += self._window_keys(window, now)[0]
        answer = await self.run(PEEK, keys,
                                ["s" if isinstance(w, Sliding) else "c" for w in windows])
        return [self._usage(window, now, int(answer[2 * i]), int(answer[2 * i + 1]), 1)
                for i, window in enumerate(windows)]

    # -- failed logins and lock-outs -----------------------------------------------------

    async def fail(self, kind: Kind, key: str, max_failures: int, window: float,
                   lockout: float) -> bool:
        now = self.clock()
        answer = await self.run(FAIL, self._failure_keys(kind, key), [
            repr(now), max_failures, repr(window), repr(lockout), repr(now + lockout),
            self.max_tracked, key, self._records(kind)])
        return int(answer) == 1

    async def locked_for(self, kind: Kind, key: str) -> float:
        until = await self._command("HGET", self._records(kind) + key, "until")
        if until is None:
            return 0.0
        return max(float(_text(until)) - self.clock(), 0.0)

    async def locked(self, kind: Kind | None = None) -> list[Locked]:
        kinds = KINDS if kind is None else (kind,)
        now = self.clock()
        args: list[Any] = [repr(now)]
        for each in kinds:
            args += [each, self._records(each)]
        answer = [_text(item) for item in await self.run(
            LOCKED, [f"{self.prefix}locks:{each}" for each in kinds], args)]
        found = [Locked(answer[i], answer[i + 1], float(answer[i + 2]),  # type: ignore[arg-type]
                        float(answer[i + 3]), int(answer[i + 4]))
                 for i in range(0, len(answer), 5)]
        return sorted(found, key=lambda lock: (lock.since, lock.kind, lock.subject))

    async def clear(self, kind: Kind, key: str) -> bool:
        answer = await self.run(CLEAR, self._failure_keys(kind, key), [repr(self.clock()), key])
        return int(answer) == 1

    async def clear_all(self) -> int:
        keys: list[str] = []
        for kind in KINDS:
            keys += [f"{self.prefix}failing:{kind}", f"{self.prefix}locks:{kind}"]
        answer = await self.run(CLEAR_ALL, keys,
                                [repr(self.clock()), *(self._records(k) for k in KINDS)])
        return int(answer)

    # -- recent logins -------------------------------------------------------------------

    async def succeeded(self, key_id: str, client: str, keep: float) -> None:
        await self.run(SUCCEEDED, [self._logins(key_id)],
                       [repr(self.clock()), client, self.per_key, repr(keep)])

    async def since(self, key_id: str, client: str) -> float | None:
        last = await self._command("ZSCORE", self._logins(key_id), client)
        return None if last is None else self.clock() - float(_text(last))

    async def clients(self, key_id: str, within: float) -> int:
        found = await self._command("ZCOUNT", self._logins(key_id),
                                    repr(self.clock() - within), "+inf")
        return int(found)

    # -- checking ------------------------------------------------------------------------

    async def check(self) -> None:
        """Connect, authenticate, run a script that writes, reads and deletes one key of the
        namespace; CountersUnavailable naming what failed."""
        await self.run(CHECK, [f"{self.prefix}check"], [])
