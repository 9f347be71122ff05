"""The decision engine: every "may this happen?" answered once, without I/O.

Each ``decide_*`` function takes a directory snapshot, the engine settings and the facts of one
event (a login, an envelope, a header set, a rate count) and returns one frozen ``Verdict``
(docs/ARCHITECTURE.md, "Where each decision lives"). Front ends (policyd, milters) parse their
protocol, call the engine, render the verdict and log it; they never build a verdict
(tests/test_import_rules.py).

- ``reasons``: the catalogue of reason tags and the answers that go with them
  (docs/answers.md);
- ``verdict``: ``Verdict`` and its builders, ``temporary`` for every fault of ours;
- ``facts``: the settings and the facts the engine is asked about, the login identity;
- ``checks``: what every decision shares (key usable, principal active, IP rules, sender
  ownership, monitor mode, the session check of each message);
- ``login``: SMTP AUTH and the brute-force answers; ``envelope``: the policy service's
  envelope, routing and recipients-per-message decisions; ``quotas``: the windows a message
  is charged against (rates and quotas, account-wide and per subuser) and their answers;
  ``message``: the milter's header From and DKIM plan; ``recipients``: a recipient on the
  account's suppression list; ``paused``: a principal the reputation guard paused;
  ``lookups``: the socketmap's table of
  who may use an address.

Monitor mode (per account, directory-wide, or in the config) turns a *refusal* into an allow
that carries the verdict it replaced in ``monitored``, so front ends log what would have
happened. It never applies to credentials (wrong username, unknown/revoked/expired key: there
is no principal to trust) nor to temporary faults of ours.
"""

from .checks import (
    SEND_SCOPE,
    domain_may_send,
    key_usable,
    principal_active,
    sender_problem,
)
from .envelope import (
    STAGE_NOT_CHECKED,
    decide_envelope,
    decide_rate,
    limits_for,
    with_rate,
)
from .facts import (
    LEGACY_KEY_ID,
    EngineSettings,
    EnvelopeFacts,
    HeaderFacts,
    LockoutFacts,
    LoginFacts,
    RateFacts,
    format_identity,
    parse_identity,
)
from .login import (
    counts_against_key,
    counts_as_guess,
    decide_lockout,
    decide_login,
    legacy_login_for,
    locked_out,
    minutes,
    site_answer,
    site_login,
)
from .lookups import sender_logins
from .message import decide_headers
from .paused import PauseFacts, decide_paused
from .quotas import (
    SPANS,
    WINDOW_FIELDS,
    QuotaFacts,
    RateWindow,
    account_limits,
    decide_quota,
    reset_text,
    windows_for,
)
from .reasons import ANSWERS, LookupResult, Reason
from .recipients import RecipientFacts, account_of, decide_recipient
from .verdict import Action, SigningPlan, Verdict, temporary

__all__ = [
    "ANSWERS",
    "LEGACY_KEY_ID",
    "SEND_SCOPE",
    "SPANS",
    "STAGE_NOT_CHECKED",
    "WINDOW_FIELDS",
    "Action",
    "EngineSettings",
    "EnvelopeFacts",
    "HeaderFacts",
    "LockoutFacts",
    "LoginFacts",
    "LookupResult",
    "PauseFacts",
    "QuotaFacts",
    "RateFacts",
    "RateWindow",
    "Reason",
    "RecipientFacts",
    "SigningPlan",
    "Verdict",
    "account_limits",
    "account_of",
    "counts_against_key",
    "counts_as_guess",
    "decide_envelope",
    "decide_headers",
    "decide_lockout",
    "decide_login",
    "decide_paused",
    "decide_quota",
    "decide_rate",
    "decide_recipient",
    "domain_may_send",
    "format_identity",
    "key_usable",
    "legacy_login_for",
    "limits_for",
    "locked_out",
    "minutes",
    "parse_identity",
    "principal_active",
    "reset_text",
    "sender_logins",
    "sender_problem",
    "site_answer",
    "site_login",
    "temporary",
    "windows_for",
    "with_rate",
]
