"""``keyrelay migrate sendgrid``: a SendGrid account, saved as JSON answers of its v3 API, as
a declaration and a report (docs/migration.md, "Leaving SendGrid").

The folder holds, each file optional (at least one must be there):

- ``subusers.json``: ``GET /v3/subusers``, ``[{"username", "email", "disabled", "id"}]``;
- ``access_settings_whitelist.json``: ``GET /v3/access_settings/whitelist``,
  ``{"result": [{"ip", "id", ...}]}``;
- ``whitelabel_domains.json``: ``GET /v3/whitelabel/domains``, ``[{"domain", "subdomain",
  "username", "subusers": [{"username"}], "valid", ...}]``;
- ``verified_senders.json``: ``GET /v3/verified_senders``, ``{"results": [{"from_email",
  "verified", ...}]}``;
- ``api_keys.json``: ``GET /v3/api_keys`` with each key's ``scopes`` from ``GET
  /v3/api_keys/{id}``, ``{"result": [{"name", "api_key_id", "scopes"}]}``;

and ``subusers/USERNAME/`` the same calls made ``on-behalf-of`` a subuser (its verified
senders, API keys, allow-list). The parent account becomes the keyrelay account, each
subuser a subuser. Key secrets never leave SendGrid, so keys are listed to be created again.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .. import names
from ..decisions import SEND_SCOPE
from ..errors import UserError, one_line
from ..keys import holds_secret
from ..scopes import STATS_SCOPE
from .plan import DomainPlan, KeyPlan, MigrateError, Plan, SubuserPlan, subuser_names

FILES = ("subusers.json", "access_settings_whitelist.json", "whitelabel_domains.json",
         "verified_senders.json", "api_keys.json")
_PER_USER = ("access_settings_whitelist.json", "verified_senders.json", "api_keys.json")
# SendGrid scopes with a keyrelay equivalent (keyrelay/scopes.py); every other has none
_SCOPES = {"mail.send": SEND_SCOPE, "stats.read": STATS_SCOPE, "stats.global.read": STATS_SCOPE}
_MAX_BYTES = 64 * 1024 * 1024


class _File:
    """One JSON file; every fault a MigrateError naming the file, the place and the reason."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with open(path, "rb") as handle:
                raw = handle.read(_MAX_BYTES + 1)
        except OSError as exc:
            raise MigrateError(f"{path}: cannot read: {exc.strerror or exc}") from None
        if len(raw) > _MAX_BYTES:
            raise MigrateError(f"{path}: larger than {_MAX_BYTES // 1024 // 1024} MB; not a "
                               "saved API answer")
        try:
            self.data: Any = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise MigrateError(f"{path}: not UTF-8 text, not a saved API answer") from None
        except (ValueError, RecursionError) as exc:
            raise MigrateError(f"{path}: not valid JSON: {one_line(str(exc))}") from None

    def fail(self, where: str, reason: str) -> MigrateError:
        return MigrateError(f"{self.path}: {where}: {reason}")

    def items(self, envelope: str | None) -> list[dict[str, Any]]:
        """The answer's list of objects: the top level, or ``{envelope: [...]}``."""
        data = self.data
        where = "top level"
        if envelope is not None and isinstance(data, dict):
            if envelope not in data:
                raise self.fail("top level", f"expected a list or an object with "
                                f"\"{envelope}\" (the API's answer), got keys "
                                f"{', '.join(sorted(map(str, data))) or 'none'}")
            data, where = data[envelope], envelope
        if not isinstance(data, list):
            raise self.fail(where, f"expected a list, got {_kind(data)}")
        for i, item in enumerate(data):
            if not isinstance(item, dict):
                raise self.fail(f"{where}[{i}]", f"expected an object, got {_kind(item)}")
        return data

    def text(self, item: dict[str, Any], key: str, where: str) -> str:
        value = item.get(key)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"{where}.{key}", f"expected a string, got {_kind(value)}")
        return value.strip()

    def flag(self, item: dict[str, Any], key: str, where: str, default: bool) -> bool:
        value = item.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(f"{where}.{key}", f"expected true or false, got {_kind(value)}")
        return value


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true or false",
            type(None): "null"}.get(type(value), "a number")


def _load(folder: str, name: str) -> _File | None:
    path = os.path.join(folder, name)
    return _File(path) if os.path.exists(path) else None


