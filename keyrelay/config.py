"""The typed configuration of keyrelay: ``/etc/keyrelay/keyrelay.yaml``.

One schema of frozen dataclasses is the single source of truth: the loader walks it to
validate a file and ``render_example()`` walks it to write the documented example file, so a
new key or section is a new dataclass field and nothing else. Each field's ``metadata`` holds:

- ``doc``: the text shown above the key in the example file (required);
- ``min`` / ``max``: bounds for int, float and Duration values;
- ``pattern``: ``(compiled regex, description)`` that a string, or each list item, must match;
- ``absolute_path``: the string must be an absolute path;
- ``allow_empty``: ``""`` means "not set" and skips ``pattern`` and ``absolute_path``.

A rule spanning several fields of a section lives in that section's ``__post_init__`` and
raises ``InvalidField``. Every user mistake becomes a ``ConfigError`` naming file, dotted key
and reason; a ``TypeError`` from here means the schema itself uses an unsupported type.

Load once in ``main()`` and pass the ``Config`` down (STYLE.md, "Configuration").
"""

from __future__ import annotations

import difflib
import json
import os
import re
import textwrap
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    Literal,
    NewType,
    TypeVar,
    Union,
    cast,
    get_args,
    get_origin,
    get_type_hints,
)

import yaml

from keyrelay.durations import format_duration, parse_duration
from keyrelay.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

try:  # libyaml's loader is much faster; PyYAML builds without it still work
    from yaml import CSafeLoader as _SafeLoader
except ImportError:  # pragma: no cover - depends on how PyYAML was built
    from yaml import SafeLoader as _SafeLoader  # type: ignore[assignment]

DEFAULT_CONFIG_PATH = "/etc/keyrelay/keyrelay.yaml"
CONFIG_ENV = "KEYRELAY_CONFIG"

Duration = NewType("Duration", float)
"""Seconds. In YAML a number of seconds or a string such as ``72h`` (keyrelay.durations)."""

_SELECTOR = re.compile(r"[a-z][a-z0-9]{0,15}")
_SCOPE = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)+")
_TRANSPORT = re.compile(r"[a-z][a-z0-9-]*")
_NO_SPACE = re.compile(r"\S+")
# RFC 1035 names of at least two labels and 253 characters; labels may hold "_" since SPF
# include targets such as _spf.example.net do, the last label (the TLD) starts with a letter.
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?"
_HOST = r"(?=.{1,253}\Z)(?:" + _LABEL + r"\.)+[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(_HOST, re.IGNORECASE)
# The record suggestion adds "mailto:" itself, so a value starting with it would be doubled.
_MAILBOX = re.compile(r"(?!mailto:)[^@\s]+@" + _HOST, re.IGNORECASE)


