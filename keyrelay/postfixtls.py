"""The TLS certificate Postfix will offer: its files exist, can be read, and key and
certificate belong together (``keyrelay postfix apply`` refuses otherwise).

API keys must only cross TLS. A main.cf that names a missing certificate (Debian's snakeoil
files on a host without them) passes ``postfix check``, and then every smtpd fails its TLS
handshake: no submission service works. So ``apply`` looks at the files itself, as root, the
user Postfix reads them as (smtpd opens them before it drops privileges; postconf(5),
smtpd_tls_cert_file).

Two shapes (postconf(5)):

- ``smtpd_tls_chain_files``: one or more PEM files; in their order, each private key is
  followed by the certificate chain that goes with it, the server's certificate first. It
  wins over the legacy settings when set.
- ``smtpd_tls_cert_file`` with ``smtpd_tls_key_file`` (whose default, ``$smtpd_tls_cert_file``,
  is the same file), and likewise ``smtpd_tls_eccert_file`` / ``smtpd_tls_eckey_file``.

Errors name the setting and the file, never anything read from a key file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .errors import KeyrelayError

# main.cf settings whose (expanded) values the check reads
TLS_SETTINGS = ("smtpd_tls_chain_files", "smtpd_tls_cert_file", "smtpd_tls_key_file",
                "smtpd_tls_eccert_file", "smtpd_tls_eckey_file")
_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.S)
_SPLIT = re.compile(r"[\s,]+")


class CertificateError(KeyrelayError):
    """A TLS file Postfix would use is missing, unreadable, malformed or mismatched."""


@dataclass(frozen=True)
class Block:
    """One PEM block of a file: a private key or a certificate."""

    kind: str  # "key" | "certificate"
    data: bytes
    file: str


def read_file(path: str) -> bytes:
    return Path(path).read_bytes()


def check_tls_files(values: Mapping[str, str], read: Callable[[str], bytes] = read_file,
                    source: str = "") -> list[str]:
    """Check the files of ``values`` (main.cf setting -> expanded value); the files checked.

    ``source`` names where smtpd_tls_chain_files comes from when it is not main.cf (the
    keyrelay setting postfix.tls_chain_files). Raises ``CertificateError`` with one line.
    """
    chain = _files(values.get("smtpd_tls_chain_files", ""))
    if chain:
        setting = source or "smtpd_tls_chain_files"
        _check_chain(setting, [_blocks(setting, f, read) for f in chain])
        return chain
    checked = []
    for cert_name, key_name in (("smtpd_tls_cert_file", "smtpd_tls_key_file"),
                                ("smtpd_tls_eccert_file", "smtpd_tls_eckey_file")):
        cert_file = values.get(cert_name, "").strip()
        if not cert_file:
            continue
        key_file = values.get(key_name, "").strip() or cert_file
        certs = [b for b in _blocks(cert_name, cert_file, read) if b.kind == "certificate"]
        if not certs:
            raise CertificateError(f"{cert_name} = {cert_file}: no certificate in it (PEM "
                                   "BEGIN CERTIFICATE)")
        keys = [b for b in _blocks(key_name, key_file, read) if b.kind == "key"]
        if not keys:
            raise CertificateError(f"{key_name} = {key_file}: no private key in it (PEM "
                                   "BEGIN PRIVATE KEY)")
        _match(keys[0], certs[0], f"{key_name} = {key_file}", f"{cert_name} = {cert_file}")
        checked += list(dict.fromkeys([cert_file, key_file]))
    return checked


def _files(value: str) -> list[str]:
    return [item for item in _SPLIT.split(value.strip()) if item]


def _blocks(setting: str, path: str, read: Callable[[str], bytes]) -> list[Block]:
    where = f"{setting}: {path}"
    if not os.path.isabs(path):
        raise CertificateError(f"{where}: not an absolute path")
    try:
        if not os.path.isfile(path):
            reason = "is not a file" if os.path.exists(path) else "no such file"
            raise CertificateError(f"{where}: {reason}; Postfix could not offer TLS, and API "
                                   "keys must only cross TLS")
        content = read(path)
    except OSError as exc:
        raise CertificateError(f"{where}: cannot be read ({exc.strerror or exc}); Postfix "
                               "reads it as root: run keyrelay postfix apply as root") from None
    blocks = []
    for match in _PEM.finditer(content):
        label = match.group(1).decode()
        if label == "ENCRYPTED PRIVATE KEY" or (
                label.endswith("PRIVATE KEY") and b"ENCRYPTED" in match.group(0)[:200]):
            raise CertificateError(f"{where}: the private key is encrypted; Postfix needs it "
                                   "without a passphrase (readable by root only)")
        if label.endswith("PRIVATE KEY"):
            blocks.append(Block("key", match.group(0), path))
        elif label in ("CERTIFICATE", "TRUSTED CERTIFICATE"):
            blocks.append(Block("certificate", match.group(0), path))
    if not blocks:
        raise CertificateError(f"{where}: no PEM private key or certificate in it")
    return blocks


def _check_chain(setting: str, files: list[list[Block]]) -> None:
    """In file order: each key, then its certificate (then the rest of its chain)."""
    blocks = [block for found in files for block in found]
    if blocks[0].kind != "key":
        raise CertificateError(f"{setting}: {blocks[0].file} starts with a certificate; the "
                               "private key must come first, then its certificate chain")
    for i, block in enumerate(blocks):
        if block.kind != "key":
            continue
        following = blocks[i + 1] if i + 1 < len(blocks) else None
        if following is None or following.kind != "certificate":
            raise CertificateError(f"{setting}: the private key in {block.file} is not "
                                   "followed by its certificate")
        _match(block, following, f"{setting}: the private key in {block.file}",
               f"the certificate in {following.file}")


def _match(key_block: Block, cert_block: Block, key_where: str, cert_where: str) -> None:
    try:
        key = serialization.load_pem_private_key(key_block.data, password=None)
    except (ValueError, TypeError):
        raise CertificateError(f"{key_where}: the private key cannot be read (malformed, or "
                               "encrypted: Postfix needs it without a passphrase)") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_block.data)
    except ValueError:
        raise CertificateError(f"{cert_where}: the certificate cannot be read "
                               "(malformed PEM)") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise CertificateError(f"{key_where} does not belong to {cert_where}: they are not "
                               "one key pair")
