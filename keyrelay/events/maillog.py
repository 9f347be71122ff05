"""Postfix log lines as typed records (docs/events.md, "The parser").

One call per log line, so the hot path is one anchored regular expression for the syslog
prefix, a dispatch on the daemon's name and on the first bytes of the text, and one more
expression for the few shapes keyrelay reads. Everything else becomes ``Unknown`` (ignored);
a line that looks like a delivery line but cannot be read becomes ``Malformed`` (counted and
skipped by the caller). Nothing here raises on any input.

The texts follow Postfix 3.7's format strings: ``smtpd.c`` (``client=``, ``sasl_method=``,
``sasl_username=``), ``smtpd_check.c`` ``log_whatsup`` (``reject:`` lines), ``cleanup``
(``message-id=``, ``milter-reject:``, the ``milter-header-info:`` of keyrelay's DKIM table),
``qmgr`` (``from=<>, size=, nrcpt=``, ``removed``, ``status=expired, returned to sender``),
``log_adhoc.c`` (every delivery agent's ``to=<>, [orig_to=<>,] relay=, [conn_use=,] delay=,
delays=, dsn=, status= (reply)``) and ``bounce`` (``sender non-delivery notification:``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo

# --- the syslog prefix -------------------------------------------------------------------
# Traditional syslog (``Dec  5 00:30:09``) and Postfix's own maillog_file (postlogd writes
# ``Dec 05 00:30:09``), or RFC 3339 (rsyslog's high-precision format, Debian 12's default).
# ``prog`` is ``<syslog_name>/<daemon>``; a master.cf service run with ``-o syslog_name=...``
# (keyrelay's IP pools: ``postfix/kr-pool-x``) adds path components, so the daemon is the last
# component and the syslog name is everything before it.
_HEADER = re.compile(
    r"(?:(?P<mon>[A-Z][a-z]{2}) (?P<day>[ 0-3]?\d) (?P<hms>\d\d:\d\d:\d\d)"
    r"|(?P<iso>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:?\d\d)?))"
    r" (?P<host>\S+) (?P<prog>[^\s\[\]:]+)\[(?P<pid>\d{1,10})\]: "
)
_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}

# A queue id: short (hex) or long (enable_long_queue_ids: base 52 with a "z" in it).
_QID = r"[0-9A-Za-z]{5,24}"
_QUEUE_PREFIX = re.compile(r"(" + _QID + r"): ")
# "name[addr]" with an optional ":port" (smtpd_client_port_logging).
_CLIENT = r"[^\[\]\s]*\[[^\]\s]*\](?::\d+)?"
_DSN = r"[245]\.\d{1,3}\.\d{1,3}"

_SMTPD_CLIENT = re.compile(
    r"client=(?P<client>" + _CLIENT + r")"
    r"(?:, sasl_method=(?P<method>[^,\s]*))?(?:, sasl_username=(?P<user>[^,]*))?"
    r"(?:, sasl_sender=[^,\s]*)?(?:, orig_queue_id=\S+|, orig_client=\S+)*\Z"
)
_MESSAGE_ID = re.compile(r"message-id=(?P<mid>\S*)\Z")
_QMGR_FROM = re.compile(
    r"from=<(?P<sender>.*)>, size=(?P<size>\d{1,15}), nrcpt=(?P<nrcpt>\d{1,9}) \(queue active\)\Z")
_QMGR_EXPIRED = re.compile(r"from=<(?P<sender>.*)>, status=expired, returned to sender\Z")
_DELIVERY = re.compile(
    r"to=<(?P<to>.*?)>,(?: orig_to=<(?P<orig>.*?)>,)? relay=(?P<relay>[^,\s]*),"
    r"(?: conn_use=\d+,)? delay=(?P<delay>\d+(?:\.\d+)?),"
    r" delays=(?P<delays>[\d.]+/[\d.]+/[\d.]+/[\d.]+),"
    r" dsn=(?P<dsn>\d\.\d{1,3}\.\d{1,3}), status=(?P<status>[A-Za-z]+) \((?P<reply>.*)\)\Z"
)
# smtpd_check.c log_whatsup: "QID|NOQUEUE: reject: WHERE from CLIENT: TEXT;" then the optional
# " from=<S>", " to=<R>", " proto=P", " helo=<H>". TEXT is "CODE [DSN ]rest" for smtpd;
# cleanup's milter-reject has no three-digit code, only "DSN rest".
_WHATSUP = re.compile(
    r"(?P<stage>[A-Z][A-Z-]*) from (?P<client>" + _CLIENT + r"): "
    r"(?:(?P<code>[245]\d\d) )?(?:(?P<dsn>" + _DSN + r") )?(?P<text>.*?);"
    r"(?: from=<(?P<sender>.*?)>)?(?: to=<(?P<rcpt>.*?)>)?(?: proto=(?P<proto>\S+))?"
    r"(?: helo=<(?P<helo>.*)>)?\Z"
)
# cleanup's "QID: milter-header-info: header DKIM-Signature: <60 characters> from CLIENT;
# from=<S> to=<R> proto=P helo=<H>: keyrelay-dkim d=DOMAIN": the INFO action of the
# milter_header_checks table `postfix apply` adds (keyrelay/postfixdkimlog.py DKIM_HEADER_CHECKS).
# The text after the last ": " is the table's; anchored at the end, so a helo or an address
# holding the same words cannot stand in for it.
_DKIM_INFO = re.compile(r": keyrelay-dkim d=(?P<domain>[^\s;]*)\Z")
_DOMAIN = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                     r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?\Z")
_BOUNCE_NOTICE = re.compile(
    r"sender (?:non-delivery|delay|delivery status) notification: (?P<new>" + _QID + r")\Z")


@dataclass(frozen=True, slots=True)
class Header:
    """The syslog prefix: when, which host, which Postfix program and process."""

    when: float  # seconds since the epoch
    host: str
    syslog_name: str  # "postfix", "postfix-out", "postfix/kr-pool-x"
    daemon: str  # "smtpd", "smtp", "qmgr", ...
    pid: int


@dataclass(frozen=True, slots=True)
class Unknown:
    """Any line keyrelay does not read (not Postfix, or a shape of no interest)."""

    header: Header | None


@dataclass(frozen=True, slots=True)
class Malformed:
    """A line that names a shape keyrelay reads (a delivery, a reject) but does not fit it."""

    header: Header
    shape: str
    text: str


@dataclass(frozen=True, slots=True)
class SmtpdConnect:
    """``connect from NAME[ADDR]``: a new session of this smtpd process."""

    header: Header


@dataclass(frozen=True, slots=True)
class SmtpdDisconnect:
    """``disconnect from NAME[ADDR] ...``: the session of this smtpd process ended."""

    header: Header


@dataclass(frozen=True, slots=True)
class SmtpdClient:
    """``QID: client=NAME[ADDR], sasl_method=M, sasl_username=U``: a queue file was opened."""

    header: Header
    queue_id: str
    client: str
    sasl_method: str | None
    sasl_username: str | None


@dataclass(frozen=True, slots=True)
class MessageId:
    """cleanup's ``QID: message-id=<...>``."""

    header: Header
    queue_id: str
    message_id: str


