"""The catalogue of every reason keyrelay gives for an answer: one tag per cause.

A reason tag is what the decision log's ``reason=`` field carries and what tests assert. Each
tag has exactly one meaning; the answer that goes with it (SMTP code, enhanced status, the
kind of text) is listed in ``ANSWERS`` and, for admins, in docs/answers.md, which
tests/test_reasons.py keeps complete and in agreement with this table.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple


class Reason(StrEnum):
    # allowed
    OK = "ok"
    UNAUTHENTICATED = "unauthenticated"  # no login: Postfix's own relay rules decide
    MONITOR = "monitor"  # a refusal that monitor mode let pass (logged with would_be=)
    NOT_CHECKED = "not_checked"  # milter.check_sender off: a From refusal let pass, unsigned
    STAGE_NOT_CHECKED = "stage_not_checked"  # a policy request at a stage keyrelay ignores
    SITE_LOGIN = "site_login"  # the site's own login (coexistence): the site's rules decide
    # login (SMTP AUTH)
    TLS_REQUIRED = "tls_required"
    BAD_USERNAME = "bad_username"
    MALFORMED_KEY = "malformed_key"
    UNKNOWN_KEY = "unknown_key"  # no key with this id exists (a guess, or a mistyped key)
    WRONG_SECRET = "wrong_secret"  # noqa: S105 - a tag: the key id exists, the secret is wrong
    MALFORMED_EXCHANGE = "malformed_exchange"  # the SASL exchange itself was broken
    LEGACY_PASSWORD = "legacy_password"  # noqa: S105 - a tag: an imported login's old password
    WRONG_LEGACY_PASSWORD = "wrong_legacy_password"  # noqa: S105 - a tag, not a password
    LEGACY_PASSWORD_ENDED = "legacy_password_ended"  # noqa: S105 - the sunset has passed
    LEGACY_BUSY = "legacy_busy"  # every password-hash worker is busy
    RESERVED_USERNAME = "reserved_username"  # a site login shaped like a keyrelay login
    ADDRESS_LOCKED_OUT = "address_locked_out"
    KEY_LOCKED_OUT = "key_locked_out"
    # login and every message after it
    REVOKED_KEY = "revoked_key"
    EXPIRED_KEY = "expired_key"
    PRINCIPAL_INACTIVE = "principal_inactive"
    MISSING_SCOPE = "missing_scope"
    IP_NOT_ALLOWED = "ip_not_allowed"
    # messages of a logged-in session
    FOREIGN_LOGIN = "foreign_login"  # the session's login is not an API key login
    KEY_NOT_IN_COPY = "key_not_in_copy"  # the login's key is missing from this node's copy
    KEY_OF_OTHER_PRINCIPAL = "key_of_other_principal"  # the login names another key owner
    AUTH_REQUIRED = "auth_required"
    SENDER_NOT_OWNED = "sender_not_owned"
    HEADER_FROM_NOT_OWNED = "header_from_not_owned"
    RATE_LIMITED = "rate_limited"
    QUOTA_EXCEEDED = "quota_exceeded"  # a daily or monthly quota is used up
    TOO_MANY_RECIPIENTS = "too_many_recipients"
    SUPPRESSED = "suppressed"  # the account's suppression list holds the recipient
    PAUSED = "paused"  # the reputation guard paused the principal (bounce rate)
    # our own faults: always temporary
    ROUTING_ERROR = "routing_error"
    POOL_NOT_IN_POSTFIX = "pool_not_in_postfix"  # its transport is not in master.cf yet
    DIRECTORY_UNAVAILABLE = "directory_unavailable"
    COUNTERS_UNAVAILABLE = "counters_unavailable"  # the counter store (Redis) cannot answer
    SUPPRESSIONS_UNAVAILABLE = "suppressions_unavailable"  # the suppression list cannot answer
    REPUTATION_UNAVAILABLE = "reputation_unavailable"  # the pauses cannot be read
    DKIM_KEY_UNAVAILABLE = "dkim_key_unavailable"
    CLIENT_ADDRESS_MISSING = "client_address_missing"
    SITE_AUTH_UNAVAILABLE = "site_auth_unavailable"  # the site's Dovecot auth cannot answer
    INTERNAL_ERROR = "internal_error"


# Reasons that count as guessing towards a client address's lock-out (policyd.bruteforce):
# credentials that could be someone trying keys. A known key used in the wrong place (revoked,
# expired, refused address...) is answered clearly every time and locks no one out.
GUESSES = frozenset({Reason.BAD_USERNAME, Reason.MALFORMED_KEY, Reason.UNKNOWN_KEY,
                     Reason.WRONG_SECRET, Reason.WRONG_LEGACY_PASSWORD})
# ...and those that also count against the key id itself: a wrong secret for a key that exists
KEY_GUESSES = frozenset({Reason.WRONG_SECRET})


class Answer(NamedTuple):
    """What a reason answers: where, with which code and text, and when (docs/answers.md).

    ``texts`` are what the client reads, with ``<...>`` for the parts that vary
    (tests/test_decisions.py checks every refusal's text against them)."""

    where: str  # auth, policy, milter, socketmap (several joined by ", ")
    code: str  # SMTP code as the client sees it, e.g. "535", "-" for an allow
    status: str  # enhanced status code, "-" for none
    texts: tuple[str, ...]
    when: str


_ALLOWED = ("-",)
ANSWERS: dict[Reason, Answer] = {
    Reason.OK: Answer("auth, policy, milter", "235 / -", "-", _ALLOWED, "allowed"),
    Reason.UNAUTHENTICATED: Answer(
        "policy, milter", "-", "-", _ALLOWED,
        "no login on a non-submission port: Postfix's own restrictions decide"),
    Reason.MONITOR: Answer(
        "auth, policy, milter", "-", "-", _ALLOWED,
        "a refusal let pass in monitor mode; the log's would_be= holds the refusal and "
        "reason= its reason"),
    Reason.NOT_CHECKED: Answer(
        "milter", "-", "-", _ALLOWED,
        "milter.check_sender is off: a refusal let pass, the message unsigned; the log's "
        "would_be= holds the refusal"),
    Reason.STAGE_NOT_CHECKED: Answer(
        "policy", "-", "-", _ALLOWED,
        "a policy request at a stage keyrelay does not check (CONNECT, HELO...); not logged"),
    Reason.SITE_LOGIN: Answer(
        "auth, policy, milter", "235 / -", "-", _ALLOWED,
        "coexistence (auth.site_auth_socket, docs/coexistence.md): a login that is neither "
        "auth.username nor an imported legacy login is passed to the site's Dovecot and its "
        "answer, success or failure, goes back unchanged (logged with site_answer=OK or FAIL; "
        "a FAIL is Postfix's 535 5.7.8 with the site's text); the "
        "messages of such a login pass keyrelay's policy service and milter unchecked and "
        "unsigned: the site's own restrictions decide"),
    Reason.TLS_REQUIRED: Answer(
        "auth", "535", "5.7.8",
        ("log in over TLS (STARTTLS, or port 465): API keys are not accepted on a plaintext "
         "connection",), "a login on a connection without TLS (auth.require_tls); a legacy "
         "password login always"),
    Reason.BAD_USERNAME: Answer(
        "auth", "535", "5.7.8",
        ("log in with username '<username>' and an API key as the password",),
        "the username is not auth.username (`apikey`); counts as a guess"),
    Reason.MALFORMED_KEY: Answer(
        "auth", "535", "5.7.8",
        ("the password is not a keyrelay API key (kr.<id>.<secret>); account passwords are "
         "not accepted",), "the password is not shaped like a key; counts as a guess"),
    Reason.UNKNOWN_KEY: Answer(
        "auth", "535", "5.7.8", ("unknown API key; check that the whole key was copied",),
        "no key with this key id exists; counts as a guess"),
    Reason.WRONG_SECRET: Answer(
        "auth", "535", "5.7.8", ("unknown API key; check that the whole key was copied",),
        "the key id exists, the secret is wrong (the client reads the same as for "
        "unknown_key); counts as a guess against the address and the key id"),
    Reason.MALFORMED_EXCHANGE: Answer(
        "auth", "535", "5.7.8",
        ("mechanism <name> is not supported", "the initial response is not valid base64",
         "the response is not valid base64", "<what is wrong with the PLAIN or LOGIN data>"),
        "the SASL exchange itself was broken, before any credentials"),
    Reason.LEGACY_PASSWORD: Answer(
        "auth", "235 / -", "-", _ALLOWED,
        "an imported login's old username and password, before its sunset (the password "
        "bridge, docs/migration.md); logged with days_left=; the session's login is "
        "PRINCIPAL:legacy, under the same rules as a key's"),
    Reason.WRONG_LEGACY_PASSWORD: Answer(
        "auth", "535", "5.7.8", ("authentication failed: wrong username or password",),
        "the username is an imported legacy login, the password is wrong; counts as a guess"),
    Reason.LEGACY_PASSWORD_ENDED: Answer(
        "auth, policy, milter", "535 (auth), 550", "5.7.8 (auth), 5.7.1",
        ("password logins for <principal> ended on <date>; the application must use an API "
         "key (keyrelay key create <principal>)",
         "password logins for <principal> have ended; the application must use an API key "
         "(keyrelay key create <principal>)"),
        "a legacy login after its sunset, or one removed (`keyrelay legacy remove`), at login "
        "or since"),
    Reason.LEGACY_BUSY: Answer(
        "auth", "454", "4.7.0", ("password check temporarily busy; try again later",),
        "every worker that verifies legacy password hashes is busy and the queue is full: "
        "the connection is closed and Postfix answers 454 4.7.0"),
    Reason.RESERVED_USERNAME: Answer(
        "auth", "535", "5.7.8",
        ("the username '<username>' has the form of a keyrelay login (PRINCIPAL:KEYID) and "
         "cannot be a site login",),
        "coexistence: a username (or the site's answer's user=) that keyrelay's policy "
        "service and milter would read as one of its own logins is never passed on or "
        "let in"),
    Reason.ADDRESS_LOCKED_OUT: Answer(
        "auth", "535", "5.7.8",
        ("too many failed logins from <address>; try again in <n> <minute|minutes>",),
        "policyd.bruteforce.max_failures_per_address guesses from the client's address "
        "(IPv6: its /64) within the window"),
    Reason.KEY_LOCKED_OUT: Answer(
        "auth", "535", "5.7.8",
        ("too many failed logins for API key <id>; try again in <n> <minute|minutes>",),
        "policyd.bruteforce.max_failures_per_key wrong secrets for the key id; never from an "
        "address (IPv6: its /64) where the key logged in within policyd.bruteforce.trusted_for "
        "(docs/policyd.md, \"Brute-force protection\")"),
    Reason.REVOKED_KEY: Answer(
        "auth, policy, milter", "535 (auth), 550", "5.7.8 (auth), 5.7.1",
        ("API key <id> was revoked; create a new key",),
        "the key was revoked, before the login or since"),
    Reason.EXPIRED_KEY: Answer(
        "auth, policy, milter", "535 (auth), 550", "5.7.8 (auth), 5.7.1",
        ("API key <id> expired at <date> <time> UTC; create a new key",),
        "the key expired, before the login or since"),
    Reason.PRINCIPAL_INACTIVE: Answer(
        "auth, policy, milter", "535 (auth), 550", "5.7.8 (auth), 5.7.1",
        ("account <account> is suspended; contact your relay administrator",
         "subuser <subuser> is suspended; contact your relay administrator",
         "<principal> no longer exists"),
        "the account or subuser is suspended or was removed"),
    Reason.MISSING_SCOPE: Answer(
        "auth, policy, milter", "535 (auth), 550", "5.7.8 (auth), 5.7.1",
        ("API key <id> lacks the mail.send scope",), "the key lacks the mail.send scope"),
    Reason.IP_NOT_ALLOWED: Answer(
        "auth, policy, milter", "535 (auth), 554", "5.7.8 (auth), 5.7.1",
        ("client address <address> is not in the IP access list of account <account>",),
        "the client address is outside the account's IP access rules"),
    Reason.FOREIGN_LOGIN: Answer(
        "policy, milter", "550", "5.7.1",
        ("login '<login>' is not a keyrelay API key login; log in with an API key",),
        "the session logged in through another SASL service, not with an API key"),
    Reason.KEY_NOT_IN_COPY: Answer(
        "policy, milter", "451", "4.7.1",
        ("API key <id> is not in this server's copy of the directory yet (or was deleted "
         "since login); try again in a moment",),
        "the login's key is not in this node's copy of the directory (created a moment ago "
        "and not seen yet, or deleted since the login)"),
    Reason.KEY_OF_OTHER_PRINCIPAL: Answer(
        "policy, milter", "550", "5.7.1",
        ("API key <id> does not belong to <principal>; log in again",),
        "the session's login names a principal that does not own its key"),
    Reason.AUTH_REQUIRED: Answer(
        "policy", "530", "5.7.0", ("Authentication required",),
        "mail on a submission port without a login"),
    Reason.SENDER_NOT_OWNED: Answer(
        "policy", "550", "5.7.1",
        ("envelope sender: <address> is not a verified domain or sender of <principal>",
         "envelope sender: domain <domain> is not verified yet (state: <state>); publish its "
         "DNS records (keyrelay domain dns) and have it verified",
         "envelope sender: the null sender <> is not accepted from an application; use an "
         "address of your verified domain",
         "envelope sender: '<sender>' is not a valid address"),
        "the envelope sender is not the principal's (Postfix puts \"<rcpt>: Recipient "
        "address rejected:\" in front)"),
    Reason.HEADER_FROM_NOT_OWNED: Answer(
        "milter", "550", "5.7.1",
        ("From: <address> is not a verified domain or sender of <principal>",
         "From: domain <domain> is not verified yet (state: <state>); publish its DNS "
         "records (keyrelay domain dns) and have it verified",
         "From: '<value>' is not a valid address",
         "Sender: <any of the From: problems>",
         "the message has no From: header; add one with an address of your domain",
         "the message has <n> <From|Sender>: headers; RFC 5322 allows one",
         "the <From|Sender>: header <what is wrong with it>",
         "the <From|Sender>: header has no address",
         "the Sender: header must hold exactly one address",
         "the From: header has <n> addresses; add a Sender: header with your own address "
         "(RFC 5322 section 3.6.2)"),
        "the header From (or Sender) is missing, malformed, or not the principal's"),
    Reason.RATE_LIMITED: Answer(
        "policy", "451", "4.7.1",
        ("limit of <n> messages per <minute|hour> reached for <account NAME|ACCOUNT/SUBUSER> "
         "(<a message to N recipients counts N|this message has N recipients, more than the "
         "whole window's limit: send fewer recipients per message>); try again in <n> "
         "<seconds|minutes>",),
        "a sliding rate limit (per minute, per hour) of the subuser or of its whole account "
        "(keyrelay limits set, or the config's defaults) is reached, at DATA or "
        "END-OF-MESSAGE; counted in recipients (docs/policyd.md, \"What is counted\")"),
    Reason.QUOTA_EXCEEDED: Answer(
        "policy", "451", "4.7.1",
        ("<daily|monthly> quota of <n> messages for <account NAME|ACCOUNT/SUBUSER> reached; "
         "it resets at <date and time in counters.time_zone, e.g. 2026-12-05 00:00 UTC> (<a "
         "message to N recipients counts N|this message has N recipients, more than the whole "
         "window's limit: send fewer recipients per message>)",),
        "a calendar quota (keyrelay limits set --per-day/--per-month, or the config's "
        "defaults) of the subuser or of its whole account is used up, at DATA or "
        "END-OF-MESSAGE. Temporary, as SES answers its daily quota: the client keeps the "
        "message and retries; the day and month begin at midnight in counters.time_zone. "
        "Not X.2.2 (RFC 3463: the recipient's mailbox is full)"),
    Reason.TOO_MANY_RECIPIENTS: Answer(
        "policy", "452", "4.5.3",
        ("too many recipients: at most <n> per message for <principal>; send the others in "
         "another message",),
        "more recipients than the principal's recipients_per_message (RFC 5321 section "
        "4.5.3.1.10). At RCPT only that recipient is refused: the recipients accepted so far "
        "get the message, an SMTP client queues the others and sends them in another "
        "transaction (docs/policyd.md, \"Recipients per message\"); at DATA (the RCPTs were "
        "not checked) the whole message is deferred"),
    Reason.SUPPRESSED: Answer(
        "policy", "550", "5.7.1",
        ("recipient suppressed for account <account> since <date> (<hard bounce, added by an "
         "administrator or imported; then: the reason, at most 120 characters>); remove it "
         "with keyrelay suppression remove <account> <recipient>",),
        "at RCPT, for a keyrelay login whose envelope is allowed: the recipient is on its "
        "account's suppression list (a hard bounce, `keyrelay suppression add` or `import`; "
        "docs/suppressions.md). Only that recipient is refused, the others of the message "
        "get it (Postfix puts \"<rcpt>: Recipient address rejected:\" in front)"),
    Reason.PAUSED: Answer(
        "policy", "451", "4.7.1",
        ("sending paused for <principal> since <date and time, UTC>: bounce rate <rate> % "
         "over <window> is above <max> %; the account's admin resumes it with keyrelay "
         "<subuser|account> resume <principal>",),
        "at MAIL and RCPT of a keyrelay login: the reputation guard paused the principal, "
        "its bounce rate over reputation.window passed reputation.max_bounce_rate with at "
        "least reputation.min_volume delivered and bounced recipients (docs/reputation.md); "
        "until `keyrelay subuser resume` (or `account resume`). Temporary, so the mail "
        "waits in the client's queue"),
    Reason.ROUTING_ERROR: Answer(
        "policy", "451", "4.3.0",
        ("relay configuration error (IP pool '<pool>' is not defined); try again later",),
        "the principal's IP pool is not defined (our configuration's fault)"),
    Reason.POOL_NOT_IN_POSTFIX: Answer(
        "policy", "451", "4.3.0",
        ("relay configuration incomplete (IP pool '<pool>' is not set up in Postfix yet); "
         "try again later",),
        "the principal's IP pool has no transport in the master.cf of postfix.config_dir "
        "yet: the pool was added or assigned and `keyrelay postfix apply` has not run since. "
        "Answered at RCPT, before the message is accepted; policyd logs which pool and "
        "transport"),
    Reason.DIRECTORY_UNAVAILABLE: Answer(
        "auth, policy, milter, socketmap", "454 (auth), 451, TEMP (socketmap)",
        "4.7.0 (auth), 4.3.0",
        ("account directory temporarily unavailable; try again later",),
        "the directory cannot be read: file broken or missing, LDAP away or hung, the copy "
        "too old, the read-through budget spent. The auth service closes the connection: "
        "Postfix answers 454 4.7.0 Temporary authentication failure"),
    Reason.COUNTERS_UNAVAILABLE: Answer(
        "policy", "451", "4.3.0",
        ("message rate limits temporarily unavailable; try again later",),
        "the counter store cannot answer (counters.backend: redis away, hung or refusing us, "
        "with counters.on_unavailable: tempfail, the default): nothing is accepted unchecked "
        "(docs/cluster.md, \"Redis away\")"),
    Reason.SUPPRESSIONS_UNAVAILABLE: Answer(
        "policy", "451", "4.3.0",
        ("recipient suppression list temporarily unavailable; try again later",),
        "the suppression list cannot be read at RCPT (counters.backend: redis away, hung or "
        "refusing us; the SQLite file suppressions.path unreadable), and, with "
        "counters.on_unavailable local, this node's replica of the lists is missing, "
        "unreadable or older than suppressions.replica_max_age, or lists the recipient: a "
        "recipient is never accepted unchecked, nor refused for good by our outage "
        "(docs/suppressions.md, \"Faults\")"),
    Reason.REPUTATION_UNAVAILABLE: Answer(
        "policy", "451", "4.3.0",
        ("sending pauses temporarily unavailable; try again later",),
        "the reputation guard's pauses cannot be read at MAIL or RCPT (counters.backend: "
        "redis away, hung or refusing us; the SQLite file reputation.path unreadable) and "
        "this worker's last copy is older than 10 times reputation.refresh, or it has none: "
        "a message is never accepted unchecked (docs/reputation.md, \"Faults\")"),
    Reason.DKIM_KEY_UNAVAILABLE: Answer(
        "milter", "451", "4.3.0", ("DKIM signing temporarily unavailable; try again later",),
        "a DKIM private key cannot be read"),
    Reason.CLIENT_ADDRESS_MISSING: Answer(
        "milter", "451", "4.3.0", ("temporary relay failure; try again later",),
        "Postfix sent no {client_addr} (milter_protocol below 6, or macros not negotiated)"),
    Reason.SITE_AUTH_UNAVAILABLE: Answer(
        "auth", "454", "4.7.0", ("site authentication temporarily unavailable; try again "
                                 "later",),
        "coexistence: the site's Dovecot auth socket (auth.site_auth_socket) cannot be reached, "
        "broke the protocol, did not answer in time or answered that it could not decide "
        "(code=temp_fail: its passdb away): the connection is closed and Postfix answers "
        "454 4.7.0"),
    Reason.INTERNAL_ERROR: Answer(
        "auth, policy, milter, socketmap", "454 (auth), 451, TEMP (socketmap)",
        "4.7.0 (auth), 4.3.0", ("temporary relay failure; try again later",),
        "a bug of ours, logged with a traceback; the daemon keeps serving everyone else"),
}

# The texts of our own faults' temporary answers: one per reason, whichever service answers.
TEMPORARY_TEXTS: dict[Reason, str] = {
    reason: ANSWERS[reason].texts[0] for reason in (
        Reason.DIRECTORY_UNAVAILABLE, Reason.COUNTERS_UNAVAILABLE,
        Reason.SUPPRESSIONS_UNAVAILABLE, Reason.REPUTATION_UNAVAILABLE,
        Reason.DKIM_KEY_UNAVAILABLE,
        Reason.CLIENT_ADDRESS_MISSING, Reason.INTERNAL_ERROR, Reason.LEGACY_BUSY,
        Reason.SITE_AUTH_UNAVAILABLE)
}


class LookupResult(StrEnum):
    """The socketmap service's answers (the log's ``result=``); docs/answers.md."""

    OK = "ok"  # OK with the logins allowed to use the address
    NOTFOUND = "notfound"  # nobody may use the address
    UNKNOWN_MAP = "unknown_map"  # PERM: Postfix asked a map keyrelay does not serve
    UNAVAILABLE = "unavailable"  # TEMP: the directory cannot be read
    TOO_LONG = "too_long"  # TEMP: more logins than Postfix's socketmap reply holds
    INTERNAL_ERROR = "internal_error"  # TEMP: a bug of ours


LOOKUP_ANSWERS: dict[LookupResult, tuple[str, str]] = {
    LookupResult.OK: ("OK <login>,<login>...", "the logins that may use the address"),
    LookupResult.NOTFOUND: ("NOTFOUND", "nobody may use the address"),
    LookupResult.UNKNOWN_MAP: (
        "PERM unknown map '<name>'",
        "Postfix asked a map keyrelay does not serve (a typo in main.cf); Postfix answers "
        "451 4.3.5"),
    LookupResult.UNAVAILABLE: (
        "TEMP account directory temporarily unavailable",
        "the directory cannot be read; Postfix answers 451 4.3.0"),
    LookupResult.TOO_LONG: (
        "TEMP too many logins for one address",
        "more logins than Postfix's 100,000-byte socketmap reply holds; Postfix answers 451 "
        "4.3.0"),
    LookupResult.INTERNAL_ERROR: (
        "TEMP internal error in the relay's socketmap service",
        "a bug of ours, logged with a traceback; the connection is closed"),
}


def catalogue() -> str:
    """The tables of docs/answers.md, as ``python -m keyrelay.decisions`` prints
    them (tests/test_reasons.py keeps the document equal to this)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| reason | service | code | status | text the client reads | when |",
             "| --- | --- | --- | --- | --- | --- |"]
    for reason, answer in ANSWERS.items():
        texts = "<br>".join(f"`{cell(t)}`" if t != "-" else "-" for t in answer.texts)
        lines.append(f"| `{reason}` | {answer.where} | {answer.code} | {answer.status} | "
                     f"{texts} | {cell(answer.when)} |")
    lines += ["", "| result | socketmap reply | when |", "| --- | --- | --- |"]
    for result, (reply, when) in LOOKUP_ANSWERS.items():
        lines.append(f"| `{result}` | `{cell(reply)}` | {cell(when)} |")
    return "\n".join(lines) + "\n"
