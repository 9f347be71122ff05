"""The schema's sections for keyrelay-policyd (with its brute-force protection),
keyrelay-milter and what `keyrelay postfix apply` writes into Postfix's main.cf and master.cf.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .base import AUTO_WORKERS, NO_SPACE, Duration, InvalidField, Workers

# Postfix's own endpoint syntax: unix:/absolute/path, or inet:host:port (IPv6 in brackets).
_ENDPOINT = re.compile(r"unix:/\S+|inet:(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}")
_ENDPOINT_TEXT = "unix:/absolute/path or inet:host:port (IPv6 as inet:[::1]:port)"
# the control socket: a unix socket only (a TCP port would be open to every local user)
_CONTROL_ENDPOINT = re.compile(r"unix:/\S+")
_CONTROL_ENDPOINT_TEXT = ("unix:/absolute/path (a unix socket only: a TCP port would let "
                          "every local user lift lock-outs)")
_OCTAL_MODE = re.compile(r"0?[0-7]{3}")
_USER = re.compile(r"[a-z_][a-z0-9_-]*\$?")
MAX_WORKERS = 64  # more processes than this is a typo, not a machine
# metrics_listen: HOST:PORT for the /metrics and /health endpoints (docs/metrics.md)
_METRICS_LISTEN = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}")
_METRICS_LISTEN_TEXT = "HOST:PORT (IPv6 as [::1]:9464), or empty for no endpoints"


def metrics_listen_field(port: int, daemon: str) -> Any:
    """The ``metrics_listen`` field of ``daemon``'s section (its example ``port``); the
    section's ``__post_init__`` calls ``check_port``."""
    return field(default="", metadata={
        "doc": (f"Address of {daemon}'s /metrics (Prometheus) and /health endpoints, plain "
                "HTTP without authentication: HOST:PORT on loopback or a private interface, "
                f"e.g. 127.0.0.1:{port}, and let only Prometheus reach it (docs/metrics.md). "
                "Empty: no endpoints."),
        "pattern": (_METRICS_LISTEN, _METRICS_LISTEN_TEXT),
        "allow_empty": True,
    })


def check_port(listen: str) -> None:
    if listen and not 0 < int(listen.rpartition(":")[2]) < 65536:
        raise InvalidField("metrics_listen", f"{listen}: the port must be 1 to 65535")


@dataclass(frozen=True, slots=True)
class BruteForceConfig:
    max_failures_per_address: int = field(
        default=10,
        metadata={
            "doc": "Guessing failures (wrong username, malformed or unknown key, wrong secret) "
            "from one client address within `window` before that address is locked out. "
            "Revoked or expired keys are refused without counting.",
            "min": 1,
        },
    )
    max_failures_per_key: int = field(
        default=10,
        metadata={
            "doc": "Wrong secrets presented for one existing key id within `window` before that "
            "key id is locked out, from every address except those where it logged in "
            "successfully within `trusted_for`.",
            "min": 1,
        },
    )
    window: Duration = field(
        default=Duration(600.0),
        metadata={"doc": "How long a failed login counts.", "min": 1},
    )
    lockout: Duration = field(
        default=Duration(900.0),
        metadata={
            "doc": "How long a locked-out address or key id is refused at once, whatever it "
            "presents.",
            "min": 1,
        },
    )
    trusted_for: Duration = field(
        default=Duration(7 * 86400.0),
        metadata={
            "doc": "A locked-out key id still logs in from a client address (IPv6: its /64) "
            "where it logged in successfully within this time, so that a stranger who knows "
            "a key id cannot lock its owner out. 0 locks it out everywhere.",
            "min": 0,
        },
    )
    max_tracked: int = field(
        default=100000,
        metadata={
            "doc": "Most addresses and key ids remembered (each, and the key ids' recent login "
            "addresses, 8 per key id); the least recently failed or used are forgotten first, "
            "so memory stays bounded under attack.",
            "min": 100,
        },
    )


