"""``keyrelay migrate postfix``: a Postfix site's SASL logins, sender-login maps and
``permit_mynetworks`` clients as a declaration and a report (docs/migration.md).

Postfix is asked, never second-guessed: main.cf and master.cf through ``postconf -c DIR``,
each map of ``smtpd_sender_login_maps`` through ``postmap -c DIR -s`` (every type it can
list: hash, btree, lmdb, cdb, texthash, inline; ``proxy:`` maps are read directly,
``unionmap:`` members one by one). ``regexp:`` and ``pcre:`` maps hold patterns, not
addresses: the report names them and quotes their rules.

Postfix's lookup order is kept (postconf(5), smtpd_sender_login_maps): for ``user@domain``
the first map holding ``user@domain`` decides, else the first holding ``user``, else the
first holding ``@domain``. So a key a later map repeats is shadowed, and an address entry
takes precedence over its domain's ``@domain`` entry; a keyrelay domain grant cannot leave
an address out, so a login the address entry does not name gets no grant of that domain
(the report says so), and no login gets more than Postfix allowed it.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from datetime import date

from .. import names
from ..decisions import SEND_SCOPE
from ..errors import UserError, one_line
from ..postfixconf import split_list
from .plan import DomainPlan, KeyPlan, MigrateError, Plan, SubuserPlan, subuser_names
from .sasl import Login, read_passwd_file, read_sasldb

_SECONDS = 60
_PARAMS = ("smtpd_sender_login_maps", "mynetworks", "smtpd_sasl_local_domain", "myhostname",
           "recipient_delimiter", "smtpd_sasl_auth_enable")
_RESTRICTIONS = ("smtpd_client_restrictions", "smtpd_helo_restrictions",
                 "smtpd_sender_restrictions", "smtpd_relay_restrictions",
                 "smtpd_recipient_restrictions", "smtpd_data_restrictions",
                 "smtpd_end_of_data_restrictions")
_MISMATCH = ("reject_sender_login_mismatch", "reject_authenticated_sender_login_mismatch",
             "reject_known_sender_login_mismatch")
_LISTABLE = ("hash", "btree", "lmdb", "cdb", "dbm", "sdbm", "texthash", "inline")
_PATTERNS = ("regexp", "pcre")


@dataclass
class Site:
    config_dir: str
    params: dict[str, str]
    services: dict[str, dict[str, str]]  # master.cf "-o" overrides: service -> name -> value
    map_types: set[str]


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=_SECONDS,
                              check=False, errors="replace")
    except FileNotFoundError:
        raise MigrateError(f"{argv[0]} is not installed: keyrelay migrate postfix reads the "
                           "site through Postfix's own tools (Debian: apt-get install "
                           "postfix)") from None
    except subprocess.TimeoutExpired:
        raise MigrateError(f"{' '.join(argv)} did not finish within {_SECONDS} s") from None


def _fatal(done: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in done.stderr.splitlines() if "fatal:" in line] or \
        done.stderr.strip().splitlines() or [f"exit {done.returncode}"]
    return one_line(lines[-1].split("fatal: ", 1)[-1])


def _pairs(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        name, eq, value = line.partition(" = ")
        if eq:
            found[name.strip()] = value.strip()
        elif line.endswith(" ="):
            found[line[:-2].strip()] = ""
    return found


def read_site(config_dir: str) -> Site:
    if not os.path.isfile(os.path.join(config_dir, "main.cf")):
        raise MigrateError(f"--config-dir {config_dir}: no main.cf there (name the folder "
                           "of the site's main.cf, e.g. /etc/postfix)")
    done = _run(["postconf", "-c", config_dir, "-x", *_PARAMS, *_RESTRICTIONS])
    if done.returncode != 0:
        raise MigrateError(f"--config-dir {config_dir}: postconf: {_fatal(done)}")
    params = _pairs(done.stdout)
    services: dict[str, dict[str, str]] = {}
    master = _run(["postconf", "-c", config_dir, "-P", "-x"])
    if master.returncode == 0:
        for key, value in _pairs(master.stdout).items():
            service, _, name = key.rpartition("/")
            services.setdefault(service, {})[name] = value
    kinds = _run(["postconf", "-c", config_dir, "-m"])
    return Site(config_dir, params, services, set(kinds.stdout.split()))


# -- sender-login maps -----------------------------------------------------------------------
@dataclass
class MapEntry:
    table: str
    key: str
    owners: list[str]


def _members(table: str) -> list[str]:
    """The tables to list for one map of the parameter: a ``unionmap:{...}``'s members, a
    ``proxy:`` map's own table."""
    kind, _, name = table.partition(":")
    if kind == "unionmap" and name.startswith("{") and name.endswith("}"):
        return [m for t in split_list(name[1:-1]) for m in _members(t)]
    if kind == "proxy":
        return _members(name)
    return [table]


