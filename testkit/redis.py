"""A private ``redis-server`` for tests and benches: on a free loopback port and a unix socket
in a short temporary folder, with the ACL user keyrelay's counters need (keyrelay/counters/
scripts.py ``acl_rules``) and a password in a file, optionally TLS on a second port (the
throw-away CA of testkit/slapd.py ``shared_tls``).

``stop()`` ends it cleanly, ``kill()`` with SIGKILL (an outage), ``start()`` starts it again
on the same ports and socket (empty: nothing is persisted). ``keys()`` lists every key with
its TTL in ms (-1: none), through the harness's own admin user.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from keyrelay.counters.scripts import acl_rules

from .net import free_ports, unix_accepts, wait_until
from .slapd import shared_tls

REDIS_SERVER = Path("/usr/bin/redis-server")
START_DEADLINE = 60.0  # a loaded machine; the wait ends as soon as the server answers


class RedisServer:
    """One private redis-server. ``user``/``password`` (in ``password_file``) may use keys
    under ``prefix`` only; ``admin`` may do anything (the harness itself)."""

    def __init__(self, *, tls: bool = False, prefix: str = "keyrelay:",
                 user: str = "keyrelay", replica_of: RedisServer | None = None) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="kr-redis-", dir="/tmp"))
        self.socket = self.folder / "redis.sock"
        self.port, self.tls_port = free_ports(2)
        self.tls = tls
        self.prefix = prefix
        self.user = user
        # a replica shares its primary's users and passwords (a failover swaps their roles)
        self.replica_of = replica_of
        self.password: str = (replica_of.password if replica_of
                              else secrets.token_urlsafe(18))
        self.admin_password: str = (replica_of.admin_password if replica_of
                                    else secrets.token_urlsafe(18))
        self.password_file = self.folder / "redis.secret"
        self.password_file.write_text(self.password + "\n")
        self.password_file.chmod(0o600)
        self.ca_file = shared_tls() / "ca.pem" if tls else None
        self.process: subprocess.Popen[bytes] | None = None
        self.sentinel: subprocess.Popen[bytes] | None = None
        self._write_config()

    def _write_config(self) -> None:
        lines = [
            "bind 127.0.0.1", f"port {self.port}", f"unixsocket {self.socket}",
            "unixsocketperm 700", f"dir {self.folder}", 'save ""', "appendonly no",
            f"logfile {self.folder / 'redis.log'}", "daemonize no", "protected-mode no",
            "user default off",
            f"user admin on >{self.admin_password} ~* &* +@all",
            f"user {self.user} on >{self.password} {acl_rules(self.prefix)}",
            # what a replica logs in as to its primary (the primary too: after a failover
            # it becomes a replica itself)
            "masteruser admin", f"masterauth {self.admin_password}",
        ]
        if self.replica_of is not None:
            lines.append(f"replicaof 127.0.0.1 {self.replica_of.port}")
        if self.tls:
            tls = shared_tls()
            lines += [f"tls-port {self.tls_port}", f"tls-cert-file {tls / 'server.pem'}",
                      f"tls-key-file {tls / 'server.key'}",
                      f"tls-ca-cert-file {tls / 'ca.pem'}", "tls-auth-clients no"]
        (self.folder / "redis.conf").write_text("\n".join(lines) + "\n")

    # -- lifetime --------------------------------------------------------------------------

    def start(self) -> RedisServer:
        if self.process is not None and self.process.poll() is None:
            return self
        if self.socket.exists():
            self.socket.unlink()
        # its own session, as slapd's (testkit/slapd.py)
        self.process = subprocess.Popen(
            [str(REDIS_SERVER), str(self.folder / "redis.conf")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until(self._answers, START_DEADLINE, f"redis-server on {self.port} answering")
        return self

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited ({self.process.returncode}):\n"
                               + self.log())
        if not unix_accepts(self.socket):
            return False
        try:
            return bool(self.admin().ping())
        except redis.RedisError:
            return False

    def start_sentinel(self, service_name: str = "mymaster") -> int:
        """A Redis Sentinel (``redis-server --sentinel``) that monitors this server as
        ``service_name``; its port. Ended with the server's ``close``."""
        port = free_ports(1)[0]
        conf = self.folder / "sentinel.conf"
        conf.write_text("\n".join([
            "bind 127.0.0.1", f"port {port}", f"dir {self.folder}", "daemonize no",
            f"logfile {self.folder / 'sentinel.log'}",
            f"sentinel monitor {service_name} 127.0.0.1 {self.port} 1",
            f"sentinel auth-user {service_name} admin",
            f"sentinel auth-pass {service_name} {self.admin_password}",
        ]) + "\n")
        self.sentinel = subprocess.Popen(
            [str(REDIS_SERVER), str(conf), "--sentinel"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def knows_the_primary() -> bool:
            client: Any = redis.Redis(host="127.0.0.1", port=port, socket_timeout=10)
            try:
                found = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME",
                                               service_name)
                return bool(found)
            except redis.RedisError:
                return False
            finally:
                client.close()

        wait_until(knows_the_primary, START_DEADLINE, f"redis sentinel on {port}")
        return port

    def stop(self) -> None:
        """End the server cleanly (SIGTERM) and wait for it."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """End the server at once (SIGKILL): what an outage looks like to its clients."""
        self._end(signal.SIGKILL)

    def _end(self, how: signal.Signals) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(how)
        try:
            process.wait(timeout=START_DEADLINE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open and nothing answers."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.resume()
        self.stop()
        if self.sentinel is not None:
            self.sentinel.terminate()
            self.sentinel.wait(timeout=START_DEADLINE)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what tests read -------------------------------------------------------------------

    def admin(self) -> Any:
        """A synchronous client as the admin user, over the unix socket."""
        return redis.Redis(unix_socket_path=str(self.socket), username="admin",
                           password=self.admin_password, socket_timeout=10)

    def keys(self) -> dict[str, int]:
        """Every key and its TTL in ms (-1: none)."""
        client = self.admin()
        try:
            return {key.decode(): int(client.pttl(key)) for key in client.scan_iter(count=1000)}
        finally:
            client.close()

    def flush(self) -> None:
        client = self.admin()
        try:
            client.flushall()
        finally:
            client.close()

    def log(self) -> str:
        try:
            return (self.folder / "redis.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def counters_settings(self, *, via: str = "tcp", **extra: Any) -> dict[str, Any]:
        """keyrelay.yaml's ``counters:`` section (as YAML data) for this server: ``via`` is
        ``tcp``, ``unix`` or ``tls``; ``extra`` keys go into ``redis:``, except ``on_unavailable``
        and ``time_zone``."""
        settings: dict[str, Any] = {
            "username": self.user, "password_file": str(self.password_file),
            # generous: a loaded machine's answer must not read as Redis away (tests of an
            # unanswering server pass a shorter one)
            "prefix": self.prefix, "timeout": 10,
        }
        if via == "unix":
            settings["socket"] = str(self.socket)
        elif via == "tls":
            assert self.tls and self.ca_file is not None
            settings.update(port=self.tls_port, tls={"enabled": True,
                                                     "ca_file": str(self.ca_file)})
        else:
            settings["port"] = self.port
        top = {key: extra.pop(key) for key in ("on_unavailable", "time_zone") if key in extra}
        settings.update(extra)
        return {"backend": "redis", **top, "redis": settings}


@contextmanager
def redis_server(**options: Any) -> Iterator[RedisServer]:
    """A started ``RedisServer``, removed afterwards."""
    with RedisServer(**options) as server:
        yield server
