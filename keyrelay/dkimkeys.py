"""DKIM key pairs and the DNS records that publish them.

Each sending domain gets one RSA-2048 (rsa-sha256, RFC 6376) and one Ed25519 (ed25519-sha256,
RFC 8463) key pair. Private keys are PKCS#8 PEM files created with mode 0600 and never read
back by this module; the public half goes into the directory as the DNS ``p=`` value
(``public_key_value``, which the milter uses too, to check that a key file is the published
one).

Key files are made before the directory write that names them (``new_keys``): they are
deleted again when that write does not happen, and kept once it has.
"""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from .directory.model import Algorithm, Pool, Selector, SelectorState
from .errors import KeyrelayError, UserError

RSA_BITS = 2048
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
_SUFFIX = {Algorithm.RSA_SHA256: "rsa", Algorithm.ED25519_SHA256: "ed"}
DNS_K = {Algorithm.RSA_SHA256: "rsa", Algorithm.ED25519_SHA256: "ed25519"}


@dataclass(frozen=True, slots=True)
class DnsRecord:
    name: str  # fully qualified, without the trailing dot
    type: str
    value: str  # the whole TXT value (split into strings only when rendered)
    purpose: str

    def zone_line(self) -> str:
        """The record in zone-file form, TXT split into strings of at most 255 octets."""
        chunks = [self.value[i : i + 255] for i in range(0, len(self.value), 255)] or [""]
        quoted = " ".join(f'"{c}"' for c in chunks)
        return f"{self.name}. 3600 IN {self.type} {quoted}"


def selector_names(prefix: str, now: datetime, taken: set[str]) -> dict[Algorithm, str]:
    """Fresh selector names like ``kr20261128-rsa``; a letter is added on a same-day rotation."""
    stamp = f"{prefix}{now:%Y%m%d}"
    for extra in ["", *"bcdefghijklmnopqrstuvwxyz"]:
        candidate = {alg: f"{stamp}{extra}-{sfx}" for alg, sfx in _SUFFIX.items()}
        if not taken.intersection(candidate.values()):
            return candidate
    raise UserError("more than 26 selector rotations in one day: rotate again tomorrow")


def public_key_value(private: PrivateKey) -> str:
    """The DNS ``p=`` value of a private key's public half: base64 of the DER
    SubjectPublicKeyInfo for RSA (RFC 6376 section 3.6.1), of the raw 32-byte key for
    Ed25519 (RFC 8463 section 4.2)."""
    if isinstance(private, rsa.RSAPrivateKey):
        public = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        public = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    return base64.b64encode(public).decode("ascii")


