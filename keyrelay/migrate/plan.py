"""What an import found, and the two files it writes from it: the ``keyrelay sync``
declaration (keyrelay/declare.py reads it) and the Markdown migration report.

A ``Plan`` holds one account, its subusers (one per login or SendGrid subuser) with their
single senders, the domains (owned by the account, granted to subusers), the API keys to
create, and the report's lines: what was mapped to what, what could not be and why. Both
files are written atomically, and neither is written unless both can be (``write_outputs``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date

import yaml

from .. import names
from ..errors import KeyrelayError, UserError


class MigrateError(KeyrelayError):
    """An input the import cannot use at all (one line: the file and the reason)."""


@dataclass
class SubuserPlan:
    name: str
    origin: str  # the login or SendGrid username it comes from, as the site wrote it
    source: str  # where it was found, e.g. "sasldb2 /etc/sasldb2"
    senders: list[str] = field(default_factory=list)
    suspended: bool = False
    legacy_username: str | None = None  # the password bridge (``--sunset``): the old login
    password_hash: str | None = field(default=None, repr=False)  # {SCHEME}hash, never plain


@dataclass
class DomainPlan:
    name: str
    grants: list[str] = field(default_factory=list)  # subuser names


@dataclass
class KeyPlan:
    principal: str  # a subuser name, or "" for the account itself
    name: str
    scopes: tuple[str, ...]
    why: str  # what it replaces, for the report


@dataclass
class Plan:
    account: str
    title: str  # "Postfix site /etc/postfix", "SendGrid export ./sg"
    subusers: dict[str, SubuserPlan] = field(default_factory=dict)
    domains: dict[str, DomainPlan] = field(default_factory=dict)
    account_senders: list[str] = field(default_factory=list)
    account_ip_allow: list[str] | None = None
    account_suspended: bool = False
    sunset: date | None = None  # the password bridge's end for every login given a hash
    keys: list[KeyPlan] = field(default_factory=list)
    mapped: list[tuple[str, str]] = field(default_factory=list)  # (what the site had, became)
    problems: list[str] = field(default_factory=list)  # could not be mapped, and why
    notes: list[str] = field(default_factory=list)  # read before syncing
    sections: list[tuple[str, list[str]]] = field(default_factory=list)  # source-specific
    next_steps: list[str] = field(default_factory=list)  # source-specific, before the keys

    def pid(self, subuser: str) -> str:
        return f"{self.account}/{subuser}" if subuser else self.account

    def grant(self, domain: str, subuser: str) -> None:
        dom = self.domains.setdefault(domain, DomainPlan(domain))
        if subuser and subuser not in dom.grants:
            dom.grants.append(subuser)

    def add_sender(self, subuser: str, address: str) -> None:
        senders = self.subusers[subuser].senders if subuser else self.account_senders
        if address not in senders:
            senders.append(address)


# -- names -----------------------------------------------------------------------------------
_NOT_NAME = re.compile(r"[^a-z0-9]+")
_MAX = 32


def _slug(text: str) -> str:
    return _NOT_NAME.sub("-", text.lower()).strip("-")


def _hashed(slug: str, origin: str) -> str:
    digest = hashlib.sha256(origin.encode("utf-8", "surrogateescape")).hexdigest()[:6]
    stem = slug[: _MAX - 7].strip("-") or "login"
    return f"{stem}-{digest}"


def subuser_names(origins: Iterable[str]) -> dict[str, str]:
    """A readable, valid subuser name (keyrelay/names.py: 1-32 of a-z, 0-9 and inner hyphens)
    for each login or username, unique among them and the same on every run:

    - the part before ``@``, made lowercase, each run of other characters a hyphen
      (``App_1@example.com`` becomes ``app-1``);
    - the whole login so made (``app-1-example-com``) where two logins share that part;
    - cut to 25 characters plus ``-`` and 6 hex digits of its SHA-256 where still clashing
      or too long (or where nothing readable is left).
    """
    origins = list(dict.fromkeys(origins))
    chosen: dict[str, str] = {}
    short = {o: _slug(o.partition("@")[0]) for o in origins}
    full = {o: _slug(o) for o in origins}
    for origin in origins:
        name = short[origin]
        if not name or sum(1 for v in short.values() if v == name) > 1:
            name = full[origin]
        chosen[origin] = name
    for origin in origins:
        name = chosen[origin]
        clash = sum(1 for v in chosen.values() if v == name) > 1
        if not name or clash or len(name) > _MAX:
            chosen[origin] = _hashed(name, origin)
    for origin, name in chosen.items():
        try:
            names.account_name(name)
        except UserError:  # cannot happen with the rules above; never write an invalid name
            chosen[origin] = _hashed("login", origin)
    return chosen


# -- the declaration -------------------------------------------------------------------------
def declaration(plan: Plan) -> dict[str, object]:
    """The ``keyrelay sync`` document (docs/cli.md, "Declared directory"). Lists are given,
    so they are exact: a second sync of the same file changes nothing."""
    account: dict[str, object] = {}
    if plan.account_suspended:
        account["status"] = "suspended"
    if plan.account_ip_allow is not None:
        account["ip_allow"] = list(plan.account_ip_allow)
    if plan.account_senders:  # an account that exists keeps the senders it has otherwise
        account["senders"] = sorted(plan.account_senders)
    subusers: dict[str, object] = {}
    for name in sorted(plan.subusers):
        sub = plan.subusers[name]
        body: dict[str, object] = {}
        if sub.suspended:
            body["status"] = "suspended"
        body["senders"] = sorted(sub.senders)
        if plan.sunset is not None and sub.password_hash and sub.legacy_username:
            body["legacy_login"] = {"username": sub.legacy_username,
                                    "password_hash": sub.password_hash,
                                    "sunset": plan.sunset.isoformat()}
        subusers[name] = body
    account["subusers"] = subusers
    doc: dict[str, object] = {"accounts": {plan.account: account}}
    if plan.domains:
        doc["domains"] = {
            d.name: {"owner": plan.account, "grants": [plan.pid(g) for g in sorted(d.grants)]}
            for d in sorted(plan.domains.values(), key=lambda d: d.name)
        }
    return doc


def render_declaration(plan: Plan, command: str) -> str:
    header = (f"# keyrelay sync declaration written by `{command}`\n"
              f"# from {plan.title}; read the report beside it, then run:\n"
              "#   keyrelay sync --dry-run THIS-FILE && keyrelay sync THIS-FILE\n"
              "# It holds no password and no API key: create keys with `keyrelay key create`.\n")
    if any(sub.password_hash for sub in plan.subusers.values()) and plan.sunset is not None:
        header = header.replace(
            "# It holds no password and no API key",
            f"# It holds the old logins' password HASHES (legacy_login, until {plan.sunset}; "
            "never a\n# plaintext password): keep it as private as the directory. No API key")
    return header + yaml.safe_dump(declaration(plan), sort_keys=False, default_flow_style=False,
                                   allow_unicode=False)


# -- the report ------------------------------------------------------------------------------
def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_report(plan: Plan, command: str, out: str) -> str:
    lines = [f"# Migration report: {plan.title}", "",
             f"Written by `{command}`. The declaration is `{out}`: nothing has changed in the "
             "keyrelay directory yet; `keyrelay sync` makes it so.", ""]
    senders = sum(len(s.senders) for s in plan.subusers.values()) + len(plan.account_senders)
    lines += ["## Summary", "",
              f"- account `{plan.account}` with {len(plan.subusers)} subuser(s)",
              f"- {len(plan.domains)} domain(s), {senders} verified single sender(s)",
              f"- {len(plan.problems)} item(s) could not be mapped (below)", ""]
    notes = list(plan.notes)
    if plan.domains:
        notes.append(f"Each domain is owned by the account `{plan.account}` (keyrelay grants "
                     "only an account's own domains to its subusers): a key of the account "
                     "itself could send as all of them, so give the applications subuser keys")
    if notes:
        lines += ["## Read before syncing", "", *(f"- {n}" for n in notes), ""]
    lines += ["## What was mapped to what", ""]
    if plan.mapped:
        lines += ["| found | became |", "| --- | --- |"]
        lines += [f"| {_cell(a)} | {_cell(b)} |" for a, b in plan.mapped]
    else:
        lines.append("Nothing.")
    lines += ["", "## Subusers", ""]
    if plan.subusers:
        lines += ["| subuser | from | senders (single addresses) | domains granted |",
                  "| --- | --- | --- | --- |"]
        for name in sorted(plan.subusers):
            sub = plan.subusers[name]
            doms = sorted(d.name for d in plan.domains.values() if name in d.grants)
            lines.append(f"| `{plan.pid(name)}`{' (suspended)' if sub.suspended else ''} | "
                         f"{_cell(sub.origin)} ({_cell(sub.source)}) | "
                         f"{', '.join(sorted(sub.senders)) or '-'} | {', '.join(doms) or '-'} |")
    else:
        lines.append("None.")
    lines += ["", "## Could not be mapped", ""]
    lines += [f"- {p}" for p in plan.problems] if plan.problems else ["Nothing: every entry "
                                                                      "was mapped."]
    for title, body in plan.sections:
        lines += ["", f"## {title}", "", *body]
    lines += ["", "## Next steps, in this order", ""]
    steps = [f"Review this report and the declaration; then `keyrelay sync --dry-run {out}` "
             f"and `keyrelay sync {out}` (it creates the account, subusers, senders and domains, "
             "and DKIM keys for each new domain).",
             f"`keyrelay monitor on {plan.account}`: until you turn it off, refusals of this "
             "account are logged and the mail passes, so a sender the import missed shows in "
             "the log instead of bouncing."]
    if plan.domains:
        steps.append("DNS, for each domain: `keyrelay domain dns DOMAIN`, publish the records "
                     "(DKIM; SPF and DMARC as docs/domains.md says), then `keyrelay domain "
                     "verify DOMAIN`: " + ", ".join(f"`{d}`" for d in sorted(plan.domains)) + ".")
    steps += plan.next_steps
    if plan.keys:
        steps.append("Create one API key per application, then move the applications one at "
                     "a time: new host (this relay, port 587 with STARTTLS or 465), username "
                     "`apikey`, the key as password:\n" + "\n".join(
                         f"   - `keyrelay key create {plan.pid(k.principal)} --name {k.name}"
                         + "".join(f" --scope {s}" for s in k.scopes) + f"`: {_cell(k.why)}"
                         for k in plan.keys))
    steps.append("Watch the log for `verdict=monitor-allow` lines of the moved applications "
                 "(each names the refusal monitor mode let pass); when there are none, "
                 f"`keyrelay monitor off {plan.account}`.")
    lines += [f"{i}. {s}" for i, s in enumerate(steps, 1)]
    return "\n".join(lines) + "\n"


# -- writing ---------------------------------------------------------------------------------
def report_path(out: str) -> str:
    """The report beside the declaration: ``migrated.yaml`` -> ``migrated.report.md``."""
    stem, ext = os.path.splitext(out)
    return (stem if ext in (".yaml", ".yml") else out) + ".report.md"


def write_outputs(files: list[tuple[str, str]], force: bool) -> None:
    """Write each (path, text) atomically: each is made whole in a temporary file beside it,
    then put in place. An existing file is refused (before anything is written) unless
    ``force``; when one cannot be put in place, the ones already placed are taken back."""
    if not force:
        for path, _ in files:
            if os.path.lexists(path):
                raise MigrateError(f"{path} exists: name a new file, or run with --force to "
                                   "replace it")
    temps: list[tuple[str, str]] = []
    placed: list[str] = []
    try:
        for path, text in files:
            folder = os.path.dirname(os.path.abspath(path))
            try:
                fd, tmp = tempfile.mkstemp(prefix=".keyrelay-migrate.", suffix=".tmp",
                                           dir=folder)
            except OSError as exc:
                raise MigrateError(f"cannot write {path}: cannot create a file in {folder}: "
                                   f"{exc.strerror or exc}") from None
            temps.append((tmp, path))
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o640)
        for tmp, path in temps:
            if force:
                os.replace(tmp, path)
            else:
                _link(tmp, path)
            placed.append(path)
    except BaseException:
        for tmp, _ in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        for path in placed:
            if not force:  # ours: made by this run
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        raise


def _link(tmp: str, path: str) -> None:
    """Put ``tmp`` in place as ``path``, never over a file made there meanwhile."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise MigrateError(f"{path} exists: name a new file, or run with --force to replace "
                           "it") from None
    except OSError:
        if os.path.lexists(path):
            raise MigrateError(f"{path} exists: name a new file, or run with --force to "
                               "replace it") from None
        os.rename(tmp, path)
        return
    os.unlink(tmp)
