"""Delivering one batch of events to an account's webhook, and when to try again
(docs/webhooks.md, "Delivery").

``deliver`` POSTs the batch once and says what became of it (an ``Outcome``); it keeps no
state. The caller (the outbox) keeps the events, their attempts and the time of the first
failure, and asks ``next_attempt`` when to try a failed batch again, or whether to give it up.

The request: ``POST`` of the JSON array of the events (compact, UTF-8) with
``Content-Type: application/json``, ``User-Agent: keyrelay/VERSION`` and
``X-Keyrelay-Signature`` (keyrelay/webhooks/sign.py). The URL is checked by the policy
(keyrelay/webhooks/target.py) at every delivery, its name resolved again, and the connection
goes to an address that was checked, with the URL's host in the Host header, the TLS server
name and the certificate check. Redirects are not followed. Nothing here ever puts the
secret or the body in a reason.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import ssl
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from .. import __version__
from ..config import WebhooksConfig
from ..directory.model import Webhook
from . import sign
from .target import IPAddress, Resolver, Target, TargetRefused, TargetUnresolved, check
from .target import system_resolver as system_resolver

USER_AGENT = f"keyrelay/{__version__}"
RETRY_STATUSES = frozenset({408, 429})


class Result(StrEnum):
    DELIVERED = "delivered"  # the receiver answered 2xx: done
    RETRY = "retry"  # a passing failure: try again at next_attempt(...)
    GIVE_UP = "give_up"  # retrying cannot help: give the events up (count and log them)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one delivery came to. ``reason``: one line for logs and the CLI, naming the URL
    and what happened (never the secret, never the body); ``status``: the HTTP status when
    the receiver answered; ``address``: the address connected to, if any."""

    result: Result
    reason: str
    status: int | None = None
    address: str | None = None

    @property
    def delivered(self) -> bool:
        return self.result is Result.DELIVERED