@dataclass(frozen=True, slots=True)
class DkimSigned:
    """cleanup's ``QID: milter-header-info: header DKIM-Signature: ...: keyrelay-dkim
    d=DOMAIN``: a milter added a DKIM signature of DOMAIN (logged through keyrelay's
    milter_header_checks table, docs/events.md "Attribution")."""

    header: Header
    queue_id: str
    domain: str


@dataclass(frozen=True, slots=True)
class QueueActive:
    """qmgr's ``QID: from=<S>, size=N, nrcpt=N (queue active)``."""

    header: Header
    queue_id: str
    sender: str
    size: int
    nrcpt: int


@dataclass(frozen=True, slots=True)
class Expired:
    """qmgr's ``QID: from=<S>, status=expired, returned to sender``."""

    header: Header
    queue_id: str
    sender: str


@dataclass(frozen=True, slots=True)
class Removed:
    """qmgr's ``QID: removed``: the queue file is gone."""

    header: Header
    queue_id: str


@dataclass(frozen=True, slots=True)
class Delivery:
    """A delivery agent's ``QID: to=<R>, relay=..., dsn=X.Y.Z, status=S (REPLY)``."""

    header: Header
    queue_id: str
    recipient: str
    orig_recipient: str | None
    relay: str
    delay: float
    delays: str
    dsn: str
    status: str  # sent, deferred, bounced, expired, SOFTBOUNCE, deliverable, undeliverable
    reply: str


