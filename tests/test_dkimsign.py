"""DKIM signing without a milter (milters.dkimsign), checked by dkimpy's verifier.

Keys are made the way `keyrelay domain add` makes them (keyrelay.dkimkeys) and the verifier
looks up the public keys through a ``dnsfunc`` that serves the very TXT records keyrelay tells
admins to publish. The helpers at the top are shared with tests/test_milter.py. The key
files keyrelay.dkimkeys makes for a directory write are checked here too.

dkimpy verifies ed25519-sha256 with PyNaCl. Where PyNaCl is not installed, a stand-in backed by
``cryptography`` is put in its place (only the last step, checking the Ed25519 signature of a
hash dkimpy computed; canonicalisation and hashing stay dkimpy's).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import logging
import os
import pickle
import random
import re
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import dkim
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.canonicalization import Relaxed

from keyrelay import dkimkeys
from keyrelay.directory.model import Algorithm, Selector, SelectorState
from keyrelay.errors import DirectoryUnavailable
from milters import dkimsign
from milters.dkimsign import KeyStore, KeyUnavailable, RelaxedBodyHash, SigningKey, sign

NOW = datetime(2025, 6, 2, 12, 0, tzinfo=UTC)
STAMP = int(NOW.timestamp())


def _nacl_stand_in() -> types.ModuleType:
    """The three names dkimpy uses from PyNaCl, on top of ``cryptography``."""

    class BadSignatureError(Exception):
        pass

    class Base64Encoder:
        pass

    class VerifyKey:
        def __init__(self, key: bytes, encoder: type = Base64Encoder) -> None:
            self.key = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(key))

        def verify(self, message: bytes, signature: bytes) -> bytes:
            try:
                self.key.verify(signature, message)
            except InvalidSignature:
                raise BadSignatureError("signature was forged or corrupt") from None
            return message

    nacl = types.ModuleType("nacl")
    nacl.signing = types.SimpleNamespace(VerifyKey=VerifyKey)  # type: ignore[attr-defined]
    nacl.encoding = types.SimpleNamespace(Base64Encoder=Base64Encoder)  # type: ignore[attr-defined]
    nacl.exceptions = types.SimpleNamespace(  # type: ignore[attr-defined]
        BadSignatureError=BadSignatureError, ValueError=ValueError
    )
    return nacl


if not hasattr(dkim, "nacl"):  # dkimpy imported without PyNaCl
    dkim.nacl = _nacl_stand_in()


# -- shared helpers --------------------------------------------------------------------------
class DnsZone:
    """The DKIM TXT records of some selectors, as a dkimpy ``dnsfunc``."""

    def __init__(self) -> None:
        self.records: dict[str, bytes] = {}

    def publish(self, domain: str, selectors: Sequence[Selector]) -> None:
        for selector in selectors:
            record = dkimkeys.dkim_record(domain, selector)
            self.records[record.name + "."] = record.value.encode("ascii")

    def __call__(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        key = name.decode("ascii") if isinstance(name, bytes) else name
        return self.records.get(key)


def make_selectors(key_dir: Path, domain: str, tag: str = "kr20250601") -> tuple[Selector, ...]:
    """An RSA-2048 and an Ed25519 selector with real key files, as `domain add` makes them."""
    names = {Algorithm.RSA_SHA256: f"{tag}-rsa", Algorithm.ED25519_SHA256: f"{tag}-ed"}
    return dkimkeys.create_selectors(str(key_dir), domain, names, SelectorState.ACTIVE, NOW)


def delivered(body: bytes) -> bytes:
    """``body`` as Postfix's SMTP client sends it: bare LF as CRLF, ending in CRLF."""
    body = body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return body + b"\r\n" if body and not body.endswith(b"\n") else body


def wire(headers: Sequence[tuple[str, bytes]], body: bytes,
         signatures: Sequence[bytes] = ()) -> bytes:
    """The message as delivered: signatures on top, every line end CRLF (Postfix's SMTP)."""
    lines = [b"DKIM-Signature: " + value for value in signatures]
    lines += [name.encode("utf-8", "surrogateescape") + b": " + value for name, value in headers]
    head = b"\r\n".join(line.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for line in lines)
    return head + b"\r\n\r\n" + delivered(body)


