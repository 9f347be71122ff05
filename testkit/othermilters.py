"""The other milters keyrelay-milter is compared with (bench/postfix_milter_bench.py,
bench/e2e_bench.py): OpenDKIM and dkimpy-milter, each started by the benchmark with a
configuration and a new 2048-bit key of its own (Debian's system services and /etc files are
not used), and ``MilterUnderTest``, one milter of a comparison."""

from __future__ import annotations

import base64
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from keyrelay.demo import Child, unix_accepts
from testkit.privaterelay import BenchError

OPENDKIM = "/usr/sbin/opendkim"
DKIMPY_MILTER = "/usr/bin/dkimpy-milter"


@dataclass
class MilterUnderTest:
    """One milter of a comparison: its name, how Postfix reaches it (the ``smtpd_milters``
    value; empty: no milter) and its process, once known."""

    name: str
    endpoint: str
    child: Child | None = None

    def pid(self) -> int | None:
        if self.child is None or self.child.process is None:
            return None
        return self.child.process.pid


def rsa_key_pair() -> tuple[bytes, str]:
    """A 2048-bit RSA key (PKCS#1 PEM, which OpenDKIM and dkimpy both read) and its DKIM
    TXT record value."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode()


def opendkim_child(root: Path, folder: Path, domains: list[str]) -> tuple[Child, str]:
    """OpenDKIM (not started) signing rsa-sha256 with selector ``opendkim`` and one new
    2048-bit key for every domain of ``domains``, its socket in ``folder``; and the key's
    DKIM record value. Its configuration and key go to ``root/opendkim``."""
    if not os.access(OPENDKIM, os.X_OK):
        raise BenchError(f"{OPENDKIM} is missing: run `make bench-deps` (Debian "
                         "package opendkim), or leave out --setup opendkim")
    home = root / "opendkim"
    home.mkdir(mode=0o700)
    pem, record = rsa_key_pair()
    key = home / "opendkim.key"
    key.write_bytes(pem)
    key.chmod(0o600)
    shutil.chown(key, "opendkim", "opendkim")
    shutil.chown(home, "opendkim", "opendkim")
    conf = home / "opendkim.conf"
    conf.write_text(f"""\
# OpenDKIM signing rsa-sha256 for the benchmark's domains
Syslog                  no
Mode                    s
Domain                  {",".join(domains)}
Selector                opendkim
KeyFile                 {key}
# the key is 0600 in a 0700 folder, but the temporary folder sits in a world-writable /tmp
RequireSafeKeys         no
Canonicalization        relaxed/relaxed
SignatureAlgorithm      rsa-sha256
OversignHeaders         From
InternalHosts           127.0.0.1
Socket                  local:{folder / 'opendkim.sock'}
UMask                   007
UserID                  opendkim:postfix
PidFile                 {home / 'opendkim.pid'}
""")
    sock = folder / "opendkim.sock"
    return Child("opendkim", [OPENDKIM, "-f", "-x", str(conf)], root / "logs" / "opendkim.log",
                 lambda: unix_accepts(sock)), record


def dkimpy_child(root: Path, folder: Path, domains: list[str]) -> tuple[Child, str]:
    """dkimpy-milter (not started), as ``opendkim_child`` with selector ``dkimpy``."""
    if not os.access(DKIMPY_MILTER, os.X_OK):
        raise BenchError(f"{DKIMPY_MILTER} is missing: run `make bench-deps` (Debian "
                         "package dkimpy-milter), or leave out --setup dkimpy")
    home = root / "dkimpy"
    home.mkdir(mode=0o700)
    pem, record = rsa_key_pair()
    key = home / "dkimpy.key"
    key.write_bytes(pem)  # read as root before dkimpy-milter drops its privileges
    key.chmod(0o600)
    conf = home / "dkimpy-milter.conf"
    conf.write_text(f"""\
# dkimpy-milter signing rsa-sha256 for the benchmark's domains
Syslog                  no
Mode                    s
Domain                  {",".join(domains)}
Selector                dkimpy
KeyFile                 {key}
Canonicalization        relaxed/relaxed
InternalHosts           127.0.0.1
Socket                  local:{folder / 'dkimpy.sock'}
UMask                   007
UserID                  dkimpy-milter:postfix
""")
    sock = folder / "dkimpy.sock"
    return Child("dkimpy-milter", [DKIMPY_MILTER, str(conf)], root / "logs" / "dkimpy.log",
                 lambda: unix_accepts(sock)), record
