"""``keyrelay webhook``: an account's webhook, where its delivery events are POSTed, signed
(docs/webhooks.md). The signing secret is printed once, when it is made; nothing else shows
it (not ``show``, not ``account show``, not the audit log)."""

from __future__ import annotations

import argparse
from typing import Any

from .. import admin
from ..directory.model import Webhook
from ..errors import KeyrelayError
from ..output import dump_json, when
from ..webhooks import delivery, records, sign, target
from .core import Context, command, group


def webhook_json(account: str, hook: Webhook) -> dict[str, Any]:
    """What may be shown of a webhook: never its secret."""
    return {"account": account, "url": hook.url, "created": when(hook.created, ""),
            "updated": when(hook.updated, "")}


def webhook_set(ctx: Context, args: argparse.Namespace) -> None:
    admin.account(ctx.read(), args.account)  # an unknown account before any DNS
    target.check(args.url, ctx.config.webhooks.allow_private_targets)
    secret = None if args.keep_secret else sign.new_secret()
    with ctx.change("webhook.set", account=args.account, url=args.url,
                    secret="kept" if secret is None else "new") as data:
        made = records.set_webhook(data, args.account, args.url, ctx.now, secret)
    if ctx.json:
        shown = webhook_json(args.account, made)
        if secret is not None:
            shown["secret"] = secret
        dump_json(ctx.out, shown)
        return
    ctx.out.write(f"Webhook of {args.account}: deliveries go to {made.url}\n")
    if secret is None:
        ctx.out.write("The signing secret is the one it had.\n")
        return
    ctx.out.write(f"Signing secret (HMAC-SHA256 key of the {sign.HEADER} header; shown only "
                  "now, store it with the receiver):\n"
                  f"{secret}\n")


def webhook_show(ctx: Context, args: argparse.Namespace) -> None:
    hook = records.webhook_of(ctx.read(), args.account)
    info = webhook_json(args.account, hook)
    if ctx.json:
        dump_json(ctx.out, info)
        return
    for label in ("account", "url", "created", "updated"):
        ctx.out.write(f"{label + ':':<9} {info[label] or '-'}\n")
    ctx.out.write(f"{'secret:':<9} set (shown only by `keyrelay webhook set`)\n")


def webhook_remove(ctx: Context, args: argparse.Namespace) -> None:
    with ctx.change("webhook.remove", account=args.account) as data:
        old = records.remove_webhook(data, args.account)
    ctx.say(f"Removed the webhook of {args.account} ({old.url}): its events are no longer "
            "delivered; its secret no longer signs anything.")


def webhook_test(ctx: Context, args: argparse.Namespace) -> None:
    hook = records.webhook_of(ctx.read(), args.account)
    outcome = delivery.deliver(hook, [delivery.make_test_event(args.account, ctx.now)],
                              ctx.config.webhooks, ctx.now)
    if not outcome.delivered:
        raise WebhookTestFailed(outcome.reason)
    if ctx.json:
        dump_json(ctx.out, {"account": args.account, "url": hook.url,
                            "status": outcome.status, "address": outcome.address})
        return
    ctx.out.write(f"Test event delivered: {outcome.reason}\n")


class WebhookTestFailed(KeyrelayError):
    """``webhook test``: the receiver did not take the test event (the reason, one line)."""


def register(sub: Any) -> None:
    hook = group(sub, "webhook", "an account's webhook: where its delivery events are POSTed, "
                 "signed")
    put = command(hook, "set", webhook_set,
                  "set or replace an account's webhook URL; prints a new signing secret once "
                  "(--keep-secret: change only the URL)", json=True)
    put.add_argument("account", metavar="ACCOUNT")
    put.add_argument("--url", required=True, metavar="URL",
                     help="an http:// or https:// URL to a public address (see "
                          "webhooks.allow_private_targets)")
    put.add_argument("--keep-secret", action="store_true",
                     help="keep the signing secret the webhook has; only the URL changes")
    command(hook, "show", webhook_show, "show an account's webhook (never its secret)",
            json=True).add_argument("account", metavar="ACCOUNT")
    command(hook, "remove", webhook_remove, "remove an account's webhook").add_argument(
        "account", metavar="ACCOUNT")
    command(hook, "test", webhook_test,
            "send one signed test event to the account's webhook now; prints the HTTP status "
            "or why it failed", json=True).add_argument("account", metavar="ACCOUNT")


