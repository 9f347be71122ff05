"""The schema's ``webhooks:`` section: how delivery events reach an account's webhook
(docs/webhooks.md). keyrelay/config/__init__.py says what a field's metadata holds."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import Duration, InvalidField


@dataclass(frozen=True, slots=True)
class WebhooksConfig:
    allow_private_targets: bool = field(
        default=False,
        metadata={"doc": "Let a webhook URL point at a loopback, private (RFC 1918, ULA), "
                  "link-local, shared (100.64.0.0/10) or other non-public address. Off, such "
                  "a URL is refused when it is set and every time it is delivered to (its "
                  "name resolved again each time), since tenants may choose the URL: this "
                  "guards the relay's own network against requests forged through it (SSRF). "
                  "Multicast and unspecified addresses are refused always."},
    )
    ca_file: str = field(
        default="",
        metadata={"doc": "CA certificates that sign the webhook receivers' certificates, for "
                  "receivers behind a private CA; empty: the system's CA store. An https "
                  "receiver's certificate and name are always verified.",
                  "absolute_path": True, "allow_empty": True},
    )
    timeout: Duration = field(
        default=Duration(10.0),
        metadata={"doc": "How long one delivery may take, from the connection to the "
                  "receiver's answer; past it, the delivery is retried.", "min": 0.1},
    )
    retry_for: Duration = field(
        default=Duration(24 * 3600.0),
        metadata={"doc": "How long a delivery that failed for a passing reason (a network "
                  "error, a timeout, HTTP 5xx, 408 or 429) is retried, from its first "
                  "failure; after that its events are given up, counted and logged.",
                  "min": 1},
    )
    retry_initial: Duration = field(
        default=Duration(10.0),
        metadata={"doc": "Pause before the first retry; each further one doubles it (with "
                  "jitter), up to retry_max.", "min": 0.1},
    )
    retry_max: Duration = field(
        default=Duration(3600.0),
        metadata={"doc": "Longest pause between two retries.", "min": 0.1},
    )
    batch_size: int = field(
        default=100,
        metadata={"doc": "Most events in one delivery (one JSON array).", "min": 1,
                  "max": 10000},
    )
    batch_interval: Duration = field(
        default=Duration(5.0),
        metadata={"doc": "How long an event may wait for others to fill its batch before "
                  "the batch is sent anyway.", "min": 0},
    )

    def __post_init__(self) -> None:
        if self.retry_initial > self.retry_max:
            raise InvalidField("retry_initial", "must not be longer than retry_max")
