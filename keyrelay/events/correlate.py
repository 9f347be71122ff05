"""Records of the maillog turned into delivery events (docs/events.md, "Events").

Postfix logs a message's life over several lines, tied by its queue id: smtpd opens the
queue file (``client=..., sasl_username=IDENTITY``), cleanup names its Message-ID and the
domain of its DKIM signature (keyrelay's milter_header_checks table), qmgr takes it into the
active queue (``from=<>, size=, nrcpt=``), a delivery agent logs each recipient's outcome,
qmgr removes it. The correlator keeps, per queue id of a keyrelay login, what the events
need (account, subuser, key id, Message-ID, DKIM domain, the recipients deferred so far) and per
smtpd process the session's login, for the refusals smtpd logs before a queue file exists
(``NOQUEUE: reject:``).

Events are dicts with SendGrid's Event Webhook names where the meaning is the same (``email``,
``timestamp``, ``event``, ``reason``, ``status``, ``response``, ``attempt``, ``type``) and
keyrelay's own (``account``, ``subuser``, ``key_id``, ``queue_id``, ``message_id``,
``dkim_domain``, ``event_id``). ``event_id`` is derived from the log position of the line that
caused the event, so reading the same lines again gives the same ids.

The state is bounded (a message not finished within ``max_age`` seconds of log time, a
session idle for ``session_max_age``, and beyond ``max_messages`` the oldest, are forgotten and
counted) and serialisable: ``changes()`` gives what changed since the last call, which the
store writes in the same transaction as the events and the log position.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..decisions.facts import parse_identity
from . import maillog as m

Event = dict[str, Any]

DEFAULT_MAX_AGE = 8 * 86400.0  # Postfix's maximal_queue_lifetime is 5 days by default
DEFAULT_SESSION_MAX_AGE = 3600.0  # smtpd's timeouts end an idle session long before
DEFAULT_MAX_MESSAGES = 200_000
MAX_PENDING = 100  # refusals held per session until its login is known

_MESSAGE = "m:"
_SESSION = "s:"
_CLOCK = "g:clock"  # the log time and the minute of the last sweep
SWEEP_EVERY = 60.0  # seconds of log time between two sweeps of what is too old


@dataclass(frozen=True, slots=True)
class Position:
    """Where a line starts: the source (a hash naming one log file's content) and offset."""

    source: str
    offset: int


def event_id(pos: Position, n: int) -> str:
    """The id of the ``n``-th event caused by the line at ``pos``: stable across replays."""
    raw = f"{pos.source}:{pos.offset}:{n}".encode()
    return hashlib.blake2b(raw, digest_size=12).hexdigest()


def _attribution(identity: str | None) -> tuple[str, str | None, str] | None:
    """``account/subuser:keyid`` as (account, subuser, key id); None if not keyrelay's."""
    if not identity:
        return None
    parsed = parse_identity(identity)
    if parsed is None:
        return None
    principal, key_id = parsed
    account, slash, subuser = principal.partition("/")
    if not account or (slash and not subuser) or "/" in subuser:
        return None
    return account, (subuser or None), key_id


def _hard_or_soft(dsn: str) -> str:
    return "hard" if dsn.startswith("5") else "soft"


class Correlator:
    """Feeds on records in log order; returns the events each one causes."""

    def __init__(self, *, max_age: float = DEFAULT_MAX_AGE,
                 session_max_age: float = DEFAULT_SESSION_MAX_AGE,
                 max_messages: int = DEFAULT_MAX_MESSAGES) -> None:
        self.max_age = max_age
        self.session_max_age = session_max_age
        self.max_messages = max_messages
        # queue id -> {"a": account, "s": subuser, "k": key id, "m": Message-ID, "g": DKIM
        # domain, "t": first seen, "p": processed sent, "d": {recipient: [dsn, reply,
        # attempts]}}
        self.messages: dict[str, dict[str, Any]] = {}
        # "host/pid" of an smtpd -> {"l": login identity ("" none/not ours, None unknown yet),
        # "t": last seen, "q": [refusal events waiting for the login]}
        self.sessions: dict[str, dict[str, Any]] = {}
        self.counts: dict[str, int] = {"forgotten": 0, "evicted": 0, "unattributed": 0}
        self._dirty: set[str] = set()
        self.log_time = 0.0
        self._swept = 0  # the log-time minute of the last sweep

    # --- persistence ----------------------------------------------------------------------

    def changes(self) -> list[tuple[str, str | None]]:
        """(key, JSON or None for deleted) of every entry changed since the last call."""
        out: list[tuple[str, str | None]] = []
        if self._dirty:
            out.append((_CLOCK, json.dumps([self.log_time, self._swept])))
        self._dirty.discard(_CLOCK)
        for key in sorted(self._dirty):
            table = self.messages if key.startswith(_MESSAGE) else self.sessions
            value = table.get(key[2:])
            out.append((key, None if value is None else json.dumps(value, sort_keys=True)))
        self._dirty.clear()
        return out

    def load(self, items: Iterable[tuple[str, str]]) -> None:
        """Restore the entries ``changes()`` gave (any order)."""
        messages: list[tuple[str, dict[str, Any]]] = []
        for key, value in items:
            data = json.loads(value)
            if key == _CLOCK:
                self.log_time, self._swept = float(data[0]), int(data[1])
            elif key.startswith(_MESSAGE):
                messages.append((key[2:], data))
            elif key.startswith(_SESSION):
                self.sessions[key[2:]] = data
        # expiry walks the oldest first: keep first-seen order
        messages.sort(key=lambda item: float(item[1].get("t", 0.0)))
        self.messages.update(messages)

    def snapshot(self) -> dict[str, Any]:
        """Everything, as plain data (tests compare states with it)."""
        return {"messages": self.messages, "sessions": self.sessions}

    # --- bounds ---------------------------------------------------------------------------

    def expire(self, now: float | None = None) -> None:
        """Forget what is older than the limits, by log time. ``feed`` calls it when the log
        time enters a new minute: the lines alone decide when, so a replay forgets alike."""
        now = self.log_time if now is None else now
        limit = now - self.max_age
        while self.messages:
            qid, msg = next(iter(self.messages.items()))
            if msg["t"] >= limit and len(self.messages) <= self.max_messages:
                break
            self.counts["forgotten" if msg["t"] < limit else "evicted"] += 1
            self._forget(qid)
        session_limit = now - self.session_max_age
        for key in [k for k, s in self.sessions.items() if s["t"] < session_limit]:
            self.counts["unattributed"] += len(self.sessions[key]["q"])
            del self.sessions[key]
            self._dirty.add(_SESSION + key)

    def _forget(self, qid: str) -> None:
        if self.messages.pop(qid, None) is not None:
            self._dirty.add(_MESSAGE + qid)

    # --- events ---------------------------------------------------------------------------

    def _event(self, kind: str, pos: Position, n: int, when: float, msg: dict[str, Any] | None,
               qid: str | None, email: str | None) -> Event:
        return {
            "event": kind,
            "email": email,
            "timestamp": int(when),
            "event_id": event_id(pos, n),
            "account": msg["a"] if msg else None,
            "subuser": msg["s"] if msg else None,
            "key_id": msg["k"] if msg else None,
            "queue_id": qid,
            "message_id": msg.get("m") if msg else None,
            "dkim_domain": msg.get("g") if msg else None,
        }

    def feed(self, record: m.Record, pos: Position) -> list[Event]:
        """The events ``record`` (read at ``pos``) causes, in order."""
        header = record.header
        if header is None:
            return []
        if header.when > self.log_time:
            self.log_time = header.when
            if int(header.when // SWEEP_EVERY) > self._swept:
                self._swept = int(header.when // SWEEP_EVERY)
                self._dirty.add(_CLOCK)
                self.expire()
        kind = type(record)
        if kind is m.Delivery:
            assert isinstance(record, m.Delivery)
            return self._delivery(record, pos)
        if kind is m.SmtpdClient:
            assert isinstance(record, m.SmtpdClient)
            return self._client(record)
        if kind is m.MessageId:
            assert isinstance(record, m.MessageId)
            msg = self.messages.get(record.queue_id)
            if msg is not None and "m" not in msg:
                msg["m"] = record.message_id
                self._dirty.add(_MESSAGE + record.queue_id)
            return []
        if kind is m.DkimSigned:
            assert isinstance(record, m.DkimSigned)
            msg = self.messages.get(record.queue_id)
            # the last signature's: keyrelay's milter runs after the site's (postfixconf.py)
            if msg is not None and msg.get("g") != record.domain:
                msg["g"] = record.domain
                self._dirty.add(_MESSAGE + record.queue_id)
            return []
        if kind is m.QueueActive:
            assert isinstance(record, m.QueueActive)
            msg = self.messages.get(record.queue_id)
            if msg is None or msg["p"]:
                return []  # not ours, or back from the deferred queue
            msg["p"] = True
            self._dirty.add(_MESSAGE + record.queue_id)
            event = self._event("processed", pos, 0, header.when, msg, record.queue_id, None)
            event["sender"] = record.sender
            event["nrcpt"] = record.nrcpt
            return [event]
        if kind is m.Removed:
            assert isinstance(record, m.Removed)
            self._forget(record.queue_id)
            return []
        if kind is m.Expired:
            assert isinstance(record, m.Expired)
            return self._expired(record, pos)
        if kind is m.Reject:
            assert isinstance(record, m.Reject)
            return self._reject(record, pos)
        if kind is m.SmtpdConnect or kind is m.SmtpdDisconnect:
            key = f"{header.host}/{header.pid}"
            session = self.sessions.pop(key, None)
            if session is not None:
                self.counts["unattributed"] += len(session["q"])
                self._dirty.add(_SESSION + key)
            return []
        return []

    def _client(self, record: m.SmtpdClient) -> list[Event]:
        header = record.header
        key = f"{header.host}/{header.pid}"
        identity = record.sasl_username or ""
        who = _attribution(identity)
        session = self.sessions.get(key)
        if session is None:
            session = self.sessions[key] = {"l": None, "t": header.when, "q": []}
        pending: list[Event] = session["q"]
        session.update({"l": identity if who else "", "t": header.when, "q": []})
        self._dirty.add(_SESSION + key)
        if who is None:
            self.counts["unattributed"] += len(pending)
            return []
        account, subuser, key_id = who
        self.messages[record.queue_id] = {"a": account, "s": subuser, "k": key_id,
                                          "t": header.when, "p": False, "d": {}}
        self._dirty.add(_MESSAGE + record.queue_id)
        for event in pending:
            event.update({"account": account, "subuser": subuser, "key_id": key_id})
        if len(self.messages) > self.max_messages:
            self.expire()
        return pending

    def _delivery(self, record: m.Delivery, pos: Position) -> list[Event]:
        qid = record.queue_id
        msg = self.messages.get(qid)
        if msg is None:
            return []
        status = record.status
        rcpt = record.recipient
        deferred: dict[str, list[Any]] = msg["d"]
        if status == "sent":
            event = self._event("delivered", pos, 0, record.header.when, msg, qid, rcpt)
            event.update({"status": record.dsn, "response": record.reply,
                          "relay": record.relay})
        elif status in ("deferred", "SOFTBOUNCE"):
            attempts = (deferred[rcpt][2] if rcpt in deferred else 0) + 1
            deferred[rcpt] = [record.dsn, record.reply, attempts]
            event = self._event("deferred", pos, 0, record.header.when, msg, qid, rcpt)
            event.update({"status": record.dsn, "response": record.reply,
                          "attempt": attempts, "relay": record.relay})
            self._dirty.add(_MESSAGE + qid)
            return [event]
        elif status in ("bounced", "expired"):
            event = self._event("bounce", pos, 0, record.header.when, msg, qid, rcpt)
            event.update({"status": record.dsn, "reason": record.reply,
                          "type": "soft" if status == "expired" else _hard_or_soft(record.dsn),
                          "relay": record.relay})
        else:  # deliverable / undeliverable: an address probe, not a delivery
            return []
        if deferred.pop(rcpt, None) is not None:
            self._dirty.add(_MESSAGE + qid)
        return [event]

    def _expired(self, record: m.Expired, pos: Position) -> list[Event]:
        """qmgr gave up on the message: every recipient still deferred bounces (soft)."""
        qid = record.queue_id
        msg = self.messages.get(qid)
        if msg is None or not msg["d"]:
            return []
        events = []
        for n, (rcpt, (dsn, reply, _attempts)) in enumerate(sorted(msg["d"].items())):
            event = self._event("bounce", pos, n, record.header.when, msg, qid, rcpt)
            event.update({"status": dsn, "reason": f"expired: {reply}", "type": "soft"})
            events.append(event)
        msg["d"] = {}
        self._dirty.add(_MESSAGE + qid)
        return events

    def _reject(self, record: m.Reject, pos: Position) -> list[Event]:
        header = record.header
        qid = record.queue_id
        msg: dict[str, Any] | None = None
        if qid is not None:
            msg = self.messages.get(qid)
            if record.milter:  # cleanup dropped the queue file
                self._forget(qid)
            if msg is None:
                return []
        event = self._event("dropped", pos, 0, header.when, msg, qid, record.recipient)
        event.update({
            "reason": record.text,
            "status": record.dsn,
            "response": " ".join(p for p in (record.code, record.dsn, record.text) if p),
            "stage": record.stage,
        })
        if msg is not None:
            return [event]
        # NOQUEUE: the login of this smtpd process's session, if it is known yet
        key = f"{header.host}/{header.pid}"
        session = self.sessions.get(key)
        if session is None:
            session = self.sessions[key] = {"l": None, "t": header.when, "q": []}
        session["t"] = header.when
        self._dirty.add(_SESSION + key)
        login = session["l"]
        if login is None:
            if len(session["q"]) < MAX_PENDING:
                event["queue_id"] = None
                session["q"].append(event)
            else:
                self.counts["unattributed"] += 1
            return []
        who = _attribution(login)
        if who is None:
            return []
        event.update(dict(zip(("account", "subuser", "key_id"), who, strict=True)))
        return [event]


__all__ = ["Correlator", "Event", "Position", "event_id"]
