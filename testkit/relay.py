"""The relay ``make run`` starts (``keyrelay.demo``), for end-to-end tests, and its clients.

``private_relay`` runs one on free loopback ports in a temporary folder (the session's is the
fixture ``demo_relay`` in tests/conftest.py). ``connect`` opens an smtplib client on one of
its ports (STARTTLS done, or implicit TLS for the 465 role); ``reply_of`` returns the SMTP code
and text a refused step got; ``new_tenant`` makes a fresh account with subuser ACCOUNT/app, a
verified domain and an API key with the real ``keyrelay`` CLI (one ``keyrelay sync`` of a
declaration, then ``domain mark-verified`` and ``key create``); ``wait_delivered`` waits until
Postfix's queue is empty and asserts the message reached smtp-sink exactly once.
"""

from __future__ import annotations

import base64
import email
import email.message
import email.policy
import itertools
import json
import secrets
import shutil
import smtplib
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keyrelay.demo import SMTP_SINK, Child, Relay, Settings, greets, keyrelay_cli
from testkit.net import client_tls, free_ports, reply_text, wait_until

SUBMISSION_PORTS = ["submission", "alt_submission", "submissions"]
ATTEMPTS_PER_SESSION = 8  # below smtpd_soft_error_limit (10): no error sleep
_sources = (f"127.0.1.{i}" for i in itertools.count(1))
_names = (f"t{i}" for i in itertools.count(1))


# -- helpers ---------------------------------------------------------------------------------
@contextmanager
def private_relay(pool_address: str, directory: Mapping[str, Any] | None = None
                  ) -> Iterator[Relay]:
    """The relay ``make run`` starts (keyrelay.demo) on free loopback ports, in a temporary
    folder, stopped and removed afterwards; ``directory``: keyrelay's directory section
    (default: the demo's YAML file)."""
    # a short folder: unix socket paths inside the queue must stay under 108 bytes
    run_dir = Path(tempfile.mkdtemp(prefix="kr-e2e-"))
    (smtp, submission, alt_submission, submissions, sink, policyd_metrics, milter_metrics,
     bounce_sink, defer_sink, events_metrics) = free_ports(10)
    settings = Settings(
        run_dir=run_dir, smtp_port=smtp, submission_port=submission,
        alt_submission_port=alt_submission, submissions_port=submissions, sink_port=sink,
        bounce_sink_port=bounce_sink, defer_sink_port=defer_sink,
        policyd_metrics_port=policyd_metrics, milter_metrics_port=milter_metrics,
        events_metrics_port=events_metrics, pool_address=pool_address, directory=directory,
        # the daemons run unprivileged, as in production and `make run`; with LDAP as root:
        # the test slapd's bind password file is root's (mode 0600)
        daemon_user="keyrelay" if directory is None else "root")
    relay = Relay(settings, say=lambda text: None)
    relay.start()
    try:
        yield relay
    finally:
        relay.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def connect(relay: Relay, port_name: str, *, source: str | None = None,
            starttls: bool = True) -> smtplib.SMTP:
    """A client on one of the relay's ports: STARTTLS done, or implicit TLS for 465."""
    s = relay.settings
    port = s.ports()[port_name]
    address = (source, 0) if source else None
    if port_name == "submissions":
        return smtplib.SMTP_SSL(s.host, port, context=client_tls(), timeout=30,
                                source_address=address)
    client = smtplib.SMTP(s.host, port, timeout=30, source_address=address)
    if starttls:
        client.starttls(context=client_tls())
    return client


def reply_of(action: Callable[[], object]) -> tuple[int, str]:
    """The SMTP code and text an action got refused with (it must be refused).

    smtplib raises for AUTH and sendmail, but ``mail`` and ``rcpt`` return the reply.
    """
    try:
        result = action()
        if isinstance(result, tuple) and isinstance(result[0], int) and result[0] >= 400:
            return result[0], result[1].decode()
    except smtplib.SMTPRecipientsRefused as exc:
        ((code, text),) = exc.recipients.values()
        return code, text.decode()
    except smtplib.SMTPSenderRefused as exc:
        return exc.smtp_code, exc.smtp_error.decode()
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code, reply_text(exc.smtp_error)
    raise AssertionError("the relay accepted what it should have refused")


