"""An account's webhook (docs/webhooks.md) in the YAML directory file: its ``webhook``
mapping, written only when the account has one, so that a file without one reads as before
in any keyrelay (docs/directory.md, "The YAML file"). The signing secret is stored as it
signs, like a DKIM private key: an error names its key, never its value."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .model import Webhook

if TYPE_CHECKING:
    from .yamlfile import _Parser

FIELDS = ("url", "secret", "created", "updated")


def render(hook: Webhook, ts: Callable[[datetime | None], str | None]) -> dict[str, Any]:
    return {"url": hook.url, "secret": hook.secret, "created": ts(hook.created),
            "updated": ts(hook.updated)}


def parse(parser: _Parser, value: object, key: str) -> Webhook:
    """One account's ``webhook``: the URL's syntax is checked (its addresses are checked
    when it is set and at each delivery, never when the file is read)."""
    from ..webhooks import sign, target  # here: keyrelay.webhooks imports this package

    doc = parser.mapping(value, key, FIELDS)
    url = parser.string(doc.get("url"), f"{key}.url")
    try:
        target.parse_url(url)
    except UserError as exc:
        raise parser.fail(f"{key}.url", str(exc)) from None
    secret = doc.get("secret")
    problem = sign.secret_problem(secret)
    if problem is not None:  # said without its value
        raise parser.fail(f"{key}.secret", problem)
    assert isinstance(secret, str)
    return Webhook(url, secret, parser.time(doc.get("created"), f"{key}.created"),
                   parser.time(doc.get("updated"), f"{key}.updated"))
