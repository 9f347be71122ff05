"""keyrelay.demo's ``Child.kill``: a daemon killed by the demo, the benchmarks or the soaks
takes its worker processes with it (keyrelay/supervisor.py forks them into the daemon's own
session), as systemd's final SIGKILL reaches a unit's whole cgroup. Before, a soak that killed
keyrelay-milter's supervisor saw its workers still accepting on the socket, and took that for
the restarted daemon being ready (bench/soak.py, "killed while the ACLs hid the records")."""

from __future__ import annotations

import time
from pathlib import Path

from keyrelay.demo.processes import Child, _running_in_group


def test_kill_ends_the_process_and_every_process_of_its_session(tmp_path: Path) -> None:
    # a parent with two children of its own, as a supervisor with two workers
    child = Child("supervisor", ["sh", "-c", "sleep 300 & sleep 300 & echo up; wait"],
                  tmp_path / "child.log", lambda: "up" in (tmp_path / "child.log").read_text())
    child.start()
    assert child.process is not None
    group = child.process.pid
    assert _running_in_group(group)

    child.kill()

    assert child.process.poll() is not None
    assert not _running_in_group(group)


def test_kill_of_a_process_that_already_exited_ends_what_it_left_behind(
        tmp_path: Path) -> None:
    child = Child("supervisor", ["sh", "-c", "sleep 300 & echo up; sleep 1"],
                  tmp_path / "child.log", lambda: "up" in (tmp_path / "child.log").read_text())
    child.start()
    assert child.process is not None
    child.process.wait()  # the parent is gone; its child still runs in the session
    group = child.process.pid
    deadline = time.monotonic() + 30
    while not _running_in_group(group):
        assert time.monotonic() < deadline
        time.sleep(0.05)

    child.kill()

    assert not _running_in_group(group)
