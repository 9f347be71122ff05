"""A scratch root: this host's root filesystem under an overlay whose writable layer is a
tmpfs, in a mount namespace of its own (``unshare --mount``). What runs inside (dpkg, apt,
adduser, pip, an Ansible role, the daemons) really writes, and every write lands in the
tmpfs, which vanishes with the namespace: the host keeps nothing. Needs root (mounting).

Folders of the host can be bound into it (``binds``: path inside -> path outside), shared
both ways, e.g. a test's folder at the same path. tests/test_deb.py installs the Debian
package into one, tests/test_readme_deploy.py and tests/test_ansible.py deploy into one.
"""

from __future__ import annotations

import shlex
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


class ScratchRoot:
    """``binds``: folders of the host shared into it; ``tmpfs``: folders inside that start
    empty (a tmpfs each)."""

    def __init__(self, binds: Mapping[str, Path], tmpfs: tuple[str, ...] = ("/run",)) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="kr-scratch-"))
        self.root = self.base / "root"
        layers = f"lowerdir=/,upperdir={self.base}/upper,workdir={self.base}/work"
        mounts = "".join(
            f"mkdir -p {shlex.quote(f'{self.root}{inside}')}\n"
            f"mount --bind {shlex.quote(str(outside))} {shlex.quote(f'{self.root}{inside}')}\n"
            for inside, outside in binds.items())
        empty = "".join(f"mount -t tmpfs tmpfs {shlex.quote(f'{self.root}{inside}')}\n"
                        for inside in tmpfs)
        script = f"""set -e
            mount -t tmpfs -o mode=0755 kr-scratch {self.base}
            mkdir {self.base}/upper {self.base}/work {self.root}
            mount -t overlay overlay -o {layers} {self.root}
            mount -t proc proc {self.root}/proc
            mount --rbind /dev {self.root}/dev
            {empty}
            {mounts}
            echo ready
            exec sleep 100000"""
        self.holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh",
                                        "-c", script], stdout=subprocess.PIPE, text=True)
        assert self.holder.stdout is not None
        if self.holder.stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError("could not set up the scratch root (unshare, tmpfs, overlay)")

    @property
    def enter(self) -> list[str]:
        """The command prefix that runs a program inside."""
        return ["nsenter", f"--target={self.holder.pid}", "--mount", "--", "chroot",
                str(self.root)]

    def run(self, *args: str, timeout: float = 60) -> str:
        """``args`` run inside; its output, or AssertionError with all it said."""
        result = subprocess.run([*self.enter, *args], capture_output=True, text=True,
                                timeout=timeout, check=False)
        assert result.returncode == 0, result
        return result.stdout

    def path(self, inside: str) -> str:
        """``inside`` as a process outside reaches it (through the namespace holder's root)."""
        return f"/proc/{self.holder.pid}/root{self.root}{inside}"

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()
        self.base.rmdir()


@contextmanager
def scratch_root(binds: Mapping[str, Path]) -> Iterator[ScratchRoot]:
    scratch = ScratchRoot(binds)
    try:
        yield scratch
    finally:
        scratch.close()
