"""``python -m keyrelay.webhooks.receiver``: a tiny webhook receiver for trying keyrelay's
webhooks (the README's tour, docs/webhooks.md).

It listens on 127.0.0.1, checks each request's ``X-Keyrelay-Signature`` with the account's
secret (``keyrelay webhook set`` printed it; give it in ``$KEYRELAY_WEBHOOK_SECRET``, never
on the command line, where ``ps`` shows it), answers ``200`` and prints every event as one
JSON line, or answers ``401`` and prints one line saying why the signature is refused. It is
what a receiver must do, in the fewest lines; a real one also keeps the events.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

from . import sign

SECRET_ENV = "KEYRELAY_WEBHOOK_SECRET"  # noqa: S105 - the variable's name, not a secret


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m keyrelay.webhooks.receiver",
        description="Receive keyrelay's webhook requests on 127.0.0.1, check each signature "
        f"with the secret in ${SECRET_ENV}, print each event as one JSON line.")
    parser.add_argument("--port", type=int, default=8099, help="port on 127.0.0.1 (8099)")
    args = parser.parse_args(argv)
    secret = os.environ.get(SECRET_ENV, "")
    if not secret:
        print(f"webhook receiver: set {SECRET_ENV} to the secret `keyrelay webhook set` "
              "printed", file=sys.stderr)
        return 2

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            header = self.headers.get(sign.HEADER, "")
            if not sign.verify(secret, header, body, int(time.time())):
                print(f"webhook receiver: refused a request: its {sign.HEADER} does not "
                      "match the secret (or is older than 5 minutes)", flush=True)
                self.send_response(401)
            else:
                for event in json.loads(body):
                    print(json.dumps(event, sort_keys=True), flush=True)
                self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    try:
        server = HTTPServer(("127.0.0.1", args.port), Handler)
    except OSError as exc:
        print(f"webhook receiver: cannot listen on 127.0.0.1:{args.port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"webhook receiver: listening on http://127.0.0.1:{args.port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
