"""The Postfix settings keyrelay needs, and how they are merged into an existing Postfix.

This module is the one source of truth for keyrelay's main.cf and master.cf settings:
``keyrelay postfix show`` prints them, ``keyrelay postfix apply`` writes them with ``postconf``
into an existing configuration directory, the Ansible role runs that command, and
``postfix-conf/main.cf.keyrelay`` and ``postfix-conf/master.cf.keyrelay`` are generated from
it (``python -m keyrelay.postfixconf``; a test keeps them in sync).

What keyrelay owns:

- main.cf parameters named ``keyrelay_*``: the policy service element, the SASL path, the
  milter endpoint, and per role (``smtp`` for port 25, ``submission`` for 587, 2525 and 465)
  the merged restriction and milter lists. Services refer to them as ``$keyrelay_...``, so
  values with spaces never have to go through ``postconf -P``, which refuses them.
- the ``-o`` settings it needs on the smtpd services of config ``postfix``; every other
  ``-o`` setting of an existing service is kept, and services that do not exist yet are
  created (chroot ``n``, so sockets outside the queue directory stay reachable).
- ``milter_header_checks``: keyrelay's table that logs each signature's DKIM domain, after
  the site's own tables (keyrelay/postfixdkimlog.py);
- one ``smtp`` transport per IP pool (``routing.transport_prefix`` + pool name) with
  ``smtp_bind_address``, ``smtp_bind_address6``, ``smtp_helo_name`` and
  ``smtp_bind_address_enforce = yes``; transports under that prefix whose pool is gone are
  removed.

Merging: a restriction list keeps what the site had, with keyrelay's policy check moved to the
front (it must see the request before ``permit_sasl_authenticated`` ends the list) and
``permit_sasl_authenticated`` added after it when missing; a milter list keeps the site's
milters and appends keyrelay's (it signs, so it must run last). A second run finds nothing to
change. ``postfix check`` runs before the edits (a site whose own configuration fails it is
told so, and nothing is changed) and after them; when it fails then, main.cf and master.cf
are put back as they were. The TLS files Postfix will offer are checked first
(postfixtls.py), and before them a site's own SASL set-up on the services keyrelay takes
over (postfixsasl.py: refused, or replaced with ``--replace-site-sasl``).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import postfixdkimlog
from .config import Config
from .directory.model import Pool
from .durations import format_duration
from .postfixdkimlog import DKIM_HEADER_CHECKS as DKIM_HEADER_CHECKS
from .postfixdkimlog import DKIM_HEADER_CHECKS_REF as DKIM_HEADER_CHECKS_REF
from .postfixdkimlog import merge_header_checks as merge_header_checks
from .postfixrun import POSTCONF as POSTCONF  # re-exported: the demo and tests use these
from .postfixrun import POSTFIX as POSTFIX
from .postfixrun import PostfixConfError as PostfixConfError
from .postfixrun import check, postconf
from .postfixrun import reload as reload
from .postfixrun import run_postfix as run_postfix
from .postfixtls import TLS_SETTINGS, CertificateError, check_tls_files

SMTP, SUBMISSION = "smtp", "submission"
PERMIT_AUTHENTICATED = "permit_sasl_authenticated"
POLICY_UNAVAILABLE = "451 4.3.0 keyrelay policy service unavailable, try again later"
_LIST_SPLIT = re.compile(r"[\s,]+")
RESTRICTION_LISTS = ("smtpd_client_restrictions", "smtpd_helo_restrictions",
                     "smtpd_sender_restrictions", "smtpd_recipient_restrictions",
                     "smtpd_relay_restrictions", "smtpd_data_restrictions",
                     "smtpd_end_of_data_restrictions", "smtpd_etrn_restrictions")
# what a site's own SASL set-up is made of (keyrelay/postfixsasl.py checks it)
SASL_PARAMETERS = ("smtpd_sasl_auth_enable", "smtpd_sasl_type", "smtpd_sasl_path",
                   "smtpd_sender_login_maps", "smtpd_restriction_classes", *RESTRICTION_LISTS)


@dataclass(frozen=True)
class ServiceSpec:
    """One master.cf service: the entry used to create it, and keyrelay's ``-o`` settings."""

    name: str
    type: str  # inet | unix
    command: str  # smtpd | smtp
    settings: dict[str, str]  # -o name=value; values without whitespace
    remove: tuple[str, ...] = ()  # -o settings that must not be there

    @property
    def key(self) -> str:
        return f"{self.name}/{self.type}"

    def entry(self) -> str:
        """The master.cf line for a new service (private/unpriv/chroot/wakeup/maxproc)."""
        private = "n" if self.type == "inet" else "-"
        return f"{self.name} {self.type} {private} - n - - {self.command}"