class InvalidField(ValueError):
    """A section's cross-field rule failed; ``key`` is the field the admin should change."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


_LDAP_URL = re.compile(r"ldaps?://(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::[0-9]{1,5})?/?")
_LDAP_URL_TEXT = "ldap://host[:port] or ldaps://host[:port]"
_IP_ADDRESS = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}|[0-9A-Fa-f:]*:[0-9A-Fa-f:.]*")
_DN = re.compile(r"[A-Za-z][A-Za-z0-9-]*=[^,]+(?:,[A-Za-z][A-Za-z0-9-]*=[^,]+)*")


@dataclass(frozen=True, slots=True)
class LdapConfig:
    urls: tuple[str, ...] = field(
        default=("ldap://127.0.0.1",),
        metadata={
            "doc": "LDAP servers, tried in order (a local replica first, then the provider).",
            "pattern": (_LDAP_URL, _LDAP_URL_TEXT),
        },
    )
    start_tls: bool = field(
        default=True,
        metadata={"doc": "StartTLS on ldap:// URLs before binding (ldaps:// is TLS already). "
                  "The server certificate is always verified."},
    )
    ca_file: str = field(
        default="",
        metadata={
            "doc": "CA certificates that sign the LDAP servers' certificates; empty: the "
            "system's CA store.",
            "absolute_path": True,
            "allow_empty": True,
        },
    )
    base_dn: str = field(
        default="ou=keyrelay,dc=example,dc=net",
        metadata={"doc": "Entry under which keyrelay keeps its records (docs/ldap.md).",
                  "pattern": (_DN, "a DN such as ou=keyrelay,dc=example,dc=net")},
    )
    bind_dn: str = field(
        default="cn=keyrelay,ou=services,dc=example,dc=net",
        metadata={"doc": "Service DN keyrelay binds as; empty: anonymous (reads only).",
                  "pattern": (_DN, "a DN such as cn=keyrelay,ou=services,dc=example,dc=net"),
                  "allow_empty": True},
    )
    bind_password_file: str = field(
        default="/etc/keyrelay/ldap.secret",
        metadata={"doc": "File holding the bind DN's password (one line; mode 0640, readable "
                  "by the daemons' user). The password is never in this file.",
                  "absolute_path": True},
    )
    timeout: Duration = field(
        default=Duration(5.0),
        metadata={"doc": "Connect and response timeout of every LDAP operation.", "min": 0.1},
    )
    refresh_interval: Duration = field(
        default=Duration(2.0),
        metadata={"doc": "How often the daemons ask LDAP whether the directory changed; a "
                  "change (a revoked key) takes effect within this plus one reload. While "
                  "LDAP is unreachable for longer than this plus timeout (plus stale_grace), "
                  "every answer is temporary.", "min": 0.1},
    )
    full_reload_interval: Duration = field(
        default=Duration(300.0),
        metadata={"doc": "Reload everything at least this often, to pick up changes made "
                  "without the keyrelay CLI (which raises krSerial).", "min": 1},
    )
    stale_grace: Duration = field(
        default=Duration(0.0),
        metadata={"doc": "How long the daemons may go on answering from their last copy when "
                  "LDAP is unreachable; 0: answer temporarily (4xx) at once. A revoked key "
                  "may work this much longer.", "min": 0},
    )
    read_through_per_second: int = field(
        default=20,
        metadata={"doc": "Key ids not in a daemon's copy that may be read from LDAP per "
                  "second (read-through: a key created a moment ago works at its first "
                  "login). Past this budget such a login is answered temporarily (454), "
                  "never refused; guessed key ids cannot flood LDAP.", "min": 1},
    )
    negative_cache: Duration = field(
        default=Duration(10.0),
        metadata={"doc": "How long a key id that LDAP said does not exist is refused from "
                  "memory without asking again. Key ids are random: only a guess can ask "
                  "for one before it is created.", "min": 0},
    )


@dataclass(frozen=True, slots=True)
class DirectoryConfig:
    backend: Literal["yaml", "ldap"] = field(
        default="yaml",
        metadata={"doc": 'Where accounts, keys and domains live: "yaml" (the embedded file) '
                  'or "ldap" (directory.ldap; docs/ldap.md).'},
    )
    path: str = field(
        default="/etc/keyrelay/directory.yaml",
        metadata={"doc": "The YAML directory file.", "absolute_path": True},
    )
    ldap: LdapConfig = field(
        default_factory=LdapConfig,
        metadata={"doc": "The LDAP directory (backend: ldap)."},
    )

    @property
    def location(self) -> str:
        """Where the directory is, for messages: the file, or the LDAP servers and base."""
        if self.backend == "ldap":
            return f"{' '.join(self.ldap.urls)} (base {self.ldap.base_dn})"
        return self.path


@dataclass(frozen=True, slots=True)
class DkimConfig:
    key_dir: str = field(
        default="/etc/keyrelay/dkim",
        metadata={
            "doc": "Private DKIM keys, one folder per domain; key files are mode 0600 and "
            "readable only by the daemon user.",
            "absolute_path": True,
        },
    )
    selector_prefix: str = field(
        default="kr",
        metadata={
            "doc": "Start of every generated DKIM selector name: a lowercase letter, then up "
            "to 15 lowercase letters or digits.",
            "pattern": (_SELECTOR, "a lowercase letter followed by up to 15 letters or digits"),
        },
    )
    retiring_overlap: Duration = field(
        default=Duration(7 * 86400.0),
        metadata={
            "doc": "After rotation, how long a replaced selector stays published before "
            "keyrelay domain retire-selector may remove it (mail signed with it may still be "
            "verified: queued, forwarded, re-checked by receivers).",
        },
    )


@dataclass(frozen=True, slots=True)
class AuthConfig:
    username: str = field(
        default="apikey",
        metadata={
            "doc": "The only SMTP AUTH username accepted; the password is the API key. Any "
            "other username is refused.",
            "pattern": (_NO_SPACE, "a non-empty name without whitespace"),
        },
    )
    require_tls: bool = field(
        default=True,
        metadata={
            "doc": "Refuse a login that Postfix reports as not under TLS: an API key must never "
            "cross the network in clear. Postfix's smtpd_tls_auth_only should already prevent "
            "it; this is the second lock."
        },
    )


@dataclass(frozen=True, slots=True)
class KeysConfig:
    default_scopes: tuple[str, ...] = field(
        default=("mail.send",),
        metadata={
            "doc": "Scopes given to `keyrelay key create` without --scope.",
            "pattern": (_SCOPE, "a dotted lowercase scope such as mail.send"),
        },
    )
    # A zero lifetime would create keys that are already expired; "never" is null.
    default_expiry: Duration | None = field(
        default=None,
        metadata={
            "doc": "Lifetime of new keys when `keyrelay key create` has no --expires; "
            "null: keys never expire.",
            "min": 1,
        },
    )
    max_expiry: Duration | None = field(
        default=None,
        metadata={
            "doc": "Longest lifetime allowed for a new key; null: no limit. default_expiry "
            "must not be longer.",
            "min": 1,
        },
    )
    last_used_flush_interval: Duration = field(
        default=Duration(300.0),
        metadata={
            "doc": "How often the daemons write keys' last-used times to the directory "
            "(at least 1s).",
            "min": 1,
        },
    )

    def __post_init__(self) -> None:
        if (
            self.default_expiry is not None
            and self.max_expiry is not None
            and self.default_expiry > self.max_expiry
        ):
            raise InvalidField(
                "default_expiry",
                f"must not be longer than max_expiry ({format_duration(self.max_expiry)}), "
                f"got {format_duration(self.default_expiry)}",
            )


@dataclass(frozen=True, slots=True)
class DomainsConfig:
    failing_grace: Duration = field(
        default=Duration(72 * 3600.0),
        metadata={
            "doc": "How long a verified domain whose DNS records broke may keep sending "
            "before it is refused."
        },
    )
    fail_after: int = field(
        default=3,
        metadata={
            "doc": "DNS checks (keyrelay domain check) that must fail in a row before a "
            "verified domain becomes failing; a check that could not be made (DNS timeout, "
            "SERVFAIL) never counts.",
            "min": 1,
        },
    )


@dataclass(frozen=True, slots=True)
class DnsConfig:
    spf_include: str = field(
        default="",
        metadata={
            "doc": 'Domain to suggest as "include:" in SPF records, e.g. _spf.example.net; '
            "empty: suggest the addresses of the principal's IP pool.",
            "pattern": (_HOSTNAME, "a domain name such as _spf.example.net"),
            "allow_empty": True,
        },
    )
    dmarc_rua: str = field(
        default="",
        metadata={
            "doc": "Mailbox for DMARC aggregate reports in the suggested DMARC record "
            '(without "mailto:"); empty: suggest a record without rua.',
            "pattern": (_MAILBOX, "a mailbox such as dmarc@example.com (without mailto:)"),
            "allow_empty": True,
        },
    )
    nameservers: tuple[str, ...] = field(
        default=(),
        metadata={
            "doc": "Resolvers that keyrelay domain verify/check ask (IP addresses); empty: "
            "those of /etc/resolv.conf. Use a validating resolver that sees the public DNS.",
            "pattern": (_IP_ADDRESS, "an IPv4 or IPv6 address such as 127.0.0.1"),
        },
    )
    port: int = field(
        default=53,
        metadata={"doc": "Port of the nameservers.", "min": 1, "max": 65535},
    )
    timeout: Duration = field(
        default=Duration(5.0),
        metadata={"doc": "How long one DNS check may wait for answers before it counts as "
                  "could-not-check.", "min": 1},
    )


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    messages_per_minute: int = field(
        default=600,
        metadata={"doc": "Messages a principal may send per minute (at least 1).", "min": 1},
    )
    messages_per_hour: int = field(
        default=20000,
        metadata={"doc": "Messages a principal may send per hour (at least 1).", "min": 1},
    )
    recipients_per_message: int = field(
        default=100,
        metadata={"doc": "Recipients allowed in one message (at least 1).", "min": 1},
    )


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    default_pool: str = field(
        default="",
        metadata={
            "doc": "IP pool for principals that have none; empty: Postfix's default transport."
        },
    )
    transport_prefix: str = field(
        default="kr-pool-",
        metadata={
            "doc": "The Postfix transport (master.cf service) of a pool is this prefix plus "
            "the pool name.",
            "pattern": (_TRANSPORT, "a lowercase letter followed by letters, digits or -"),
        },
    )


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = field(
        default="info", metadata={"doc": "Least severe messages logged."}
    )
    format: Literal["text", "json"] = field(
        default="text", metadata={"doc": "Log line format: plain text, or one JSON object."}
    )
    audit_log: str = field(
        default="/var/log/keyrelay/audit.log",
        metadata={
            "doc": "One line per change made with the keyrelay CLI; empty: no audit log.",
            "absolute_path": True,
            "allow_empty": True,
        },
    )


# Postfix's own endpoint syntax: unix:/absolute/path, or inet:host:port (IPv6 in brackets).
_ENDPOINT = re.compile(r"unix:/\S+|inet:(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}")
_ENDPOINT_TEXT = "unix:/absolute/path or inet:host:port (IPv6 as inet:[::1]:port)"
_OCTAL_MODE = re.compile(r"0?[0-7]{3}")
_USER = re.compile(r"[a-z_][a-z0-9_-]*\$?")


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
            "key id is locked out from every address (its owner too: rotate the key if this "
            "happens).",
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
    max_tracked: int = field(
        default=100000,
        metadata={
            "doc": "Most addresses and key ids remembered (each); the least recently failed "
            "are forgotten first, so memory stays bounded under attack.",
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
        default="",
        metadata={
            "doc": "User to run as after the sockets are bound, when started as root; empty: "
            "keep running as the starting user.",
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
            "pattern": (_NO_SPACE, "a word without whitespace"),
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
    bruteforce: BruteForceConfig = field(
        default_factory=BruteForceConfig,
        metadata={"doc": "Brute-force protection of SMTP AUTH."},
    )


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
        default="",
        metadata={
            "doc": "User to run as after the socket is bound, when started as root; it must "
            "be able to read the DKIM key files. Empty: keep running as the starting user.",
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

    def __post_init__(self) -> None:
        if not (self.check_sender or self.sign):
            raise InvalidField("sign", "check_sender and sign are both false; nothing to do")


_SERVICE = re.compile(r"(?:(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):)?[A-Za-z0-9][A-Za-z0-9_.-]*")
_SERVICE_TEXT = "a master.cf service name: a port number or name, optionally host:port"


@dataclass(frozen=True, slots=True)
class PostfixConfig:
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


@dataclass(frozen=True, slots=True)
class Config:
    directory: DirectoryConfig = field(
        default_factory=DirectoryConfig,
        metadata={"doc": "The account directory: accounts, subusers, keys, domains, pools."},
    )
    dkim: DkimConfig = field(default_factory=DkimConfig, metadata={"doc": "DKIM signing keys."})
    auth: AuthConfig = field(default_factory=AuthConfig, metadata={"doc": "SMTP AUTH."})
    keys: KeysConfig = field(default_factory=KeysConfig, metadata={"doc": "API keys."})
    domains: DomainsConfig = field(
        default_factory=DomainsConfig, metadata={"doc": "Sending domains."}
    )
    dns: DnsConfig = field(
        default_factory=DnsConfig,
        metadata={"doc": "DNS records that `keyrelay domain add` suggests."},
    )
    monitor_mode: bool = field(
        default=False,
        metadata={
            "doc": "Monitor mode for all accounts: log what would have been refused and let "
            "the mail pass. For migrating gradually; accounts can also enable it one by one."
        },
    )
    limits: LimitsConfig = field(
        default_factory=LimitsConfig,
        metadata={"doc": "Default limits for principals that have no limits of their own."},
    )
    routing: RoutingConfig = field(
        default_factory=RoutingConfig, metadata={"doc": "Outbound IP pools."}
    )
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata={"doc": "Logging."})
    policyd: PolicydConfig = field(
        default_factory=PolicydConfig,
        metadata={"doc": "keyrelay-policyd: SASL auth, policy and socketmap services."},
    )
    milter: MilterConfig = field(
        default_factory=MilterConfig,
        metadata={"doc": "keyrelay-milter: header From/Sender check and DKIM signing."},
    )
    postfix: PostfixConfig = field(
        default_factory=PostfixConfig,
        metadata={"doc": "What `keyrelay postfix apply` writes into Postfix's main.cf and "
                  "master.cf."},
    )


def default_config() -> Config:
    """The configuration an empty file gives."""
    return Config()


def resolve_config_path(cli_value: str | None) -> str:
    """The config file to read: ``--config``, else ``$KEYRELAY_CONFIG``, else the default.

    An empty value counts as not given, so ``KEYRELAY_CONFIG=`` cannot select the file "".
    """
    return cli_value or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH


def load_config(path: str) -> Config:
    """Read, parse and validate the YAML file at ``path``; raise ConfigError on any fault."""
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read the file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "", f"not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        data = _load_yaml(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(path, "", f"invalid YAML{where}: {exc.problem or exc}") from None
    except (yaml.YAMLError, ValueError) as exc:
        # PyYAML's constructors raise ValueError for e.g. an impossible date 2026-13-45
        raise ConfigError(path, "", f"invalid YAML: {exc}") from None
    return parse_config(data, path)


def _load_yaml(text: str) -> object:
    """``yaml.load`` with the safe loader, refusing a key given twice in one mapping: PyYAML
    keeps the last one silently, so a second ``logging:`` section would drop every setting
    of the first (an audit log written to the default path instead of the one configured)."""
    loader = _SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:  # an empty file
            return None
        _refuse_duplicate_keys(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _refuse_duplicate_keys(root: Any) -> None:
    """Raise a ConstructorError (a MarkedYAMLError: line and column) at the second of two
    equal keys of a mapping node anywhere under ``root``."""
    merge = "tag:yaml.org,2002:merge"  # "<<: *anchor" keys may repeat what they merge
    stack, visited = [root], set()
    while stack:
        node = stack.pop()
        if id(node) in visited:  # an alias repeats a node; anchors can even form a cycle
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], Any] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != merge:
                    earlier = first.setdefault((key.tag, key.value), key)
                    if earlier is not key:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"the key {key.value!r} is given twice (first at line "
                            f"{earlier.start_mark.line + 1}); keep one", key.start_mark)
                stack += [key, value]
        elif isinstance(node, yaml.SequenceNode):
            stack += node.value


def parse_config(data: object, path: str) -> Config:
    """Validate already-loaded YAML ``data``; ``path`` is only used in error messages."""
    if data is None:  # an empty file
        return default_config()
    if not isinstance(data, dict):
        raise ConfigError(path, "", f"the top level must be a mapping of keys, got {_got(data)}")
    return _section(Config, data, path, "")


_D = TypeVar("_D", bound="DataclassInstance")


def _section(cls: type[_D], data: object, path: str, prefix: str) -> _D:
    """Build dataclass ``cls`` from mapping ``data``, whose dotted key is ``prefix``."""
    if data is None:  # "section:" with every key commented out loads as null
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, prefix, f"expected a mapping of keys, got {_got(data)}")
    schema = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in schema:
            close = difflib.get_close_matches(str(key), schema, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            reason = f"unknown key; {hint}allowed here: {', '.join(schema)}"
            raise ConfigError(path, _join(prefix, str(key)), reason)
    hints = get_type_hints(cls)
    values = {
        name: _value(hints[name], data[name], schema[name].metadata, path, _join(prefix, name))
        for name in schema
        if name in data
    }
    try:
        return cast(Any, cls)(**values)  # type: ignore[no-any-return]
    except InvalidField as exc:
        raise ConfigError(path, _join(prefix, exc.key), exc.reason) from None


def _value(tp: Any, value: object, meta: Mapping[str, Any], path: str, key: str) -> object:
    """Check ``value`` against type ``tp`` and the rules in ``meta``; return the typed value."""
    declared = tp  # kept for messages: "a duration or null", not just "a duration"

    def wrong_type() -> ConfigError:
        return ConfigError(path, key, f"expected {_describe(declared)}, got {_got(value)}")

    if get_origin(tp) in (Union, types.UnionType):
        if value is None:
            return None
        tp = _without_none(tp)
    result: object
    if is_dataclass(tp):
        return _section(cast(Any, tp), value, path, key)
    if tp is Duration:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise wrong_type()
        try:
            result = parse_duration(value)
        except ValueError as exc:
            raise ConfigError(path, key, str(exc)) from None
    elif get_origin(tp) is Literal:
        if not any(type(value) is type(c) and value == c for c in get_args(tp)):
            raise ConfigError(path, key, f"must be {_describe(tp)}, got {_got(value)}")
        result = value
    elif get_origin(tp) is tuple:
        if not isinstance(value, list | tuple):
            raise wrong_type()
        item_tp = get_args(tp)[0]
        return tuple(_value(item_tp, v, meta, path, f"{key}[{i}]") for i, v in enumerate(value))
    elif tp is bool or tp is str:
        if not isinstance(value, tp):
            raise wrong_type()
        result = value
    elif tp is int or tp is float:
        accepted = (int, float) if tp is float else (int,)
        # bool is an int subclass in Python, but `true` is not a count.
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise wrong_type()
        result = tp(value)
    else:
        raise TypeError(f"{key}: unsupported type in the config schema: {tp!r}")
    _check(result, meta, path, key, format_duration if tp is Duration else str)
    return result


def _check(value: object, meta: Mapping[str, Any], path: str, key: str, show: Any) -> None:
    """Apply the ``min``/``max``/``pattern``/``absolute_path`` rules of a field."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "min" in meta and value < meta["min"]:
            raise ConfigError(path, key, f"must be at least {show(meta['min'])}, got {show(value)}")
        if "max" in meta and value > meta["max"]:
            raise ConfigError(path, key, f"must be at most {show(meta['max'])}, got {show(value)}")
    if not isinstance(value, str) or (value == "" and meta.get("allow_empty")):
        return
    if "pattern" in meta:
        regex, description = meta["pattern"]
        if not regex.fullmatch(value):
            raise ConfigError(path, key, f"must be {description}, got {value!r}")
    if meta.get("absolute_path") and not os.path.isabs(value):
        raise ConfigError(path, key, f"must be an absolute path, got {value!r}")


