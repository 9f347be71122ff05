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
raises ``InvalidField``. Every user mistake becomes a ``ConfigError`` naming file, line,
dotted key and reason (``FILE:LINE: KEY.PATH: reason``).

Load once in ``main()`` and pass the ``Config`` down.

- base.py: ``Duration`` and ``InvalidField``, shared by every section;
- sections.py: the directory, DKIM, auth, keys, domains, DNS, limits, routing and logging
  sections, and ``Config``, the whole file;
- counters.py: the counters section (memory or Redis);
- services.py: the keyrelay-policyd, keyrelay-milter and Postfix sections;
- webhooks.py: the webhooks section (docs/webhooks.md);
- loader.py: which file (``resolve_config_path``), reading and validating it;
- example.py: the example file, ``python -m keyrelay.config``.
"""

from .base import Duration, InvalidField
from .counters import CountersConfig, RedisConfig, RedisTlsConfig
from .events import EventsConfig
from .example import render_example
from .loader import CONFIG_ENV, DEFAULT_CONFIG_PATH, load_config, parse_config, resolve_config_path
from .sections import (
    AuthConfig,
    Config,
    DirectoryConfig,
    DkimConfig,
    DnsConfig,
    DomainsConfig,
    KeysConfig,
    LdapConfig,
    LimitsConfig,
    LoggingConfig,
    MetricsConfig,
    RoutingConfig,
    default_config,
)
from .services import BruteForceConfig, MilterConfig, PolicydConfig, PostfixConfig
from .webhooks import WebhooksConfig

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_PATH",
    "AuthConfig",
    "BruteForceConfig",
    "Config",
    "CountersConfig",
    "DirectoryConfig",
    "DkimConfig",
    "DnsConfig",
    "DomainsConfig",
    "Duration",
    "EventsConfig",
    "InvalidField",
    "KeysConfig",
    "LdapConfig",
    "LimitsConfig",
    "LoggingConfig",
    "MetricsConfig",
    "MilterConfig",
    "PolicydConfig",
    "PostfixConfig",
    "RedisConfig",
    "RedisTlsConfig",
    "RoutingConfig",
    "WebhooksConfig",
    "default_config",
    "load_config",
    "parse_config",
    "render_example",
    "resolve_config_path",
]
