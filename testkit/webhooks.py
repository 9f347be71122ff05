"""A webhook receiver for the tests: a real HTTP or HTTPS server on 127.0.0.1 (port 0: the
kernel's choice, bound before the URL is known) that records every request and answers what
the test says (docs/webhooks.md). The HTTPS one serves a certificate for 127.0.0.1 and
localhost signed by a throw-away CA (``testkit.slapd.shared_tls``: ``ca.pem``)."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

from keyrelay.webhooks import sign

from .net import wait_until
from .slapd import shared_tls


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names lowercased
    body: bytes


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering (a slow receiver)


class Receiver:
    """``with Receiver(tls=True) as hook:`` ... ``hook.url`` ... ``hook.received``; ``port``:
    a port of the test's choice (a receiver that comes up late at a URL already set)."""

    def __init__(self, tls: bool = False, port: int = 0) -> None:
        self.tls = tls
        self.received: list[Request] = []
        self.answer: Callable[[Request], Answer] = lambda _request: Answer()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = Request("POST", self.path,
                                  {k.lower(): v for k, v in self.headers.items()},
                                  self.rfile.read(length))
                with receiver._lock:
                    receiver.received.append(request)
                answer = receiver.answer(request)
                if answer.delay:
                    receiver._stop.wait(answer.delay)
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        if tls:
            folder = shared_tls()
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(folder / "server.pem", folder / "server.key")
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def ca_file(self) -> Path:
        """The CA that signs the HTTPS receiver's certificate (webhooks.ca_file)."""
        return shared_tls() / "ca.pem"

    def url_for(self, host: str = "127.0.0.1", path: str = "/hook") -> str:
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}{path}"

    @property
    def url(self) -> str:
        return self.url_for()

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Request]:
        """The requests once ``count`` have come (TimeoutError after ``timeout`` seconds)."""
        wait_until(lambda: len(self.received) >= count, timeout, f"{count} webhook request(s)")
        with self._lock:
            return list(self.received)

    def signed_events(self, secret: str) -> list[dict[str, Any]]:
        """Every event received so far, in order, each request's signature checked with
        ``secret`` (keyrelay/webhooks/sign.py; an AssertionError when one does not verify)."""
        found: list[dict[str, Any]] = []
        with self._lock:
            requests = list(self.received)
        for request in requests:
            assert sign.verify(secret, request.headers["x-keyrelay-signature"], request.body,
                               int(time.time()))
            found += json.loads(request.body)
        return found

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)
