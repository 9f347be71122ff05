"""The schema's sections for the directory, DKIM, SMTP AUTH, keys, domains, DNS, limits,
routing and logging, and ``Config``, the whole file (the daemons' and Postfix's sections are in
keyrelay/config/services.py). keyrelay/config/__init__.py says what a field's metadata holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from ..durations import format_duration
from .base import NO_SPACE, Duration, InvalidField
from .counters import CountersConfig
from .events import EventsConfig
from .reputation import ReputationConfig
from .services import MilterConfig, PolicydConfig, PostfixConfig
from .suppressions import SuppressionsConfig
from .webhooks import WebhooksConfig

_SELECTOR = re.compile(r"[a-z][a-z0-9]{0,15}")
_SCOPE = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)+")
_TRANSPORT = re.compile(r"[a-z][a-z0-9-]*")
# RFC 1035 names of at least two labels and 253 characters; labels may hold "_" since SPF
# include targets such as _spf.example.net do, the last label (the TLD) starts with a letter.
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?"
_HOST = r"(?=.{1,253}\Z)(?:" + _LABEL + r"\.)+[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(_HOST, re.IGNORECASE)
# The record suggestion adds "mailto:" itself, so a value starting with it would be doubled.
_MAILBOX = re.compile(r"(?!mailto:)[^@\s]+@" + _HOST, re.IGNORECASE)

_LDAP_URL = re.compile(r"ldaps?://(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::[0-9]{1,5})?/?")
_LDAP_URL_TEXT = "ldap://host[:port] or ldaps://host[:port]"
_IP_ADDRESS = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}|[0-9A-Fa-f:]*:[0-9A-Fa-f:.]*")
# a unix socket's absolute path (no whitespace), or inet:HOST:PORT as Postfix writes it
_SITE_AUTH = re.compile(r"/\S+|inet:(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}")
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
            "pattern": (NO_SPACE, "a non-empty name without whitespace"),
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
    site_auth_socket: str = field(
        default="",
        metadata={
            "doc": "Living beside the site's own Dovecot SASL (docs/coexistence.md): its auth "
            "socket, the absolute path of a unix socket or inet:HOST:PORT. A login whose "
            "username is neither auth.username nor an imported legacy login is passed on to "
            "it, and its answer goes back to Postfix unchanged; keyrelay's checks then apply "
            "only to keyrelay's own logins, and `keyrelay postfix apply` keeps the site's "
            "sender-login map and *_sender_login_mismatch restrictions on the services it "
            "takes over. Empty: off, any other username is refused.",
            "pattern": (_SITE_AUTH, "an absolute path such as /run/dovecot/auth-keyrelay, or "
                        "inet:HOST:PORT such as inet:127.0.0.1:12345"),
            "allow_empty": True,
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
    # the maxima are keyrelay.limits.LIMIT_MAXIMA, the bounds of `keyrelay limits set`
    # (tests/test_config.py keeps them equal)
    messages_per_minute: int = field(
        default=600,
        metadata={"doc": "Rate limit of an account (all its subusers together) per sliding "
                  "minute, counted in recipients: a message to N recipients counts N (1 to "
                  "1000000; not above messages_per_hour).", "min": 1, "max": 1_000_000},
    )
    messages_per_hour: int = field(
        default=20000,
        metadata={"doc": "Rate limit of an account per sliding hour, counted in recipients "
                  "(1 to 60000000).",
                  "min": 1, "max": 60_000_000},
    )
    recipients_per_message: int = field(
        default=100,
        metadata={"doc": "Recipients allowed in one message (1 to 100000).", "min": 1,
                  "max": 100_000},
    )
    messages_per_day: int | None = field(
        default=None,
        metadata={"doc": "Daily quota of an account (all its subusers together), counted in "
                  "recipients from midnight in counters.time_zone (1 to 1440000000; not "
                  "below messages_per_hour when both are set); null: no daily quota.",
                  "min": 1, "max": 1_440_000_000},
    )
    messages_per_month: int | None = field(
        default=None,
        metadata={"doc": "Monthly quota of an account, counted in recipients from the first "
                  "of the month (1 to 44640000000; not below messages_per_day); null: no "
                  "monthly quota.", "min": 1, "max": 44_640_000_000},
    )

    def __post_init__(self) -> None:
        if self.messages_per_minute > self.messages_per_hour:
            raise InvalidField(
                "messages_per_minute",
                f"{self.messages_per_minute} per minute is above messages_per_hour "
                f"({self.messages_per_hour}): the per-minute limit must not be above the "
                "per-hour limit")
        day, month = self.messages_per_day, self.messages_per_month
        if day is not None and self.messages_per_hour > day:
            raise InvalidField(
                "messages_per_day",
                f"{day} per day is below messages_per_hour ({self.messages_per_hour}): the "
                "daily quota must not be below the per-hour limit")
        if day is not None and month is not None and day > month:
            raise InvalidField(
                "messages_per_month",
                f"{month} per month is below messages_per_day ({day}): the monthly quota "
                "must not be below the daily quota")


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


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    top_accounts: int = field(
        default=100,
        metadata={
            "doc": "Accounts with their own series in keyrelay_messages_total (the milter's "
            "/metrics): the ones sending most, re-chosen every hour; the rest count as "
            "account=\"other\", so ten thousand tenants do not make ten thousand series. "
            "0: every account is \"other\" (docs/metrics.md, \"Labels and cardinality\").",
            "min": 0,
            "max": 10000,
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
        metadata={"doc": "Default limits and quotas of an account that sets none of its own "
                  "(each caps the account and its subusers together; docs/policyd.md, "
                  "\"What is counted\"); recipients_per_message also of a subuser whose "
                  "account sets none."},
    )
    routing: RoutingConfig = field(
        default_factory=RoutingConfig, metadata={"doc": "Outbound IP pools."}
    )
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata={"doc": "Logging."})
    counters: CountersConfig = field(
        default_factory=CountersConfig,
        metadata={"doc": "Where limits, quotas, failed logins and lock-outs are counted "
                  "(docs/cluster.md)."},
    )
    suppressions: SuppressionsConfig = field(
        default_factory=SuppressionsConfig,
        metadata={"doc": "Recipients an account may no longer mail (docs/suppressions.md)."},
    )
    reputation: ReputationConfig = field(
        default_factory=ReputationConfig,
        metadata={"doc": "The reputation guard: a principal whose bounce rate runs away is "
                  "paused (docs/reputation.md)."},
    )
    policyd: PolicydConfig = field(
        default_factory=PolicydConfig,
        metadata={"doc": "keyrelay-policyd: SASL auth, policy and socketmap services."},
    )
    milter: MilterConfig = field(
        default_factory=MilterConfig,
        metadata={"doc": "keyrelay-milter: header From/Sender check and DKIM signing."},
    )
    metrics: MetricsConfig = field(
        default_factory=MetricsConfig,
        metadata={"doc": "Prometheus metrics (policyd.metrics_listen, "
                  "milter.metrics_listen and events.metrics_listen turn the endpoints on)."},
    )
    postfix: PostfixConfig = field(
        default_factory=PostfixConfig,
        metadata={"doc": "What `keyrelay postfix apply` writes into Postfix's main.cf and "
                  "master.cf."},
    )
    events: EventsConfig = field(
        default_factory=EventsConfig,
        metadata={"doc": "keyrelay-events: delivery events from Postfix's log "
                  "(docs/events.md)."},
    )
    webhooks: WebhooksConfig = field(
        default_factory=WebhooksConfig,
        metadata={"doc": "Accounts' webhooks: where delivery events are POSTed, signed "
                  "(docs/webhooks.md)."},
    )

    def __post_init__(self) -> None:
        if self.counters.backend == "memory" and self.policyd.workers > 1:
            raise InvalidField(
                "policyd.workers",
                f"{self.policyd.workers} workers with counters.backend memory would each "
                "count on their own, multiplying every rate limit, quota and lock-out "
                f"threshold by {self.policyd.workers}: use counters.backend redis to run "
                "several workers, or set policyd.workers to auto or 1")


def default_config() -> Config:
    """The configuration an empty file gives."""
    return Config()