@dataclass(frozen=True)
class Plan:
    """Everything keyrelay wants in main.cf and master.cf, merged with what is there."""

    main: dict[str, str]
    services: list[ServiceSpec]
    drop_services: list[str]  # name/type of pool transports whose pool is gone
    notes: list[str]  # things the admin should know (printed, not errors)


@dataclass
class Current:
    """What a Postfix configuration directory holds now, as ``postconf`` reports it."""

    main: dict[str, str] = field(default_factory=dict)  # explicit main.cf settings (-n)
    effective: dict[str, str] = field(default_factory=dict)  # built-ins we merge from (-h)
    services: dict[str, dict[str, str]] = field(default_factory=dict)  # name/type -> fields
    settings: dict[str, dict[str, str]] = field(default_factory=dict)  # name/type -> -o
    as_written: set[str] = field(default_factory=set)  # main values taken from main.cf itself

    @property
    def queue_directory(self) -> str:
        return self.effective.get("queue_directory", "/var/spool/postfix")


@dataclass(frozen=True)
class Change:
    """One edit, described for the admin, with the ``postconf`` arguments that make it."""

    text: str
    args: tuple[str, ...]


# -- lists -----------------------------------------------------------------------------------
def split_list(value: str) -> list[str]:
    """A Postfix list (commas and/or whitespace) into items; ``{ ... }`` groups stay whole."""
    items: list[str] = []
    depth, start = 0, None
    for i, char in enumerate(value):
        if char == "{":
            if depth == 0 and start is None:
                start = i
            depth += 1
        elif char == "}":
            depth = max(depth - 1, 0)
        elif depth == 0 and (char.isspace() or char == ","):
            if start is not None:
                items.append(value[start:i])
                start = None
            continue
        if start is None:
            start = i
    if start is not None:
        items.append(value[start:])
    return [_normal(item) for item in items if item]


def _normal(item: str) -> str:
    """One list item with its inner whitespace collapsed, so equal items compare equal."""
    return " ".join(item.split())


def join_list(items: Iterable[str]) -> str:
    return ", ".join(items)


def merge_restrictions(base: Sequence[str], policy: str, *, add_permit: bool = True) -> list[str]:
    """``base`` with ``policy`` first and, when ``add_permit``, ``permit_sasl_authenticated``
    somewhere after it."""
    items = [policy] + [item for item in base if item != policy]
    if add_permit and PERMIT_AUTHENTICATED not in items:
        items.insert(1, PERMIT_AUTHENTICATED)
    return items


def merge_milters(base: Sequence[str], milter: str) -> list[str]:
    """``base`` with ``milter`` last: it DKIM-signs, so nothing may change the message after."""
    return [item for item in base if item != milter] + [milter]


# -- endpoints -------------------------------------------------------------------------------
def queue_relative(path: str, queue_directory: str) -> str:
    """``path`` relative to Postfix's queue directory when inside it, else unchanged.

    Postfix daemons run with the queue directory as working directory (and, chrooted, as
    root), so a relative name reaches the socket whether the service is chrooted or not.
    """
    queue = os.path.normpath(queue_directory)
    normal = os.path.normpath(path)
    if normal.startswith(queue + os.sep):
        return normal[len(queue) + 1:]
    return path


def postfix_endpoint(listen: str, queue_directory: str) -> str:
    """A keyrelay ``listen`` value in Postfix's ``unix:`` / ``inet:host:port`` notation."""
    if listen.startswith("unix:"):
        return "unix:" + queue_relative(listen[5:], queue_directory)
    milter = re.fullmatch(r"(inet6?):(\d+)@(\S+)", listen)  # libmilter's notation
    if milter:
        family, port, host = milter.groups()
        return f"inet:[{host}]:{port}" if family == "inet6" else f"inet:{host}:{port}"
    return listen


def sasl_path(listen: str, queue_directory: str) -> str:
    """``smtpd_sasl_path`` for the Dovecot protocol: a bare socket path, or inet:host:port."""
    endpoint = postfix_endpoint(listen, queue_directory)
    return endpoint[5:] if endpoint.startswith("unix:") else endpoint