@dataclass(frozen=True, slots=True)
class Reject:
    """smtpd's ``NOQUEUE|QID: reject: ...`` or cleanup's ``QID: milter-reject: ...``."""

    header: Header
    queue_id: str | None  # None for NOQUEUE
    milter: bool
    stage: str  # RCPT, DATA, END-OF-MESSAGE, MAIL, ...
    client: str
    code: str | None
    dsn: str | None
    text: str
    sender: str | None
    recipient: str | None


@dataclass(frozen=True, slots=True)
class BounceNotice:
    """bounce's ``QID: sender non-delivery notification: NEWQID``."""

    header: Header
    queue_id: str
    notice_queue_id: str


Record = (Unknown | Malformed | SmtpdConnect | SmtpdDisconnect | SmtpdClient | MessageId
          | DkimSigned | QueueActive | Expired | Removed | Delivery | Reject | BounceNotice)

# Postfix's delivery agents: every one logs through log_adhoc.c. A master.cf service of its own
# (keyrelay's "kr-pool-x" transports are "smtp" processes) keeps the program name.
DELIVERY_DAEMONS = frozenset({"smtp", "lmtp", "local", "virtual", "error", "retry",
                              "discard", "pipe", "qmgr", "bounce", "defer", "trace"})
_UNKNOWN_NO_HEADER = Unknown(None)


