"""The SASL auth service: decides one login attempt and renders the verdict for Postfix.

Brute-force protection sits in front of the decision engine, keyed on the client address and
on the key id (every username is ``apikey``, so the username is useless as a key). The counts,
lock-outs and where each key id recently logged in live in the counter store (keyrelay/counters:
this process's memory, or Redis shared by every node, docs/cluster.md); this module gathers
them for each attempt and counts its outcome. What counts as a guess, who a
lock-out stops and what a locked-out client is told is the engine's
(keyrelay/decisions/login.py): a wrong username, a password that is not a key, an unknown key
id or a wrong secret count; a revoked or expired key, a suspended principal or a refused
address is a known key used in the wrong place, answered clearly every time without locking
anyone out. A locked key id still logs in where it recently logged in (docs/policyd.md,
"Brute-force protection").

An imported legacy login (the password bridge, docs/migration.md) is the one login whose
check is slow by design: its password hash is verified in a thread pool of fixed size
(``HASH_WORKERS``), never on the event loop, with at most ``HASH_PENDING`` attempts waiting
or running; one more is answered temporarily (``legacy_busy``: the connection drops, Postfix
answers 454 4.7.0). A wrong password counts as a guess against the client's address.

With ``auth.site_auth_socket`` set (coexistence, docs/coexistence.md), a login that is not
keyrelay's is decided by none of this: before any lock-out or count it is passed on to the
site's Dovecot (policyd/siteauth.py) and the site's answer goes back unchanged
(``SiteAnswer``); the site's auth service keeps its own failure delays and penalties.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from keyrelay import keys, names, passwords
from keyrelay.counters import CountersUnavailable, MemoryCounters
from keyrelay.decisions import (
    LEGACY_KEY_ID,
    Action,
    LockoutFacts,
    LoginFacts,
    Reason,
    Verdict,
    counts_against_key,
    counts_as_guess,
    decide_lockout,
    decide_login,
    legacy_login_for,
    minutes,
    site_answer,
    site_login,
    temporary,
)
from keyrelay.durations import format_duration
from keyrelay.errors import DirectoryUnavailable, UserError
from keyrelay.metrics import NO_METRICS, Metrics

from . import dovecot
from .context import KeyLookup, ServiceContext
from .policy import run_now
from .siteauth import SiteAuth, SiteAuthUnavailable, SiteReply

log = logging.getLogger("keyrelay.policyd.auth")
# keyrelay_auth_attempts_total's result label (docs/metrics.md)
RESULTS = {Action.ALLOW: "success", Action.REFUSE: "failure", Action.TEMPFAIL: "tempfail"}
# Legacy password hashes are verified by this many threads (Argon2id at 64 MiB each) ...
HASH_WORKERS = 2
# ... with at most this many attempts running or waiting; one more is answered temporarily
HASH_PENDING = 16


class PasswordCheck:
    """An attempt whose legacy password hash must be verified (off the event loop) before
    the engine decides it."""

    __slots__ = ("password_hash", "principal")

    def __init__(self, principal: str, password_hash: str) -> None:
        self.principal = principal
        self.password_hash = password_hash

    def __repr__(self) -> str:
        return "PasswordCheck(<hash>)"


class SiteAnswer(NamedTuple):
    """The site's answer to a login passed on (coexistence): sent back to Postfix unchanged
    when ``verdict`` (the engine's reading of it, for the log and the metrics) is
    ``site_login``; a ``reserved_username`` refusal is rendered as keyrelay's own."""

    verdict: Verdict
    reply: SiteReply


Outcome = Verdict | SiteAnswer


class AuthService:
    """Decides logins; failures, lock-outs and recent logins are counted in the context's
    counter store (``ctx.store``, keyrelay/counters), on the store's clock.

    With the memory store every step is one synchronous call (``run_now``); with a store
    that answers over the network (Redis), ``login`` hands back a coroutine the connection
    awaits (policyd/server.py ``AuthConnection``), as it does for an LDAP key look-up.
    The thresholds are read from the context at each attempt: after a SIGHUP that changed
    ``policyd.bruteforce`` they apply to the next failure counted; the counts and lock-outs so
    far are kept (in Redis they are every node's, not one node's to wipe).
    """

    def __init__(self, context: ServiceContext, metrics: Metrics = NO_METRICS) -> None:
        self.context = context
        self.metrics = metrics
        self._hash_pool: ThreadPoolExecutor | None = None  # made at the first legacy login
        self.hashing = 0  # legacy password checks running or waiting
        self._site: SiteAuth | None = None  # made at the first login passed on

    def _pool(self) -> ThreadPoolExecutor:
        if self._hash_pool is None:
            self._hash_pool = ThreadPoolExecutor(HASH_WORKERS,
                                                 thread_name_prefix="keyrelay-passwords")
        return self._hash_pool

    def login(self, attempt: dovecot.Attempt) -> Outcome | Coroutine[Any, Any, Outcome]:
        """Decide one attempt; every fault of ours becomes a TEMPFAIL verdict.

        A coroutine instead means: the answer needs a wait (a counter store over the network,
        or a key id not in this node's copy of the directory that may exist: a key created a
        moment ago, looked up off the event loop). The caller awaits it for the verdict.
        """
        step = self._login(attempt, None)
        if isinstance(self.context.store, MemoryCounters):
            result = run_now(step)
            if isinstance(result, KeyLookup):
                return self._look_up(attempt, result)
            if isinstance(result, PasswordCheck):
                return self._verify(attempt, result)
            if result.action is Action.PASS:
                return self._pass_on(attempt)
            return result
        return self._settle(attempt, step)

    async def _settle(self, attempt: dovecot.Attempt,
                      step: Coroutine[Any, Any, Verdict | KeyLookup | PasswordCheck]
                      ) -> Outcome:
        result = await step
        if isinstance(result, KeyLookup):
            return await self._look_up(attempt, result)
        if isinstance(result, PasswordCheck):
            return await self._verify(attempt, result)
        if result.action is Action.PASS:
            return await self._pass_on(attempt)
        return result

    async def _pass_on(self, attempt: dovecot.Attempt) -> Outcome:
        """Ask the site's auth service (coexistence); its fault is a temporary answer."""
        target = self.context.config.auth.site_auth_socket
        site = self._site
        if site is None or site.target != target:  # first, or changed by SIGHUP
            old, site = site, SiteAuth(target)
            self._site = site  # before any await: a second login must not make another
            if old is not None:
                await old.close()
        try:
            reply = await site.login(attempt)
        except SiteAuthUnavailable as exc:
            log.error("login %s from %s not passed on to the site: %s",
                      loggable_username(attempt.username), attempt.client_address, exc)
            return temporary(Reason.SITE_AUTH_UNAVAILABLE)
        if reply.temporary:
            # the site's own fault (its passdb away): Postfix would turn the FAIL into a
            # permanent 535, so the connection closes instead and the client gets 454
            log.error("login %s from %s: the site's auth service answered a temporary failure",
                      loggable_username(attempt.username), attempt.client_address)
            return temporary(Reason.SITE_AUTH_UNAVAILABLE)
        return SiteAnswer(site_answer(reply.ok, reply.user), reply)

    async def close(self) -> None:
        """Close the connection to the site's auth service, if any (on stop)."""
        if self._site is not None:
            await self._site.close()

    async def _verify(self, attempt: dovecot.Attempt, check: PasswordCheck) -> Verdict:
        """Verify a legacy password in the bounded pool, then decide with the outcome."""
        if self.hashing >= HASH_PENDING:
            log.warning("legacy password check refused for now: %d checks already running "
                        "or waiting", self.hashing)
            return temporary(Reason.LEGACY_BUSY)
        self.hashing += 1
        try:
            ok = await asyncio.get_running_loop().run_in_executor(
                self._pool(), passwords.verify, check.password_hash, attempt.password)
        except passwords.HashUnusable as exc:
            # our fault (a damaged stored hash): temporary, and counted against nobody
            log.error("legacy login of %s: %s", check.principal, exc)
            return temporary(Reason.INTERNAL_ERROR)
        finally:
            self.hashing -= 1
        verdict = await self._login(attempt, None, ok, check.password_hash)
        assert isinstance(verdict, Verdict)
        return verdict

    async def _look_up(self, attempt: dovecot.Attempt, lookup: KeyLookup) -> Verdict:
        await asyncio.get_running_loop().run_in_executor(None, lookup.run)
        return await self.looked_up(attempt, lookup)

    async def looked_up(self, attempt: dovecot.Attempt, lookup: KeyLookup) -> Verdict:
        """Decide an attempt after its key id was looked up in the directory."""
        if lookup.fault is not None:
            # our own fault (LDAP away, or the read-through budget spent): temporary, and
            # counted against nobody, since the key may well exist
            log.error("API key %s not in this copy and cannot be looked up: %s",
                      lookup.key_id, lookup.fault)
            return temporary(Reason.DIRECTORY_UNAVAILABLE)
        verdict = await self._login(attempt, lookup)
        assert isinstance(verdict, Verdict)
        return verdict

    async def _login(self, attempt: dovecot.Attempt, lookup: KeyLookup | None,
                     password_ok: bool | None = None, verified: str = ""
                     ) -> Verdict | KeyLookup | PasswordCheck:
        try:
            return await self._decide(attempt, lookup, password_ok, verified)
        except CountersUnavailable as exc:
            # only a store without the in-process fallback raises this for brute-force
            # counting (keyrelay/counters/fallback.py never does): our fault, temporary
            log.error("counter store unavailable: %s", exc)
            return temporary(Reason.COUNTERS_UNAVAILABLE)

    async def _decide(self, attempt: dovecot.Attempt, lookup: KeyLookup | None,
                      password_ok: bool | None, verified: str = ""
                      ) -> Verdict | KeyLookup | PasswordCheck:
        ctx = self.context
        if (ctx.settings.site_logins and lookup is None and password_ok is None
                and attempt.username != ctx.settings.username):
            # coexistence: the site's logins are passed on before any lock-out or count
            try:
                passed = site_login(ctx.snapshot(), ctx.settings, attempt.username)
            except DirectoryUnavailable as exc:
                log.error("directory unavailable: %s", exc)
                return temporary(Reason.DIRECTORY_UNAVAILABLE)
            if passed is not None:
                return passed
        store = ctx.store
        address = attempt.client_address
        client = client_key(address)
        presented = keys.parse(attempt.password)
        key_id = presented.key_id if presented else None
        if lookup is None:  # after a look-up, the lock-outs were checked already
            address_locked = await store.locked_for("address", client)
            key_locked = await store.locked_for("key", key_id) if key_id else 0.0
            # where the key last logged in matters only to a locked key id
            since = await store.since(key_id, client) if key_id and key_locked > 0 else None
            locked = decide_lockout(ctx.settings, LockoutFacts(
                address, key_id, address_locked, key_locked, since))
            if locked is not None:
                return locked
        try:
            directory = ctx.snapshot()
        except DirectoryUnavailable as exc:
            log.error("directory unavailable: %s", exc)
            return temporary(Reason.DIRECTORY_UNAVAILABLE)
        facts = LoginFacts(attempt.username, attempt.password, address, ctx.clock(),
                           secured=attempt.secured)
        cred = legacy_login_for(directory, ctx.settings, facts)
        if password_ok is None:
            if cred is not None:  # decided again once the hash is verified, off the loop
                return PasswordCheck(cred.principal, cred.password_hash)
        elif cred is None or cred.password_hash != verified:
            # the login changed (new hash, removed, another principal's) while its password
            # was checked: the outcome is not this copy's to apply; the client retries
            log.info("legacy login %s changed while its password was checked; answering "
                     "temporarily", loggable_username(attempt.username))
            return temporary(Reason.DIRECTORY_UNAVAILABLE)
        verdict = decide_login(directory, ctx.settings, facts, password_ok)
        if (lookup is None and key_id and verdict.reason is Reason.UNKNOWN_KEY
                and ctx.directory.reads_through):
            # the engine found everything else right, and only this copy lacks the key: it
            # may be a minute old (docs/ldap.md, "Read-through"); decided again after the look-up
            return KeyLookup(ctx, key_id)
        bf = ctx.config.policyd.bruteforce
        if counts_as_guess(verdict):
            if await store.fail("address", client, bf.max_failures_per_address, bf.window,
                                bf.lockout):
                self.metrics.lockout("address")
                log.warning("client %s locked out for %s after repeated failed logins",
                            address, minutes(bf.lockout))
            if key_id and counts_against_key(verdict) and await store.fail(
                    "key", key_id, bf.max_failures_per_key, bf.window, bf.lockout):
                self.metrics.lockout("key")
                log.warning("API key %s locked out for %s after repeated wrong secrets (the "
                            "last from %s); still let in from the %d address(es) where it "
                            "logged in within %s", key_id, minutes(bf.lockout), address,
                            await store.clients(key_id, ctx.settings.trusted_for),
                            format_duration(bf.trusted_for))
        elif verdict.allowed and verdict.key_id == LEGACY_KEY_ID and verdict.identity:
            ctx.key_used(verdict.identity, facts.now)  # PRINCIPAL:legacy (keyrelay/admin.py)
        elif verdict.allowed and verdict.key_id:
            ctx.key_used(verdict.key_id, facts.now)
            await store.succeeded(verdict.key_id, client, bf.trusted_for)
        return verdict

    def log(self, attempt: dovecot.Attempt, outcome: Outcome,
            seconds: float | None = None) -> None:
        """The decision's log line and metrics; ``seconds`` from the complete request."""
        verdict = outcome.verdict if isinstance(outcome, SiteAnswer) else outcome
        self.metrics.login(RESULTS[verdict.action], str(verdict.reason), seconds)
        fields = {
            "service": "auth",
            "client": attempt.client_address,
            "mechanism": attempt.mechanism,
            **verdict.log_fields(),
        }
        if isinstance(outcome, SiteAnswer):
            fields["site_answer"] = "OK" if outcome.reply.ok else "FAIL"
        if verdict.reason in (Reason.SITE_LOGIN, Reason.RESERVED_USERNAME) or (
                verdict.action is not Action.ALLOW and verdict.reason is Reason.BAD_USERNAME):
            fields["username"] = loggable_username(attempt.username)
        if verdict.key_id == LEGACY_KEY_ID and verdict.principal:
            days = self._days_left(verdict.principal)
            if days is not None:
                fields["days_left"] = str(days)
        self.context.decisions.emit(log.name, "login", fields)

    def _days_left(self, principal: str) -> int | None:
        try:
            cred = self.context.snapshot().legacy.get(principal)
        except DirectoryUnavailable:
            return None
        return None if cred is None else cred.days_left(self.context.clock())

    def log_exchange_failure(self, reply: dovecot.Reply) -> None:
        """A SASL exchange that failed before any credentials (bad base64, bad PLAIN...)."""
        fields = {
            "service": "auth",
            "client": reply.client_address,
            "mechanism": reply.mechanism,
            "verdict": "refuse",
            "reason": str(Reason.MALFORMED_EXCHANGE),
            "reply": f"535 5.7.8 {reply.failure}",
        }
        self.metrics.login("failure", str(Reason.MALFORMED_EXCHANGE), None)
        self.context.decisions.emit(log.name, "login", fields)


def client_key(address: str) -> str:
    """What failures are counted against: the IPv4 address, or the IPv6 /64.

    One IPv6 host usually holds a whole /64: counting single addresses would let it try
    2^64 times and flush the bounded tracker, forgetting every lock-out.
    """
    try:
        ip = names.ip_address(address)
    except UserError:
        return address[:64]
    if ip.version == 6:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def loggable_username(username: str) -> str:
    """What was tried as the username, for the log; never a key pasted into that field."""
    if username.startswith(keys.KEY_PREFIX + ".") or keys.parse(username) is not None:
        return "<an API key>"
    return username[:64]


def render(request_id: str, outcome: Outcome) -> bytes | None:
    """The Dovecot reply for a verdict; ``None`` means: close the connection. The site's
    answer to a login passed on goes back unchanged, under Postfix's request id.

    Postfix 3.7 turns every ``FAIL`` into a permanent 535 whatever flags it carries, so a
    temporary fault is signalled the only way Postfix understands: the connection drops and
    the client gets ``454 4.7.0`` (docs/postfix-hooks.md section 1).
    """
    if isinstance(outcome, SiteAnswer):
        if outcome.verdict.reason is Reason.SITE_LOGIN:
            return outcome.reply.line(request_id)
        outcome = outcome.verdict
    verdict = outcome
    if verdict.action is Action.ALLOW:
        assert verdict.identity is not None
        return dovecot.ok(request_id, verdict.identity)
    if verdict.action is Action.REFUSE:
        return dovecot.fail(request_id, verdict.text)
    return None