def _write_private(path: str, pem: bytes) -> None:
    """Write a private key: mode 0600, in folders private to the daemon user.

    Files and folders belong to the owner of the key folder (dkim.key_dir, which the
    deployment gives to the daemons' user): `keyrelay domain add` is run as root, and a key
    owned by root would leave the milter unable to sign (it answers 451, never sends
    unsigned). A file that could not be written whole is removed again.
    """
    domain_dir = os.path.dirname(path)
    key_dir = os.path.dirname(domain_dir)
    os.makedirs(key_dir, mode=0o700, exist_ok=True)
    os.makedirs(domain_dir, mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        owner = os.stat(key_dir)
        if os.geteuid() == 0 and (owner.st_uid, owner.st_gid) != (0, 0):
            for made in (domain_dir, path):
                os.chown(made, owner.st_uid, owner.st_gid)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise


def new_selector(key_dir: str, domain: str, algorithm: Algorithm, name: str,
                 state: SelectorState, now: datetime) -> Selector:
    """Generate a key pair, write its private key to KEY_DIR/DOMAIN/NAME.pem, return the
    selector that names it."""
    private: PrivateKey
    if algorithm is Algorithm.RSA_SHA256:
        private = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    else:
        private = ed25519.Ed25519PrivateKey.generate()
    path = os.path.join(key_dir, domain, f"{name}.pem")
    _write_private(path, private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return Selector(name=name, algorithm=algorithm, state=state, key_file=path,
                    public_key=public_key_value(private), created=now)


def create_selectors(
    key_dir: str, domain: str, names: dict[Algorithm, str], state: SelectorState, now: datetime
) -> tuple[Selector, ...]:
    """Generate one key pair per algorithm, write the private keys, return the selectors."""
    return tuple(new_selector(key_dir, domain, algorithm, name, state, now)
                 for algorithm, name in names.items())


def delete_key_files(paths: list[str]) -> list[str]:
    """Delete private key files (one already gone is fine); a line for each that could not
    be deleted."""
    problems = []
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            problems.append(f"cannot delete {path}: {exc.strerror}")
    return problems


class NewKeys:
    """The private key files made for one directory write (see ``new_keys``)."""

    def __init__(self, key_dir: str) -> None:
        self.key_dir = key_dir
        self.files: list[str] = []
        self.recorded = False

    def create(self, domain: str, names: dict[Algorithm, str], state: SelectorState,
               now: datetime) -> tuple[Selector, ...]:
        """``create_selectors``, each file remembered as soon as it is written."""
        made = []
        for algorithm, name in names.items():
            made.append(new_selector(self.key_dir, domain, algorithm, name, state, now))
            self.files.append(made[-1].key_file)
        return tuple(made)

    def written(self) -> None:
        """The directory write that names these keys has happened: they stay, whatever
        fails after it."""
        self.recorded = True


@contextlib.contextmanager
def new_keys(key_dir: str, warn: Callable[[str], None],
             named: Callable[[], set[str]] | None = None) -> Iterator[NewKeys]:
    """Private key files for a directory write that names them: ``keys.create(...)``, then
    the write, then ``keys.written()``.

    Leaving the block before ``written()`` (the write refused or failed, an error or Ctrl-C)
    deletes the files made that the directory does not name: no private key is left behind.
    Whether the write happened is asked of the directory itself (``named``: the key files
    it names), not only of ``written()``: a Ctrl-C can land after the directory file was
    replaced and before ``written()`` ran. What the directory names stays, whatever fails
    next (e.g. the audit log): without it the domain could not sign. When the directory
    cannot be read, the files stay (with a warning): a stray key file can be deleted by
    hand, a domain whose key is gone cannot sign. A file that cannot be deleted is passed
    to ``warn``.
    """
    keys = NewKeys(key_dir)
    try:
        yield keys
    finally:
        if not keys.recorded and keys.files:
            doomed = list(keys.files)
            if named is not None:
                try:
                    kept = named()
                except (KeyrelayError, OSError) as exc:
                    for path in doomed:
                        warn(f"kept {path}: cannot tell whether the directory names it ({exc})")
                    doomed = []
                else:
                    doomed = [path for path in doomed if os.path.abspath(path) not in kept]
            for problem in delete_key_files(doomed):
                warn(problem)


def dkim_record(domain: str, selector: Selector) -> DnsRecord:
    return DnsRecord(
        name=f"{selector.name}._domainkey.{domain}",
        type="TXT",
        value=f"v=DKIM1; k={DNS_K[selector.algorithm]}; p={selector.public_key}",
        purpose=f"DKIM {selector.algorithm} selector {selector.name} ({selector.state})",
    )


def spf_record(domain: str, pools: list[Pool], include: str) -> DnsRecord:
    mechanisms = [f"include:{include}"] if include else []
    for pool in pools:
        for address in pool.bind:
            mechanisms.append(f"ip{address.version}:{address}")
    return DnsRecord(
        name=domain,
        type="TXT",
        value=" ".join(["v=spf1", *dict.fromkeys(mechanisms), "~all"]),
        purpose="SPF: authorises the relay's outbound addresses (merge into an existing record)",
    )


def dmarc_record(domain: str, rua: str) -> DnsRecord:
    report = f" rua=mailto:{rua};" if rua else ""
    return DnsRecord(
        name=f"_dmarc.{domain}",
        type="TXT",
        value=f"v=DMARC1; p=none;{report} adkim=r; aspf=r",
        purpose="DMARC suggestion: start with p=none, tighten once reports look clean",
    )