def _unix_outside_queue(endpoint: str) -> bool:
    path = endpoint[5:] if endpoint.startswith("unix:") else endpoint
    return path.startswith("/")


# -- the plan --------------------------------------------------------------------------------
def build_plan(config: Config, pools: Iterable[Pool], current: Current) -> Plan:
    """keyrelay's settings for ``config`` and ``pools``, merged with ``current``."""
    pf, policyd = config.postfix, config.policyd
    queue = current.queue_directory
    notes: list[str] = []
    for what, listen in (("policyd.auth_listen", policyd.auth_listen),
                         ("policyd.policy_listen", policyd.policy_listen)):
        if not listen:
            raise PostfixConfError(f"{what} is empty: Postfix needs this keyrelay-policyd "
                                   "service; set it in the keyrelay configuration")
    policy_endpoint = postfix_endpoint(policyd.policy_listen, queue)
    milter_endpoint = postfix_endpoint(config.milter.listen, queue)
    auth_path = sasl_path(policyd.auth_listen, queue)

    def policy(context: str) -> str:
        parts = [policy_endpoint, f"timeout={format_duration(pf.policy_timeout)}",
                 f"{{ default_action = {POLICY_UNAVAILABLE} }}"]
        if context:
            parts.append(f"policy_context={context}")
        return "check_policy_service { " + ", ".join(parts) + " }"

    main: dict[str, str] = {
        "keyrelay_sasl_path": auth_path,
        "keyrelay_milter": milter_endpoint,
        "keyrelay_submission_policy": policy(policyd.submission_context),
        # A message keyrelay signed must leave byte for byte: Postfix's 8bit-to-7bit
        # conversion for servers without 8BITMIME would break its DKIM signatures.
        "disable_mime_output_conversion": "yes",
    }
    settings, dkim_notes = postfixdkimlog.plan(
        current.main.get(postfixdkimlog.PARAMETER, ""),
        postfixdkimlog.PARAMETER in current.as_written, current.effective.get("mail_version", ""))
    main.update(settings)
    notes.extend(dkim_notes)
    roles: dict[str, list[tuple[str, str]]] = {
        SUBMISSION: [(name, "encrypt") for name in pf.submission_services]
        + [(name, "wrappermode") for name in pf.submissions_services],
    }
    if pf.smtp_service:
        main["keyrelay_smtp_policy"] = policy("")
        roles[SMTP] = [(pf.smtp_service, "may")]
    if not policyd.submission_context:
        notes.append("policyd.submission_context is empty: policyd tells submission services "
                     f"by server_port only ({', '.join(map(str, policyd.submission_ports))})")
    if pf.tls_chain_files:
        main["smtpd_tls_chain_files"] = pf.tls_chain_files
    elif not (current.main.get("smtpd_tls_chain_files") or current.main.get("smtpd_tls_cert_file")):
        raise PostfixConfError(
            "Postfix has no TLS certificate (neither smtpd_tls_chain_files nor "
            "smtpd_tls_cert_file is set in main.cf) and postfix.tls_chain_files is empty in "
            "the keyrelay configuration: API keys must only cross TLS; set one of them")

    services: list[ServiceSpec] = []
    seen: set[str] = set()
    for role, members in roles.items():
        keys = [f"{name}/inet" for name, _ in members]
        lists = _role_lists(role, keys, current)
        main.update(lists)
        for name, tls in members:
            spec = _smtpd_service(name, role, tls)
            if spec.key in seen:
                raise PostfixConfError(f"service {name} is named twice in the keyrelay "
                                       "configuration's postfix section")
            seen.add(spec.key)
            services.append(spec)
            chroot = current.services.get(spec.key, {}).get("chroot", "n")
            if chroot == "y":
                outside = [e for e in (policy_endpoint, milter_endpoint, "unix:" + auth_path)
                           if e.startswith("unix:") and _unix_outside_queue(e)]
                if outside:
                    raise PostfixConfError(
                        f"master.cf service {spec.key} is chrooted, but {', '.join(outside)} "
                        f"{'is' if len(outside) == 1 else 'are'} outside the queue directory "
                        f"{queue}: put keyrelay's sockets under {queue}/private/ or set the "
                        "service's chroot column to n")
        relay = split_list(main[f"keyrelay_{role}_relay_restrictions"])
        if role == SMTP and "permit_mynetworks" in relay:
            notes.append(f"{pf.smtp_service}: permit_mynetworks in keyrelay_smtp_relay_"
                         "restrictions lets clients in mynetworks relay without an API key")

    wanted_pools, pool_notes = _pool_services(config, pools)
    services.extend(wanted_pools)
    notes.extend(pool_notes)
    prefix = config.routing.transport_prefix
    wanted = {spec.key for spec in wanted_pools}
    drop = sorted(key for key in current.services
                  if key.endswith("/unix") and key.startswith(prefix) and key not in wanted)
    return Plan(main=main, services=services, drop_services=drop, notes=notes)


