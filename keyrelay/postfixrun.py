"""Running Postfix's own commands on a configuration directory: ``postconf``, ``postfix
check``, ``postfix reload`` (for keyrelay/postfixconf.py and the demo)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
from pathlib import Path

from .errors import KeyrelayError

POSTCONF = "/usr/sbin/postconf"
POSTFIX = "/usr/sbin/postfix"


class PostfixConfError(KeyrelayError):
    """The Postfix configuration cannot be read, changed or checked; the message says why."""


def postconf(config_dir: Path, *args: str) -> str:
    """``postconf -c DIR ARGS``: what it printed, or PostfixConfError with its complaints."""
    try:
        result = subprocess.run([POSTCONF, "-c", str(config_dir), *args],
                                capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise PostfixConfError(f"{POSTCONF} not found: is Postfix installed?") from None
    if result.returncode != 0:
        detail = "; ".join(line.strip() for line in result.stderr.splitlines() if line.strip())
        raise PostfixConfError(f"postconf -c {config_dir} {' '.join(args)} failed: {detail}")
    return result.stdout


def reload(config_dir: Path) -> str:
    """``postfix reload`` when this instance runs; a sentence saying what happened."""
    status, _ = run_postfix(config_dir, "status")
    if status != 0:
        return f"Postfix ({config_dir}) is not running; the settings apply when it starts."
    status, output = run_postfix(config_dir, "reload")
    if status != 0:
        detail = "; ".join(line.strip() for line in output.splitlines() if line.strip())
        raise PostfixConfError(f"postfix -c {config_dir} reload failed: {detail}")
    return f"Postfix ({config_dir}) reloaded."


def check(config_dir: Path, failed: str) -> str:
    """``postfix -c DIR check``; its warnings, or PostfixConfError: ``failed``, then its
    complaints."""
    status, output = run_postfix(config_dir, "check")
    if status != 0:
        detail = "; ".join(line.strip() for line in output.splitlines() if line.strip())
        raise PostfixConfError(f"{failed}: {detail or 'exit status ' + str(status)}")
    return output


def run_postfix(config_dir: Path, *args: str, timeout: float = 120) -> tuple[int, str]:
    """Run ``postfix -c DIR ARGS``: its exit status and what it printed.

    Postfix prints its errors (``postfix: fatal: ...``) only when stderr is a terminal, and
    otherwise only to the mail log; so it runs on a pseudo-terminal here.
    """
    controller, terminal = pty.openpty()
    try:
        try:
            process = subprocess.Popen([POSTFIX, "-c", str(config_dir), *args],
                                       stdin=subprocess.DEVNULL, stdout=terminal,
                                       stderr=terminal, start_new_session=True)
        except FileNotFoundError:
            raise PostfixConfError(f"{POSTFIX} not found: is Postfix installed?") from None
        os.close(terminal)
        terminal = -1
        output = bytearray()
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([controller], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # EIO: every writer has closed the terminal
                    chunk = b""
                if not chunk:
                    break
                output += chunk
            elif process.poll() is not None:
                break  # exited and nothing left to read (a daemon may keep the terminal)
            elif time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise PostfixConfError(f"postfix {' '.join(args)} did not finish within "
                                       f"{timeout:g}s")
        status = process.wait()
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    return status, output.decode("utf-8", "replace").replace("\r\n", "\n").strip()
