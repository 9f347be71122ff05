"""The demo's state in its run directory: keyrelay.yaml, the demo tenant (made once with the
real ``keyrelay`` CLI), a fresh API key on every start, and ``demo.env``."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from ..daemon import ROOT_USERS
from .processes import BIN
from .settings import (
    BOUNCE_DOMAIN,
    DEFER_DOMAIN,
    DEMO_ACCOUNT,
    DEMO_DOMAIN,
    DEMO_FROM,
    DEMO_POOL,
    DEMO_SUBUSER,
    DEMO_TO,
    DemoError,
    Settings,
)


def keyrelay_cli(settings: Settings, *args: str) -> str:
    """Run the real ``keyrelay`` command on the demo configuration; its stdout."""
    result = subprocess.run([str(BIN / "keyrelay"), "--config", str(settings.config), *args],
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise DemoError(f"keyrelay {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def write_config(settings: Settings) -> None:
    """The demo's keyrelay.yaml, rewritten on every start (ports come from the environment)."""
    run, host = settings.run_dir, settings.host
    config = {
        "directory": (dict(settings.directory) if settings.directory is not None
                      else {"backend": "yaml", "path": str(run / "directory.yaml")}),
        "dkim": {"key_dir": str(run / "dkim")},
        "logging": {"audit_log": str(run / "audit.log")},
        "policyd": {
            "user": settings.daemon_user,
            "auth_listen": f"unix:{settings.socket('auth')}",
            "policy_listen": f"unix:{settings.socket('policy')}",
            "socketmap_listen": f"unix:{settings.socket('socketmap')}",
            "control_listen": f"unix:{settings.socket('control')}",
            "shutdown_grace": "2s",
            "metrics_listen": _listen(settings, settings.policyd_metrics_port),
        },
        "milter": {"listen": f"unix:{settings.socket('milter')}", "shutdown_grace": "2s",
                   "user": settings.daemon_user,
                   "metrics_listen": _listen(settings, settings.milter_metrics_port)},
        "postfix": {
            "config_dir": str(settings.postfix_etc),
            "smtp_service": f"{host}:{settings.smtp_port}",
            "submission_services": [f"{host}:{settings.submission_port}",
                                    f"{host}:{settings.alt_submission_port}"],
            "submissions_services": [f"{host}:{settings.submissions_port}"],
            "tls_chain_files": f"{run / 'tls' / 'key.pem'}, {run / 'tls' / 'cert.pem'}",
        },
    }
    # keyrelay-events (docs/events.md): the demo Postfix's own maillog_file
    config["events"] = {"maillog": str(settings.maillog), "state": str(settings.events_state),
                        "metrics_listen": _listen(settings, settings.events_metrics_port)}
    # the README's tour sets a webhook to a receiver on this machine (docs/webhooks.md)
    config["webhooks"] = {"allow_private_targets": True}
    # the suppression list of the demo's in-process counters (docs/suppressions.md)
    config["suppressions"] = {"path": str(settings.run_dir / "suppressions.db")}
    if settings.counters is not None:
        config["counters"] = dict(settings.counters)
    text = ("# Written by keyrelay's demo (make run) on every start; the ports come from the\n"
            "# environment (see README). JSON is YAML: keyrelay reads this file as YAML.\n"
            + json.dumps(config, indent=2) + "\n")
    settings.config.write_text(text)
    settings.config.chmod(0o600)
    give_to_daemons(settings, settings.config, 0o640, owner=False)


def give_to_daemons(settings: Settings, path: Path, mode: int, owner: bool) -> None:
    """As root with an unprivileged daemon user: ``path`` to that user's group (``owner``:
    to the user too), with ``mode``, as a production host has /etc/keyrelay."""
    user = settings.daemon_user
    if os.geteuid() != 0 or user in ROOT_USERS:
        return
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid if owner else 0, entry.pw_gid)
    path.chmod(mode)


def ensure_daemon_user(settings: Settings, say: Callable[[str], None]) -> None:
    """Create the daemons' system user (and its group) when the demo runs as root and it is
    missing, as the Debian package and the Ansible role do on a production host."""
    user = settings.daemon_user
    if os.geteuid() != 0 or user in ROOT_USERS:
        return
    try:
        pwd.getpwnam(user)
        return
    except KeyError:
        pass
    for _ in range(30):  # another demo starting at the same time may hold /etc/passwd's lock
        result = subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
             "/nonexistent", "--shell", "/usr/sbin/nologin", user],
            capture_output=True, text=True, timeout=60, check=False)
        if result.returncode in (0, 9):  # 9: made meanwhile
            break
        time.sleep(1)
        with contextlib.suppress(KeyError):
            pwd.getpwnam(user)
            return
    else:
        raise DemoError(f"cannot create the system user {user} for the daemons: "
                        f"{result.stderr.strip()}")
    say(f"created the system user {user}: keyrelay-policyd and keyrelay-milter run as it")