def build(folder: str, account: str) -> Plan:
    if not os.path.isdir(folder):
        raise MigrateError(f"--from {folder}: not a folder (name the folder of the saved "
                           "SendGrid API answers)")
    if not any(os.path.exists(os.path.join(folder, f)) for f in FILES):
        raise MigrateError(f"--from {folder}: holds none of {', '.join(FILES)} "
                           "(docs/migration.md says how to save them)")
    plan = Plan(account=account, title=f"SendGrid export {folder}")
    missing = [f for f in FILES if not os.path.exists(os.path.join(folder, f))]
    if missing:
        plan.notes.append("Not in the export (nothing of these was imported): "
                          + ", ".join(f"`{m}`" for m in missing))
    subs: dict[str, bool] = {}  # SendGrid username -> disabled
    listing = _load(folder, "subusers.json")
    if listing is not None:
        for i, item in enumerate(listing.items(None)):
            username = listing.text(item, "username", f"[{i}]")
            if username in subs:
                plan.problems.append(f"subuser `{username}` is listed twice in "
                                     f"{listing.path}: imported once")
                continue
            subs[username] = listing.flag(item, "disabled", f"[{i}]", False)
    named = subuser_names(subs)
    for username, disabled in subs.items():
        plan.subusers[named[username]] = SubuserPlan(named[username], username,
                                                     "SendGrid subuser", suspended=disabled)
        plan.mapped.append((f"subuser `{username}`" + (" (disabled)" if disabled else ""),
                            f"subuser `{plan.pid(named[username])}`"
                            + (" (suspended)" if disabled else "")))
    extra = os.path.join(folder, "subusers")
    if os.path.isdir(extra):
        for entry in sorted(os.listdir(extra)):
            if entry not in subs:
                plan.problems.append(f"`subusers/{entry}/` is not a subuser that "
                                     "subusers.json lists: not read")
    _domains(folder, plan, named)
    for username, sub in [("", "")] + [(u, named[u]) for u in subs]:
        base = folder if not username else os.path.join(extra, username)
        who = "the parent account" if not username else f"subuser `{username}`"
        _senders(_load(base, "verified_senders.json"), plan, sub, who)
        _allow_list(_load(base, "access_settings_whitelist.json"), plan, sub, who)
        _keys(_load(base, "api_keys.json"), plan, sub, who)
    plan.sections.append(("Passwords and API keys", [
        "SendGrid never gives out a key's secret, so no key could be imported: create one "
        "keyrelay key per application (next steps) and change the application's host and "
        "key at its own pace. SMTP applications keep the username `apikey`. Applications "
        "that call SendGrid's HTTP API (`/v3/mail/send`) must switch to SMTP: keyrelay has no "
        "HTTP API.",
    ]))
    plan.next_steps.append(
        "Keep SendGrid's own DNS records (its CNAMEs, its `include:sendgrid.net` in SPF) until "
        "the last application has moved; keyrelay's DKIM selectors have other names, so both "
        "sign side by side meanwhile.")
    return plan


def _domains(folder: str, plan: Plan, named: dict[str, str]) -> None:
    found = _load(folder, "whitelabel_domains.json")
    if found is None:
        return
    for i, item in enumerate(found.items(None)):
        where = f"[{i}]"
        raw = found.text(item, "domain", where)
        try:
            domain = names.domain(raw)
        except UserError as exc:
            plan.problems.append(f"authenticated domain `{raw}`: {exc}; not imported")
            continue
        users = [item.get("username")] + [
            s.get("username") for s in item.get("subusers") or [] if isinstance(s, dict)]
        grants = [named[u] for u in users if isinstance(u, str) and u in named]
        plan.domains.setdefault(domain, DomainPlan(domain))
        for sub in grants:
            plan.grant(domain, sub)
        state = "valid" if item.get("valid") is True else "not valid in SendGrid"
        plan.mapped.append((f"authenticated domain `{domain}` ({state}, user "
                            f"`{item.get('username', '?')}`)",
                            f"domain `{domain}` (owner `{plan.account}`)"
                            + (f", granted to {', '.join(plan.pid(g) for g in grants)}"
                               if grants else "")))