def verified(message: bytes, dns: DnsZone) -> list[bool]:
    """dkimpy's verdict on each DKIM-Signature of ``message``, top to bottom."""
    count = sum(1 for line in message.split(b"\n") if line.lower().startswith(b"dkim-signature:"))
    results = []
    for idx in range(count):
        checker = dkim.DKIM(message, minkey=2048)
        try:
            results.append(bool(checker.verify(idx=idx, dnsfunc=dns)))
        except dkim.DKIMException:
            results.append(False)
    return results


def tags(value: bytes) -> dict[str, str]:
    unfolded = b"".join(value.split()).decode("ascii")
    return dict(part.split("=", 1) for part in unfolded.split(";") if part)


def body_hash(body: bytes, chunk: int | None = None) -> bytes:
    hasher = RelaxedBodyHash()
    if chunk is None:
        hasher.update(body)
    else:
        for i in range(0, len(body), chunk):
            hasher.update(body[i : i + chunk])
    return hasher.digest()


def dkimpy_body_hash(body: bytes) -> bytes:
    """dkimpy's relaxed body hash of ``body`` as a receiver gets it (``delivered``)."""
    _, parsed = dkim.rfc822_parse(b"X: y\r\n\r\n" + delivered(body))
    return hashlib.sha256(Relaxed.canonicalize_body(parsed)).digest()


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dkim")


@pytest.fixture(scope="module")
def selectors(key_dir: Path) -> tuple[Selector, ...]:
    return make_selectors(key_dir, "example.com")


@pytest.fixture(scope="module")
def dns(selectors: tuple[Selector, ...]) -> DnsZone:
    zone = DnsZone()
    zone.publish("example.com", selectors)
    return zone


@pytest.fixture(scope="module")
def keys(selectors: tuple[Selector, ...]) -> tuple[SigningKey, ...]:
    return KeyStore().keys_for(selectors)


HEADERS = [
    ("From", b"Alice Example <alice@example.com>"),
    ("To", b"bob@example.net"),
    ("Subject", b"Quarterly report"),
    ("Date", b"Mon, 02 Jun 2025 12:00:00 +0000"),
    ("Message-ID", b"<20250602120000.1@example.com>"),
    ("MIME-Version", b"1.0"),
    ("Content-Type", b"text/plain; charset=utf-8"),
    ("X-Mailer", b"not signed"),
]


def signed(headers: Sequence[tuple[str, bytes]], body: bytes,
           keys: Sequence[SigningKey], chunk: int | None = None) -> bytes:
    signatures = sign(headers, body_hash(body, chunk), "example.com", keys, STAMP)
    return wire(headers, body, signatures)


# -- signatures verify -------------------------------------------------------------------------
def test_rsa_and_ed25519_signatures_both_verify_with_dkimpy(
    keys: tuple[SigningKey, ...], dns: DnsZone
) -> None:
    message = signed(HEADERS, b"Hello Bob,\r\n\r\nthe report is attached.\r\n", keys)
    assert verified(message, dns) == [True, True]


def test_signature_tags_say_relaxed_relaxed_domain_selector_and_time(
    keys: tuple[SigningKey, ...],
) -> None:
    rsa_value, ed_value = sign(HEADERS, body_hash(b"x\r\n"), "example.com", keys, STAMP)
    for value, algorithm, selector in (
        (rsa_value, "rsa-sha256", "kr20250601-rsa"),
        (ed_value, "ed25519-sha256", "kr20250601-ed"),
    ):
        found = tags(value)
        assert found["v"] == "1"
        assert found["a"] == algorithm
        assert found["c"] == "relaxed/relaxed"
        assert found["d"] == "example.com"
        assert found["s"] == selector
        assert found["t"] == str(STAMP)
        assert found["bh"] == base64.b64encode(body_hash(b"x\r\n")).decode()
        assert "i" not in found and "l" not in found  # no identity, no body length limit