def init_state(settings: Settings, say: Callable[[str], None]) -> None:
    """Create the demo tenant once; a state from another pool address starts afresh."""
    run = settings.run_dir
    marker = run / "demo-state.json"
    # version 2: the state belongs to the daemons' user (keys made for it)
    wanted = {"version": 2, "pool_address": settings.pool_address,
              "daemon_user": settings.daemon_user}
    try:
        if json.loads(marker.read_text()) == wanted:
            return
    except (OSError, ValueError):
        pass
    for stale in ("directory.yaml", "directory.yaml.lock", "dkim", "demo.env", "demo-key.txt"):
        path = run / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    say(f"creating the demo tenant in {run}/")
    key_dir = run / "dkim"
    key_dir.mkdir(mode=0o700, exist_ok=True)
    give_to_daemons(settings, key_dir, 0o700, owner=True)  # new keys are its owner's

    def kr(*args: str) -> str:
        return keyrelay_cli(settings, *args)

    kr("account", "add", DEMO_ACCOUNT)
    kr("subuser", "add", DEMO_SUBUSER)
    kr("pool", "add", DEMO_POOL, "--bind", settings.pool_address, "--helo", "relay.demo.example")
    kr("pool", "assign", DEMO_SUBUSER, DEMO_POOL)
    kr("domain", "add", DEMO_ACCOUNT, DEMO_DOMAIN)
    kr("domain", "grant", DEMO_DOMAIN, DEMO_SUBUSER)
    # The demo has no DNS server: the domain is marked verified by hand (audited as manual).
    kr("domain", "mark-verified", DEMO_DOMAIN)
    (run / "demo.example.zone").write_text(kr("domain", "dns", DEMO_DOMAIN))
    marker.write_text(json.dumps(wanted) + "\n")


def fresh_key(settings: Settings) -> tuple[str, str]:
    """A new API key for demo/app (key, key id); earlier demo keys are revoked."""
    for key in json.loads(keyrelay_cli(settings, "key", "list", DEMO_SUBUSER, "--json")):
        if key["name"].startswith("demo-") and key["state"] == "active":
            keyrelay_cli(settings, "key", "revoke", key["key_id"])
    name = time.strftime("demo-%Y%m%d-%H%M%S")
    created = json.loads(keyrelay_cli(settings, "key", "create", DEMO_SUBUSER,
                                      "--name", name, "--json"))
    return created["key"], created["key_id"]


def _listen(settings: Settings, port: int) -> str:
    if not port:
        return ""
    return f"[{settings.host}]:{port}" if ":" in settings.host else f"{settings.host}:{port}"


def read_env(path: Path) -> dict[str, str]:
    """The ``NAME=value`` lines of a ``demo.env`` file; {} when it cannot be read."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    result = {}
    for line in lines:
        name, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            result[name.strip()] = shlex.split(value)[0] if value.strip() else ""
    return result


def write_env(settings: Settings, key: str, key_id: str) -> None:
    values = {
        "KEYRELAY_DEMO_KEY": key,
        "KEYRELAY_DEMO_KEY_ID": key_id,
        "KEYRELAY_DEMO_FROM": DEMO_FROM,
        "KEYRELAY_DEMO_TO": DEMO_TO,
        "KEYRELAY_HOST": settings.host,
        "KEYRELAY_SMTP_PORT": str(settings.smtp_port),
        "KEYRELAY_SUBMISSION_PORT": str(settings.submission_port),
        "KEYRELAY_ALT_SUBMISSION_PORT": str(settings.alt_submission_port),
        "KEYRELAY_SUBMISSIONS_PORT": str(settings.submissions_port),
        "KEYRELAY_SINK_PORT": str(settings.sink_port),
        "KEYRELAY_BOUNCE_SINK_PORT": str(settings.bounce_sink_port),
        "KEYRELAY_DEFER_SINK_PORT": str(settings.defer_sink_port),
        "KEYRELAY_BOUNCE_DOMAIN": BOUNCE_DOMAIN,
        "KEYRELAY_DEFER_DOMAIN": DEFER_DOMAIN,
        "KEYRELAY_POOL_ADDRESS": settings.pool_address,
        "KEYRELAY_CONFIG": str(settings.config),
        "KEYRELAY_OUTBOX": str(settings.outbox),
        "KEYRELAY_METRICS_URLS": " ".join(settings.metrics_urls()),
    }
    text = "# Written by make run; the API key is secret (mode 0600).\n" + "".join(
        f"{name}={shlex.quote(value)}\n" for name, value in values.items())
    tmp = settings.env_file.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, settings.env_file)