def body_of(events: Sequence[Mapping[str, Any]]) -> bytes:
    """The request body: the events as one compact JSON array in UTF-8."""
    return json.dumps(list(events), separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def make_test_event(account: str, now: datetime) -> dict[str, Any]:
    """The event ``keyrelay webhook test`` sends."""
    return {"event": "test", "timestamp": int(now.timestamp()), "account": account}


def tls_context(settings: WebhooksConfig) -> ssl.SSLContext:
    """Certificates verified against webhooks.ca_file, else the system's CA store."""
    context = ssl.create_default_context(cafile=settings.ca_file or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def deliver(webhook: Webhook, events: Sequence[Mapping[str, Any]], settings: WebhooksConfig,
            now: datetime, *, resolver: Resolver = system_resolver,
            context: ssl.SSLContext | None = None) -> Outcome:
    """POST ``events`` (one batch) to ``webhook``, signed at ``now``; never raises for what
    the network or the receiver does. ``context``: the TLS context to reuse (``tls_context``
    makes one per call otherwise)."""
    shown = webhook.url if len(webhook.url) <= 200 else webhook.url[:197] + "..."
    try:
        target = check(webhook.url, settings.allow_private_targets, resolver)
    except TargetUnresolved as exc:
        return Outcome(Result.RETRY, str(exc))
    except TargetRefused as exc:
        return Outcome(Result.GIVE_UP, str(exc))
    body = body_of(events)
    headers = {"Host": target.url.host_header, "Content-Type": "application/json",
               "User-Agent": USER_AGENT,
               sign.HEADER: sign.signature(webhook.secret, int(now.timestamp()), body)}
    if target.url.scheme == "https" and context is None:
        try:
            context = tls_context(settings)
        except (OSError, ssl.SSLError) as exc:  # the CA file unreadable: ours, passing
            return Outcome(Result.RETRY, f"webhook {shown}: cannot read webhooks.ca_file "
                           f"{settings.ca_file}: {getattr(exc, 'strerror', None) or exc}")
    return _post(target, headers, body, float(settings.timeout), context, shown)


def _post(target: Target, headers: dict[str, str], body: bytes, timeout: float,
          context: ssl.SSLContext | None, shown: str) -> Outcome:
    last = "no address to connect to"
    for address in target.addresses:
        conn = _connection(target, address, timeout, context)
        expired = threading.Event()
        timer = threading.Timer(timeout, _abort, (conn, expired))
        timer.daemon = True
        timer.start()
        try:
            try:
                conn.connect()
            except ssl.SSLCertVerificationError as exc:
                return Outcome(Result.RETRY, f"webhook {shown}: the TLS certificate of "
                               f"{target.url.host} ({address}) does not verify: "
                               f"{_ssl_reason(exc)}", address=str(address))
            except ssl.SSLError as exc:
                return Outcome(Result.RETRY, f"webhook {shown}: TLS handshake with {address} "
                               f"failed: {_ssl_reason(exc)}", address=str(address))
            except (OSError, http.client.HTTPException) as exc:
                last = f"cannot connect to {address} port {target.url.port}: {_os_reason(exc)}"
                if expired.is_set() or isinstance(exc, TimeoutError):
                    last = f"no connection to {address} within {timeout:g}s"
                continue  # the next checked address, if any
            try:
                conn.request("POST", target.url.path, body, headers)
                response = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                why = (f"no answer within {timeout:g}s"
                       if expired.is_set() or isinstance(exc, TimeoutError)
                       else f"the request failed: {_os_reason(exc)}")
                return Outcome(Result.RETRY, f"webhook {shown}: {why} ({address})",
                               address=str(address))
            return _answer(response, shown, str(address))
        finally:
            timer.cancel()
            conn.close()
    return Outcome(Result.RETRY, f"webhook {shown}: {last}")


def _answer(response: http.client.HTTPResponse, shown: str, address: str) -> Outcome:
    status = response.status
    phrase = "".join(c for c in (response.reason or "")[:60] if c.isprintable()).strip()
    said = f"HTTP {status}{' ' + phrase if phrase else ''}"
    if 200 <= status < 300:
        return Outcome(Result.DELIVERED, f"webhook {shown}: {said}", status, address)
    if 300 <= status < 400:
        where = response.getheader("Location") or "no Location given"
        where = "".join(c for c in where[:200] if c.isprintable())
        return Outcome(Result.GIVE_UP, f"webhook {shown}: {said}, a redirect to {where}; "
                       "redirects are not followed: set the webhook's URL to where it points",
                       status, address)
    if status >= 500 or status in RETRY_STATUSES:
        return Outcome(Result.RETRY, f"webhook {shown}: {said}", status, address)
    return Outcome(Result.GIVE_UP, f"webhook {shown}: {said}, refused by the receiver",
                   status, address)


class _Pinned(http.client.HTTPConnection):
    """HTTP to the checked address; the Host header names the URL's host."""

    def __init__(self, host: str, port: int, address: IPAddress, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((str(self.address), self.port), self.timeout)


class _PinnedTls(http.client.HTTPSConnection):
    """HTTPS to the checked address; SNI and the certificate check use the URL's host."""

    def __init__(self, host: str, port: int, address: IPAddress, timeout: float,
                 context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self.address = address
        self.tls = context

    def connect(self) -> None:
        raw = socket.create_connection((str(self.address), self.port), self.timeout)
        try:
            self.sock = self.tls.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


def _connection(target: Target, address: IPAddress, timeout: float,
                context: ssl.SSLContext | None) -> http.client.HTTPConnection:
    if target.url.scheme == "https":
        assert context is not None
        return _PinnedTls(target.url.host, target.url.port, address, timeout, context)
    return _Pinned(target.url.host, target.url.port, address, timeout)


def _abort(conn: http.client.HTTPConnection, expired: threading.Event) -> None:
    """The delivery's deadline: whatever it waits on now fails at once (a receiver that
    trickles its answer byte by byte cannot hold a delivery longer than the timeout)."""
    expired.set()
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _ssl_reason(exc: ssl.SSLError) -> str:
    text = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or str(exc)
    return str(text)


def _os_reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text)


def next_attempt(attempts: int, first_failure: datetime, now: datetime,
                 settings: WebhooksConfig,
                 jitter: Callable[[], float] = random.random) -> datetime | None:
    """When to try a batch again after its ``attempts``-th failed delivery (1 for the first),
    ``first_failure`` being when the first one failed and ``now`` when the last one did;
    None: ``webhooks.retry_for`` has passed since the first failure, give the batch up.

    The pause starts at ``retry_initial`` and doubles with each failure up to ``retry_max``,
    times a random factor from 0.75 to 1.25 (so that many batches that failed together do
    not all come back together); the last attempt is made when ``retry_for`` ends."""
    give_up_at = first_failure + timedelta(seconds=float(settings.retry_for))
    if now >= give_up_at:
        return None
    pause = min(float(settings.retry_max),
                float(settings.retry_initial) * 2.0 ** min(max(attempts, 1) - 1, 60))
    pause *= 0.75 + jitter() / 2
    return min(now + timedelta(seconds=pause), give_up_at)