def test_from_is_signed_once_more_than_it_occurs(keys: tuple[SigningKey, ...]) -> None:
    value = sign(HEADERS, body_hash(b""), "example.com", keys[:1], STAMP)[0]
    names = tags(value)["h"].split(":")
    assert names.count("from") == 2
    # the other over-signed headers too (To, Subject present; Reply-To, Cc absent: signed once)
    assert names.count("to") == 2 and names.count("subject") == 2
    assert names.count("reply-to") == 1 and names.count("cc") == 1
    assert "x-mailer" not in names
    assert {"date", "message-id", "mime-version", "content-type"} <= set(names)


@pytest.mark.parametrize(
    ("added", "still_valid"),
    [
        (("From", b"ceo@bank.example"), False),  # a second From: the over-signing guards this
        (("Reply-To", b"thief@evil.example"), False),
        (("Cc", b"someone@evil.example"), False),
        (("Subject", b"Urgent: wire money"), False),
        (("X-Spam-Score", b"0.1"), True),  # unsigned headers may be added on the way
        (("Received", b"from relay.example.net"), True),
    ],
)
def test_adding_an_over_signed_header_breaks_the_signature(
    keys: tuple[SigningKey, ...], dns: DnsZone, added: tuple[str, bytes], still_valid: bool
) -> None:
    body = b"text\r\n"
    signatures = sign(HEADERS, body_hash(body), "example.com", keys, STAMP)
    message = wire([added, *HEADERS], body, signatures)
    assert verified(message, dns) == [still_valid, still_valid]


def test_signature_header_is_folded_under_78_columns_with_the_given_line_separator(
    keys: tuple[SigningKey, ...],
) -> None:
    many = [("To", b"x@example.net")] * 30 + HEADERS
    for linesep in (b"\r\n", b"\n"):
        for value in sign(many, body_hash(b""), "example.com", keys, STAMP, linesep=linesep):
            lines = (b"DKIM-Signature: " + value).split(linesep)
            assert len(lines) > 1
            assert all(len(line.expandtabs(8)) <= 78 for line in lines), lines
            assert all(line.startswith(b"\t") for line in lines[1:])
            assert b"\r" not in value.replace(b"\r\n", b"") and not value.endswith(b"\n")
            assert not value.startswith(b" ")


def test_repeated_header_signs_only_its_last_instances(keys: tuple[SigningKey, ...],
                                                      dns: DnsZone) -> None:
    headers = HEADERS + [("To", f"r{i}@example.net".encode()) for i in range(200)]
    value = sign(headers, body_hash(b""), "example.com", keys[:1], STAMP)[0]
    assert tags(value)["h"].split(":").count("to") == dkimsign.MAX_SIGNED_INSTANCES + 1
    assert verified(wire(headers, b"", [value]), dns) == [True]


def test_header_line_ends_become_crlf_exactly_as_the_lookbehind_definition_says() -> None:
    # _crlf is two replaces (the cheap form); the definition is "every LF not after a CR
    # gains a CR", here as a regular expression, on every string of these pieces up to 4 long
    definition = re.compile(rb"(?<!\r)\n")
    pieces = [b"", b"\r", b"\n", b"\r\n", b"\n\r", b"\r\r\n", b" ", b"\t", b"a"]
    for parts in itertools.product(pieces, repeat=4):
        value = b"".join(parts)
        assert dkimsign._crlf(value) == definition.sub(b"\r\n", value), value


def test_h_list_follows_each_messages_headers_though_folded_once_per_shape(
    keys: tuple[SigningKey, ...], dns: DnsZone,
) -> None:
    # the folded h= list is kept by header names: the same shape again reuses it, another
    # shape gets its own, and both verify
    fewer = [h for h in HEADERS if h[0].lower() != "subject"]
    for headers in (HEADERS, fewer, HEADERS, fewer):
        values = sign(headers, body_hash(b"x\r\n"), "example.com", keys, STAMP)
        expected = [name.lower() for name, _ in headers
                    if name.lower() in dkimsign.SIGNED_HEADERS] + list(dkimsign.OVERSIGNED)
        assert all(tags(v)["h"].split(":") == expected for v in values)
        assert verified(wire(headers, b"x\r\n", values), dns) == [True, True]


