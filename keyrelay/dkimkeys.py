"""DKIM key pairs and the DNS records that publish them.

Each sending domain gets one RSA-2048 (rsa-sha256, RFC 6376) and one Ed25519 (ed25519-sha256,
RFC 8463) key pair. Private keys are PKCS#8 PEM files created with mode 0600 and never read
back by this module; the public half goes into the directory as the DNS ``p=`` value.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from .directory.model import Algorithm, Pool, Selector, SelectorState

RSA_BITS = 2048
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
    raise RuntimeError("more than 26 selector rotations in one day")


def _write_private(path: str, pem: bytes) -> None:
    """Write a private key: mode 0600, in folders private to the daemon user.

    Files and folders belong to the owner of the key folder (dkim.key_dir, which the
    deployment gives to the daemons' user): `keyrelay domain add` is run as root, and a key
    owned by root would leave the milter unable to sign (it answers 451, never sends
    unsigned).
    """
    domain_dir = os.path.dirname(path)
    key_dir = os.path.dirname(domain_dir)
    os.makedirs(key_dir, mode=0o700, exist_ok=True)
    os.makedirs(domain_dir, mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())
    owner = os.stat(key_dir)
    if os.geteuid() == 0 and (owner.st_uid, owner.st_gid) != (0, 0):
        for made in (domain_dir, path):
            os.chown(made, owner.st_uid, owner.st_gid)


def create_selectors(
    key_dir: str, domain: str, names: dict[Algorithm, str], state: SelectorState, now: datetime
) -> tuple[Selector, ...]:
    """Generate one key pair per algorithm, write the private keys, return the selectors."""
    created = []
    pkcs8 = serialization.PrivateFormat.PKCS8
    pem = serialization.Encoding.PEM
    none = serialization.NoEncryption()
    for algorithm, name in names.items():
        public: bytes
        if algorithm is Algorithm.RSA_SHA256:
            rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
            private = rsa_key.private_bytes(pem, pkcs8, none)
            public = rsa_key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        else:
            ed_key = ed25519.Ed25519PrivateKey.generate()
            private = ed_key.private_bytes(pem, pkcs8, none)
            public = ed_key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        path = os.path.join(key_dir, domain, f"{name}.pem")
        _write_private(path, private)
        created.append(
            Selector(
                name=name,
                algorithm=algorithm,
                state=state,
                key_file=path,
                public_key=base64.b64encode(public).decode("ascii"),
                created=now,
            )
        )
    return tuple(created)


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
