"""A private Dovecot auth service (Debian's dovecot-core) standing in for a site's own SASL.

Only its auth process serves: no protocols, no mail storage. Users come from a
``passwd-file`` whose hashes are SHA512-CRYPT, as a site's would be; a user's extra fields
(``passwd-file`` field 8) go into the file as given, and Dovecot returns them in its ``OK``
answer (which keyrelay must pass back unchanged). The auth-client socket is mode 0666 so
keyrelay-policyd, unprivileged, and Postfix can both connect; a real site gives keyrelay a
listener of its own (docs/coexistence.md). ``auth_failure_delay`` is 0 unless asked, so a
failed login answers at once. Paths stay short: unix socket names are limited to 108 bytes.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from passlib.hash import sha512_crypt

from keyrelay.demo import Child

DOVECOT = "/usr/sbin/dovecot"


def available() -> bool:
    return Path(DOVECOT).exists()


class Dovecot:
    def __init__(self, root: Path, users: Mapping[str, str],
                 extra: Mapping[str, str] | None = None, failure_delay: str = "0",
                 checkpassword_exit: int | None = None) -> None:
        self.root = root
        self.socket = root / "auth"
        self.log_path = root / "dovecot.log"
        self.config = root / "dovecot.conf"
        self.users = root / "users"
        self.child: Child | None = None
        lines = [f"{name}:{sha512_crypt.using(rounds=5000).hash(password)}::::::"
                 f"{(extra or {}).get(name, '')}" for name, password in users.items()]
        self.users.write_text("\n".join(lines) + "\n")
        passdb = f"driver = passwd-file\n  args = scheme=SHA512-CRYPT {self.users}"
        if checkpassword_exit is not None:  # a passdb that answers with this exit status
            script = root / "checkpassword"
            script.write_text(f"#!/bin/sh\nexit {checkpassword_exit}\n")
            script.chmod(0o755)
            passdb = f"driver = checkpassword\n  args = {script}"
        self.config.write_text(f"""\
base_dir = {root}/run
state_dir = {root}/state
log_path = {self.log_path}
protocols = none
listen = 127.0.0.1
ssl = no
auth_mechanisms = plain login
disable_plaintext_auth = no
auth_failure_delay = {failure_delay}
passdb {{
  {passdb}
}}
userdb {{
  driver = static
  args = uid=65534 gid=65534 home=/nonexistent
}}
service auth {{
  unix_listener auth-client {{
    path = {self.socket}
    mode = 0666
  }}
}}
""")

    def start(self, timeout: float = 30.0) -> None:
        """Start the master in the foreground, in a session of its own; wait until the auth
        socket accepts."""
        self.child = Child("dovecot", [DOVECOT, "-F", "-c", str(self.config)],
                           self.root / "stderr", self.accepts)
        self.child.start(timeout)

    def accepts(self) -> bool:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(self.socket))
            except OSError:
                return False
        return True

    def stop(self) -> None:
        """Stop the master, then every process it started: an auth process still serving a
        connection may outlive the master, and "away" must mean away."""
        if self.child is None:
            return
        self.child.stop()
        self.child.kill()  # the rest of its session (zombies left to their reaper)
        self.child = None
        self.socket.unlink(missing_ok=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextmanager
def private_dovecot(users: Mapping[str, str], extra: Mapping[str, str] | None = None,
                    failure_delay: str = "0",
                    checkpassword_exit: int | None = None) -> Iterator[Dovecot]:
    """A running private Dovecot auth service with these users (name: password), stopped
    and removed afterwards; ``checkpassword_exit``: instead, a checkpassword passdb whose
    script exits so (111: a temporary failure)."""
    root = Path(tempfile.mkdtemp(prefix="kr-dv-"))
    root.chmod(0o755)  # Dovecot's unprivileged auth process reads the passwd-file
    dovecot = Dovecot(root, users, extra, failure_delay, checkpassword_exit)
    try:
        dovecot.start()
        yield dovecot
    finally:
        dovecot.stop()
        shutil.rmtree(root, ignore_errors=True)
