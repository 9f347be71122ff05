"""A `systemctl` for tests/test_ansible.py on a machine without systemd as PID 1: the role's
own service tasks (ansible.builtin.systemd_service) run against it and it starts the units
the role installed as systemd would, from their own lines.

`start UNIT` of a service runs each ExecStartPre (with the unit's Environment); the first
that fails fails the start, exit 1 with its output, as `systemctl start` does ("the control
process exited with error code"). Then ExecStart runs in the background in a session of its
own, its output in STATE/UNIT.log, its pid in STATE/UNIT.pid; the unit is active while that
process lives. A timer is only marked active. `enable` is remembered (`enable --now` starts
too); `show`, `is-enabled`, `is-active` report that state; `stop` sends SIGTERM and waits;
`restart` is stop + start. A unit named without a suffix is a service.

Not systemd: no cgroups, sandboxing, restarts on failure, dependencies or timers firing.
KR_UNITS_DIR names the folder of unit files (the role's keyrelay_systemd_dir), KR_STATE_DIR
the folder of this state.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

UNITS = Path(os.environ["KR_UNITS_DIR"])
STATE = Path(os.environ["KR_STATE_DIR"])
STOP_SECONDS = 30.0  # the units' TimeoutStopSec


def settings(unit: str) -> dict[str, list[str]]:
    """Every key=value line of the unit file, values in order."""
    found: dict[str, list[str]] = {}
    for line in (UNITS / unit).read_text(encoding="utf-8").splitlines():
        key, equals, value = line.partition("=")
        if equals and not line.startswith(("#", ";")):
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def environment(unit: dict[str, list[str]]) -> dict[str, str]:
    env = dict(os.environ)
    for line in unit.get("Environment", []):
        for assignment in shlex.split(line):
            name, _, value = assignment.partition("=")
            env[name] = value
    return env


def pid_of(unit: str) -> int | None:
    """The pid of the unit's running main process, else None."""
    try:
        pid = int((STATE / f"{unit}.pid").read_text())
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ValueError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else pid


def active(unit: str) -> bool:
    if unit.endswith(".timer"):
        return (STATE / f"{unit}.active").exists()
    return pid_of(unit) is not None


def enabled(unit: str) -> bool:
    return (STATE / f"{unit}.enabled").exists()


def start(unit: str) -> int:
    if unit.endswith(".timer"):
        (STATE / f"{unit}.active").touch()
        return 0
    if active(unit):
        return 0
    lines = settings(unit)
    env = environment(lines)
    for command in lines.get("ExecStartPre", []):
        check = subprocess.run(shlex.split(command), env=env, capture_output=True, text=True,
                               check=False)
        if check.returncode != 0:
            sys.stderr.write(f"Job for {unit} failed because the control process exited "
                             f"with error code.\n{check.stdout}{check.stderr}")
            return 1
    with (STATE / f"{unit}.log").open("ab") as log:
        process = subprocess.Popen(shlex.split(lines["ExecStart"][0]), env=env, stdout=log,
                                   stderr=log, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    (STATE / f"{unit}.pid").write_text(str(process.pid))
    return 0


def stop(unit: str) -> int:
    (STATE / f"{unit}.active").unlink(missing_ok=True)
    pid = pid_of(unit)
    if pid is None:
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_SECONDS
    while pid_of(unit) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_of(unit) is not None:
        os.kill(pid, signal.SIGKILL)
    return 0


def show(unit: str) -> int:
    loaded = (UNITS / unit).exists()
    print(f"Id={unit}")
    print(f"LoadState={'loaded' if loaded else 'not-found'}")
    print(f"ActiveState={'active' if active(unit) else 'inactive'}")
    print(f"SubState={'running' if active(unit) else 'dead'}")
    print(f"UnitFileState={'enabled' if enabled(unit) else 'disabled'}")
    return 0


def main(argv: list[str]) -> int:
    words = [w for w in argv if not w.startswith("-")]
    if not words:
        return 0
    verb, units = words[0], words[1:]
    if verb == "enable" and "--now" in argv:  # enable, then start
        status = main(["enable", *units])
        return status | main(["start", *units])
    if verb in ("daemon-reload", "daemon-reexec"):
        return 0
    status = 0
    for unit in (u if "." in u else f"{u}.service" for u in units):
        if verb == "show":
            status |= show(unit)
        elif verb == "is-enabled":
            print("enabled" if enabled(unit) else "disabled")
            status |= 0 if enabled(unit) else 1
        elif verb == "is-active":
            print("active" if active(unit) else "inactive")
            status |= 0 if active(unit) else 3
        elif verb == "enable":
            (STATE / f"{unit}.enabled").touch()
        elif verb == "disable":
            (STATE / f"{unit}.enabled").unlink(missing_ok=True)
        elif verb == "start":
            status |= start(unit)
        elif verb == "stop":
            status |= stop(unit)
        elif verb == "restart":
            stop(unit)
            status |= start(unit)
        else:
            print(f"systemctl_without_systemd: {verb} is not supported", file=sys.stderr)
            return 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
