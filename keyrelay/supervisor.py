"""Worker processes for keyrelay-policyd and keyrelay-milter (``policyd.workers``,
``milter.workers``): one supervisor process and N forked workers.

The daemon binds its listening sockets once, as root, and drops root; then ``Supervisor``
forks the workers, which inherit the bound sockets and accept on them (the kernel hands each
new connection to one of the workers waiting). The supervisor itself serves nothing:

- a worker that dies is replaced, after a pause that doubles (0.5 s up to 30 s) while workers
  keep dying within 10 s of their start, and each death and replacement is logged;
- SIGHUP is passed to every worker (each reloads and logs it), SIGTERM and SIGINT too: the
  workers stop gracefully; one still running ``stop_timeout`` seconds later is killed;
- the workers get SIGTERM if the supervisor dies (PR_SET_PDEATHSIG), so none serves on alone.

Signals are taken synchronously (blocked, then ``sigtimedwait``): no handler runs between a
fork and the worker's own start. ``workers: 1`` runs no supervisor at all (the daemons call
``worker_count`` and serve in-process when it says 1). docs/policyd.md and docs/milters.md,
"Worker processes", describe it for admins.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

AUTO_CAP = 16  # ``auto`` on a bigger machine: beyond this, add nodes or set a number
_SIGNALS = {signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM, signal.SIGINT}
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_FIRST_PAUSE, _LONGEST_PAUSE, _HEALTHY_AFTER = 0.5, 30.0, 10.0


def cpus() -> int:
    """CPUs this process may run on (its affinity, which systemd's CPUAffinity= narrows)."""
    return len(os.sched_getaffinity(0))


def worker_count(setting: int) -> int:
    """The number of workers for a ``*.workers`` setting: ``auto`` (0) is one per CPU, at
    most ``AUTO_CAP``."""
    return setting if setting > 0 else max(1, min(cpus(), AUTO_CAP))


@dataclass
class _Worker:
    slot: int
    pid: int
    started: float


class Supervisor:
    """Runs ``count`` workers, each ``work(slot)`` in a forked child (``slot`` 1..count).

    ``work`` serves until told to stop and returns an exit status (0: stopped as asked).
    ``on_hup`` (default: pass SIGHUP to every worker) runs in the supervisor at SIGHUP.
    """

    def __init__(self, program: str, count: int, work: Callable[[int], int],
                 stop_timeout: float, log: logging.Logger,
                 on_hup: Callable[[Supervisor], None] | None = None) -> None:
        self.program = program
        self.count = count
        self.work = work
        self.stop_timeout = stop_timeout
        self.log = log
        self.on_hup = on_hup or Supervisor.pass_hup
        self.workers: dict[int, _Worker] = {}  # by pid
        self.pending: dict[int, float] = {}  # slot -> monotonic time to start it again
        self.pauses: dict[int, float] = {}  # slot -> the next pause after a quick death
        self.stopping = False
        self.retiring: set[int] = set()  # pids told to stop by replace_all: not restarted
        # SIGHUPs passed so far, in memory shared with the workers: a worker started after
        # one (or that got it before it could handle it) reloads once it can
        self._hups = mmap.mmap(-1, 8)
        # hooks (the metrics endpoint, keyrelay/metrics/endpoint.py): once the workers are
        # started, with the supervisor's signals blocked (a thread started there inherits
        # that); for each worker reaped; in each worker right after its fork
        self.on_started: Callable[[], None] | None = None
        self.on_reaped: Callable[[int], None] | None = None
        self.in_child: Callable[[], None] | None = None

    # -- the supervisor --------------------------------------------------------------------
    def run(self) -> int:
        """Start the workers and supervise them until SIGTERM/SIGINT; the exit status."""
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        self.old_mask = old_mask
        try:
            for slot in range(1, self.count + 1):
                self.start(slot)
            self.log.info("%s supervisor (pid %d): %d workers started", self.program,
                          os.getpid(), self.count)
            if self.on_started is not None:
                self.on_started()
            while not self.stopping:
                self.step(self.wait_time())
            return self.stop()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def wait_time(self) -> float:
        if not self.pending:
            return 5.0
        return max(0.0, min(self.pending.values()) - time.monotonic())

    def step(self, timeout: float) -> None:
        info = signal.sigtimedwait(_SIGNALS, timeout)
        if info is not None:
            if info.si_signo in (signal.SIGTERM, signal.SIGINT):
                self.stopping = True
                return
            if info.si_signo == signal.SIGHUP:
                self.on_hup(self)
        self.reap()
        now = time.monotonic()
        for slot, when in list(self.pending.items()):
            if when <= now:
                del self.pending[slot]
                self.start(slot)

    def reloads(self) -> int:
        """SIGHUPs the supervisor passed on so far; a worker whose configuration came from the
        supervisor's start reloads at its own start when this is not 0."""
        return int.from_bytes(self._hups[:8], "little")

    def pass_hup(self) -> None:
        """Pass a SIGHUP to every worker (each reloads its configuration and logs it)."""
        self._hups[:8] = (self.reloads() + 1).to_bytes(8, "little")
        self.log.info("SIGHUP: passing it to %d workers", len(self.workers))
        self.signal_all(signal.SIGHUP)

    def replace_all(self) -> None:
        """Start a new worker for each running one, then stop the old one gracefully."""
        for old in list(self.workers.values()):
            if old.pid in self.retiring:
                continue
            self.start(old.slot)
            self.retiring.add(old.pid)
            try:
                os.kill(old.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def signal_all(self, signo: int) -> None:
        for pid in list(self.workers):
            try:
                os.kill(pid, signo)
            except ProcessLookupError:
                pass

    def reap(self) -> None:
        """Collect every worker that exited; schedule its replacement unless stopping."""
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue  # a child of something else in this process (accessible_as)
            if self.on_reaped is not None:
                self.on_reaped(pid)
            how = _describe(status)
            if pid in self.retiring:
                self.retiring.discard(pid)
                self.log.info("worker %d (pid %d), replaced, %s", worker.slot, pid, how)
                continue
            if self.stopping:
                self.log.info("worker %d (pid %d) %s", worker.slot, pid, how)
                continue
            lived = time.monotonic() - worker.started
            pause = self.pauses.get(worker.slot, _FIRST_PAUSE)
            if lived >= _HEALTHY_AFTER:
                pause = _FIRST_PAUSE
            self.pauses[worker.slot] = min(pause * 2, _LONGEST_PAUSE)
            self.pending[worker.slot] = time.monotonic() + pause
            self.log.warning("worker %d (pid %d) %s after %.1fs; starting a new one in %.1fs",
                             worker.slot, pid, how, lived, pause)

    def start(self, slot: int) -> None:
        pid = os.fork()
        if pid == 0:
            os._exit(self._child(slot))
        self.workers[pid] = _Worker(slot, pid, time.monotonic())
        self.log.info("worker %d started (pid %d)", slot, pid)

    def stop(self) -> int:
        """Pass SIGTERM to every worker, wait ``stop_timeout`` for them, kill what is left."""
        self.log.info("stopping %d workers", len(self.workers))
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        while self.workers and time.monotonic() < deadline:
            signal.sigtimedwait({signal.SIGCHLD}, min(0.5, deadline - time.monotonic()))
            self.reap()
        if self.workers:
            self.log.warning("%d workers still running %.0fs after SIGTERM: killing them",
                             len(self.workers), self.stop_timeout)
            self.signal_all(signal.SIGKILL)
            while self.workers:
                pid, _ = os.waitpid(-1, 0)
                self.workers.pop(pid, None)
        return 0

    # -- a worker, right after the fork -----------------------------------------------------
    def _child(self, slot: int) -> int:
        parent = os.getppid()
        try:
            for signo in _SIGNALS:
                signal.signal(signo, signal.SIG_DFL)
            # until the worker handles SIGHUP itself; one passed meanwhile shows in reloads()
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_SETMASK, self.old_mask)
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if os.getppid() != parent:  # the supervisor died before the line above
                return 1
            if self.in_child is not None:
                self.in_child()
            return self.work(slot)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # a worker must never return into the supervisor
            self.log.exception("worker %d failed", slot)
            return 1
        finally:
            logging.shutdown()


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"