class Parser:
    """Parses lines; ``syslog_names`` (when given) keeps only those Postfix instances.

    ``tz`` and ``now`` turn the year-less traditional timestamp into a time: the local zone
    of the host that wrote the log, and the year that puts the line at most a day ahead of
    ``now`` (a log read across New Year). RFC 3339 lines carry both.
    """

    def __init__(self, *, syslog_names: frozenset[str] | None = None,
                 tz: tzinfo | None = None, now: Callable[[], float] = time.time) -> None:
        self.syslog_names = syslog_names
        self.tz = tz
        self.now = now
        self._stamps: dict[str, float] = {}

    def _ours(self, syslog_name: str) -> bool:
        if self.syslog_names is None:
            return True
        return (syslog_name in self.syslog_names
                or syslog_name.partition("/")[0] in self.syslog_names)

    def _when(self, mon: str | None, day: str | None, hms: str | None,
              iso: str | None) -> float | None:
        key = iso or f"{mon} {day} {hms}"
        cached = self._stamps.get(key)
        if cached is not None:
            return cached
        try:
            if iso is not None:
                stamp = datetime.fromisoformat(iso)
                if stamp.tzinfo is None:
                    stamp = stamp.astimezone(self.tz) if self.tz else stamp.astimezone()
                value = stamp.timestamp()
            else:
                assert mon is not None and day is not None and hms is not None
                value = self._traditional(_MONTHS[mon], int(day), hms)
        except (ValueError, KeyError, OverflowError):
            return None
        if len(self._stamps) > 4096:  # a few distinct seconds per batch; never grows
            self._stamps.clear()
        self._stamps[key] = value
        return value

    def _traditional(self, month: int, day: int, hms: str) -> float:
        hour, minute, second = (int(part) for part in hms.split(":"))
        now = self.now()
        zone = self.tz or datetime.now().astimezone().tzinfo
        year = datetime.fromtimestamp(now, zone).year
        stamp = datetime(year, month, day, hour, minute, second, tzinfo=zone)
        if stamp.timestamp() > now + 86400:
            stamp = stamp.replace(year=year - 1)
        return stamp.timestamp()

    def header(self, line: str) -> tuple[Header, str] | None:
        """The prefix of a Postfix line of ours and the text after it, or None."""
        m = _HEADER.match(line)
        if m is None:
            return None
        syslog_name, slash, daemon = m.group("prog").rpartition("/")
        if not slash or not self._ours(syslog_name):
            return None
        when = self._when(m.group("mon"), m.group("day"), m.group("hms"), m.group("iso"))
        if when is None:
            return None
        text = line[m.end():].rstrip("\r\n")
        return Header(when, m.group("host"), syslog_name, daemon, int(m.group("pid"))), text

    def parse(self, line: str) -> Record:
        """One log line (with or without its LF) as a record; never raises."""
        found = self.header(line)
        if found is None:
            return _UNKNOWN_NO_HEADER
        hdr, text = found
        try:
            return self._body(hdr, text)
        except (ValueError, OverflowError):  # an absurd number in a matched field
            return Malformed(hdr, "number", text)

    def _body(self, hdr: Header, text: str) -> Record:
        daemon = hdr.daemon
        if text.startswith("NOQUEUE: "):
            if daemon == "smtpd" and text.startswith("NOQUEUE: reject: "):
                return _reject(hdr, None, False, text[17:], text)
            return Unknown(hdr)
        qm = _QUEUE_PREFIX.match(text)
        if qm is None:
            if daemon == "smtpd":
                if text.startswith("connect from "):
                    return SmtpdConnect(hdr)
                if text.startswith("disconnect from "):
                    return SmtpdDisconnect(hdr)
            return Unknown(hdr)
        qid = qm.group(1)
        rest = text[qm.end():]
        if rest.startswith("to=<"):
            if daemon not in DELIVERY_DAEMONS:
                return Unknown(hdr)
            m = _DELIVERY.match(rest)
            if m is None:
                return Malformed(hdr, "delivery", text)
            return Delivery(hdr, qid, m.group("to"), m.group("orig"), m.group("relay"),
                            float(m.group("delay")), m.group("delays"), m.group("dsn"),
                            m.group("status"), m.group("reply"))
        if daemon == "qmgr":
            if rest == "removed":
                return Removed(hdr, qid)
            if rest.startswith("from=<"):
                m = _QMGR_FROM.match(rest)
                if m is not None:
                    return QueueActive(hdr, qid, m.group("sender"), int(m.group("size")),
                                       int(m.group("nrcpt")))
                m = _QMGR_EXPIRED.match(rest)
                if m is not None:
                    return Expired(hdr, qid, m.group("sender"))
                return Malformed(hdr, "qmgr", text)
            return Unknown(hdr)
        if daemon == "smtpd":
            if rest.startswith("client="):
                m = _SMTPD_CLIENT.match(rest)
                if m is None:
                    return Malformed(hdr, "client", text)
                return SmtpdClient(hdr, qid, m.group("client"), m.group("method"),
                                   m.group("user"))
            if rest.startswith("reject: "):
                return _reject(hdr, qid, False, rest[8:], text)
            return Unknown(hdr)
        if daemon == "cleanup":
            if rest.startswith("message-id="):
                m = _MESSAGE_ID.match(rest)
                if m is None:
                    return Malformed(hdr, "message-id", text)
                return MessageId(hdr, qid, m.group("mid"))
            if rest.startswith("milter-reject: "):
                return _reject(hdr, qid, True, rest[15:], text)
            if rest.startswith("milter-header-info: header DKIM-Signature: "):
                m = _DKIM_INFO.search(rest)
                if m is None:
                    return Unknown(hdr)  # a site's own INFO rule for DKIM-Signature headers
                if _DOMAIN.match(m.group("domain")) is None:
                    return Malformed(hdr, "dkim", text)
                return DkimSigned(hdr, qid, m.group("domain").rstrip(".").lower())
            return Unknown(hdr)
        if daemon == "bounce" and rest.startswith("sender "):
            m = _BOUNCE_NOTICE.match(rest)
            if m is not None:
                return BounceNotice(hdr, qid, m.group("new"))
        return Unknown(hdr)


def _reject(hdr: Header, qid: str | None, milter: bool, rest: str, text: str) -> Record:
    m = _WHATSUP.match(rest)
    if m is None:
        return Malformed(hdr, "milter-reject" if milter else "reject", text)
    return Reject(hdr, qid, milter, m.group("stage"), m.group("client"), m.group("code"),
                  m.group("dsn"), m.group("text"), m.group("sender"), m.group("rcpt"))


def utc_parser(now: float) -> Parser:
    """A parser with a fixed clock in UTC: the golden tests and the bench."""
    return Parser(tz=UTC, now=lambda: now)


__all__ = [
    "DELIVERY_DAEMONS", "BounceNotice", "Delivery", "DkimSigned", "Expired", "Header", "Malformed",
    "MessageId", "Parser", "QueueActive", "Record", "Reject", "Removed", "SmtpdClient",
    "SmtpdConnect", "SmtpdDisconnect", "Unknown", "utc_parser",
]
