"""The schema's ``counters:`` section: where rates, quotas, failed logins and lock-outs are
counted (in this process, or in Redis shared by several relay nodes; docs/cluster.md).
keyrelay/config/__init__.py says what a field's metadata holds."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .base import Duration, InvalidField

_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*")
_HOST_TEXT = "a host name or an IP address such as 127.0.0.1"
_HOST_PORT = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}")
_HOST_PORT_TEXT = "host:port, such as 10.0.0.5:26379 (IPv6 as [::1]:26379)"
_ACL_USER = re.compile(r"[^\s>@<]{1,128}")
_PREFIX = re.compile(r"[A-Za-z0-9_.:/-]{1,64}")
_SERVICE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ZONE = re.compile(r"[A-Za-z0-9_+/-]{1,64}")


@dataclass(frozen=True, slots=True)
class RedisTlsConfig:
    enabled: bool = field(
        default=False,
        metadata={"doc": "Connect with TLS (the server's tls-port); the server's certificate "
                  "is always verified."},
    )
    ca_file: str = field(
        default="",
        metadata={"doc": "CA certificates that sign the Redis server's certificate; the "
                  "server's certificate and name are then verified. Empty, with enabled: true: "
                  "the system's CA store.", "absolute_path": True, "allow_empty": True},
    )
    cert_file: str = field(
        default="",
        metadata={"doc": "Client certificate, for a server with tls-auth-clients yes; empty: "
                  "none.", "absolute_path": True, "allow_empty": True},
    )
    key_file: str = field(
        default="",
        metadata={"doc": "The client certificate's private key (readable only by the daemons' "
                  "user).", "absolute_path": True, "allow_empty": True},
    )

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise InvalidField("cert_file" if self.key_file else "key_file",
                               "cert_file and key_file go together: give both or neither")


@dataclass(frozen=True, slots=True)
class RedisConfig:
    host: str = field(
        default="127.0.0.1",
        metadata={"doc": "Redis server's host name or address.",
                  "pattern": (_HOST, _HOST_TEXT)},
    )
    port: int = field(
        default=6379, metadata={"doc": "Redis server's port.", "min": 1, "max": 65535},
    )
    socket: str = field(
        default="",
        metadata={"doc": "A unix socket of the Redis server, in place of host and port "
                  "(one node only: a socket is local); empty: host and port.",
                  "absolute_path": True, "allow_empty": True},
    )
    db: int = field(
        default=0, metadata={"doc": "Database number.", "min": 0, "max": 65535},
    )
    username: str = field(
        default="",
        metadata={"doc": "Redis ACL user (docs/cluster.md, \"Redis ACL\" lists the commands it "
                  "needs); empty: the default user.",
                  "pattern": (_ACL_USER, "an ACL user name without whitespace"),
                  "allow_empty": True},
    )
    password_file: str = field(
        default="",
        metadata={"doc": "File holding the user's password (one line; mode 0640, readable by "
                  "the daemons' user). The password is never in this file. Empty: no "
                  "password.", "absolute_path": True, "allow_empty": True},
    )
    tls: RedisTlsConfig = field(
        default_factory=RedisTlsConfig, metadata={"doc": "TLS to the Redis server."},
    )
    timeout: Duration = field(
        default=Duration(1.0),
        metadata={"doc": "Longest wait for Redis in one operation (connecting included); "
                  "then the operation counts as Redis away (on_unavailable).",
                  "min": 0.05, "max": 60},
    )
    prefix: str = field(
        default="keyrelay:",
        metadata={"doc": "Start of every key keyrelay writes; nodes that share counters use "
                  "the same server, db and prefix.",
                  "pattern": (_PREFIX, "up to 64 letters, digits or _ . : / -")},
    )
    sentinels: tuple[str, ...] = field(
        default=(),
        metadata={"doc": "Redis Sentinels that know the primary, as host:port; when given, "
                  "host, port and socket are not used and the primary of service_name is "
                  "asked for (and asked again after a failover).",
                  "pattern": (_HOST_PORT, _HOST_PORT_TEXT)},
    )
    service_name: str = field(
        default="mymaster",
        metadata={"doc": "The Sentinel service name of the primary (sentinels).",
                  "pattern": (_SERVICE, "a Sentinel service name such as mymaster")},
    )

    def __post_init__(self) -> None:
        if self.username and not self.password_file:
            raise InvalidField("password_file", f"username {self.username} needs a "
                               "password_file (the password is never in the configuration)")
        if self.sentinels and self.socket:
            raise InvalidField("socket", "give either sentinels or socket, not both")
        for entry in self.sentinels:
            port = int(entry.rsplit(":", 1)[1])
            if not 1 <= port <= 65535:
                raise InvalidField("sentinels", f"port must be 1 to 65535, got {entry!r}")


@dataclass(frozen=True, slots=True)
class CountersConfig:
    backend: Literal["memory", "redis"] = field(
        default="memory",
        metadata={"doc": 'Where limits, quotas, failed logins and lock-outs are counted: '
                  '"memory" (each daemon for itself: one relay node) or "redis" (shared by '
                  "every node that names the same Redis; docs/cluster.md)."},
    )
    on_unavailable: Literal["tempfail", "local"] = field(
        default="tempfail",
        metadata={"doc": "With Redis away, messages that limits or quotas apply to get "
                  "\"tempfail\" (451 4.3.0: mail waits, nothing is sent unchecked; so do "
                  "the recipients of keyrelay logins, whose suppression lists are in Redis) "
                  "or \"local\": counted in this daemon's memory until Redis answers again "
                  "(logged once per outage; each node then allows its own full limit; the "
                  "recipients of keyrelay logins are checked against this node's replica "
                  "of the suppression lists, suppressions.replica). "
                  "Failed logins are always counted locally meanwhile."},
    )
    time_zone: str = field(
        default="UTC",
        metadata={"doc": "IANA time zone (e.g. Europe/Paris) of the daily and monthly quotas: "
                  "they reset at midnight there.",
                  "pattern": (_ZONE, "an IANA time zone name such as UTC or Europe/Paris")},
    )
    redis: RedisConfig = field(
        default_factory=RedisConfig, metadata={"doc": "The Redis server (backend: redis)."},
    )

    def __post_init__(self) -> None:
        try:
            ZoneInfo(self.time_zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise InvalidField("time_zone", f"no time zone {self.time_zone!r} on this host "
                               "(an IANA name such as UTC or Europe/Paris; Debian: tzdata)"
                               ) from None
