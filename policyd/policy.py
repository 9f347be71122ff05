"""The policy service: decides one ``check_policy_service`` request and renders the action.

Stages (``protocol_state``):

- MAIL and RCPT: the session must be logged in on a submission service, the login must still
  be valid (key not revoked or expired since), the client inside the IP access rules, the
  envelope sender the principal's own; at RCPT also the recipients-per-message limit (each
  recipient beyond it gets ``452 4.5.3``, the others the message: docs/policyd.md) and the
  account's suppression list (a suppressed recipient gets ``550 5.7.1``, a list that cannot
  be read ``451 4.3.0``: docs/suppressions.md); at MAIL and RCPT a principal the reputation
  guard paused gets ``451 4.7.1`` (pauses that cannot be read: ``451 4.3.0``;
  docs/reputation.md). An
  allowed request answers ``FILTER <pool transport>:`` so the mail leaves through the
  principal's IP pool, or ``DUNNO`` to let Postfix's own restrictions go on. A pool whose
  transport is not in Postfix's master.cf yet gets ``451 4.3.0`` (``pool_not_in_postfix``)
  instead of a FILTER Postfix could not follow (transports.py).
- DATA and END-OF-MESSAGE: the same checks, then the message is charged to the counter
  store (``keyrelay.counters``): its recipients, in every window of
  ``decisions.windows_for`` (rates and quotas, the subuser's own and its account's), in one
  atomic check-and-add; a full window answers ``451 4.7.1`` (``decide_quota``), a store that
  cannot answer ``451 4.3.0``. Each message is charged once, at whichever of the two stages
  Postfix asks first (``instance`` tells messages apart); a message refused or let pass by
  monitor mode over a full window took nothing (docs/policyd.md, "What is counted").
- Other stages: ``DUNNO``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypeVar

from keyrelay.counters import CountersUnavailable, MemoryCounters, Usage, Window
from keyrelay.decisions import (
    STAGE_NOT_CHECKED,
    Action,
    EngineSettings,
    EnvelopeFacts,
    PauseFacts,
    QuotaFacts,
    RateFacts,
    RateWindow,
    Reason,
    RecipientFacts,
    Verdict,
    account_of,
    decide_envelope,
    decide_paused,
    decide_quota,
    decide_rate,
    decide_recipient,
    temporary,
    windows_for,
    with_rate,
)
from keyrelay.directory import Directory
from keyrelay.errors import DirectoryUnavailable, UserError
from keyrelay.limits import store_window
from keyrelay.metrics import NO_METRICS, Metrics
from keyrelay.reputation import ReputationUnavailable
from keyrelay.reputation.pauses import STALE_FACTOR
from keyrelay.suppressions import RedisLookup, Suppression, SuppressionsUnavailable
from keyrelay.suppressions import address as suppression_address

from .context import KeyLookup, ServiceContext
from .transports import PostfixTransports

log = logging.getLogger("keyrelay.policyd.policy")

ENVELOPE_STAGES = frozenset({"MAIL", "RCPT", "DATA", "END-OF-MESSAGE"})
MESSAGE_STAGES = frozenset({"DATA", "END-OF-MESSAGE"})
PAUSE_STAGES = frozenset({"MAIL", "RCPT"})  # where a paused principal is answered
# Messages already charged, and RCPTs per message, by Postfix's per-message "instance"
# attribute.
_COUNTED_MAX = 65536

T = TypeVar("T")


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def run_now(step: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that never waits (``MemoryCounters``: "Nothing here
    awaits", keyrelay/counters/memory.py), without an event-loop task: the policy service's
    hot path with the memory store stays one synchronous call."""
    try:
        step.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    step.close()
    raise RuntimeError("the memory counter store awaited")


def _charged(directory: Directory, settings: EngineSettings,
             principal: str) -> tuple[tuple[RateWindow, ...], tuple[Window, ...]]:
    """The windows of ``windows_for`` and the store's for each, once per snapshot, settings
    and principal (as the engine memoises its own: ``Directory.derived``)."""
    found = directory.derived.get(_CHARGED)
    if not (isinstance(found, tuple) and found[0] is settings):
        found = directory.derived[_CHARGED] = (settings, {})
    memo: dict[str, tuple[tuple[RateWindow, ...], tuple[Window, ...]]] = found[1]
    pair = memo.get(principal)
    if pair is None:
        windows = windows_for(directory, settings, principal)
        pair = memo[principal] = (windows, tuple(store_window(window) for window in windows))
    return pair


_CHARGED = "policyd.charged"


