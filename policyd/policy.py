"""The policy service: decides one ``check_policy_service`` request and renders the action.

Stages (``protocol_state``):

- MAIL and RCPT: the session must be logged in on a submission service, the login must still
  be valid (key not revoked or expired since), the client inside the IP access rules, the
  envelope sender the principal's own; at RCPT also the recipients-per-message limit (each
  recipient beyond it gets ``452 4.5.3``, the others the message: docs/policyd.md). An
  allowed request answers ``FILTER <pool transport>:`` so the mail leaves through the
  principal's IP pool, or ``DUNNO`` to let Postfix's own restrictions go on. A pool whose
  transport is not in Postfix's master.cf yet gets ``451 4.3.0`` (``pool_not_in_postfix``)
  instead of a FILTER Postfix could not follow (transports.py).
- DATA and END-OF-MESSAGE: the same checks, and the message rate limits; each message is
  counted once, at whichever of the two stages Postfix asks first (``instance`` tells
  messages apart).
- Other stages: ``DUNNO``.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict

from keyrelay.decisions import (
    STAGE_NOT_CHECKED,
    Action,
    EnvelopeFacts,
    RateFacts,
    Reason,
    Verdict,
    decide_envelope,
    decide_rate,
    temporary,
    with_rate,
)
from keyrelay.errors import DirectoryUnavailable

from .context import ServiceContext
from .counters import SlidingWindow
from .transports import PostfixTransports

log = logging.getLogger("keyrelay.policyd.policy")

ENVELOPE_STAGES = frozenset({"MAIL", "RCPT", "DATA", "END-OF-MESSAGE"})
MESSAGE_STAGES = frozenset({"DATA", "END-OF-MESSAGE"})
# Messages whose rate was already counted, and RCPTs per message, by Postfix's per-message
# "instance" attribute.
_COUNTED_MAX = 65536


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


class PolicyService:
    def __init__(self, context: ServiceContext) -> None:
        self.context = context
        self.per_minute = SlidingWindow(60.0)
        self.per_hour = SlidingWindow(3600.0)
        self._counted: OrderedDict[str, None] = OrderedDict()
        # RCPTs allowed so far, per message ("instance"); bounded like _counted
        self._recipients: OrderedDict[str, int] = OrderedDict()
        self._transports = PostfixTransports(context.config.postfix.config_dir)

    def transports(self) -> frozenset[str] | None:
        """The pool transports Postfix's master.cf has (postfix.config_dir, which a SIGHUP
        may change); None: not known."""
        config_dir = self.context.config.postfix.config_dir
        if config_dir != self._transports.config_dir:
            self._transports = PostfixTransports(config_dir)
        return self._transports.current()

    def submission(self, request: dict[str, str]) -> bool:
        cfg = self.context.config.policyd
        context = request.get("policy_context", "")
        if cfg.submission_context and context == cfg.submission_context:
            return True
        return _int(request.get("server_port")) in cfg.submission_ports

    def decide(self, request: dict[str, str]) -> Verdict:
        """Decide one request; directory trouble becomes a temporary verdict."""
        stage = request.get("protocol_state", "").upper()
        if request.get("request") != "smtpd_access_policy" or stage not in ENVELOPE_STAGES:
            return STAGE_NOT_CHECKED
        ctx = self.context
        try:
            directory = ctx.snapshot()
        except DirectoryUnavailable as exc:
            log.error("directory unavailable: %s", exc)
            return temporary(Reason.DIRECTORY_UNAVAILABLE)
        now = ctx.clock()
        identity = request.get("sasl_username", "")
        facts = EnvelopeFacts(
            identity=identity,
            submission=self.submission(request),
            client_address=request.get("client_address", ""),
            sender=request.get("sender", ""),
            now=now,
            transports=self.transports(),
        )
        verdict = decide_envelope(directory, ctx.settings, facts)
        if verdict.reason is Reason.POOL_NOT_IN_POSTFIX and verdict.transport:
            self._transports.missing(
                verdict.transport, verdict.transport.removeprefix(ctx.settings.transport_prefix))
        # An allow without a principal is a session without login (port 25): nothing to count.
        if not verdict.allowed or verdict.principal is None:
            return verdict
        if stage == "RCPT":
            # Postfix sends recipient_count=0 until DATA (docs/postfix-hooks.md section 2):
            # count this message's RCPTs ourselves, per instance.
            recipients = self._recipients.get(request.get("instance", ""), 0) + 1
        else:
            recipients = _int(request.get("recipient_count"))
        counted = stage in MESSAGE_STAGES and self._needs_count(request)
        tick = ctx.monotonic()
        rate = decide_rate(
            directory, ctx.settings,
            RateFacts(
                identity=identity,
                messages_last_minute=self._rate(self.per_minute, verdict, tick, counted),
                messages_last_hour=self._rate(self.per_hour, verdict, tick, counted),
                recipients=recipients,
                now=now,
            ),
        )
        answer = with_rate(verdict, rate)
        if not answer.allowed:
            return answer  # refused: nothing counted
        if stage == "RCPT":
            self._count_recipient(request.get("instance", ""), recipients)
        if counted and verdict.principal:
            self.per_minute.add(verdict.principal, tick)
            self.per_hour.add(verdict.principal, tick)
            self._remember(request)
        return answer

    @staticmethod
    def _rate(window: SlidingWindow, verdict: Verdict, tick: float, counted: bool) -> int:
        """Messages in the window, including this one when this request counts it."""
        if not counted or not verdict.principal:
            return 0
        # round up: a fraction of a message left in the window still counts against the limit
        return math.ceil(window.count(verdict.principal, tick)) + 1

    def _count_recipient(self, instance: str, recipients: int) -> None:
        if not instance:
            return
        self._recipients[instance] = recipients
        self._recipients.move_to_end(instance)
        while len(self._recipients) > _COUNTED_MAX:
            self._recipients.popitem(last=False)

    def _needs_count(self, request: dict[str, str]) -> bool:
        instance = request.get("instance", "")
        return not instance or instance not in self._counted

    def _remember(self, request: dict[str, str]) -> None:
        instance = request.get("instance", "")
        if instance:
            self._counted[instance] = None
            while len(self._counted) > _COUNTED_MAX:
                self._counted.popitem(last=False)

    def prune(self) -> None:
        tick = self.context.monotonic()
        self.per_minute.prune(tick)
        self.per_hour.prune(tick)

    def log(self, request: dict[str, str], verdict: Verdict) -> None:
        if verdict.reason is Reason.STAGE_NOT_CHECKED:
            return
        fields = {
            "service": "policy",
            "stage": request.get("protocol_state", ""),
            "queue_id": request.get("queue_id", ""),
            "client": request.get("client_address", ""),
            "sender": request.get("sender", ""),
            "recipient": request.get("recipient", ""),
            **verdict.log_fields(),
        }
        self.context.decisions.emit(log.name, "policy", fields)


def render(verdict: Verdict) -> str:
    """The ``action=`` value for a verdict (access(5) actions)."""
    if verdict.action is Action.ALLOW:
        # FILTER routes the whole message through the pool's transport; Postfix then goes on
        # with the rest of the restriction list, as for DUNNO.
        return f"FILTER {verdict.transport}:" if verdict.transport else "DUNNO"
    return verdict.smtp_reply
