"""What keyrelay-milter does with one message, apart from the milter protocol.

The milter glue (``milters.milter``) hands over the session's login, the headers and the body
as they arrive, and renders the ``MessageOutcome`` it gets back; everything between is here: asking
the decision engine for the header verdict (From/Sender identity and the DKIM plan,
keyrelay/decisions/message.py), signing, turning our own faults into the engine's temporary
answers, and the one log line per message.

Memory per message is bounded: the body is only streamed through the body hash, and only the
headers that are signed or checked are kept.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from keyrelay.config import Config
from keyrelay.decisions import (
    LEGACY_KEY_ID,
    Action,
    EngineSettings,
    HeaderFacts,
    Reason,
    Verdict,
    decide_headers,
    parse_identity,
    temporary,
)
from keyrelay.directory import Directory, DirectoryBackend
from keyrelay.errors import DirectoryUnavailable
from keyrelay.logs import DecisionLog
from keyrelay.metrics import NO_METRICS, Metrics

from . import dkimsign
from .dkimsign import KeyStore, KeyUnavailable, RelaxedBodyHash

log = logging.getLogger("keyrelay.milter")

_CHECKED = frozenset({"from", "sender"})


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class MessageOutcome:
    """The answer for one message: a verdict and the DKIM-Signature values to add on top."""

    verdict: Verdict
    signatures: tuple[bytes, ...] = ()
    selectors: tuple[str, ...] = ()  # the selectors of ``signatures``, for the log
    algorithms: tuple[str, ...] = ()  # and their algorithms, for the metrics

    @property
    def outcome(self) -> str:
        """keyrelay_messages_total's outcome label (docs/metrics.md)."""
        verdict = self.verdict
        if verdict.action is Action.ALLOW:
            return "monitor_allowed" if verdict.monitored is not None else "signed"
        return "refused" if verdict.action is Action.REFUSE else "tempfail"


class Message:
    """One message as it streams in: login, kept headers and the running body hash."""

    __slots__ = ("body_hash", "client_address", "fault", "headers", "identity")

    def __init__(self, identity: str, client_address: str, hash_body: bool) -> None:
        self.identity = identity  # Postfix's {auth_authen}; "" without SMTP AUTH
        self.client_address = client_address
        self.headers: list[tuple[str, bytes]] = []
        self.body_hash = RelaxedBodyHash() if hash_body else None
        self.fault: BaseException | None = None  # set by the glue when a callback failed

    def header(self, name: str, value: bytes, keep: frozenset[str]) -> None:
        if name.lower() in keep:
            self.headers.append((name, value))

    def body(self, chunk: bytes) -> None:
        if self.body_hash is not None:
            self.body_hash.update(chunk)


