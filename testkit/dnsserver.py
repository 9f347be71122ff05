"""A real DNS server on loopback (dnsmasq) and Perl Mail::DKIM's ``dkimproxy-verify``.

``DnsServer`` serves exactly the TXT records it is given (the ones ``keyrelay domain dns``
tells admins to publish) and answers nothing else; ``dkimproxy_verify`` checks a message's
DKIM signatures against it, independently of dkimpy and of keyrelay's signer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import dns.exception
import dns.rdatatype
import dns.resolver

from testkit.net import free_udp_port

SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
DKIMPROXY_VERIFY = shutil.which("dkimproxy-verify", path=SBIN_PATH)
DNSMASQ = shutil.which("dnsmasq", path=SBIN_PATH)
MISSING = ("needs dkimproxy-verify (libmail-dkim-perl) and dnsmasq (dnsmasq-base): "
           "run `make deps` or scripts/ensure-debian-packages")


def perl_has_ed25519() -> bool:
    """Whether this Mail::DKIM verifies ed25519-sha256 (its algorithm module and CryptX).

    Debian 12's Mail::DKIM 1.20230212 has no ed25519-sha256 at all: it reports such a
    signature as "invalid (unsupported algorithm ed25519-sha256)", whatever it signs.
    """
    probe = subprocess.run(
        ["perl", "-MMail::DKIM::Algorithm::ed25519_sha256", "-MCrypt::PK::Ed25519", "-e1"],
        capture_output=True,
    )
    return probe.returncode == 0


def _txt_option(name: str, value: str) -> str:
    """A dnsmasq --txt-record option; values over 255 octets become several strings."""
    chunks = [value[i : i + 255] for i in range(0, len(value), 255)]
    return "--txt-record=" + ",".join([name, *chunks])


class DnsServer:
    """dnsmasq on 127.0.0.1 serving some TXT records (and CNAMEs to them) and nothing else."""

    def __init__(self, records: dict[str, str], log: Path, domains: list[str],
                 cnames: dict[str, str] | None = None) -> None:
        self.records = records
        self.cnames = cnames or {}  # alias -> target (a name of ``records``)
        self.domains = domains  # answered here only: nothing leaks to other resolvers
        self.port = free_udp_port()
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert DNSMASQ is not None
        args = [
            DNSMASQ, "--keep-in-foreground", "--conf-file=/dev/null", "--pid-file=",
            "--no-resolv", "--no-hosts", "--bind-interfaces", "--listen-address=127.0.0.1",
            f"--port={self.port}", "--log-queries", "--log-facility=-",
        ]
        args += [f"--local=/{domain}/" for domain in self.domains]
        args += [_txt_option(name, value) for name, value in self.records.items()]
        args += [f"--cname={alias},{target}" for alias, target in self.cnames.items()]
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
