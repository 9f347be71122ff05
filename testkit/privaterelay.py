"""The private Postfix the Postfix benchmarks run (bench/postfix_milter_bench.py,
bench/e2e_bench.py, bench/soak.py).

Built as `make run` builds it (keyrelay.demo's ``Relay.prepare``: main.cf and master.cf
written with `keyrelay postfix apply`, its own queue, `postfix -c DIR`; /etc/postfix is never
touched), on free loopback ports, with smtp-sink keeping every message in a file of its own,
keyrelay-policyd, keyrelay-milter and the other milters each in a process of its own. A
subclass chooses the setups and switches between them with ``switch`` (`postconf -P` on the
measured service, `postfix reload`). ``bench_folder``, ``run_guarded`` and ``leave_folder``
are a benchmark's life cycle: a folder, everything stopped at the end, the folder kept when
asked or when it failed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dkim

from keyrelay.demo import Child, DemoError, Relay, Settings
from keyrelay.postfixconf import run_postfix
from testkit.net import client_tls, free_ports, reply_text

POSTCONF = "/usr/sbin/postconf"
FOREIGN_FROM = "ceo@bank.example"
QUEUE_FOLDERS = ("maildrop", "incoming", "active", "deferred", "hold")


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


# -- helpers ---------------------------------------------------------------------------------
def header_block(raw: bytes) -> list[tuple[str, str]]:
    """The unfolded header fields of a message as smtp-sink stored it."""
    head = raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode("ascii", "replace")
    fields: list[tuple[str, str]] = []
    for line in head.split("\n"):
        if line[:1] in (" ", "\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + " " + line.strip())
        elif ":" in line:
            name, value = line.split(":", 1)
            fields.append((name.strip(), value.strip()))
    return fields


def signatures(raw: bytes) -> list[tuple[str, str, str]]:
    """(a=, s=, d=) of every DKIM-Signature, top to bottom."""
    found = []
    for name, value in header_block(raw):
        if name.lower() != "dkim-signature":
            continue
        tags = {}
        for part in value.split(";"):
            tag, sep, tag_value = part.partition("=")
            if sep:
                tags[tag.strip()] = re.sub(r"\s+", "", tag_value)
        found.append((tags.get("a", ""), tags.get("s", ""), tags.get("d", "")))
    return found


def postconf(etc: Path, *args: str) -> str:
    result = subprocess.run([POSTCONF, "-c", str(etc), *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise BenchError(f"postconf {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout.strip()




@dataclass
class PrivateRelay:
    root: Path
    relay: Relay = field(init=False)
    records: dict[str, bytes] = field(default_factory=dict)  # DKIM TXT records by name
    extra: list[Child] = field(default_factory=list)  # milters other than keyrelay's
    service: str = ""  # the measured master.cf service, host:port
    current: str = ""  # the setup selected last
    directory: dict[str, Any] | None = None  # keyrelay's directory section; None: YAML file

    # -- building --------------------------------------------------------------------------
    def prepare(self) -> Settings:
        """The relay's state, certificate and Postfix configuration; nothing started."""
        smtp, submission, alt, submissions, sink, policyd_metrics, milter_metrics = (
            free_ports(7))
        settings = Settings(run_dir=(self.root / "relay").resolve(), host="127.0.0.1",
                            smtp_port=smtp, submission_port=submission,
                            alt_submission_port=alt, submissions_port=submissions,
                            sink_port=sink, pool_address="127.0.0.2",
                            # the endpoints on, as a monitored production relay has them
                            policyd_metrics_port=policyd_metrics,
                            milter_metrics_port=milter_metrics,
                            directory=self.directory,
                            # as testkit/relay.py: unprivileged, but root with LDAP
                            daemon_user="keyrelay" if self.directory is None else "root")
        self.relay = Relay(settings, say=lambda text: print(f"  {text}", flush=True))
        self.relay.prepare()
        return settings

    def rewrite_config(self, why: str, **changes: Any) -> None:
        """Change top-level sections of keyrelay.yaml (before the daemons start)."""
        path = self.relay.settings.config
        text = path.read_text()
        config = json.loads(text[text.index("{"):])
        config.update(changes)
        path.write_text(f"# {why}\n" + json.dumps(config, indent=2) + "\n")

    def milter_folder(self) -> Path:
        """Where the other milters' sockets go: group postfix may connect."""
        folder = self.root / "milters"
        folder.mkdir(mode=0o770)
        shutil.chown(folder, "root", "postfix")
        folder.chmod(0o770)
        return folder

    # -- processes -------------------------------------------------------------------------
    def start(self, keyrelay_milter: bool, others: list[Child]) -> None:
        relay = self.relay
        children = relay.children
        # smtp-sink keeps every message (one file each) so that its signatures can be checked
        children["sink"] = relay.sink(file_pattern="%H%M%S.", backlog=512)
        children["policyd"] = relay.policyd()
        if keyrelay_milter:
            children["milter"] = relay.milter()
        for child in children.values():
            child.start()
        for child in others:
            self.extra.append(child)
            child.start()
        self.relay.start_postfix()

    def stop(self) -> None:
        try:
            if hasattr(self, "relay"):
                self.relay.stop()
        finally:
            for child in self.extra:
                child.stop()

    def master_pid(self) -> int:
        return int((self.relay.settings.queue / "pid" / "master.pid").read_text().split()[0])

    # -- one setup at a time ---------------------------------------------------------------
    def switch(self, name: str, **settings: str) -> None:
        """Set ``settings`` on the measured service (values without spaces) and reload."""
        if name == self.current:
            return
        etc = self.relay.settings.postfix_etc
        postconf(etc, "-P", *(f"{self.service}/inet/{k}={v}" for k, v in settings.items()))
        status, output = run_postfix(etc, "reload")
        if status != 0:
            raise BenchError(f"postfix reload: {output}")
        self.current = name

    # -- the sink and the queue ------------------------------------------------------------
    def outbox(self) -> list[Path]:
        return sorted(Path(e.path) for e in os.scandir(self.relay.settings.outbox))

    def clear_outbox(self) -> None:
        for path in self.outbox():
            path.unlink()

    def queue_empty(self) -> bool:
        queue = self.relay.settings.queue
        return not any(files for name in QUEUE_FOLDERS for _, _, files in os.walk(queue / name))

    def wait_drained(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not self.queue_empty():
            if time.monotonic() > deadline:
                raise BenchError(f"Postfix's queue did not empty within {timeout:g}s; see "
                                 f"{self.relay.settings.maillog}")
            time.sleep(0.01)

    # -- checks ----------------------------------------------------------------------------
    def verify(self, name: str, path: Path) -> None:
        """Every DKIM signature of the message at ``path`` verifies with dkimpy."""
        raw = path.read_bytes()
        count = len(signatures(raw))

        def dnsfunc(qname: bytes, timeout: int = 5) -> bytes | None:
            return self.records.get(qname.decode().rstrip(".").lower())

        if count == 0:
            print(f"  {name}: no DKIM-Signature at the sink, as expected", flush=True)
            return
        verifier = dkim.DKIM(raw)
        for index in range(count):
            if not verifier.verify(idx=index, dnsfunc=dnsfunc):
                raise BenchError(f"{name}: signature {index + 1} of {count} in {path} does "
                                 "not verify with dkimpy")
        print(f"  {name}: {count} DKIM signature(s) verified with dkimpy", flush=True)

    def check_from_refused(self, key: str, mail_from: str, rcpt_to: str, *,
                           starttls: bool) -> None:
        """keyrelay-milter's From check is on: a header From that is not the principal's
        is refused at the end of DATA."""
        s = self.relay.settings
        domain = mail_from.rpartition("@")[2]
        text = (f"From: <{FOREIGN_FROM}>\r\nTo: <{rcpt_to}>\r\nSubject: not mine\r\n"
                f"Message-ID: <foreign.{time.time_ns()}@{domain}>\r\n\r\nhello\r\n")
        with smtplib.SMTP(s.host, s.submission_port, timeout=30) as client:
            if starttls:
                client.starttls(context=client_tls())
            client.login("apikey", key)
            try:
                client.sendmail(mail_from, [rcpt_to], text)
            except smtplib.SMTPDataError as exc:
                if exc.smtp_code == 550:
                    print(f"  keyrelay: From: {FOREIGN_FROM} refused at end of DATA "
                          f"({exc.smtp_code} {reply_text(exc.smtp_error)})",
                          flush=True)
                    return
                raise BenchError(f"keyrelay: From: {FOREIGN_FROM}: {exc}") from None
        raise BenchError(f"keyrelay: a message with From: {FOREIGN_FROM} was accepted; "
                         "keyrelay-milter's From check is not in effect")


def run_guarded(prog: str, bench: PrivateRelay, body: Callable[[], None]) -> int:
    """``body()``, then every process of ``bench`` stopped, also on an error or Ctrl-C;
    the exit status: 0 done, 1 the benchmark failed (said on stderr), 130 interrupted."""
    status = 0
    try:
        body()
    except (BenchError, DemoError, OSError, subprocess.SubprocessError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        status = 130
    finally:
        print("stopping Postfix, the milters, keyrelay-policyd and smtp-sink ...", flush=True)
        bench.stop()
    return status


def _stop_on_signal(number: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {number}")


def bench_folder(prog: str, prefix: str, tmpdir: Path | None = None) -> Path | None:
    """As root: SIGTERM stops the benchmark like Ctrl-C (everything started is stopped), and
    a new temporary folder (0755, with logs/) is made; not as root: None, said on stderr."""
    if os.geteuid() != 0:
        print(f"{prog}: error: run as root (it starts a private Postfix instance and the "
              "milters as their own users)", file=sys.stderr)
        return None
    signal.signal(signal.SIGTERM, _stop_on_signal)
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=tmpdir))
    root.chmod(0o755)
    (root / "logs").mkdir()
    return root


def leave_folder(root: Path, status: int, keep: bool) -> int:
    """Keep the benchmark's folder when asked to or when it failed (to look into); remove it
    otherwise. Returns ``status``."""
    if keep or status == 1:
        print(f"kept {root} (configuration, logs, the last messages at the sink)")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return status