def _senders(found: _File | None, plan: Plan, sub: str, who: str) -> None:
    if found is None:
        return
    for i, item in enumerate(found.items("results")):
        raw = found.text(item, "from_email", f"results[{i}]")
        if not found.flag(item, "verified", f"results[{i}]", False):
            plan.problems.append(f"verified sender `{raw}` of {who} is not verified in "
                                 "SendGrid: not imported")
            continue
        try:
            address = names.address(raw)
        except UserError as exc:
            plan.problems.append(f"verified sender of {who}: {exc}; not imported")
            continue
        plan.add_sender(sub, address)
        plan.mapped.append((f"verified sender `{address}` of {who}",
                            f"verified single sender of `{plan.pid(sub)}`"))


def _allow_list(found: _File | None, plan: Plan, sub: str, who: str) -> None:
    if found is None:
        return
    rules = []
    for i, item in enumerate(found.items("result")):
        raw = found.text(item, "ip", f"result[{i}]")
        try:
            rules.append(str(names.network(raw)))
        except UserError as exc:
            plan.problems.append(f"IP access rule of {who}: {exc}; not imported")
    if sub:
        if rules:
            plan.problems.append(
                f"IP access rules of {who} ({', '.join(rules)}): keyrelay's IP rules are set "
                f"on accounts and hold for all their subusers; not imported. If they may hold "
                f"for all of `{plan.account}`, `keyrelay ip allow {plan.account} CIDR` each")
        return
    plan.account_ip_allow = list(dict.fromkeys(rules))
    if plan.account_ip_allow:
        plan.notes.append(
            "The parent's IP Access Management allow-list becomes the IP access rules of "
            f"account `{plan.account}`: logins and mail of the account and every subuser from "
            "any other address are refused. SendGrid's list also guarded its web console: "
            "leave out the addresses of people's desks if no application sends from them")
    for rule in plan.account_ip_allow:
        plan.mapped.append((f"IP access rule `{rule}`",
                            f"IP access rule of account `{plan.account}` (all its subusers)"))


def _keys(found: _File | None, plan: Plan, sub: str, who: str) -> None:
    if found is None:
        return
    used: set[str] = set()
    for i, item in enumerate(found.items("result")):
        where = f"result[{i}]"
        name = found.text(item, "name", where)
        scopes = item.get("scopes")
        if scopes is None:
            plan.problems.append(
                f"API key `{_safe(name)}` of {who}: its scopes are not in the file "
                "(`GET /v3/api_keys` lists names only; add each key's `GET "
                "/v3/api_keys/{id}` answer); if it sends mail, create it with "
                f"`--scope {SEND_SCOPE}`")
            continue
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise found.fail(f"{where}.scopes", f"expected a list of strings, got "
                             f"{_kind(scopes)}")
        mapped = tuple(dict.fromkeys(_SCOPES[s] for s in scopes if s in _SCOPES))
        other = sorted(s for s in scopes if s not in _SCOPES)
        if other:
            shown = ", ".join(other[:8]) + (f" and {len(other) - 8} more" if len(other) > 8
                                            else "")
            plan.problems.append(f"API key `{_safe(name)}` of {who}: scopes with no keyrelay "
                                 f"equivalent (keyrelay has no web API): {shown}")
        if SEND_SCOPE not in mapped:
            plan.problems.append(f"API key `{_safe(name)}` of {who} cannot send mail "
                                 f"(no `{SEND_SCOPE}`): no keyrelay key is needed for it")
            continue
        key_name = _key_name(name, used)
        plan.keys.append(KeyPlan(sub, key_name, mapped,
                                 f"SendGrid key `{_safe(name)}` of {who}"))
        plan.mapped.append((f"API key `{_safe(name)}` of {who}: " + ", ".join(scopes[:4])
                            + (" ..." if len(scopes) > 4 else ""),
                            f"a new key `{key_name}` of `{plan.pid(sub)}` with "
                            + ", ".join(mapped) + " (to create)"))


def _safe(name: str) -> str:
    """A key's name as the report shows it: never something that looks like a key."""
    return "<a name that looks like a key>" if holds_secret(name) or name.startswith("SG.") \
        else one_line(name)[:64]


def _key_name(name: str, used: set[str]) -> str:
    base = _safe(name)
    if base.startswith("<") or not base.strip():
        base = "sendgrid-key"
    base = "-".join(base.split())[:58]
    key_name, n = base, 2
    while key_name in used:
        key_name, n = f"{base}-{n}", n + 1
    used.add(key_name)
    return key_name
