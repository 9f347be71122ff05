"""``keyrelay migrate``: turn an existing set-up into a ``keyrelay sync`` declaration and a
Markdown report, touching nothing else (docs/migration.md).

- ``postfix``: a Postfix site's SASL logins (Cyrus ``sasldb2``, Dovecot ``passwd-file``), its
  ``smtpd_sender_login_maps`` and its ``permit_mynetworks`` clients (``migrate/postfix.py``,
  ``migrate/sasl.py``);
- ``sendgrid``: JSON files shaped like SendGrid v3 API answers (``migrate/sendgrid.py``).

Both build a ``Plan`` (``migrate/plan.py``): the account, its subusers with their senders,
the domains with their grants, and the report's lines. Nothing reaches the directory until
the admin runs ``keyrelay sync`` on the declaration. No plaintext password and no API key
is ever read into the declaration or the report; only ``migrate postfix --sunset`` puts each
login's password **hash** into the declaration (the password bridge).
"""

from __future__ import annotations

from .plan import MigrateError, Plan, write_outputs

__all__ = ["MigrateError", "Plan", "write_outputs"]
