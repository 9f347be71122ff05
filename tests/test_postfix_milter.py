"""A real private Postfix runs authenticated mail through keyrelay-policyd (SASL, policy) and
keyrelay-milter (header From check, DKIM signing) to a real sink.

The end-to-end check of the milter: what arrives is signed twice (rsa-sha256 and
ed25519-sha256) and verifies with dkimpy against the records ``keyrelay domain dns`` prints;
a header From that is not the principal's is refused at end of DATA; with the milter down,
Postfix defers (``milter_default_action = tempfail``) and nothing leaves.
"""

from __future__ import annotations

import json
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dkim
import pytest
from policyd_harness import Policyd, connect, wait_until
from postfix_harness import (
    PostfixInstance,
    Sink,
    add_demo_tenant,
    free_port,
    make_certificate,
    make_traversable,
    submission_client,
    text_message,
    tls_context,
)

pytestmark = pytest.mark.skipif(
    not Path("/usr/sbin/postfix").exists(),
    reason="Postfix is not installed (make test installs it)",
)

MILTER = Path(sys.executable).parent / "keyrelay-milter"


@dataclass
class Milter:
    """One ``keyrelay-milter`` process on a unix socket, with its stderr in a log file."""

    config_path: Path
    socket: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None)

    @property
    def endpoint(self) -> str:
        return f"unix:{self.socket}"

    def start(self, timeout: float = 20.0) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(MILTER), "--config", str(self.config_path)],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            )
        try:
            wait_until(self.ready, timeout, "keyrelay-milter to accept connections")
        except BaseException:
            self.kill()
            raise

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"keyrelay-milter exited with {self.process.returncode}:\n"
                               + self.log())
        try:
            connect(self.endpoint, timeout=1).close()
        except OSError:
            return False
        return True

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then the exit status (libmilter notices within about 5 s)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Relay:
    postfix: PostfixInstance
    sink: Sink
    policyd: Policyd
    milter: Milter
    submission_port: int
    key: str

    def keyrelay(self, *args: str) -> str:
        return self.policyd.keyrelay(*args)


def _dns(relay: Relay, domain: str) -> dict[str, bytes]:
    """The TXT records ``keyrelay domain dns --json`` tells the customer to publish."""
    printed = json.loads(relay.keyrelay("domain", "dns", domain, "--json"))
    return {record["name"].rstrip(".").lower(): record["value"].encode()
            for record in printed["records"] if record["type"] == "TXT"}


def _sink_files(sink: Sink) -> list[Path]:
    return sorted(sink.folder.iterdir())


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    root = tmp_path_factory.mktemp("relay")
    sockets = root / "milter"
    if len(str(sockets / "milter.sock")) > 100:  # AF_UNIX paths hold 107 bytes
        sockets = Path(tempfile.mkdtemp(prefix="krm-"))
    sockets.mkdir(exist_ok=True)
    make_traversable(sockets)  # Postfix's smtpd (user postfix) connects to the socket
    milter_socket = sockets / "milter.sock"

    policyd = Policyd(root / "policyd", {
        "milter": {"listen": f"unix:{milter_socket}", "socket_group": "",
                   "socket_mode": "0666", "shutdown_grace": "2s"},
    })
    kr = policyd.keyrelay
    add_demo_tenant(kr)
    key = policyd.create_key("acme/app", "e2e").text
    auth_port = policyd.endpoint("auth").rpartition(":")[2]
    policy_port = policyd.endpoint("policy").rpartition(":")[2]
    submission_port = free_port()
    milter = Milter(policyd.config_path, milter_socket, root / "milter.log")

    sink = Sink(root / "sink")
    tls_key, tls_cert = make_certificate(root / "tls", "relay.test.example")
    policy = f"check_policy_service {{ inet:127.0.0.1:{policy_port}, policy_context=submission }}"
    postfix = PostfixInstance(
        root / "postfix",
        main={
            "smtpd_tls_chain_files": f"{tls_key}, {tls_cert}",
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": f"inet:127.0.0.1:{auth_port}",
            "smtpd_sasl_security_options": "noanonymous, noplaintext",
            "smtpd_sasl_tls_security_options": "noanonymous",
            "mua_relay_restrictions": f"{policy}, permit_sasl_authenticated, reject",
            "mua_data_restrictions": policy,
            "milter_default_action": "tempfail",
            "milter_protocol": "6",
            "disable_mime_output_conversion": "yes",
            "default_filter_nexthop": f"[127.0.0.1]:{sink.port}",
            "relayhost": f"[127.0.0.1]:{sink.port}",
            "smtp_bind_address_enforce": "yes",
        },
        services=(
            f"127.0.0.1:{submission_port} inet n - n - - smtpd\n"
            "  -o syslog_name=postfix/submission\n"
            "  -o smtpd_tls_security_level=encrypt\n"
            "  -o smtpd_sasl_auth_enable=yes\n"
            "  -o smtpd_tls_auth_only=yes\n"
            "  -o smtpd_relay_restrictions=$mua_relay_restrictions\n"
            "  -o smtpd_data_restrictions=$mua_data_restrictions\n"
            f"  -o smtpd_milters=unix:{milter_socket}\n"
            "kr-pool-app unix - - n - - smtp\n"
            "  -o smtp_bind_address=127.0.0.1\n"
            "  -o smtp_helo_name=pool-app.test.example\n"
        ),
    )
    try:
        sink.start()
        policyd.start()
        milter.start()
        postfix.start(submission_port)
        yield Relay(postfix, sink, policyd, milter, submission_port, key)
    finally:
        postfix.stop()
        sink.stop()
        if milter.running():
            milter.stop()
        if policyd.running():
            policyd.stop()
        if sockets != root / "milter":
            shutil.rmtree(sockets, ignore_errors=True)