class MilterService:
    """Shared by every milter connection: configuration, directory, keys and the log."""

    def __init__(
        self,
        config: Config,
        directory: DirectoryBackend,
        decisions: DecisionLog,
        keys: KeyStore | None = None,
        clock: Callable[[], datetime] = utcnow,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.settings = EngineSettings.from_config(config)
        self.directory = directory
        self.decisions = decisions
        self.keys = keys if keys is not None else KeyStore()
        self.clock = clock
        # milter.sign is an engine setting (it plans no signature); here it decides only what
        # is kept of a message while it streams in
        self.kept_headers = dkimsign.SIGNED_HEADERS if self.settings.sign else _CHECKED
        self._lock = threading.Lock()
        self.in_progress = 0  # messages begun and not yet finished or aborted

    # -- the message's life ------------------------------------------------------------
    def begin(self, identity: str, client_address: str) -> Message:
        """A new message (MAIL FROM) in a session logged in as ``identity`` ("" for none)."""
        with self._lock:
            self.in_progress += 1
        # Unauthenticated mail is left alone (the policy service decided who may relay):
        # nothing of it is kept or hashed.
        return Message(identity, client_address, hash_body=bool(identity) and self.settings.sign)

    def end(self) -> None:
        """The message begun last on a connection is finished or aborted."""
        with self._lock:
            self.in_progress -= 1

    def finish(self, message: Message | None, queue_id: str) -> MessageOutcome:
        """Decide, sign and log the message; never raises (faults become 451 4.3.0)."""
        identity = message.identity if message else ""
        started = time.perf_counter()
        try:
            if message is None or message.fault is not None:
                fault = message.fault if message else None
                raise RuntimeError("message callbacks failed") from fault
            outcome = self._decide(message)
        except DirectoryUnavailable as exc:
            log.warning("directory unavailable: %s", exc)
            outcome = MessageOutcome(temporary(Reason.DIRECTORY_UNAVAILABLE, identity))
        except KeyUnavailable as exc:
            log.error("DKIM key unavailable: %s", exc)
            outcome = MessageOutcome(temporary(Reason.DKIM_KEY_UNAVAILABLE, identity))
        except Exception:  # the one catch-all: an answer, a traceback, and mail is kept safe
            log.exception("internal error deciding message %s", queue_id or "(no queue id)")
            outcome = MessageOutcome(temporary(Reason.INTERNAL_ERROR, identity))
        self._log(message, queue_id, outcome)
        principal = outcome.verdict.principal
        try:
            self.metrics.message(principal.partition("/")[0] if principal else "",
                                 outcome.outcome, time.perf_counter() - started,
                                 outcome.algorithms)
        except Exception:  # the metrics must never change a message's answer
            log.exception("metrics: message %s not counted", queue_id or "(no queue id)")
        return outcome

    def _decide(self, message: Message) -> MessageOutcome:
        now = self.clock()
        # Without a login the engine answers before reading the directory, so an outage
        # does not hold up mail that the policy service already let through.
        if message.identity and not message.client_address:
            # {client_addr} comes from our macro request; without it the IP rules cannot be
            # checked, and an empty address would read as "outside the rules" (permanent).
            log.error("Postfix sent no {client_addr}: milter macro negotiation failed "
                      "(milter_protocol must be 6); deferring authenticated mail")
            return MessageOutcome(temporary(Reason.CLIENT_ADDRESS_MISSING, message.identity))
        directory = self.directory.snapshot() if message.identity else Directory.empty()
        parsed = parse_identity(message.identity) if message.identity else None
        if (parsed and parsed[1] not in directory.keys and parsed[1] != LEGACY_KEY_ID
                and self.directory.reads_through):
            # logged in with a key this process's copy lacks (created a moment ago, checked by
            # policyd's own read-through): look it up rather than defer the message (this
            # runs in libmilter's thread for the connection, so waiting blocks no one else)
            directory = self.directory.fresh_for_key(parsed[1])
        facts = HeaderFacts(
            identity=message.identity,
            from_values=_values(message.headers, "from"),
            sender_values=_values(message.headers, "sender"),
            client_address=message.client_address,
            now=now,
        )
        verdict = decide_headers(directory, self.settings, facts)
        plan = verdict.signing
        if not verdict.allowed or plan is None:  # refused, or nothing to sign (milter.sign)
            return MessageOutcome(verdict)
        if message.body_hash is None:
            raise RuntimeError("a message to sign has no body hash")
        keys = self.keys.keys_for(plan.selectors)
        signatures = dkimsign.sign(
            message.headers, message.body_hash.digest(), plan.domain, keys,
            int(now.timestamp()), linesep=b"\n",  # libmilter header values fold with LF
        )
        return MessageOutcome(verdict, tuple(signatures), tuple(k.selector for k in keys),
                              tuple(str(k.algorithm) for k in keys))

    def _log(self, message: Message | None, queue_id: str, outcome: MessageOutcome) -> None:
        fields = {
            "service": "milter",
            "queue_id": queue_id,
            "client": message.client_address if message else "",
            **outcome.verdict.log_fields(),
        }
        if outcome.selectors:
            fields["dkim_selectors"] = ",".join(outcome.selectors)
        self.decisions.emit(log.name, "message", fields)


def _values(headers: list[tuple[str, bytes]], name: str) -> tuple[str, ...]:
    # Undecodable bytes are kept as surrogates: the header parser refuses what it cannot
    # read, and the reply shows them escaped.
    return tuple(
        value.decode("utf-8", "surrogateescape")
        for field, value in headers
        if field.lower() == name
    )
