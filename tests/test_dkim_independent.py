"""keyrelay's DKIM signatures checked by an independent verifier over real DNS.

The signer is milters.dkimsign with keys made the way `keyrelay domain add` makes them
(keyrelay.dkimkeys). The verifier is Perl Mail::DKIM's ``dkimproxy-verify`` (Debian
libmail-dkim-perl), which looks the public keys up with Net::DNS in a dnsmasq (Debian
dnsmasq-base) started on loopback that serves exactly the TXT records keyrelay tells admins
to publish. Ed25519 is checked only where Mail::DKIM has ed25519-sha256 (newer releases,
with libcryptx-perl); Debian 12's does not, and then the test asserts it says so.
Nothing here shares code with dkimpy.

`make deps` installs the three packages; without them the tests skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import dns.exception
import dns.rdatatype
import dns.resolver
import pytest

from keyrelay import dkimkeys
from keyrelay.directory.model import Algorithm, Selector, SelectorState
from milters.dkimsign import KeyStore, RelaxedBodyHash, SigningKey, sign

DOMAIN = "example.com"
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
DKIMPROXY_VERIFY = shutil.which("dkimproxy-verify", path=SBIN_PATH)
DNSMASQ = shutil.which("dnsmasq", path=SBIN_PATH)

pytestmark = pytest.mark.skipif(
    DKIMPROXY_VERIFY is None or DNSMASQ is None,
    reason="needs dkimproxy-verify (libmail-dkim-perl) and dnsmasq (dnsmasq-base): "
    "run `make deps` or scripts/ensure-debian-packages",
)

HEADERS = [
    ("From", b"Alice Example <alice@example.com>"),
    ("To", b"bob@example.net"),
    ("Subject", b"Independent check"),
    ("Date", b"Mon, 02 Jun 2025 12:00:00 +0000"),
    ("Message-ID", b"<20250602120000.2@example.com>"),
    ("MIME-Version", b"1.0"),
    ("Content-Type", b"text/plain; charset=utf-8"),
]


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _txt_option(name: str, value: str) -> str:
    """A dnsmasq --txt-record option; values over 255 octets become several strings."""
    chunks = [value[i : i + 255] for i in range(0, len(value), 255)]
    return "--txt-record=" + ",".join([name, *chunks])


class DnsServer:
    """dnsmasq on 127.0.0.1 serving some TXT records and nothing else."""

    def __init__(self, records: dict[str, str], log: Path) -> None:
        self.records = records
        self.port = _free_udp_port()
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert DNSMASQ is not None
        args = [
            DNSMASQ, "--keep-in-foreground", "--conf-file=/dev/null", "--pid-file=",
            "--no-resolv", "--no-hosts", "--bind-interfaces", "--listen-address=127.0.0.1",
            f"--port={self.port}", f"--local=/{DOMAIN}/", "--log-queries", "--log-facility=-",
        ]
        args += [_txt_option(name, value) for name, value in self.records.items()]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 10.0) -> None:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = self.port
        resolver.lifetime = 0.5
        name = next(iter(self.records))
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"dnsmasq exited: {self.log.read_text(errors='replace')}")
            try:
                answer = resolver.resolve(name, dns.rdatatype.TXT)
            except dns.exception.DNSException:
                if time.monotonic() > deadline:
                    raise
                continue  # the query's own timeout paces the loop
            served = b"".join(b"".join(rdata.strings) for rdata in answer)
            assert served.decode("ascii") == self.records[name]
            return

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def selectors(tmp_path_factory: pytest.TempPathFactory) -> tuple[Selector, ...]:
    names = {Algorithm.RSA_SHA256: "kr20250601-rsa", Algorithm.ED25519_SHA256: "kr20250601-ed"}
    return dkimkeys.create_selectors(
        str(tmp_path_factory.mktemp("keys")), DOMAIN, names, SelectorState.ACTIVE,
        datetime.now(UTC),
    )


@pytest.fixture(scope="module")
def dns_server(
    selectors: tuple[Selector, ...], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DnsServer]:
    records = {}
    for selector in selectors:
        record = dkimkeys.dkim_record(DOMAIN, selector)
        assert record.type == "TXT"
        records[record.name] = record.value
    server = DnsServer(records, tmp_path_factory.mktemp("dns") / "dnsmasq.log")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def keys(selectors: tuple[Selector, ...]) -> tuple[SigningKey, ...]:
    by_algorithm = {key.algorithm: key for key in KeyStore().keys_for(selectors)}
    return (by_algorithm[Algorithm.RSA_SHA256], by_algorithm[Algorithm.ED25519_SHA256])


@pytest.fixture(scope="module")
def perl_ed25519() -> bool:
    """Whether this Mail::DKIM verifies ed25519-sha256 (its algorithm module and CryptX).

    Debian 12's Mail::DKIM 1.20230212 has no ed25519-sha256 at all: it reports such a
    signature as "invalid (unsupported algorithm ed25519-sha256)", whatever it signs.
    """
    probe = subprocess.run(
        ["perl", "-MMail::DKIM::Algorithm::ed25519_sha256", "-MCrypt::PK::Ed25519", "-e1"],
        capture_output=True,
    )
    return probe.returncode == 0


# -- helpers ---------------------------------------------------------------------------------
def body_hash(body: bytes) -> bytes:
    hasher = RelaxedBodyHash()
    hasher.update(body)
    return hasher.digest()


def on_the_wire(signatures: Sequence[bytes], body: bytes) -> bytes:
    """The message as Postfix's SMTP client sends it: signatures on top, CRLF line ends."""
    lines = [b"DKIM-Signature: " + value for value in signatures]
    lines += [name.encode("ascii") + b": " + value for name, value in HEADERS]
    body = body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def dkimproxy_verify(message: bytes, server: DnsServer) -> tuple[list[str], str]:
    """The ``verify result`` of each signature, top to bottom, and the whole output."""
    assert DKIMPROXY_VERIFY is not None
    env = {key: value for key, value in os.environ.items()
           if key not in ("LOCALDOMAIN", "RES_SEARCHLIST")}
    env["RES_NAMESERVERS"] = "127.0.0.1"
    env["RES_OPTIONS"] = f"port:{server.port} retry:1 retrans:2"
    proc = subprocess.run(
        [DKIMPROXY_VERIFY], input=message, env=env, capture_output=True, timeout=60
    )
    output = proc.stdout.decode("utf-8", "replace")
    assert proc.returncode == 0, output + proc.stderr.decode("utf-8", "replace")
    results = [line.split(":", 1)[1].strip() for line in output.splitlines()
               if line.startswith("verify result:")]
    return results, output