def test_mail_from_a_verified_domain_arrives_signed_twice_and_verifies(relay: Relay) -> None:
    before = len(_sink_files(relay.sink))
    with submission_client(relay.submission_port) as client:
        client.login("apikey", relay.key)
        refused = client.sendmail("app@acme.example", ["rcpt@example.net"],
                                  text_message("app@acme.example", "rcpt@example.net", "signed"))
    assert refused == {}
    messages = relay.sink.wait_for(before + 1)
    (message,) = [m for m in messages if m["Subject"] == "signed"]
    (path,) = [p for p in _sink_files(relay.sink) if b"Subject: signed" in p.read_bytes()]
    raw = path.read_bytes()

    # smtp-sink prepends its X-* headers and a Received: of its own; below them, the two
    # signatures top the header block as Postfix sent it (above Postfix's own Received:)
    names = [name for name, value in message.items()
             if not name.startswith("X-") and "by smtp-sink" not in str(value)]
    assert names[:3] == ["DKIM-Signature", "DKIM-Signature", "Received"], names
    signatures = [str(value) for value in message.get_all("DKIM-Signature")]
    algorithms = sorted(tag.strip() for sig in signatures for tag in sig.replace("\n", "")
                        .replace("\r", "").split(";") if tag.strip().startswith("a="))
    assert algorithms == ["a=ed25519-sha256", "a=rsa-sha256"]
    assert all("d=acme.example" in sig.replace(" ", "") for sig in signatures)

    records = _dns(relay, "acme.example")

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name.decode().rstrip(".").lower())

    # dkim.verify checks the first signature; DKIM checks each one on its own
    assert dkim.verify(raw, dnsfunc=dnsfunc)
    verifier = dkim.DKIM(raw)
    assert all(verifier.verify(idx=i, dnsfunc=dnsfunc) for i in range(2))
    wait_until(lambda: "verdict=allow" in relay.milter.log(), 10, "the milter's allow line")


def test_header_from_not_the_principals_is_refused_at_end_of_data(relay: Relay) -> None:
    before = len(_sink_files(relay.sink))
    with submission_client(relay.submission_port) as client:
        client.login("apikey", relay.key)
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("app@acme.example", ["rcpt@example.net"],
                            text_message("ceo@bank.example", "rcpt@example.net", "spoof"))
    assert refused.value.smtp_code == 550
    assert b"5.7.1" in refused.value.smtp_error
    assert b"ceo@bank.example" in refused.value.smtp_error
    relay.postfix.wait_for_log("milter-reject: END-OF-MESSAGE")
    assert len(_sink_files(relay.sink)) == before


def test_milter_down_defers_the_message_and_nothing_leaves(relay: Relay) -> None:
    # last test of the module: it stops the milter
    assert relay.milter.stop() == 0
    wait_until(lambda: not _connectable(relay.milter.endpoint), 10, "the milter socket to close")
    before = len(_sink_files(relay.sink))
    # smtpd connects to its milters when the session starts; that failing, with
    # milter_default_action = tempfail it defers every later command: STARTTLS (which this
    # encrypt-only submission service needs before AUTH and MAIL) gets Postfix's 454 4.3.0,
    # its mapping of a milter's 4xx at STARTTLS (smtpd.c starttls_cmd)
    with smtplib.SMTP("127.0.0.1", relay.submission_port, timeout=30) as client:
        with pytest.raises(smtplib.SMTPResponseException) as deferred:
            client.starttls(context=tls_context())
            client.login("apikey", relay.key)
            client.sendmail("app@acme.example", ["rcpt@example.net"],
                            text_message("app@acme.example", "rcpt@example.net", "no milter"))
    assert 400 <= deferred.value.smtp_code < 500, deferred.value
    assert (deferred.value.smtp_code, deferred.value.smtp_error) == (454, b"4.3.0 Try again later")
    log = relay.postfix.wait_for_log("milter-reject: CONNECT")
    assert "451 4.7.1 Service unavailable - try again later" in log
    # Postfix queued nothing, so nothing can reach the sink later either
    queue = subprocess.run(["postqueue", "-c", str(relay.postfix.config_dir), "-p"],
                           capture_output=True, text=True, timeout=30)
    assert "Mail queue is empty" in queue.stdout, queue.stdout
    assert len(_sink_files(relay.sink)) == before
    assert not any(b"Subject: no milter" in p.read_bytes() for p in _sink_files(relay.sink))


def _connectable(endpoint: str) -> bool:
    try:
        connect(endpoint, timeout=1).close()
    except OSError:
        return False
    return True