def test_internationalised_signing_domain_is_written_as_a_label(
    key_dir: Path, keys: tuple[SigningKey, ...]
) -> None:
    value = sign(HEADERS, body_hash(b""), "bücher.example", keys[:1], STAMP)[0]
    assert tags(value)["d"] == "xn--bcher-kva.example"


# -- bodies ------------------------------------------------------------------------------------
BODIES = {
    "crlf": b"Hello,\r\n\r\nline two\r\n",
    "bare_lf": b"Hello,\n\nline two  \nwith\ttabs \t \n\n\n",
    "mixed_line_ends": b"a\r\nb\nc\r\n\nd",
    "no_final_line_end": b"last line without newline",
    "empty": b"",
    "only_blank_lines": b"\r\n\r\n\n \t \r\n",
    "whitespace_runs": b"  lead \t\t mid   trail \t\r\n\t\r\nx  \r\n",
    "latin1_8bit": "Grüße aus Köln, façade\r\n".encode("latin-1"),
    "utf8_8bit": "Grüße 😀 — 你好\r\n".encode(),
    "binary": bytes(range(256)) * 4,
    "lone_cr": b"a\rb\r\r\nc\r",
    "long_line": b"x" * 300_000 + b" \r\n",
    "dot_lines": b".\r\n..\r\n.leading dot\r\n",
}


@pytest.mark.parametrize("name", BODIES)
def test_body_signatures_verify(name: str, keys: tuple[SigningKey, ...], dns: DnsZone) -> None:
    assert verified(signed(HEADERS, BODIES[name], keys), dns) == [True, True]


@pytest.mark.parametrize("name", BODIES)
def test_streamed_body_hash_equals_dkimpys_whatever_the_chunk_size(name: str) -> None:
    body = BODIES[name]
    expected = dkimpy_body_hash(body)
    for chunk in (None, 1, 2, 3, 7, 64, 65535):
        if chunk == 1 and len(body) > 10_000:
            continue  # byte by byte through 300 kB: slow, and 2 and 3 cover the same joins
        assert body_hash(body, chunk) == expected, (name, chunk)


def test_streamed_body_hash_is_chunking_independent_on_random_bodies() -> None:
    rng = random.Random(20250602)
    alphabet = [b" ", b"\t", b"\r", b"\n", b"\r\n", b"a", b"b", b"\x00", b"\xff"]
    for _ in range(300):
        body = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        expected = dkimpy_body_hash(body)
        cuts = sorted(rng.sample(range(len(body) + 1), min(len(body) + 1, rng.randrange(0, 6))))
        hasher = RelaxedBodyHash()
        start = 0
        for cut in [*cuts, len(body)]:
            hasher.update(body[start:cut])
            start = cut
        assert hasher.digest() == expected, body


def test_last_line_without_line_end_is_hashed_as_delivered_with_crlf() -> None:
    # SMTP ends every body with CRLF, so a receiver strips this line's trailing blanks
    assert body_hash(b"text \t") == body_hash(b"text\r\n") == dkimpy_body_hash(b"text \t")


def test_empty_body_hash_is_the_hash_of_nothing() -> None:
    # RFC 6376 section 3.4.4 with errata 3861: relaxed canonicalisation of an empty body is empty
    empty = base64.b64encode(body_hash(b"")).decode()
    assert empty == "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
    assert body_hash(b"\r\n\r\n") == body_hash(b"")


# -- headers -----------------------------------------------------------------------------------
def test_long_folded_headers_verify(keys: tuple[SigningKey, ...], dns: DnsZone) -> None:
    words = b" ".join(b"word%d" % i for i in range(1500))
    folded = b"\n\t".join(words[i : i + 70] for i in range(0, len(words), 70))
    recipients = b",\n ".join(b"user%d@example.net" % i for i in range(300))
    headers = [
        ("From", b"Alice <alice@example.com>"),
        ("Subject", folded),
        ("To", recipients),
        ("References", b" ".join(b"<m%d@example.com>" % i for i in range(400))),
    ]
    assert verified(signed(headers, b"body\r\n", keys), dns) == [True, True]