def _without_none(tp: Any) -> Any:
    """``X`` for ``X | None``; only optional single types are supported, so no real unions."""
    (inner,) = (arg for arg in get_args(tp) if arg is not type(None))
    return inner


def _describe(tp: Any) -> str:
    """What a value of schema type ``tp`` looks like, for "expected ..." messages."""
    if get_origin(tp) in (Union, types.UnionType):
        return f"{_describe(_without_none(tp))} or null"
    if tp is Duration:
        return "a duration (seconds, or a string such as 72h)"
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(choice) for choice in get_args(tp))
    if get_origin(tp) is tuple:
        return f"a list (each item {_describe(get_args(tp)[0])})"
    if is_dataclass(tp):
        return "a mapping of keys"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, repr(tp))


def _got(value: object) -> str:
    """What the admin wrote, for "got ..." messages; YAML words, not Python type names."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__} ({value!r})"  # e.g. an unquoted date in YAML


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


_HEADER = """\
# keyrelay configuration. keyrelay programs read /etc/keyrelay/keyrelay.yaml, or the file
# named by their --config option or else by the KEYRELAY_CONFIG environment variable.
#
# Every key is shown with its default value and what it does; keep only what you change.
# A missing key, section or an empty file means the defaults. Unknown keys and wrong types are
# errors: run any keyrelay daemon with --check-config after editing, before restarting it.
# Durations are a number of seconds or a string such as 30s, 5m, 72h, 90d, 2w or 1h30m.
#
# Generated from the schema in keyrelay/config.py by `python -m keyrelay.config`; to change
# a key or its documentation, change the schema and regenerate this file.
"""


def render_example() -> str:
    """The annotated example file: every key, its default and its documentation."""
    lines = _HEADER.splitlines()
    _render(Config, default_config(), 0, lines)
    return "\n".join(lines) + "\n"


def _render(cls: type[DataclassInstance], values: object, depth: int, lines: list[str]) -> None:
    indent = "  " * depth
    hints = get_type_hints(cls)
    for i, f in enumerate(fields(cls)):
        if i or depth == 0:
            lines.append("")
        doc = f.metadata["doc"]
        tp = hints[f.name]
        if get_origin(tp) is Literal:
            doc += " One of: " + ", ".join(str(choice) for choice in get_args(tp)) + "."
        prefix = indent + "# "
        lines.extend(textwrap.wrap(doc, 96, initial_indent=prefix, subsequent_indent=prefix))
        value = getattr(values, f.name)
        if isinstance(tp, type) and is_dataclass(tp):
            lines.append(f"{indent}{f.name}:")
            _render(tp, value, depth + 1, lines)
        else:
            lines.append(f"{indent}{f.name}: {_yaml_scalar(value, tp)}")


def _yaml_scalar(value: object, tp: Any) -> str:
    """``value`` as YAML text that loads back to the same value of type ``tp``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if get_origin(tp) in (Union, types.UnionType):
        tp = _without_none(tp)
    if tp is Duration:
        return format_duration(cast(float, value))  # always has a unit, so YAML keeps a string
    if isinstance(value, tuple):
        return "[" + ", ".join(_yaml_scalar(item, str) for item in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid YAML double-quoted scalar
    return repr(value)


if __name__ == "__main__":
    print(render_example(), end="")