def _pattern_rules(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            rules = [line.strip() for line in handle
                     if line.strip() and not line.lstrip().startswith("#")]
    except OSError:
        return []
    return rules[:20]


def read_sender_maps(site: Site, plan: Plan) -> list[MapEntry]:
    """Every (map, key, owners) of smtpd_sender_login_maps, in Postfix's map order; what
    cannot be listed goes to the report."""
    entries: list[MapEntry] = []
    value = site.params.get("smtpd_sender_login_maps", "")
    if not value:
        plan.problems.append("`smtpd_sender_login_maps` is empty: the site binds no sender to "
                             "a login, so no sender could be imported; give each subuser its "
                             "domains and senders by hand (keyrelay domain grant, keyrelay "
                             "sender add)")
    for table in (m for t in split_list(value) for m in _members(t)):
        kind, colon, name = table.partition(":")
        if not colon:
            plan.problems.append(f"map `{table}` in smtpd_sender_login_maps is not TYPE:NAME; "
                                 "not read")
            continue
        if kind in _PATTERNS:
            rules = _pattern_rules(name)
            shown = "; ".join(f"`{r}`" for r in rules) if rules else "(file not readable)"
            plan.problems.append(
                f"map `{table}` holds patterns, which cannot be listed as addresses: its rules "
                f"were not imported ({shown}). What to do: write each address or `@domain` it "
                "is meant to match into a hash or texthash map and run the import again, or "
                "give the senders by hand (`keyrelay sender add`, `keyrelay domain grant`)")
            continue
        if kind not in site.map_types:
            plan.problems.append(f"map `{table}`: unknown map type `{kind}` (this Postfix "
                                 "knows: `postconf -m`); not read")
            continue
        if kind not in _LISTABLE:
            plan.problems.append(
                f"map `{table}`: a `{kind}` map cannot be listed (`postmap -s` does not "
                "support it); not read. What to do: export its entries into a texthash file "
                "(`KEY OWNER[, OWNER]` per line), name that file in a copy of main.cf's "
                "smtpd_sender_login_maps and run the import on the copy")
            continue
        done = _run(["postmap", "-c", site.config_dir, "-s", table])
        if done.returncode != 0:
            plan.problems.append(f"map `{table}`: cannot be read ({_fatal(done)}); not "
                                 "imported")
            continue
        for line in done.stdout.splitlines():
            key, _, rest = line.partition("\t")
            owners = [o for o in split_list(rest) if o]
            if key:
                entries.append(MapEntry(table, key.strip(), owners))
    return entries


# -- logins ----------------------------------------------------------------------------------
def gather_logins(site: Site, sasldb: str | None, passwd: str | None,
                  plan: Plan) -> list[Login]:
    """The SASL logins; with a sunset (``plan.sunset``), each with its password hash."""
    keep = plan.sunset is not None
    default_realm = (site.params.get("smtpd_sasl_local_domain")
                     or site.params.get("myhostname", ""))
    logins: list[Login] = []
    if sasldb:
        logins += read_sasldb(sasldb, default_realm, keep)
    if passwd:
        found, problems = read_passwd_file(passwd, keep)
        logins += found
        plan.problems += problems
    unique: dict[str, Login] = {}
    for login in logins:
        if login.name in unique:
            plan.problems.append(f"login `{login.name}` is in both {unique[login.name].source} "
                                 f"and {login.source}: imported once, as one subuser")
            continue
        unique[login.name] = login
    return list(unique.values())


# -- the plan --------------------------------------------------------------------------------
def _resolver(logins: list[Login]) -> dict[str, str]:
    """A sender map's owner name -> the login it means (exact names before aliases)."""
    found: dict[str, str] = {}
    for login in logins:
        for alias in login.aliases:
            found.setdefault(alias, login.name)
    for login in logins:
        found[login.name] = login.name
    return found


def build(config_dir: str, account: str, sasldb: str | None, passwd: str | None,
          sunset: date | None = None) -> Plan:
    """The import; with ``sunset``, each login keeps its password (as a hash) until then."""
    site = read_site(config_dir)
    plan = Plan(account=account, title=f"Postfix site {config_dir}", sunset=sunset)
    logins = gather_logins(site, sasldb, passwd, plan)
    entries = read_sender_maps(site, plan)
    if not sasldb and not passwd:
        plan.notes.append("No `--sasldb` and no `--dovecot-passwd` was given: the logins are "
                          "the owners the sender maps name.")
        seen = dict.fromkeys(o for e in entries for o in e.owners)
        logins = [Login(o, "named by smtpd_sender_login_maps") for o in seen]
    who = _resolver(logins)
    named = subuser_names(login.name for login in logins)
    for login in logins:
        plan.subusers[named[login.name]] = SubuserPlan(
            named[login.name], login.name, login.source, legacy_username=login.username,
            password_hash=login.password_hash)
        plan.mapped.append((f"login `{login.name}` ({login.source})",
                            f"subuser `{plan.pid(named[login.name])}`"))

    decided: dict[str, MapEntry] = {}  # Postfix: the first map holding a key decides
    for entry in entries:
        first = decided.get(entry.key.lower())
        if first is None:
            decided[entry.key.lower()] = entry
        elif first.owners != entry.owners:
            plan.problems.append(
                f"`{entry.key}` in `{entry.table}` is shadowed by `{first.table}` (Postfix uses "
                f"the first map that holds a key): {', '.join(entry.owners)} did not get it")

    addresses: dict[str, list[str]] = {}  # address -> logins
    domains: dict[str, list[str]] = {}  # domain -> logins
    for entry in decided.values():
        owners = []
        for owner in entry.owners:
            if "@" not in entry.key:  # never imported (_classify says why): no login needed
                owners.append(owner)
            elif owner in who:
                owners.append(who[owner])
            else:
                plan.problems.append(
                    f"`{entry.key}` in `{entry.table}` names login `{owner}`, which no SASL "
                    "source given holds: not imported for it")
        if len(owners) > 1 and "@" in entry.key.lstrip("@"):  # an address, not a domain
            plan.notes.append(f"`{entry.key}` is owned by {len(owners)} logins "
                              f"({', '.join(owners)}), so each of their subusers may send as "
                              "it, as Postfix allowed; check that this sharing is wanted")
        _classify(entry, owners, addresses, domains, plan)

    for domain, owners in sorted(domains.items()):
        for owner in owners:
            plan.domains.setdefault(domain, DomainPlan(domain))  # DNS is needed either way
            left_out = sorted(a for a, who_may in addresses.items()
                              if a.endswith("@" + domain) and owner not in who_may)
            if left_out:
                plan.problems.append(
                    f"`@{domain}` → `{owner}` not granted: Postfix gave {', '.join(left_out)} "
                    "to other logins only, and a keyrelay domain grant cannot leave an address "
                    f"out. If `{owner}` may send as those too, `keyrelay domain grant {domain} "
                    f"{plan.pid(named[owner])}`; else give it its addresses with `keyrelay "
                    "sender add`")
                continue
            plan.grant(domain, named[owner])
            plan.mapped.append((f"`@{domain}` → `{owner}`",
                                f"domain `{domain}` (owner `{account}`) granted to "
                                f"`{plan.pid(named[owner])}`"))
    for address, owners in sorted(addresses.items()):
        for owner in owners:
            plan.add_sender(named[owner], address)
            plan.mapped.append((f"`{address}` → `{owner}`",
                                f"verified single sender of `{plan.pid(named[owner])}`"))

    for login in logins:
        sub = plan.subusers[named[login.name]]
        if not sub.senders and not any(sub.name in d.grants for d in plan.domains.values()):
            plan.problems.append(f"login `{login.name}` has no sender-map entry (or none that "
                                 f"could be imported): its subuser `{plan.pid(sub.name)}` may "
                                 "send as no address until you give it one (`keyrelay sender "
                                 "add`, `keyrelay domain grant`)")
    _enforcement(site, plan)
    _mynetworks(site, plan)
    _passwords_and_keys(plan, logins, named)
    return plan


def _classify(entry: MapEntry, owners: list[str], addresses: dict[str, list[str]],
              domains: dict[str, list[str]], plan: Plan) -> None:
    key = entry.key
    if key.startswith("@"):
        try:
            domain = names.domain(key[1:])
        except UserError as exc:
            plan.problems.append(f"`{key}` in `{entry.table}`: {exc}; not imported")
            return
        domains.setdefault(domain, [])
        domains[domain] += [o for o in owners if o not in domains[domain]]
    elif "@" not in key:
        plan.problems.append(
            f"`{key}` in `{entry.table}` lets {', '.join(owners) or 'its owners'} send as "
            f"`{key}@` any domain (and it takes precedence over `@domain` entries); keyrelay "
            "has no such rule: not imported. Give the addresses it is meant for with "
            "`keyrelay sender add`")
    else:
        try:
            address = names.address(key)
        except UserError as exc:
            plan.problems.append(f"`{key}` in `{entry.table}`: {exc}; not imported")
            return
        addresses.setdefault(address, [])
        addresses[address] += [o for o in owners if o not in addresses[address]]


def _enforcement(site: Site, plan: Plan) -> None:
    lists = [(p, site.params.get(p, "")) for p in _RESTRICTIONS]
    lists += [(f"{svc} -o {p}", v) for svc, over in site.services.items()
              for p, v in over.items() if p in _RESTRICTIONS]
    used = {word for _, value in lists for word in split_list(value)}
    if not used & {"reject_sender_login_mismatch", "reject_authenticated_sender_login_mismatch"}:
        found = "only reject_known_sender_login_mismatch" if set(_MISMATCH) & used else \
            "no reject_sender_login_mismatch"
        plan.notes.append(
            f"The site has {found} in its restrictions: its logins could send as addresses "
            "the sender maps do not list. keyrelay lets each subuser send only as what was "
            "imported: turn monitor mode on first (next steps) to see what else they use")
    delimiter = site.params.get("recipient_delimiter", "")
    if delimiter:
        plan.notes.append(
            f"recipient_delimiter is `{delimiter}`: Postfix also let the owner of "
            f"`user@domain` send as `user{delimiter[0]}anything@domain`; keyrelay's single "
            "senders are exact addresses, so add any such address the applications use")


def _mynetworks(site: Site, plan: Plan) -> None:
    lists = [(p, site.params.get(p, "")) for p in _RESTRICTIONS]
    lists += [(f"master.cf `{svc}` -o {p}", v) for svc, over in sorted(site.services.items())
              for p, v in over.items() if p in _RESTRICTIONS]
    where = [name for name, value in lists if "permit_mynetworks" in split_list(value)]
    body: list[str] = []
    if not where:
        body.append("No restriction list has `permit_mynetworks`: no client sends without a "
                    "login.")
        plan.sections.append(("Clients that send without a login (mynetworks)", body))
        return
    body.append("`permit_mynetworks` is in " + ", ".join(f"`{w}`" for w in where) + ": these "
                "clients of `mynetworks` send without a login. keyrelay has no such path: "
                "each application on them must get a subuser (or use one above) and an API "
                "key before it moves.")
    body += ["", "| mynetworks entry | what to do |", "| --- | --- |"]
    for item in split_list(site.params.get("mynetworks", "")):
        if item.startswith("!"):
            body.append(f"| `{item}` | excluded by the site: nothing to do |")
            continue
        if item.startswith("/") or re.match(r"^[a-z][a-z0-9_]*:", item):
            body.append(f"| `{item}` | a file or table of networks: list its clients and give "
                        "each application a key |")
            continue
        net = item.replace("[", "").replace("]", "")
        try:
            parsed = names.network(net)
        except UserError:
            body.append(f"| `{item}` | not a network keyrelay reads: check it by hand |")
            continue
        what = ("this host's own programs (cron, `sendmail`): point them at this relay with "
                "a key, or leave them on the local Postfix" if parsed.is_loopback else
                "give each application there a key (`keyrelay key create`)")
        body.append(f"| `{parsed}` | {what} |")
    plan.sections.append(("Clients that send without a login (mynetworks)", body))


def _passwords_and_keys(plan: Plan, logins: list[Login], named: dict[str, str]) -> None:
    if plan.sunset is None:
        body = [f"{len(logins)} login(s) were found. Their old passwords are **not** imported "
                "(no `--sunset`), and no password was read into this report or the "
                "declaration: each application needs an API key (below) and logs in with "
                "username `apikey`."]
    else:
        bridged = [login for login in logins if login.password_hash]
        body = [f"{len(logins)} login(s) were found; {len(bridged)} keep their old username "
                f"and password until the sunset, **{plan.sunset}** (the password bridge, "
                "docs/migration.md): the declaration holds each one's password **hash** "
                "(a sasldb2's plaintext secrets hashed with Argon2id, a passwd-file's hashes "
                "as they are), never a password. Over TLS only, under the same rules as a "
                "key; after the sunset they are refused, so give each application an API key "
                "(below) before then, and watch `keyrelay legacy list`.", ""]
        body += [f"- `{plan.pid(named[login.name])}`: username `{login.username}`"
                 for login in bridged]
        without = [login.name for login in logins if not login.password_hash]
        if without:
            body += ["", "Without a password login (no usable hash; API keys only): "
                     + ", ".join(f"`{name}`" for name in without) + "."]
    plan.sections.append(("Passwords", body))
    for login in logins:
        plan.keys.append(KeyPlan(named[login.name], named[login.name], (SEND_SCOPE,),
                                 f"replaces the login `{login.name}`"))
