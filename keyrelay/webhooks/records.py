"""An account's webhook in the directory: set, replaced, removed (the admin operations of
``keyrelay webhook``; docs/webhooks.md). Each works inside a directory transaction and
raises a one-line ``UserError`` before anything is written."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from .. import admin
from ..directory.model import DirectoryData, Webhook
from ..errors import NotFound, UserError
from . import sign
from .target import parse_url


def webhook_of(data: DirectoryData, account: str) -> Webhook:
    """The account's webhook; NotFound when it has none."""
    found = admin.account(data, account).webhook
    if found is None:
        raise NotFound(f"account {account} has no webhook (set one: keyrelay webhook set "
                       f"{account} --url URL)")
    return found


def set_webhook(data: DirectoryData, account: str, url: str, now: datetime,
                secret: str | None) -> Webhook:
    """Give ``account`` a webhook to ``url`` signed with ``secret``, or keep the secret it
    has (``secret`` None). Only the URL's syntax is checked here; the caller checks its
    addresses (``target.check``) before the transaction: that needs DNS."""
    acc = admin.account(data, account)
    parsed = parse_url(url)
    old = acc.webhook
    if secret is None:
        if old is None:
            raise UserError(f"account {account} has no webhook yet, so no secret to keep: "
                            "leave out --keep-secret")
        secret = old.secret
    elif (problem := sign.secret_problem(secret)) is not None:
        raise UserError(f"webhook secret: {problem}")
    made = Webhook(parsed.text, secret, old.created if old else now, now)
    data.accounts[account] = replace(acc, webhook=made)
    return made


def remove_webhook(data: DirectoryData, account: str) -> Webhook:
    old = webhook_of(data, account)
    data.accounts[account] = replace(data.accounts[account], webhook=None)
    return old