def message(sender: str, recipient: str, subject: str, *, header_from: str | None = None,
            message_id: str | None = None) -> tuple[str, str]:
    """(Message-ID, message text)."""
    mid = message_id or f"<{uuid.uuid4().hex}@e2e.test>"
    text = (f"From: {header_from or sender}\r\nTo: {recipient}\r\nSubject: {subject}\r\n"
            f"Date: Sat, 28 Nov 2026 13:12:35 +0000\r\nMessage-ID: {mid}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            f"Hello from the end-to-end suite.\r\n{subject}\r\n")
    return mid, text


def outbox(relay: Relay) -> list[tuple[Path, email.message.EmailMessage]]:
    found = []
    for path in sorted(relay.settings.outbox.iterdir()):
        with path.open("rb") as handle:
            parsed = email.message_from_binary_file(handle, policy=email.policy.default)
        assert isinstance(parsed, email.message.EmailMessage)
        found.append((path, parsed))
    return found


def delivered(relay: Relay, message_id: str) -> list[tuple[Path, email.message.EmailMessage]]:
    return [(p, m) for p, m in outbox(relay) if m.get("Message-ID") == message_id]


def queue_empty(relay: Relay) -> bool:
    result = subprocess.run(["postqueue", "-c", str(relay.settings.postfix_etc), "-j"],
                            capture_output=True, text=True, check=True)
    return result.stdout.strip() == ""


def wait_delivered(relay: Relay, message_id: str) -> tuple[bytes, email.message.EmailMessage]:
    """Wait until Postfix's queue is empty and the message is at the sink; exactly once."""

    def complete() -> bool:
        found = delivered(relay, message_id)
        return bool(found) and all(b"\n\n" in p.read_bytes().replace(b"\r\n", b"\n")
                                   and "smtp-sink" in str(m.get("Received", ""))
                                   for p, m in found)

    wait_until(complete, 30, f"{message_id} at the sink")
    wait_until(lambda: queue_empty(relay), 30, "Postfix's queue to empty")
    found = delivered(relay, message_id)
    assert len(found) == 1, f"{message_id} delivered {len(found)} times"
    path, parsed = found[0]
    return path.read_bytes(), parsed


def never_delivered(relay: Relay, message_id: str) -> None:
    wait_until(lambda: queue_empty(relay), 30, "Postfix's queue to empty")
    assert delivered(relay, message_id) == []


def as_sent(dump: bytes) -> bytes:
    """The message as Postfix sent it: smtp-sink's own header lines (X-*, its Received:)
    removed, CRLF line ends."""
    lines = dump.replace(b"\r\n", b"\n").split(b"\n")
    start = 0
    while lines[start].startswith(b"X-"):
        start += 1
    assert lines[start].startswith(b"Received: from")  # smtp-sink's, with folded lines
    start += 1
    while lines[start][:1] in (b" ", b"\t"):
        start += 1
    return b"\r\n".join(lines[start:])


@dataclass
class Tenant:
    account: str
    principal: str
    domain: str
    key: str
    key_id: str

    @property
    def sender(self) -> str:
        return f"app@{self.domain}"


def kr(relay: Relay, *args: str) -> str:
    return keyrelay_cli(relay.settings, *args)


def new_tenant(relay: Relay, *, pool: str = "demo") -> Tenant:
    """An account with subuser ACCOUNT/app, a verified domain granted to it, a pool, a key.

    The account, its subuser with ``pool`` assigned, and the domain (owned by the account,
    with its DKIM keys, granted to the subuser) come from one ``keyrelay sync`` of a
    declaration (keyrelay/declare.py); sync leaves a new domain pending, so it is marked
    verified by hand, as the demo's own domain is; the key is made by ``keyrelay key create``.
    """
    name = next(_names)
    principal, domain = f"{name}/app", f"{name}.example"
    declared = relay.settings.run_dir / f"tenant-{name}.yaml"
    declared.write_text(json.dumps({  # JSON is YAML
        "accounts": {name: {"subusers": {"app": {"pool": pool}}}},
        "domains": {domain: {"owner": name, "grants": [principal]}},
    }))
    try:
        kr(relay, "sync", str(declared))
    finally:
        declared.unlink()
    kr(relay, "domain", "mark-verified", domain)
    key = new_key(relay, principal)
    return Tenant(name, principal, domain, key[0], key[1])


def new_key(relay: Relay, principal: str, *options: str) -> tuple[str, str]:
    created = json.loads(kr(relay, "key", "create", principal, "--name", next(_names),
                            "--json", *options))
    return created["key"], created["key_id"]


def send(relay: Relay, port_name: str, key: str, sender: str, text: str,
         recipient: str = "rcpt@example.net", *, source: str | None = None) -> None:
    with connect(relay, port_name, source=source) as client:
        client.login("apikey", key)
        refused = client.sendmail(sender, [recipient], text)
    assert refused == {}


def refusing_sink(relay: Relay, flag: str, name: str) -> None:
    """The relay's smtp-sink replaced by one on the same port that refuses every RCPT:
    ``-f`` with 5xx (a bounce), ``-r`` with 4xx (a deferral)."""
    s = relay.settings
    relay.children["sink"].stop()
    relay.children["sink"] = Child(
        name, [SMTP_SINK, "-u", "postfix", flag, "RCPT", f"{s.host}:{s.sink_port}", "100"],
        s.logs / f"{name}.log", lambda: greets(s.host, s.sink_port))
    relay.children["sink"].start()


def log_of(relay: Relay, name: str) -> str:
    return (relay.settings.logs / f"{name}.log").read_text(errors="replace")


def submission_greets(relay: Relay) -> bool:
    return greets(relay.settings.host, relay.settings.submission_port)


def next_source() -> str:
    """A loopback client address no other test has used (brute-force counters are per address)."""
    return next(_sources)


def maillog_line(relay: Relay, *needles: str, timeout: float = 30.0) -> str:
    """Wait for the line of Postfix's log that holds every needle; that line."""
    found: list[str] = []

    def logged() -> bool:
        text = relay.settings.maillog.read_text(errors="replace")
        found[:] = [line for line in text.splitlines() if all(n in line for n in needles)]
        return bool(found)

    wait_until(logged, timeout, f"a line with {needles!r} in {relay.settings.maillog}")
    return found[-1]


def published_records(relay: Relay, domain: str) -> dict[str, bytes]:
    """The TXT records ``keyrelay domain dns --json`` tells the customer to publish."""
    printed = json.loads(kr(relay, "domain", "dns", domain, "--json"))
    return {record["name"].rstrip(".").lower(): record["value"].encode()
            for record in printed["records"] if record["type"] == "TXT"}


# -- logins (brute-force tests) --------------------------------------------------------------
def auth_plain(relay: Relay, source: str, keys: list[str]) -> list[tuple[int, str]]:
    """The reply to AUTH PLAIN as apikey with each key, in one session from ``source``."""
    replies = []
    with connect(relay, "submission", source=source) as client:
        for key in keys:
            token = base64.b64encode(b"\0apikey\0" + key.encode()).decode()
            code, text = client.docmd("AUTH", f"PLAIN {token}")
            replies.append((code, text.decode()))
            if code == 235:
                break
    return replies


def many(relay: Relay, source: str, keys: list[str]) -> list[tuple[int, str]]:
    replies = []
    for start in range(0, len(keys), ATTEMPTS_PER_SESSION):
        replies += auth_plain(relay, source, keys[start:start + ATTEMPTS_PER_SESSION])
    return replies


def guess(key: str) -> str:
    """The same key id with another secret."""
    return key.rsplit(".", 1)[0] + "." + secrets.token_urlsafe(32)