class Charge(NamedTuple):
    """A message to charge to a counter store that answers over the network (Redis): the
    connection awaits ``PolicyService.charge`` and answers with its verdict."""

    request: dict[str, str]
    answer: Verdict  # the envelope's (and recipients') answer, if every window has room
    directory: Directory  # the snapshot the request was decided with
    windows: tuple[RateWindow, ...]
    charged: tuple[Window, ...]  # the store's windows, in the same order
    amount: int
    now: datetime


class Lookup(NamedTuple):
    """A message of a session whose key id this copy of the directory lacks, while the
    directory can be asked (LDAP read-through): the login was decided by another worker
    process (or this copy is older than the key). The connection runs ``lookup.run`` off the
    event loop, then decides the request again with ``looked_up=True``."""

    request: dict[str, str]
    lookup: KeyLookup


class Recipient(NamedTuple):
    """A recipient to look up in a suppression list that answers over the network (Redis):
    the connection awaits ``PolicyService.check_recipient`` and answers with its verdict."""

    request: dict[str, str]
    answer: Verdict  # the envelope's (and recipients') answer, if it is not suppressed
    directory: Directory
    account: str
    address: str  # normal form
    recipients: int  # this message's RCPTs so far, this one included


class PauseCheck(Recipient):
    """A MAIL or RCPT of a keyrelay login while the copy of the pauses is stale and they are
    in Redis: the connection awaits ``PolicyService.settle``, which reads them again (once for
    every request waiting meanwhile), answers a paused principal and goes on with the RCPT's
    suppression look-up. ``account`` and ``address`` are unused."""