@dataclass(frozen=True, slots=True)
class PolicydConfig:
    auth_listen: str = field(
        default="unix:/var/spool/postfix/private/keyrelay-auth",
        metadata={
            "doc": "SASL auth service (Dovecot protocol), for Postfix's smtpd_sasl_path; "
            + _ENDPOINT_TEXT
            + "; empty: not served.",
            "pattern": (_ENDPOINT, _ENDPOINT_TEXT),
            "allow_empty": True,
        },
    )
    policy_listen: str = field(
        default="unix:/var/spool/postfix/private/keyrelay-policy",
        metadata={
            "doc": "Policy delegation service, for check_policy_service; empty: not served.",
            "pattern": (_ENDPOINT, _ENDPOINT_TEXT),
            "allow_empty": True,
        },
    )
    socketmap_listen: str = field(
        default="unix:/var/spool/postfix/private/keyrelay-socketmap",
        metadata={
            "doc": "Socketmap lookup service (map sender_login, for smtpd_sender_login_maps); "
            "empty: not served.",
            "pattern": (_ENDPOINT, _ENDPOINT_TEXT),
            "allow_empty": True,
        },
    )
    control_listen: str = field(
        default="unix:/run/keyrelay/policyd-control.sock",
        metadata={
            "doc": "Control socket of `keyrelay lockout list|clear`, a unix socket only. "
            "Whoever can connect can lift lock-outs: it belongs to the starting user (root "
            "under systemd), mode 0600, or 0660 with `control_group`. Its folder is made if "
            "missing (under systemd: RuntimeDirectory=keyrelay). Empty: not served.",
            "pattern": (_CONTROL_ENDPOINT, _CONTROL_ENDPOINT_TEXT),
            "allow_empty": True,
        },
    )
    control_group: str = field(
        default="",
        metadata={
            "doc": "Group whose members may also use the control socket (mode 0660), e.g. "
            "the admins who run keyrelay without root; empty: mode 0600.",
            "pattern": (_USER, "a group name"),
            "allow_empty": True,
        },
    )
    socket_mode: str = field(
        default="0660",
        metadata={
            "doc": "Permissions of the unix sockets, in octal.",
            "pattern": (_OCTAL_MODE, "an octal mode such as 0660"),
        },
    )
    socket_group: str = field(
        default="postfix",
        metadata={
            "doc": "Group of the unix sockets (Postfix's smtpd must be able to connect); "
            "empty: the daemon's own group.",
            "pattern": (_USER, "a group name"),
            "allow_empty": True,
        },
    )
    user: str = field(
        default="keyrelay",
        metadata={
            "doc": "User to run as after the sockets are bound, when started as root (create "
            "it with: adduser --system --group keyrelay). root, or empty: stay root, which "
            "logs a warning; nothing in the daemon needs root once its sockets exist.",
            "pattern": (_USER, "a user name"),
            "allow_empty": True,
        },
    )
    submission_ports: tuple[int, ...] = field(
        default=(587, 465, 2525),
        metadata={
            "doc": "Postfix server ports that are submission services: mail there needs SMTP "
            "AUTH (530 5.7.0 otherwise).",
            "min": 1,
            "max": 65535,
        },
    )
    submission_context: str = field(
        default="submission",
        metadata={
            "doc": "A policy_context value (check_policy_service { ..., policy_context=... }) "
            "that marks a submission service whatever its port.",
            "pattern": (NO_SPACE, "a word without whitespace"),
            "allow_empty": True,
        },
    )
    idle_timeout: Duration = field(
        default=Duration(900.0),
        metadata={
            "doc": "A connection with no request for this long is closed (Postfix reconnects "
            "when it needs to).",
            "min": 1,
        },
    )
    request_timeout: Duration = field(
        default=Duration(30.0),
        metadata={
            "doc": "A request begun but not finished within this time closes the connection.",
            "min": 1,
        },
    )
    max_request_size: int = field(
        default=65536,
        metadata={
            "doc": "Largest request in bytes (a policy attribute block, an auth line, a "
            "netstring); a bigger one closes the connection.",
            "min": 1024,
        },
    )
    max_connections: int = field(
        default=4096,
        metadata={
            "doc": "Most open connections per service; further ones are closed at once.",
            "min": 1,
        },
    )
    shutdown_grace: Duration = field(
        default=Duration(10.0),
        metadata={
            "doc": "On SIGTERM, how long requests in progress may take to finish, and then "
            "how long writing the last keys' last-used times may take.",
            "min": 0,
        },
    )
    workers: Workers = field(
        default=AUTO_WORKERS,
        metadata={
            "doc": "Worker processes serving the sockets, each an event loop on its own CPU; "
            "auto: one per CPU the daemon may run on, at most 16. Several need "
            "counters.backend redis, where they share rates, quotas and lock-outs: with "
            "the memory backend, whose counts live in one process, auto means 1 and a number "
            "above 1 is an error (docs/policyd.md, \"Worker processes\"). 1: one process, "
            "no supervisor.",
            "min": 1,
            "max": MAX_WORKERS,
        },
    )
    metrics_listen: str = metrics_listen_field(9464, "keyrelay-policyd")
    bruteforce: BruteForceConfig = field(
        default_factory=BruteForceConfig,
        metadata={"doc": "Brute-force protection of SMTP AUTH."},
    )

    def __post_init__(self) -> None:
        check_port(self.metrics_listen)


# libmilter's endpoint syntax, or Postfix's (as written in smtpd_milters); milters.main converts.
_MILTER_ENDPOINT = re.compile(
    r"unix:/\S+"
    r"|inet6?:[0-9]{1,5}@(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.:-]+)"
    r"|inet:(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}"
)
_MILTER_ENDPOINT_TEXT = (
    "inet:host:port as in smtpd_milters (IPv6 as inet:[::1]:port), libmilter's inet:port@host, "
    "or unix:/absolute/path"
)