_ROLE_LISTS = ("relay_restrictions", "data_restrictions", "milters")


def _role_lists(role: str, services: list[str], current: Current) -> dict[str, str]:
    """The merged ``keyrelay_<role>_*`` lists.

    The base is what keyrelay wrote before (main.cf), else the services' own ``-o`` values,
    else (port 25) main.cf's value for all smtpd services, else keyrelay's default.
    """
    result: dict[str, str] = {}
    for kind in _ROLE_LISTS:
        name = f"keyrelay_{role}_{kind}"
        reference = f"${name}"
        if name in current.main:
            base = split_list(current.main[name])
        else:
            base = []
            values = [current.settings.get(key, {}).get(f"smtpd_{kind}") for key in services]
            # whole values, not items: "check_sender_access hash:/a" is two items, and an
            # item-wise union would drop an argument that two restrictions share
            for value in dict.fromkeys(v for v in values if v is not None and v != reference):
                base += split_list(value)
            if not any(f"smtpd_{kind}" in current.settings.get(key, {}) for key in services):
                if role == SMTP or kind == "milters":
                    base = split_list(current.main.get(f"smtpd_{kind}",
                                                       current.effective.get(f"smtpd_{kind}", "")))
                elif kind == "relay_restrictions":
                    base = [PERMIT_AUTHENTICATED, "reject"]
        policy = f"$keyrelay_{role}_policy"
        if kind == "relay_restrictions":
            items = merge_restrictions(base, policy)
        elif kind == "data_restrictions":
            items = merge_restrictions(base, policy, add_permit=False)
        else:
            items = merge_milters(base, "$keyrelay_milter")
        result[name] = join_list(items)
    return result


def _smtpd_service(name: str, role: str, tls: str) -> ServiceSpec:
    settings = {
        "smtpd_tls_security_level": "may" if tls == "may" else "encrypt",
        "smtpd_sasl_auth_enable": "yes",
        "smtpd_sasl_type": "dovecot",
        "smtpd_sasl_path": "$keyrelay_sasl_path",
        "smtpd_sasl_security_options": "noanonymous,noplaintext",
        "smtpd_sasl_tls_security_options": "noanonymous",
        "smtpd_tls_auth_only": "yes",
        "smtpd_tls_protocols": ">=TLSv1.2",
        "smtpd_tls_mandatory_protocols": ">=TLSv1.2",
        "smtpd_tls_ciphers": "high",
        "smtpd_tls_mandatory_ciphers": "high",
        "smtpd_relay_restrictions": f"$keyrelay_{role}_relay_restrictions",
        "smtpd_data_restrictions": f"$keyrelay_{role}_data_restrictions",
        "smtpd_milters": f"$keyrelay_{role}_milters",
        "milter_default_action": "tempfail",
    }
    if tls == "wrappermode":
        settings["smtpd_tls_wrappermode"] = "yes"
    if role == SUBMISSION:
        # the queue file, and with it the "QUEUEID: client=..., sasl_username=..." line, at
        # MAIL FROM: a recipient refused at RCPT (a suppression, a sender check) is then logged
        # with a queue id, so keyrelay-events can tell whose refusal it was (docs/events.md).
        # Not on port 25, where strangers' refused recipients would each cost a queue file.
        settings["smtpd_delay_open_until_valid_rcpt"] = "no"
    return ServiceSpec(name=name, type="inet", command="smtpd", settings=settings)