def test_header_value_forms_give_the_same_signature(keys: tuple[SigningKey, ...]) -> None:
    # relaxed header canonicalisation: LF or CRLF folds, a kept leading space, runs of blanks
    plain = [("From", b"Alice <alice@example.com>"), ("Subject", b"a b c")]
    variants = [
        [("From", b" Alice <alice@example.com>"), ("Subject", b"a\n\tb  c ")],
        [("From", b"Alice  <alice@example.com>"), ("Subject", b"a\r\n b\t\tc")],
    ]
    expected = sign(plain, body_hash(b""), "example.com", keys, STAMP)
    for headers in variants:
        assert sign(headers, body_hash(b""), "example.com", keys, STAMP) == expected


def test_8bit_and_encoded_word_headers_verify(keys: tuple[SigningKey, ...], dns: DnsZone) -> None:
    headers = [
        ("From", "Jörg Müller <joerg@example.com>".encode()),
        ("Subject", b"=?utf-8?q?Gr=C3=BC=C3=9Fe?= and \xff raw"),
        ("To", b'"Bob, the (other) one" <bob@example.net>'),
    ]
    assert verified(signed(headers, b"x\r\n", keys), dns) == [True, True]


# -- the private-key operations go through cryptography ------------------------------------
def test_rsa_signing_never_uses_dkimpys_pure_python_rsa(
    monkeypatch: pytest.MonkeyPatch, keys: tuple[SigningKey, ...], dns: DnsZone
) -> None:
    def forbidden(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("dkimpy's own RSA was called")

    monkeypatch.setattr(dkim, "RSASSA_PKCS1_v1_5_sign", forbidden)
    monkeypatch.setattr(dkim.crypto, "RSASSA_PKCS1_v1_5_sign", forbidden)
    monkeypatch.setattr(dkim.crypto, "parse_pem_private_key", forbidden)
    monkeypatch.setattr(dkim, "parse_pem_private_key", forbidden)
    message = signed(HEADERS, b"body\r\n", keys)
    monkeypatch.undo()  # the verifier may use dkimpy freely
    assert verified(message, dns) == [True, True]


def test_rsa_signature_is_pkcs1_v15_over_sha256_of_the_signed_headers(
    selectors: tuple[Selector, ...], keys: tuple[SigningKey, ...]
) -> None:
    # PKCS#1 v1.5 signatures are deterministic: dkimpy's pure-Python RSA over the same hash
    # must give the very same bytes as OpenSSL did
    value = sign(HEADERS, body_hash(b"x\r\n"), "example.com", keys[:1], STAMP)[0]
    message = wire(HEADERS, b"x\r\n", [value])
    checker = dkim.DKIM(message)
    sig_header = checker.headers[0]
    include = tags(value)["h"].encode().split(b":")
    hasher = dkim.HashThrough(hashlib.sha256())
    dkim.hash_headers(hasher, Relaxed, Relaxed.canonicalize_headers(checker.headers), include,
                      sig_header, None)
    pem = Path(selectors[0].key_file).read_bytes()
    expected = dkim.crypto.RSASSA_PKCS1_v1_5_sign(hasher, dkim.crypto.parse_pem_private_key(pem))
    assert base64.b64decode(tags(value)["b"]) == expected


# -- the key store -----------------------------------------------------------------------------
@pytest.fixture
def count_loads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    loads: list[str] = []
    real = serialization.load_pem_private_key

    def counting(data: bytes, password: bytes | None, *args: object) -> object:
        loads.append("load")
        return real(data, password)

    monkeypatch.setattr("milters.dkimsign.serialization.load_pem_private_key", counting)
    yield loads


def test_keys_are_loaded_once_and_reused(
    selectors: tuple[Selector, ...], count_loads: list[str]
) -> None:
    store = KeyStore()
    first = store.keys_for(selectors)
    for _ in range(5):
        assert store.keys_for(selectors) == first  # the same objects
    assert len(count_loads) == 2


def test_rotation_to_new_selectors_loads_their_keys(
    tmp_path: Path, count_loads: list[str]
) -> None:
    store = KeyStore()
    old = make_selectors(tmp_path, "rotate.example", "kr20250101")
    new = make_selectors(tmp_path, "rotate.example", "kr20250601")
    old_keys = store.keys_for(old)
    new_keys = store.keys_for(new)
    assert [k.selector for k in new_keys] == ["kr20250601-rsa", "kr20250601-ed"]
    assert not set(map(id, old_keys)) & set(map(id, new_keys))
    assert len(count_loads) == 4
    zone = DnsZone()
    zone.publish("rotate.example", new)
    value = sign(HEADERS, body_hash(b""), "rotate.example", new_keys, STAMP)
    assert verified(wire(HEADERS, b"", value), zone) == [True, True]


def test_key_file_replaced_in_place_is_reloaded(tmp_path: Path, count_loads: list[str]) -> None:
    store = KeyStore()
    (rsa_selector, _) = make_selectors(tmp_path, "inplace.example")
    first = store.key(rsa_selector)
    # the admin writes a new key into the same file and updates the selector's public key
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = Path(rsa_selector.key_file)
    path.unlink()
    path.write_bytes(new_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    path.chmod(0o600)
    public = new_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    replaced = replace(rsa_selector, public_key=base64.b64encode(public).decode())
    second = store.key(replaced)
    assert second is not first
    assert store.key(replaced) is second
    assert len(count_loads) == 2


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda path, sel: path.unlink(), "No such file or directory"),
        (lambda path, sel: (path.unlink(), path.mkdir()), "Is a directory"),
        (lambda path, sel: path.write_bytes(b"not a key"), "not an unencrypted PKCS#8 PEM"),
        (lambda path, sel: path.write_bytes(
            ed25519.Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"pass"),
            )), "not an unencrypted PKCS#8 PEM"),
    ],
    ids=["missing", "directory", "garbage", "encrypted"],
)
def test_unusable_key_file_raises_key_unavailable_naming_the_file(
    tmp_path: Path, damage: Callable[[Path, Selector], None], message: str
) -> None:
    (_, ed_selector) = make_selectors(tmp_path, "broken.example")
    path = Path(ed_selector.key_file)
    damage(path, ed_selector)
    with pytest.raises(KeyUnavailable) as info:
        KeyStore().key(ed_selector)
    assert str(info.value).startswith(str(path))
    assert message in str(info.value)