@dataclass(frozen=True, slots=True)
class MilterConfig:
    listen: str = field(
        default="unix:/var/spool/postfix/private/keyrelay-milter",
        metadata={
            "doc": "Where keyrelay-milter listens: "
            + _MILTER_ENDPOINT_TEXT
            + ". Postfix names the default socket unix:private/keyrelay-milter in "
            "smtpd_milters. Prefer a unix socket: over TCP, Postfix's unanswered milter "
            "events wait for delayed ACKs (about 40 ms per message).",
            "pattern": (_MILTER_ENDPOINT, _MILTER_ENDPOINT_TEXT),
        },
    )
    check_sender: bool = field(
        default=True,
        metadata={
            "doc": "Refuse (550 5.7.1) authenticated mail whose From: or Sender: is not the "
            "logged-in principal's. false: log what would be refused and let it pass unsigned, "
            "as monitor mode does."
        },
    )
    sign: bool = field(
        default=True,
        metadata={
            "doc": "DKIM-sign authenticated mail from a verified domain of the principal with "
            "the domain's active selectors (rsa-sha256 and ed25519-sha256)."
        },
    )
    socket_mode: str = field(
        default="0660",
        metadata={
            "doc": "Permissions of a unix socket, in octal.",
            "pattern": (_OCTAL_MODE, "an octal mode such as 0660"),
        },
    )
    socket_group: str = field(
        default="postfix",
        metadata={
            "doc": "Group of a unix socket (Postfix's smtpd and cleanup must be able to "
            "connect); empty: the daemon's own group.",
            "pattern": (_USER, "a group name"),
            "allow_empty": True,
        },
    )
    user: str = field(
        default="keyrelay",
        metadata={
            "doc": "User to run as after the socket is bound, when started as root; it must "
            "be able to read the DKIM key files (create it with: adduser --system --group "
            "keyrelay). root, or empty: stay root, which logs a warning.",
            "pattern": (_USER, "a user name"),
            "allow_empty": True,
        },
    )
    shutdown_grace: Duration = field(
        default=Duration(10.0),
        metadata={
            "doc": "On SIGTERM, how long messages in progress may take to finish.",
            "min": 0,
        },
    )
    workers: Workers = field(
        default=AUTO_WORKERS,
        metadata={
            "doc": "Worker processes accepting on the socket, each signing on its own CPU; "
            "auto: one per CPU the daemon may run on, at most 16 (docs/milters.md, \"Worker "
            "processes\"). 1: one process, no supervisor.",
            "min": 1,
            "max": MAX_WORKERS,
        },
    )

    metrics_listen: str = metrics_listen_field(9465, "keyrelay-milter")

    def __post_init__(self) -> None:
        check_port(self.metrics_listen)
        if not (self.check_sender or self.sign):
            raise InvalidField("sign", "check_sender and sign are both false; nothing to do")


_SERVICE = re.compile(r"(?:(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):)?[A-Za-z0-9][A-Za-z0-9_.-]*")
_SERVICE_TEXT = "a master.cf service name: a port number or name, optionally host:port"


@dataclass(frozen=True, slots=True)
class PostfixConfig:
    config_dir: str = field(
        default="/etc/postfix",
        metadata={
            "doc": "The Postfix configuration directory keyrelay serves: `keyrelay postfix "
            "apply` writes there unless --config-dir names another, and keyrelay-policyd reads "
            "its master.cf so that it never routes mail to a pool transport Postfix does not "
            "have (it answers 451 4.3.0 until `keyrelay postfix apply` has run). Empty: "
            "policyd does not check (Postfix on another host).",
            "absolute_path": True,
            "allow_empty": True,
        },
    )
    smtp_service: str = field(
        default="smtp",
        metadata={
            "doc": "The master.cf smtpd service in the port-25 role: STARTTLS offered, AUTH "
            "with an API key allowed after STARTTLS, no relaying without it; " + _SERVICE_TEXT
            + "; empty: keyrelay leaves port 25 alone.",
            "pattern": (_SERVICE, _SERVICE_TEXT),
            "allow_empty": True,
        },
    )
    submission_services: tuple[str, ...] = field(
        default=("submission", "2525"),
        metadata={
            "doc": "master.cf smtpd services where STARTTLS is required before AUTH and MAIL "
            "and every message needs an API key (587 and 2525).",
            "pattern": (_SERVICE, _SERVICE_TEXT),
        },
    )
    submissions_services: tuple[str, ...] = field(
        default=("submissions",),
        metadata={
            "doc": "master.cf smtpd services with implicit TLS (465) where every message needs "
            "an API key.",
            "pattern": (_SERVICE, _SERVICE_TEXT),
        },
    )
    tls_chain_files: str = field(
        default="",
        metadata={
            "doc": "Private key and certificate chain files for smtpd_tls_chain_files in "
            "main.cf (\"/etc/ssl/private/relay.pem\", or \"key.pem, fullchain.pem\"); empty: "
            "keep the certificate Postfix already has.",
            "allow_empty": True,
        },
    )
    policy_timeout: Duration = field(
        default=Duration(10.0),
        metadata={
            "doc": "How long Postfix waits for a policy answer before it answers the client "
            "451 4.3.0 (try again later).",
            "min": 1,
        },
    )