def _pool_services(config: Config, pools: Iterable[Pool]) -> tuple[list[ServiceSpec], list[str]]:
    specs, notes = [], []
    for pool in sorted(pools, key=lambda p: p.name):
        v4 = [a for a in pool.bind if isinstance(a, ipaddress.IPv4Address)]
        v6 = [a for a in pool.bind if isinstance(a, ipaddress.IPv6Address)]
        for family, addresses in (("IPv4", v4), ("IPv6", v6)):
            if len(addresses) > 1:
                notes.append(f"pool {pool.name}: Postfix binds one {family} address per "
                             f"transport; mail leaves from {addresses[0]}, not from "
                             f"{', '.join(map(str, addresses[1:]))}")
        transport = config.routing.transport_prefix + pool.name
        settings = {"syslog_name": f"postfix/{transport}", "smtp_helo_name": pool.helo,
                    "smtp_bind_address_enforce": "yes"}
        remove = []
        for name, addresses in (("smtp_bind_address", v4), ("smtp_bind_address6", v6)):
            if addresses:
                settings[name] = str(addresses[0])
            else:
                remove.append(name)
        specs.append(ServiceSpec(name=transport, type="unix", command="smtp", settings=settings,
                                 remove=tuple(remove)))
    return specs, notes


# -- reading and changing a configuration directory ------------------------------------------
def _pairs(text: str) -> Iterable[tuple[str, str]]:
    for line in text.splitlines():
        name, sep, value = line.partition(" = ")
        if sep:
            yield name.strip(), value.strip()
        elif line.endswith(" ="):
            yield line[:-2].strip(), ""


def read_current(config_dir: Path) -> Current:
    """The explicit main.cf settings, the built-ins keyrelay merges from (and the TLS files,
    expanded), and master.cf."""
    missing = [name for name in ("main.cf", "master.cf") if not (config_dir / name).is_file()]
    if missing:
        raise PostfixConfError(f"{config_dir}: no {' and no '.join(missing)} there; give the "
                               "directory of an existing Postfix configuration (--config-dir)")
    current = Current(main=dict(_pairs(postconf(config_dir, "-n"))))
    # postconf collapses runs of spaces: milter_header_checks, which keyrelay extends, is
    # taken from main.cf as written when it can be (keyrelay/postfixdkimlog.py)
    written = postfixdkimlog.as_written(config_dir / "main.cf",
                                        current.main.get(postfixdkimlog.PARAMETER, ""))
    if written is not None:
        current.main[postfixdkimlog.PARAMETER] = written
        current.as_written.add(postfixdkimlog.PARAMETER)
    builtins = ["queue_directory", "smtpd_milters", *TLS_SETTINGS,
                *SASL_PARAMETERS, "mail_version"]
    # -x: the built-in defaults are expressions on compatibility_level; merge their value
    values = postconf(config_dir, "-xh", *builtins).splitlines()
    current.effective = dict(zip(builtins, values, strict=False))
    for name, value in _pairs(postconf(config_dir, "-F")):
        service, _, column = name.rpartition("/")
        current.services.setdefault(service, {})[column] = value
    for name, value in _pairs(postconf(config_dir, "-P")):
        service_type, _, setting = name.rpartition("/")
        current.settings.setdefault(service_type, {})[setting] = value
    return current


def changes(plan: Plan, current: Current) -> list[Change]:
    """The edits that bring ``current`` to ``plan``; none when it is already there."""
    result: list[Change] = []
    for name, value in plan.main.items():
        if _normal(current.main.get(name, "")) != _normal(value) or name not in current.main:
            result.append(Change(f"main.cf: {name} = {value}", ("-e", f"{name} = {value}")))
    for spec in plan.services:
        if spec.key not in current.services:
            result.append(Change(f"master.cf: new service {spec.entry()}",
                                 ("-M", f"{spec.key}={spec.entry()}")))
        have = current.settings.get(spec.key, {})
        for name, value in spec.settings.items():
            if have.get(name) != value:
                result.append(Change(f"master.cf: {spec.key}: -o {name}={value}",
                                     ("-P", f"{spec.key}/{name}={value}")))
        for name in spec.remove:
            if name in have:
                result.append(Change(f"master.cf: {spec.key}: remove -o {name}",
                                     ("-PX", f"{spec.key}/{name}")))
    for key in plan.drop_services:
        result.append(Change(f"master.cf: remove {key} (its pool is gone)", ("-MX", key)))
    return result


def check_certificates(plan: Plan, current: Current) -> list[str]:
    """The TLS files Postfix will use after ``plan`` exist, are readable and belong together
    (keyrelay/postfixtls.py); the files checked, or PostfixConfError naming setting and file."""
    values = {name: current.effective.get(name, "") for name in TLS_SETTINGS}
    source = ""
    if "smtpd_tls_chain_files" in plan.main:
        values["smtpd_tls_chain_files"] = plan.main["smtpd_tls_chain_files"]
        source = "postfix.tls_chain_files (smtpd_tls_chain_files)"
    try:
        return check_tls_files(values, source=source)
    except CertificateError as exc:
        raise PostfixConfError(f"TLS certificate: {exc}") from None