def test_key_that_does_not_match_the_published_record_is_refused(tmp_path: Path) -> None:
    (rsa_selector, ed_selector) = make_selectors(tmp_path, "mismatch.example")
    other = make_selectors(tmp_path, "other.example")
    with pytest.raises(KeyUnavailable, match="does not match the public key of selector"):
        KeyStore().key(replace(ed_selector, public_key=other[1].public_key))
    with pytest.raises(KeyUnavailable, match="not an Ed25519 key"):
        KeyStore().key(replace(ed_selector, key_file=rsa_selector.key_file))
    with pytest.raises(KeyUnavailable, match="not an RSA key"):
        KeyStore().key(replace(rsa_selector, key_file=ed_selector.key_file))


def test_key_cache_is_bounded(tmp_path: Path) -> None:
    store = KeyStore(max_keys=3)
    for i in range(4):
        store.keys_for(make_selectors(tmp_path, f"d{i}.example"))
    assert len(store) == 3


# -- key files made for a directory write (keyrelay.dkimkeys) ---------------------------------
class WriteFailed(Exception):
    pass


@pytest.mark.parametrize(
    ("written", "fails", "kept"),
    [(False, True, False), (True, True, True), (False, False, False), (True, False, True)],
    ids=["write-failed", "failed-after-write", "left-without-write", "written"],
)
def test_new_keys_stay_only_once_the_directory_write_happened(
    tmp_path: Path, written: bool, fails: bool, kept: bool
) -> None:
    warnings: list[str] = []
    made: tuple[Selector, ...] = ()
    with contextlib.suppress(WriteFailed), dkimkeys.new_keys(str(tmp_path), warnings.append) as new:
        made = new.create("keys.example", {Algorithm.RSA_SHA256: "s-rsa",
                                           Algorithm.ED25519_SHA256: "s-ed"},
                          SelectorState.ACTIVE, NOW)
        assert all(Path(s.key_file).exists() for s in made)
        if written:
            new.written()
        if fails:
            raise WriteFailed
    assert [Path(s.key_file).exists() for s in made] == [kept, kept]
    assert warnings == []


