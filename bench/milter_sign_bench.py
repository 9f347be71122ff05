"""CPU per message of keyrelay-milter's signing path, in process (no Postfix, no sockets).

Makes an RSA-2048 and an Ed25519 selector the way `keyrelay domain add` does, then times, per
message of --body-size bytes with ten ordinary headers:

- each step alone: the two DKIM-Signature values with the private-key operations left out
  (header canonicalisation, selection, folding, hashing), streaming the body through the
  relaxed body hash, one RSA-2048 PKCS#1 v1.5 signature and one Ed25519 signature through
  OpenSSL (``cryptography``);
- pure signing: body hash plus both DKIM-Signature values (``milters.dkimsign.sign``) with
  keys from the key store (one ``stat`` per key and message, as in the daemon);
- the whole milter: MAIL, headers, body and end-of-message through pymilter's test context
  into ``KeyrelayMilter``, with the decision engine reading a real YAML directory and one JSON
  decision line per message written to /dev/null. Postfix's own cost per milter round trip
  is not in it: that needs the end-to-end benchmark through a private Postfix.

Figures are CPU time (``time.process_time``) per message, the best of five rounds of
--messages / 5 each; they are printed, not checked. --memory also streams bodies of growing
size through the milter and prints the peak of Python allocations (tracemalloc) for each.

    .venv/bin/python -m bench.milter_sign_bench
    .venv/bin/python -m bench.milter_sign_bench --messages 5000 --body-size 2000 --body-size 20000
    .venv/bin/python -m bench.milter_sign_bench --memory
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import Milter
from Milter import testctx

from keyrelay import admin, dkimkeys
from keyrelay.config import parse_config
from keyrelay.directory import YamlDirectory
from keyrelay.directory.model import Algorithm, DirectoryData, SelectorState
from keyrelay.directory.yamlfile import render
from keyrelay.logs import DecisionLog
from milters.dkimsign import KeyStore, RelaxedBodyHash, SigningKey, sign
from milters.milter import KeyrelayMilter
from milters.service import MilterService

DOMAIN = "bench.example"
HEADERS = [
    ("From", b"Bench Sender <sender@bench.example>"),
    ("To", b"Recipient <rcpt@example.net>"),
    ("Subject", b"Your monthly statement is ready"),
    ("Date", b"Mon, 02 Jun 2025 12:00:00 +0000"),
    ("Message-ID", b"<20250602120000.12345@bench.example>"),
    ("MIME-Version", b"1.0"),
    ("Content-Type", b"text/plain; charset=utf-8"),
    ("Content-Transfer-Encoding", b"8bit"),
    ("List-Unsubscribe", b"<https://bench.example/u/12345>"),
    ("X-Mailer", b"bench"),
]


def make_body(size: int) -> bytes:
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n"
    return (line * (size // len(line) + 1))[:size]


def per_message(messages: int, job: Callable[[], object], rounds: int = 5) -> float:
    """CPU milliseconds per call of ``job``: the best of ``rounds`` rounds, after a warm-up.

    The best round, not the mean: on a shared machine other processes only ever add time.
    """
    for _ in range(min(50, messages)):
        job()
    per_round = max(1, messages // rounds)
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(per_round):
            job()
        best = min(best, (time.process_time() - start) * 1000 / per_round)
    return best


class Setup:
    def __init__(self, root: Path) -> None:
        now = datetime.now(UTC)
        names = {Algorithm.RSA_SHA256: "bench-rsa", Algorithm.ED25519_SHA256: "bench-ed"}
        self.selectors = dkimkeys.create_selectors(
            str(root / "dkim"), DOMAIN, names, SelectorState.ACTIVE, now
        )
        data = DirectoryData()
        admin.add_account(data, "bench", now)
        admin.add_domain(data, "bench", DOMAIN, self.selectors, now)
        admin.mark_verified(data, DOMAIN, now - timedelta(days=1))
        key = admin.create_key(data, "bench", "app", ("mail.send",), None, now)
        self.login = f"bench:{key.key_id}"  # what Postfix passes as {auth_authen}
        path = root / "directory.yaml"
        path.write_text(render(data), encoding="utf-8")
        config = parse_config(
            {"directory": {"path": str(path)}, "logging": {"format": "json"}}, "bench"
        )
        self.devnull = open(os.devnull, "w")  # closed with the process
        self.service = MilterService(config, YamlDirectory(str(path)),
                                     DecisionLog(config.logging, self.devnull))
        self.store = KeyStore()

    def connection(self) -> testctx.TestCtx:
        Milter.factory = functools.partial(KeyrelayMilter, self.service)
        ctx = testctx.TestCtx()
        ctx._connect()
        ctx._setsymval("{auth_authen}", self.login)
        ctx._setsymval("{client_addr}", "127.0.0.1")
        ctx._setsymval("i", "4QxYz1ABCD")
        ctx.addheader = lambda name, value, idx: None  # Postfix would insert it
        return ctx


def through_milter(ctx: testctx.TestCtx, chunks: list[bytes]) -> None:
    ctx._envfrom("<sender@bench.example>")
    milter = ctx.getpriv()
    for name, value in HEADERS:
        milter.header_bytes(name, value)
    for chunk in chunks:
        milter.body(chunk)
    if ctx._eom() != Milter.CONTINUE:
        raise SystemExit(f"the milter did not accept the message: {ctx._reply}")


def chunked(body: bytes) -> list[bytes]:
    return [body[i : i + 65535] for i in range(0, len(body), 65535)] or [b""]


def run(setup: Setup, messages: int, size: int) -> None:
    body = make_body(size)
    digest = hashlib.sha256(b"headers").digest()
    rsa_key, ed_key = setup.store.keys_for(setup.selectors)

    def body_hash() -> bytes:
        hasher = RelaxedBodyHash()
        for chunk in chunked(body):
            hasher.update(chunk)
        return hasher.digest()

    def pure_signing() -> list[bytes]:
        keys = setup.store.keys_for(setup.selectors)
        return sign(HEADERS, body_hash(), DOMAIN, keys, int(time.time()), linesep=b"\n")

    class WithoutKeyOperation:
        """A key whose private-key operation is skipped (a fixed signature of the real
        size): what ``sign`` costs around the two signatures."""

        def __init__(self, key: SigningKey) -> None:
            self.selector, self.algorithm = key.selector, key.algorithm
            self.signature = key.sign_digest(digest)

        def sign_digest(self, _digest: bytes) -> bytes:
            return self.signature

    stubs = cast(list[SigningKey], [WithoutKeyOperation(k) for k in (rsa_key, ed_key)])
    fixed_hash = body_hash()

    ctx = setup.connection()
    chunks = chunked(body)
    rows = [
        ("DKIM-Signature values without key operations",
         per_message(messages, lambda: sign(HEADERS, fixed_hash, DOMAIN, stubs,
                                            int(time.time()), linesep=b"\n"))),
        ("relaxed body hash", per_message(messages, body_hash)),
        ("RSA-2048 signature (OpenSSL)",
         per_message(messages, lambda: rsa_key.sign_digest(digest))),
        ("Ed25519 signature (OpenSSL)",
         per_message(messages, lambda: ed_key.sign_digest(digest))),
        ("pure signing: body hash + rsa + ed25519", per_message(messages, pure_signing)),
        ("whole milter: check + sign + log",
         per_message(messages, lambda: through_milter(ctx, chunks))),
    ]
    print(f"\nbody {size} bytes, {len(HEADERS)} headers, {messages} messages; "
          "CPU ms per message (best of 5 rounds)")
    for name, ms in rows:
        print(f"  {name:46} {ms:7.3f}")


def memory(setup: Setup) -> None:
    ctx = setup.connection()
    print("\nmemory: peak Python allocations while one message streams through the milter")
    for size in (2_000, 1 << 20, 10 << 20, 50 << 20):
        chunk = make_body(65535)
        count = max(1, size // len(chunk))
        tracemalloc.start()
        ctx._envfrom("<sender@bench.example>")
        milter = ctx.getpriv()
        for name, value in HEADERS:
            milter.header_bytes(name, value)
        for _ in range(count):
            milter.body(chunk if size > 65535 else chunk[:size])
        ctx._eom()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"  body {size / (1 << 20):8.2f} MB   peak {peak / 1024:8.1f} KB")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.milter_sign_bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--body-size", type=int, action="append",
                        help="body bytes (repeatable; default 2000 and 20000)")
    parser.add_argument("--memory", action="store_true",
                        help="also print peak allocations for bodies of 2 kB to 50 MB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        setup = Setup(Path(tmp))
        for size in args.body_size or [2000, 20000]:
            run(setup, args.messages, size)
        if args.memory:
            memory(setup)


if __name__ == "__main__":
    main()
