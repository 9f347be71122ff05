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

import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime

import pytest

from keyrelay import dkimkeys
from keyrelay.directory.model import Algorithm, Selector, SelectorState
from milters.dkimsign import KeyStore, RelaxedBodyHash, SigningKey, sign
from testkit.dnsserver import (
    DKIMPROXY_VERIFY,
    DNSMASQ,
    MISSING,
    DnsServer,
    dkimproxy_verify,
    perl_has_ed25519,
)

DOMAIN = "example.com"
pytestmark = pytest.mark.skipif(DKIMPROXY_VERIFY is None or DNSMASQ is None, reason=MISSING)

HEADERS = [
    ("From", b"Alice Example <alice@example.com>"),
    ("To", b"bob@example.net"),
    ("Subject", b"Independent check"),
    ("Date", b"Mon, 02 Jun 2025 12:00:00 +0000"),
    ("Message-ID", b"<20250602120000.2@example.com>"),
    ("MIME-Version", b"1.0"),
    ("Content-Type", b"text/plain; charset=utf-8"),
]


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
    server = DnsServer(records, tmp_path_factory.mktemp("dns") / "dnsmasq.log", [DOMAIN])
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
    return perl_has_ed25519()


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