def test_a_failure_after_the_directory_named_the_keys_keeps_them(tmp_path: Path) -> None:
    """Ctrl-C between the directory file's replacement and ``written()``: the directory is
    asked which files it names, and those stay; the others go; an unreadable directory
    keeps them all, with a warning."""
    names = {Algorithm.RSA_SHA256: "s-rsa", Algorithm.ED25519_SHA256: "s-ed"}
    named: set[str] = set()
    with contextlib.suppress(WriteFailed), dkimkeys.new_keys(
            str(tmp_path), print, lambda: named) as new:
        made = new.create("keys.example", names, SelectorState.ACTIVE, NOW)
        named.add(os.path.abspath(made[0].key_file))  # the directory names the first only
        raise WriteFailed
    assert [Path(s.key_file).exists() for s in made] == [True, False]

    def unreadable() -> set[str]:
        raise DirectoryUnavailable("directory.yaml: cannot read the file: Permission denied")

    warnings: list[str] = []
    with contextlib.suppress(WriteFailed), dkimkeys.new_keys(
            str(tmp_path / "other"), warnings.append, unreadable) as new:
        made = new.create("keys.example", names, SelectorState.ACTIVE, NOW)
        raise WriteFailed
    assert all(Path(s.key_file).exists() for s in made)
    assert len(warnings) == 2 and all("cannot tell whether the directory names it" in w
                                      for w in warnings)


def test_a_key_written_before_a_failing_one_is_deleted_too(tmp_path: Path) -> None:
    taken = tmp_path / "keys.example" / "s-ed.pem"
    taken.parent.mkdir()
    taken.write_bytes(b"someone else's file")
    names = {Algorithm.RSA_SHA256: "s-rsa", Algorithm.ED25519_SHA256: "s-ed"}
    with pytest.raises(FileExistsError), dkimkeys.new_keys(str(tmp_path), print) as new:
        new.create("keys.example", names, SelectorState.ACTIVE, NOW)
    assert sorted(p.name for p in taken.parent.iterdir()) == ["s-ed.pem"]
    assert taken.read_bytes() == b"someone else's file"


def test_public_key_value_is_the_published_p_value(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    spki = rsa_key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
    raw = ed_key.public_key().public_bytes(serialization.Encoding.Raw,
                                           serialization.PublicFormat.Raw)
    assert dkimkeys.public_key_value(rsa_key) == base64.b64encode(spki).decode()
    assert dkimkeys.public_key_value(ed_key) == base64.b64encode(raw).decode()
    assert len(raw) == 32  # RFC 8463 section 4.2: the bare key, not SubjectPublicKeyInfo


# -- no key material anywhere ------------------------------------------------------------------
def _secret_texts(selectors: Sequence[Selector]) -> list[str]:
    texts = []
    for selector in selectors:
        pem = Path(selector.key_file).read_bytes()
        key = serialization.load_pem_private_key(pem, None)
        der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        body = b"".join(pem.splitlines()[1:-1]).decode()
        texts += [body[20:60], base64.b64encode(der).decode()[40:80], "PRIVATE KEY"]
        if isinstance(key, ed25519.Ed25519PrivateKey):
            raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
            texts += [raw.hex(), base64.b64encode(raw).decode()[:20]]
    return texts


def test_keys_never_show_their_material_in_repr_str_or_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    selectors = make_selectors(tmp_path, "secret.example")
    store = KeyStore()
    keys = store.keys_for(selectors)
    with pytest.raises(KeyUnavailable) as mismatch:
        store.key(replace(selectors[0], public_key=selectors[1].public_key))
    shown = " ".join([repr(store), str(store), *map(repr, keys), *map(str, keys),
                      str(mismatch.value), caplog.text])
    assert "private key not shown" in repr(keys[0])
    for secret in _secret_texts(selectors):
        assert secret not in shown
    with pytest.raises(TypeError):
        pickle.dumps(keys[0])