def expect(results: list[str], rsa: str, ed: str, perl_ed25519: bool, output: str) -> None:
    assert len(results) == 2, output
    assert results[0].startswith(rsa), output
    if perl_ed25519:
        assert results[1].startswith(ed), output
    else:  # checked as far as this verifier can: it sees the signature, knows not the algorithm
        assert results[1] == "invalid (unsupported algorithm ed25519-sha256)", output


# -- tests -----------------------------------------------------------------------------------
PLAIN = b"Hello Bob,\r\n\r\nthe report is attached.  \r\n\r\n\r\nAlice\r\n"
BARE_LF = b"Hello Bob,\n\nlines that end in a bare LF,\ttabs and trailing space \n\n\n"


@pytest.mark.parametrize("body", [PLAIN, BARE_LF], ids=["crlf-body", "bare-lf-body"])
def test_rsa_and_ed25519_signatures_pass_dkimproxy_verify(
    body: bytes, keys: tuple[SigningKey, ...], dns_server: DnsServer, perl_ed25519: bool
) -> None:
    signatures = sign(HEADERS, body_hash(body), DOMAIN, keys, int(time.time()))
    results, output = dkimproxy_verify(on_the_wire(signatures, body), dns_server)
    expect(results, "pass", "pass", perl_ed25519, output)


def test_tampered_body_fails_dkimproxy_verify(
    keys: tuple[SigningKey, ...], dns_server: DnsServer, perl_ed25519: bool
) -> None:
    signatures = sign(HEADERS, body_hash(PLAIN), DOMAIN, keys, int(time.time()))
    tampered = PLAIN.replace(b"attached", b"detached")
    results, output = dkimproxy_verify(on_the_wire(signatures, tampered), dns_server)
    expect(results, "fail", "fail", perl_ed25519, output)
    assert "body has been altered" in output


def test_tampered_header_fails_dkimproxy_verify(
    keys: tuple[SigningKey, ...], dns_server: DnsServer, perl_ed25519: bool
) -> None:
    signatures = sign(HEADERS, body_hash(PLAIN), DOMAIN, keys, int(time.time()))
    message = on_the_wire(signatures, PLAIN).replace(b"Independent check", b"Independent chECK!")
    results, output = dkimproxy_verify(message, dns_server)
    expect(results, "fail", "fail", perl_ed25519, output)
