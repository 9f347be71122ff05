"""What the benchmarks measure of processes and of the host: exact CPU time of a process or a
process tree, resident memory of a tree (sampled), the load average, a line about the host."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import threading
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
POSTCONF = "/usr/sbin/postconf"


# -- CPU accounting from /proc ---------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may hold spaces and parentheses: split after the last ')'
    return text[text.rindex(")") + 2:].split()


def process_cpu_ns(pid: int) -> int | None:
    """CPU time of a whole process (all its threads, those that ended included) in
    nanoseconds, from the kernel's per-process CPU clock; None when it is gone.

    /proc/PID/stat's utime and stime count in clock ticks (10 ms): a process that used 9 ms
    reads 0, and a short run of Postfix, whose work is spread over a handful of processes
    using a few ms each, read 0 ms in all. The process CPU clock is exact. Python has no
    clock_getcpuclockid(), so the clock id is made as glibc's MAKE_PROCESS_CPUCLOCK does:
    ``(~pid << 3) | CPUCLOCK_SCHED``.
    """
    try:
        return time.clock_gettime_ns((~pid << 3) | 2)
    except OSError:
        return None


def process_tree_cpu(root: int, *, reaped: bool = False) -> float:
    """CPU seconds of ``root`` and of every live descendant (exact: ``process_cpu_ns``);
    with ``reaped`` also of the children ``root`` has already waited for (cutime + cstime,
    which the kernel reports only in clock ticks). ProcessLookupError when ``root`` is gone.
    """
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue
        pid = int(entry.name)
        stats[pid] = fields
        children.setdefault(int(fields[1]), []).append(pid)
    if root not in stats:
        raise ProcessLookupError(f"process {root} is gone")
    ticks, nanoseconds = 0, 0
    todo = [root]
    while todo:
        pid = todo.pop()
        fields = stats[pid]
        # fields[0] is the state (field 3 of stat): utime is field 14, stime 15, ...
        # a process gone since the scan is left out: its parent reaps it and, when that is
        # the root, it is in the root's cutime + cstime
        nanoseconds += process_cpu_ns(pid) or 0
        if pid == root and reaped:
            ticks += int(fields[13]) + int(fields[14])
        todo.extend(children.get(pid, ()))
    return ticks / CLK_TCK + nanoseconds / 1e9


# -- memory ----------------------------------------------------------------------------------
def process_children() -> dict[int, list[int]]:
    """Every live process's children, by parent pid."""
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def tree_rss_mb(root: int, tree: dict[int, list[int]]) -> float:
    """Resident memory of ``root`` and its live descendants, in MB."""
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            pass
        todo.extend(tree.get(pid, ()))
    return total / 1024


class RssSampler(threading.Thread):
    """Samples the resident memory of named process trees every 0.25 s; keeps the peaks."""

    def __init__(self, roots: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.roots = roots
        self.peaks = dict.fromkeys(roots, 0.0)
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            tree = process_children()
            for name, pid in self.roots.items():
                self.peaks[name] = max(self.peaks[name], tree_rss_mb(pid, tree))
            self.halt.wait(0.25)

    def stop(self) -> dict[str, float]:
        self.halt.set()
        self.join()
        return self.peaks


# -- the host --------------------------------------------------------------------------------
def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def version_of(argv: list[str], pattern: str) -> str:
    """The first group of ``pattern`` in what ``argv`` prints; "?" when it cannot be run."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "?"
    found = re.search(pattern, result.stdout + result.stderr)
    return found.group(1) if found else "?"


def debian_version(package: str) -> str:
    return version_of(["dpkg-query", "-W", "-f=${Version}", package], r"(\S+)")


def describe_host() -> str:
    """CPUs, Python, Postfix and the other milters' versions, on one line."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    postfix = version_of([POSTCONF, "-d", "-h", "mail_version"], r"(\S+)")
    return (f"host: {os.cpu_count()} CPUs, {cpu}; Python {platform.python_version()}; "
            f"Postfix {postfix}; opendkim {debian_version('opendkim')}; "
            f"dkimpy-milter {debian_version('dkimpy-milter')}")
