"""A private, real Postfix instance on loopback for tests, and a real sink behind it.

``postfix -c DIR`` with its own main.cf, master.cf, queue and log file; nothing in
/etc/postfix is touched (POSTFIX-REFERENCE.md section 6, "Private instance"). Mail leaves
through Postfix's ``smtp`` client to ``smtp-sink``, which dumps every message it receives
with ``X-Client-Addr`` and ``X-Helo-Args`` headers, so tests can see which IP pool a message
left through. Every wait is a readiness check with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import os
import shutil
import smtplib
import socket
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from policyd_harness import free_port, wait_until

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"

# The daemons every instance needs; chroot "n" so no files must be copied into a jail.
BASE_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
    except OSError:
        return False
    return True


def wait_for_banner(port: int, timeout: float = 30.0) -> None:
    """Wait until an SMTP server on ``port`` greets with 220."""

    def greets() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                return s.recv(512).startswith(b"220")
        except OSError:
            return False

    wait_until(greets, timeout, f"an SMTP banner on port {port}")


def make_traversable(path: Path) -> None:
    """Let Postfix's unprivileged daemons reach ``path`` (pytest's temp folders are 0700)."""
    for folder in (path, *path.parents):
        mode = folder.stat().st_mode
        if not mode & 0o001:
            folder.chmod(mode | 0o001)  # search only: nobody may list these folders


def make_certificate(folder: Path, name: str) -> tuple[Path, Path]:
    """A throw-away self-signed certificate for STARTTLS (key, cert)."""
    folder.mkdir(parents=True, exist_ok=True)
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    key.chmod(0o600)
    return key, cert


@dataclass
class Sink:
    """``smtp-sink`` dumping each received message into ``folder``."""

    folder: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        make_traversable(self.folder)
        shutil.chown(self.folder, "postfix")
        self.process = subprocess.Popen(
            [SMTP_SINK, "-u", "postfix", "-c", "-d", f"{self.folder}/%H%M%S.",
             f"127.0.0.1:{self.port}", "100"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_banner(self.port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def messages(self) -> list[email.message.EmailMessage]:
        found = []
        for path in sorted(self.folder.iterdir()):
            with path.open("rb") as handle:
                parsed = email.message_from_binary_file(handle, policy=email.policy.default)
            assert isinstance(parsed, email.message.EmailMessage)
            found.append(parsed)
        return found

    def wait_for(self, count: int, timeout: float = 30.0) -> list[email.message.EmailMessage]:
        wait_until(lambda: len(list(self.folder.iterdir())) >= count, timeout,
                   f"{count} message(s) at the sink")
        # a dump file appears when the transaction starts; wait until it is complete
        wait_until(lambda: all(m.get("X-Client-Addr") and "\n\n" in m.as_string()
                               for m in self.messages()), timeout, "complete dump files")
        return self.messages()


@dataclass
class PostfixInstance:
    """A private Postfix: ``root/etc`` (config), ``root/queue``, ``root/data``, ``root/maillog``."""

    root: Path
    main: dict[str, str] = field(default_factory=dict)
    services: str = ""  # extra master.cf lines (smtpd listeners, pool transports)
    started: bool = False

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def maillog(self) -> Path:
        return self.root / "maillog"

    def write_config(self) -> None:
        etc, queue, data = self.config_dir, self.root / "queue", self.root / "data"
        for folder in (etc, queue, data):
            folder.mkdir(parents=True, exist_ok=True)
        make_traversable(self.root)
        shutil.chown(data, "postfix")
        main = {
            "compatibility_level": "3.6",
            "queue_directory": str(queue),
            "data_directory": str(data),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "myhostname": "relay.test.example",
            "mydomain": "test.example",
            "mydestination": "",
            "mynetworks": "127.0.0.0/8",
            "local_recipient_maps": "",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.root),
            "smtputf8_enable": "no",
            "biff": "no",
            "delay_warning_time": "0",
            "smtpd_banner": "$myhostname ESMTP keyrelay-test",
            "master_service_disable": "",
            **self.main,
        }
        (etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main.items()))
        (etc / "master.cf").write_text(BASE_SERVICES + self.services)

    def postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([POSTFIX, "-c", str(self.config_dir), *args],
                                capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"postfix {' '.join(args)} failed:\n{result.stdout}"
                               f"{result.stderr}\n--- maillog ---\n{self.log_text()}")
        return result

    def start(self, *ports: int) -> None:
        """Write the configuration, start the instance and wait for its smtpd ``ports``."""
        self.write_config()
        self.postfix("check")
        self.postfix("start")
        self.started = True
        for port in ports:
            wait_for_banner(port)

    def stop(self) -> None:
        if self.started:
            self.postfix("stop", check=False)
            pid_file = self.root / "queue" / "pid" / "master.pid"
            wait_until(lambda: not pid_file.exists() or not _alive(pid_file), 30,
                       "the Postfix master to exit")
            self.started = False

    def log_text(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, needle: str, timeout: float = 30.0) -> str:
        wait_until(lambda: needle in self.log_text(), timeout, f"{needle!r} in the mail log")
        return self.log_text()


def _alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


def tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the test instance's self-signed certificate
    return context


def submission_client(port: int) -> smtplib.SMTP:
    """An smtplib client on a submission port, after STARTTLS."""
    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    client.starttls(context=tls_context())
    return client


def text_message(sender: str, recipient: str, subject: str) -> str:
    return (f"From: {sender}\r\nTo: {recipient}\r\nSubject: {subject}\r\n"
            f"Date: Sat, 28 Nov 2026 13:12:35 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@test>\r\n\r\nhello\r\n")


def add_demo_tenant(keyrelay: Callable[..., str]) -> None:
    """acme, its subuser acme/app on pool app (127.0.0.1), and acme.example granted to it."""
    keyrelay("account", "add", "acme")
    keyrelay("subuser", "add", "acme/app")
    keyrelay("pool", "add", "app", "--bind", "127.0.0.1", "--helo", "pool-app.test.example")
    keyrelay("pool", "assign", "acme/app", "app")
    keyrelay("domain", "add", "acme", "acme.example")
    keyrelay("domain", "grant", "acme.example", "acme/app")
    keyrelay("domain", "mark-verified", "acme.example")
