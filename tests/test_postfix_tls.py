"""The TLS files ``keyrelay postfix apply`` checks before it changes anything
(keyrelay/postfixtls.py; issue 20 item 10): both shapes of Postfix's settings, every way they
can be wrong, one line naming the setting and the file, and never a byte of a key.

``write_key_pair`` is shared with tests/test_postfixconf.py.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from keyrelay.postfixtls import CertificateError, check_tls_files


def _pem_pair(name: str, key: ec.EllipticCurvePrivateKey | None = None,
              password: bytes | None = None) -> tuple[bytes, bytes]:
    """(private key PEM, self-signed certificate PEM) for ``name``; EC keys: fast to make."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                encryption)
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def write_key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    """key.pem (mode 0600) and cert.pem in ``folder``, one pair; their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    key_pem, cert_pem = _pem_pair(name)
    key, cert = folder / "key.pem", folder / "cert.pem"
    key.write_bytes(key_pem)
    key.chmod(0o600)
    cert.write_bytes(cert_pem)
    return key, cert


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return write_key_pair(tmp_path / "good", "relay.example")


def refused(values: dict[str, str]) -> str:
    with pytest.raises(CertificateError) as error:
        check_tls_files(values)
    text = str(error.value)
    assert "\n" not in text
    return text


# -- what passes ------------------------------------------------------------------------------
def test_cert_and_key_files_that_belong_together_pass(pair: tuple[Path, Path]) -> None:
    key, cert = pair
    assert check_tls_files({"smtpd_tls_cert_file": str(cert),
                            "smtpd_tls_key_file": str(key)}) == [str(cert), str(key)]


def test_one_file_holding_key_and_certificate_passes_in_both_shapes(tmp_path: Path) -> None:
    key_pem, cert_pem = _pem_pair("relay.example")
    both = tmp_path / "both.pem"
    both.write_bytes(key_pem + cert_pem)
    # smtpd_tls_key_file's default is $smtpd_tls_cert_file: expanded, or left empty here
    assert check_tls_files({"smtpd_tls_cert_file": str(both)}) == [str(both)]
    assert check_tls_files({"smtpd_tls_chain_files": str(both)}) == [str(both)]


def test_chain_files_with_two_key_pairs_and_a_chain_pass(tmp_path: Path) -> None:
    rsa_less = [_pem_pair("a.example"), _pem_pair("b.example")]
    _, intermediate = _pem_pair("ca.example")
    first, second = tmp_path / "first.pem", tmp_path / "second.pem"
    first.write_bytes(rsa_less[0][0] + rsa_less[0][1] + intermediate)
    second.write_bytes(rsa_less[1][0] + rsa_less[1][1])
    assert check_tls_files({"smtpd_tls_chain_files": f"{first}, {second}"}) == [
        str(first), str(second)]


def test_chain_files_win_over_the_legacy_settings(pair: tuple[Path, Path]) -> None:
    key, cert = pair
    # Postfix ignores smtpd_tls_cert_file when smtpd_tls_chain_files is set: so does the check
    assert check_tls_files({"smtpd_tls_chain_files": f"{key} {cert}",
                            "smtpd_tls_cert_file": "/nonexistent/snakeoil.pem"}) == [
        str(key), str(cert)]


# -- what is refused --------------------------------------------------------------------------
def test_a_missing_certificate_names_the_setting_and_file() -> None:
    text = refused({"smtpd_tls_cert_file": "/etc/ssl/certs/nonexistent-snakeoil.pem",
                    "smtpd_tls_key_file": "/etc/ssl/private/nonexistent-snakeoil.key"})
    assert text.startswith("smtpd_tls_cert_file: /etc/ssl/certs/nonexistent-snakeoil.pem: "
                           "no such file")


def test_a_missing_key_file_names_its_setting(pair: tuple[Path, Path], tmp_path: Path) -> None:
    _, cert = pair
    text = refused({"smtpd_tls_cert_file": str(cert),
                    "smtpd_tls_key_file": str(tmp_path / "gone.key")})
    assert text.startswith(f"smtpd_tls_key_file: {tmp_path / 'gone.key'}: no such file")


def test_a_folder_is_not_a_certificate(tmp_path: Path) -> None:
    assert refused({"smtpd_tls_cert_file": str(tmp_path)}).startswith(
        f"smtpd_tls_cert_file: {tmp_path}: is not a file")


def test_a_relative_path_is_refused() -> None:
    assert refused({"smtpd_tls_chain_files": "relay.pem"}) == (
        "smtpd_tls_chain_files: relay.pem: not an absolute path")


def test_a_key_of_another_pair_is_refused(pair: tuple[Path, Path], tmp_path: Path) -> None:
    _, cert = pair
    other, _ = write_key_pair(tmp_path / "other", "other.example")
    text = refused({"smtpd_tls_cert_file": str(cert), "smtpd_tls_key_file": str(other)})
    assert text == (f"smtpd_tls_key_file = {other} does not belong to smtpd_tls_cert_file = "
                    f"{cert}: they are not one key pair")


def test_an_ecdsa_pair_is_checked_like_the_first(pair: tuple[Path, Path],
                                                  tmp_path: Path) -> None:
    key, cert = pair
    other, _ = write_key_pair(tmp_path / "other", "other.example")
    text = refused({"smtpd_tls_cert_file": str(cert), "smtpd_tls_key_file": str(key),
                    "smtpd_tls_eccert_file": str(cert), "smtpd_tls_eckey_file": str(other)})
    assert text.startswith(f"smtpd_tls_eckey_file = {other} does not belong to")


def test_chain_files_in_the_wrong_order_are_refused(pair: tuple[Path, Path]) -> None:
    key, cert = pair
    text = refused({"smtpd_tls_chain_files": f"{cert}, {key}"})
    assert text == (f"smtpd_tls_chain_files: {cert} starts with a certificate; the private "
                    "key must come first, then its certificate chain")


def test_a_key_without_its_certificate_is_refused(pair: tuple[Path, Path]) -> None:
    key, _ = pair
    assert refused({"smtpd_tls_chain_files": str(key)}) == (
        f"smtpd_tls_chain_files: the private key in {key} is not followed by its certificate")


def test_chain_files_of_two_pairs_mixed_up_are_refused(tmp_path: Path) -> None:
    a_key, a_cert = write_key_pair(tmp_path / "a", "a.example")
    b_key, b_cert = write_key_pair(tmp_path / "b", "b.example")
    text = refused({"smtpd_tls_chain_files": f"{a_key} {b_cert} {b_key} {a_cert}"})
    assert text == (f"smtpd_tls_chain_files: the private key in {a_key} does not belong to "
                    f"the certificate in {b_cert}: they are not one key pair")


def test_an_encrypted_key_is_refused(tmp_path: Path) -> None:
    key_pem, cert_pem = _pem_pair("relay.example", password=b"a passphrase")
    (tmp_path / "key.pem").write_bytes(key_pem)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    text = refused({"smtpd_tls_chain_files": f"{tmp_path}/key.pem, {tmp_path}/cert.pem"})
    assert "the private key is encrypted; Postfix needs it without a passphrase" in text


def test_a_file_without_pem_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "cert.pem"
    junk.write_text("not a certificate\n")
    assert refused({"smtpd_tls_cert_file": str(junk)}) == (
        f"smtpd_tls_cert_file: {junk}: no PEM private key or certificate in it")


def test_a_certificate_file_without_a_certificate_is_refused(pair: tuple[Path, Path]) -> None:
    key, _ = pair
    assert refused({"smtpd_tls_cert_file": str(key)}) == (
        f"smtpd_tls_cert_file = {key}: no certificate in it (PEM BEGIN CERTIFICATE)")


def test_a_malformed_key_is_refused_without_its_bytes(pair: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    _, cert = pair
    bad = tmp_path / "bad.key"
    body = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo="
    bad.write_text(f"-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n")
    text = refused({"smtpd_tls_cert_file": str(cert), "smtpd_tls_key_file": str(bad)})
    assert text.startswith(f"smtpd_tls_key_file = {bad}: the private key cannot be read")
    assert body not in text


def test_an_unreadable_file_is_named(pair: tuple[Path, Path]) -> None:
    key, cert = pair

    def denied(path: str) -> bytes:
        raise PermissionError(13, "Permission denied", path)

    with pytest.raises(CertificateError) as error:
        check_tls_files({"smtpd_tls_cert_file": str(cert), "smtpd_tls_key_file": str(key)},
                        read=denied)
    assert str(error.value) == (f"smtpd_tls_cert_file: {cert}: cannot be read (Permission "
                                "denied); Postfix reads it as root: run keyrelay postfix "
                                "apply as root")


def test_an_ed25519_pair_passes(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.example")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, None))
    both = tmp_path / "both.pem"
    both.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
                     + cert.public_bytes(serialization.Encoding.PEM))
    assert check_tls_files({"smtpd_tls_chain_files": str(both)}) == [str(both)]