class PolicyService:
    def __init__(self, context: ServiceContext, metrics: Metrics = NO_METRICS) -> None:
        self.context = context
        self.metrics = metrics
        self._counted: OrderedDict[str, None] = OrderedDict()
        # RCPTs allowed so far, per message ("instance"); bounded like _counted
        self._recipients: OrderedDict[str, int] = OrderedDict()
        self._transports = PostfixTransports(context.config.postfix.config_dir)
        # the list's outage was logged: "" no, "replica" answered from the replica,
        # "tempfail" answered 451
        self._suppressions_away = ""
        self._pauses_away = False  # the reputation pauses' outage was logged

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

    def decide(self, request: dict[str, str], *,
               looked_up: bool = False) -> Verdict | Charge | Lookup | Recipient:
        """Decide one request; directory trouble becomes a temporary verdict. A message to
        charge to a store that answers over the network comes back as a ``Charge`` for
        ``charge``; with the memory store it is charged here, synchronously. A session's key
        id missing from this copy comes back as a ``Lookup`` (once: ``looked_up`` after it,
        when a key still missing is answered ``key_not_in_copy``, temporarily)."""
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
        if (verdict.reason is Reason.KEY_NOT_IN_COPY and verdict.key_id and not looked_up
                and ctx.directory.reads_through):
            return Lookup(request, KeyLookup(ctx, verdict.key_id))
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
        answer = with_rate(verdict, decide_rate(
            directory, ctx.settings, RateFacts(identity, recipients, now)))
        if not answer.allowed:
            return answer  # refused: nothing counted
        if stage in PAUSE_STAGES and ctx.pauses is not None:
            return self._pause(request, answer, directory, recipients)
        if stage == "RCPT":
            return self._recipient(request, answer, directory, recipients)
        if stage not in MESSAGE_STAGES or not self._needs_count(request):
            return answer
        windows, charged = _charged(directory, ctx.settings, verdict.principal)
        if not windows:
            self._remember(request)
            return answer
        # the message's recipients, final at DATA; one at least (a request without
        # recipient_count still sends a message)
        charge = Charge(request, answer, directory, windows, charged, max(recipients, 1), now)
        store = ctx.store
        if isinstance(store, MemoryCounters):
            return self.charged(charge, run_now(store.take(charge.charged, charge.amount)))
        return charge

    def _pause(self, request: dict[str, str], answer: Verdict, directory: Directory,
               recipients: int) -> Verdict | Recipient:
        """MAIL or RCPT of a keyrelay login: is its principal paused (docs/reputation.md,
        "The refusal")? The pauses are kept in memory and read again at most every
        ``reputation.refresh`` (synchronously from the SQLite file; through ``PauseCheck``
        from Redis)."""
        cache = self.context.pauses
        assert cache is not None
        if not cache.fresh():
            if cache.remote:
                return PauseCheck(request, answer, directory, "", "", recipients)
            try:
                cache.read()
            except ReputationUnavailable as exc:
                return self._pauses_failed(request, answer, directory, recipients, exc)
        return self._pause_checked(request, answer, directory, recipients)

    def _pause_checked(self, request: dict[str, str], answer: Verdict, directory: Directory,
                       recipients: int, *, read: bool = True) -> Verdict | Recipient:
        """The answer from the copy of the pauses (``read``: just read, or fresh), then at
        RCPT the suppression list's."""
        cache = self.context.pauses
        assert cache is not None
        if read and self._pauses_away:
            log.warning("reputation pauses answer again; paused principals are checked again")
            self._pauses_away = False
        identity = request.get("sasl_username", "")
        principal = answer.principal or ""
        verdict = with_rate(answer, decide_paused(
            directory, self.context.settings, PauseFacts(identity, cache.get(principal))))
        if not verdict.allowed or request.get("protocol_state", "").upper() != "RCPT":
            return verdict
        return self._recipient(request, verdict, directory, recipients)

    def _pauses_failed(self, request: dict[str, str], answer: Verdict, directory: Directory,
                       recipients: int, exc: ReputationUnavailable) -> Verdict | Recipient:
        """The pauses cannot be read: the last copy while it is recent enough (nobody can
        pause or resume while the store is away: keyrelay/reputation/pauses.py), else
        ``451 4.3.0``, never an unchecked accept. Logged once per outage."""
        cache = self.context.pauses
        assert cache is not None
        if not self._pauses_away:
            log.error("reputation pauses unavailable: %s; the last copy is used for %g s, then "
                      "mail of keyrelay logins gets 451 4.3.0 until they can be read again",
                      exc, cache.refresh * STALE_FACTOR)
            self._pauses_away = True
        if cache.usable():
            return self._pause_checked(request, answer, directory, recipients, read=False)
        return temporary(Reason.REPUTATION_UNAVAILABLE, request.get("sasl_username", ""))

    async def keep_pauses(self) -> None:
        """Read the pauses again every ``reputation.refresh`` (policyd/main.py runs it in
        every worker), so that each copy stays fresh without a request waiting for it, and
        a worker that served no mail lately still has a recent copy when the store goes
        away. A failure is left to the next request to log and answer."""
        while True:
            cache = self.context.pauses  # a SIGHUP may have replaced it
            if cache is not None and not cache.fresh():
                try:
                    if cache.remote:
                        await cache.read_async()
                    else:
                        cache.read()
                except ReputationUnavailable:
                    pass
                except Exception:  # a bug of ours must not end the loop: requests read too
                    log.exception("reading the reputation pauses failed")
            await asyncio.sleep(cache.refresh if cache is not None else 5.0)

    async def check_pause(self, pending: PauseCheck) -> Verdict:
        cache = self.context.pauses
        assert cache is not None
        try:
            await cache.read_async()
        except ReputationUnavailable as exc:
            again = self._pauses_failed(pending.request, pending.answer, pending.directory,
                                        pending.recipients, exc)
        else:
            again = self._pause_checked(pending.request, pending.answer, pending.directory,
                                        pending.recipients)
        if isinstance(again, Recipient):
            return await self.check_recipient(again)
        return again

    def _recipient(self, request: dict[str, str], answer: Verdict, directory: Directory,
                   recipients: int) -> Verdict | Recipient:
        """An allowed RCPT of a keyrelay login: the account's suppression list is asked
        (synchronously for the SQLite file, through ``Recipient`` for Redis)."""
        account = account_of(request.get("sasl_username", ""))
        try:
            address = suppression_address(request.get("recipient", ""))
        except UserError:
            address = ""  # not an address keyrelay could have suppressed
        if account is None or not address:
            self._count_recipient(request.get("instance", ""), recipients)
            return answer
        pending = Recipient(request, answer, directory, account, address, recipients)
        lookup = self.context.suppressions
        if isinstance(lookup, RedisLookup):
            return pending
        try:
            found = lookup.get(account, address)
        except SuppressionsUnavailable as exc:
            return self._unavailable(pending, exc)
        return self.recipient_checked(pending, found)

    def _unavailable(self, pending: Recipient, exc: SuppressionsUnavailable) -> Verdict:
        """The list cannot answer: with ``counters.on_unavailable: local``, this node's copy
        of the lists answers if it is young enough (keyrelay/suppressions/replica.py);
        otherwise ``451 4.3.0``: a recipient is never accepted unchecked
        (docs/suppressions.md, "Faults"). Logged once per outage and per way of answering."""
        replica = self.context.replica
        why = ""  # why the replica did not answer (none: counters.on_unavailable says so)
        if replica is not None:
            try:
                copied, found = replica.lookup(pending.account, pending.address)
                if copied is None:
                    why = f"no replica in {replica.path} yet (keyrelay-events writes it)"
                elif (self.context.clock().timestamp() - copied
                      > self.context.config.suppressions.replica_max_age):
                    why = (f"the replica in {replica.path} is older than "
                           "suppressions.replica_max_age (is keyrelay-events running?)")
                else:
                    if self._suppressions_away != "replica":
                        log.error("suppression list unavailable: %s; recipients of keyrelay "
                                  "logins are checked against this node's replica of %s "
                                  "until it answers again", exc,
                                  datetime.fromtimestamp(copied, UTC).strftime(
                                      "%Y-%m-%d %H:%M:%S UTC"))
                        self._suppressions_away = "replica"
                    return self.recipient_checked(pending, found, from_replica=True)
            except SuppressionsUnavailable as failed:
                why = str(failed)
        if self._suppressions_away != "tempfail":
            log.error("suppression list unavailable: %s; %srecipients of keyrelay logins "
                      "get 451 4.3.0 until it answers again", exc, f"{why}; " if why else "")
            self._suppressions_away = "tempfail"
        return temporary(Reason.SUPPRESSIONS_UNAVAILABLE,
                         pending.request.get("sasl_username", ""))

    async def check_recipient(self, pending: Recipient) -> Verdict:
        """Look ``pending``'s recipient up in Redis and answer; a list that cannot answer
        gets ``451 4.3.0``, never an unchecked accept."""
        lookup = self.context.suppressions
        assert isinstance(lookup, RedisLookup)
        try:
            found = await lookup.get(pending.account, pending.address)
        except SuppressionsUnavailable as exc:
            return self._unavailable(pending, exc)
        return self.recipient_checked(pending, found)

    def recipient_checked(self, pending: Recipient, found: Suppression | None, *,
                          from_replica: bool = False) -> Verdict:
        """The RCPT's answer once the list (or, Redis away, this node's replica) was read: a
        suppressed recipient is refused (or let pass in monitor mode; found in the replica:
        451 4.3.0 until Redis answers); one allowed counts towards recipients per message."""
        ctx = self.context
        if self._suppressions_away and not from_replica:
            log.warning("suppression list answers again; recipients are checked again")
            self._suppressions_away = ""
        verdict = with_rate(pending.answer, decide_recipient(
            pending.directory, ctx.settings,
            RecipientFacts(pending.request.get("sasl_username", ""), pending.address, found)))
        if from_replica and not verdict.allowed:
            # the copy may be older than a removal Redis would know of: what it refuses
            # waits (451 4.3.0) for Redis's own answer, never a 550 of our outage
            return temporary(Reason.SUPPRESSIONS_UNAVAILABLE,
                             pending.request.get("sasl_username", ""))
        if verdict.allowed:
            self._count_recipient(pending.request.get("instance", ""), pending.recipients)
        return verdict

    async def settle(self, pending: Charge | Recipient) -> Verdict:
        """What the connection awaits: a message charged, or a recipient looked up."""
        if isinstance(pending, Charge):
            return await self.charge(pending)
        if isinstance(pending, PauseCheck):
            return await self.check_pause(pending)
        return await self.check_recipient(pending)

    async def charge(self, charge: Charge) -> Verdict:
        """Charge ``charge`` to the counter store (one atomic check-and-add over all its
        windows) and answer; a store that cannot answer gets ``451 4.3.0``, never a
        refusal."""
        try:
            refused = await self.context.store.take(charge.charged, charge.amount)
        except CountersUnavailable as exc:
            log.error("counter store unavailable: %s", exc)
            return temporary(Reason.COUNTERS_UNAVAILABLE,
                             charge.request.get("sasl_username", ""))
        return self.charged(charge, refused)

    def charged(self, charge: Charge, refused: Usage | None) -> Verdict:
        """The answer once the store has taken the message (``refused`` None) or refused it
        (the first full window). Only a message taken is remembered as counted: a refused
        one (and one that monitor mode lets pass over a full window) took nothing."""
        if refused is None:
            self._remember(charge.request)
            # what decide_quota answers for a window None (an allow), with_rate keeps
            return charge.answer
        ctx = self.context
        facts = QuotaFacts(charge.request.get("sasl_username", ""), charge.amount,
                           charge.windows[charge.charged.index(refused.window)],
                           used=refused.count, resets_in=refused.resets_in, now=charge.now,
                           zone=ctx.config.counters.time_zone)
        return with_rate(charge.answer, decide_quota(charge.directory, ctx.settings, facts))

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

    def log(self, request: dict[str, str], verdict: Verdict,
            seconds: float | None = None) -> None:
        """The decision's log line and metrics; ``seconds`` from the complete request."""
        self.metrics.policy(request.get("protocol_state", "").upper(), str(verdict.action),
                            str(verdict.reason), seconds, verdict.window)
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