def apply(config_dir: Path, todo: list[Change]) -> str:
    """``postfix check`` before (a site's own fault is named as such, nothing is changed),
    the edits, ``postfix check`` again; on failure put both files back and raise.

    Returns the warnings ``postfix check`` printed after the edits that it did not print
    before, if any.
    """
    before = check(config_dir, "the site's Postfix configuration fails postfix check before "
                   "keyrelay changed anything (fix that first; nothing was changed)")
    files = [config_dir / "main.cf", config_dir / "master.cf"]
    saved = {path: path.read_bytes() for path in files}
    try:
        for change in todo:
            postconf(config_dir, *change.args)
        after = check(config_dir, "postfix check failed after keyrelay's changes; main.cf "
                      "and master.cf are put back as they were")
    except BaseException:
        for path, content in saved.items():
            path.write_bytes(content)
        raise
    known = set(before.splitlines())
    return "\n".join(line for line in after.splitlines() if line not in known)


# -- rendering -------------------------------------------------------------------------------
def render_main(plan: Plan) -> str:
    """keyrelay's main.cf parameters, as ``postconf -e`` writes them."""
    return "".join(f"{name} = {value}\n" for name, value in plan.main.items())


def render_master(plan: Plan, current: Current | None = None) -> str:
    """keyrelay's master.cf services with their ``-o`` settings.

    An existing service is shown with its own entry; its other ``-o`` settings stay.
    """
    lines = []
    for spec in plan.services:
        lines.append(entry_line(spec, current))
        lines += [f"  -o {name}={value}" for name, value in spec.settings.items()]
    lines += [f"# remove {key}: its pool is gone" for key in plan.drop_services]
    return "\n".join(lines) + "\n"


def entry_line(spec: ServiceSpec, current: Current | None = None) -> str:
    """The master.cf entry of a service: its own when it exists, else the one apply makes."""
    if current is not None and spec.key in current.services:
        return _entry_of(current.services[spec.key])
    return spec.entry()


def _entry_of(fields: dict[str, str]) -> str:
    columns = ("service", "type", "private", "unprivileged", "chroot", "wakeup",
               "process_limit")
    command = fields.get("command", "").split(" -o ")[0]
    return " ".join(fields.get(c, "-") for c in columns) + " " + command


_HEADER = """\
# {what}: generated by `python -m keyrelay.postfixconf` from keyrelay/postfixconf.py,
# for the default keyrelay configuration and one example IP pool. Do not paste it by hand:
# `keyrelay postfix apply --config-dir /etc/postfix` merges these settings into an existing
# Postfix (keeping the site's own restrictions, milters and -o settings) and runs postfix
# check; `keyrelay postfix show --config-dir /etc/postfix` prints what it would write.
"""


def example_plan() -> Plan:
    """The plan for the default configuration, a fresh Postfix and one example pool."""
    from .config import default_config

    pool = Pool(name="example", bind=(ipaddress.ip_address("192.0.2.10"),),
                helo="o1.relay.example.net")
    return build_plan(default_config(), [pool], fresh_postfix())


def fresh_postfix() -> Current:
    """A Debian Postfix as installed, with a certificate: what ``show`` merges with by default.

    Its port-25 relay restrictions are written out without permit_mynetworks, as keyrelay
    recommends for a relay whose every sender logs in with an API key.
    """
    return Current(
        main={"smtpd_tls_chain_files": "/etc/postfix/tls/key.pem, /etc/postfix/tls/fullchain.pem",
              "smtpd_relay_restrictions": "permit_sasl_authenticated, reject_unauth_destination"},
        effective={"queue_directory": "/var/spool/postfix"},
    )


def example_files() -> dict[str, str]:
    """File name in postfix-conf/ -> generated content."""
    plan = example_plan()
    return {
        "main.cf.keyrelay": _HEADER.format(what="main.cf settings") + render_main(plan),
        "master.cf.keyrelay": _HEADER.format(what="master.cf services") + render_master(plan),
    }


if __name__ == "__main__":
    folder = Path(__file__).resolve().parent.parent / "postfix-conf"
    for name, content in example_files().items():
        (folder / name).write_text(content)
        print(f"wrote {folder / name}")
