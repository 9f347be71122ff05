"""A site's own SASL set-up on the services ``keyrelay postfix apply`` takes over.

Many sites already log their mailbox users in on 587 through their own Dovecot
(``smtpd_sasl_path = private/auth``) or Cyrus SASL, bind logins to senders with
``smtpd_sender_login_maps`` and refuse the rest with ``reject_sender_login_mismatch``. On a
service keyrelay takes over (``postfix.smtp_service``, ``postfix.submission_services``,
``postfix.submissions_services``), keyrelay points the logins at its own auth service, so:

- the site's SASL there stops working: its mailbox users can no longer log in;
- the site's sender-login map knows none of keyrelay's logins, and a
  ``reject_*sender_login_mismatch`` restriction refuses every keyrelay message
  (``553 5.7.1 Sender address rejected: not owned by user ...``).

:func:`find` names each of these, per service, from what the service will use: its own
``-o`` setting, else main.cf, else Postfix's built-in default, with ``$name`` expanded and
restriction classes followed; the relay and data restrictions as keyrelay will merge them
(keyrelay/postfixconf.py). keyrelay's own values (``$keyrelay_sasl_path``, its
``sender_login`` socketmap) are not conflicts, so a second ``apply`` stays idempotent.
:func:`take_over` is what ``--replace-site-sasl`` does: keyrelay's SASL settings replace the
site's on the service (they are ``-o`` settings, so main.cf and other services keep theirs),
``-o smtpd_sender_login_maps=`` (keyrelay's socketmap only, when it was listed) and the
mismatch restrictions are taken out of the service's lists. docs/postfix.md describes both.

With ``auth.site_auth_socket`` set (coexistence, docs/coexistence.md) a site's Dovecot SASL
and its mismatch restrictions are no conflicts: keyrelay's auth service passes the site's
logins on to that Dovecot, and :func:`coexist` makes the service's sender-login map the union
of keyrelay's ``sender_login`` socketmap and the site's maps (``unionmap:{...}``), so a
mismatch check finds keyrelay's logins as owners of their senders and the site's logins of
theirs. A Cyrus SASL stays a conflict (only a Dovecot can be passed on to), and so does a site
map without keyrelay's socketmap (``policyd.socketmap_listen`` empty) to join it with.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from .config import Config
from .postfixconf import (
    PERMIT_AUTHENTICATED,
    RESTRICTION_LISTS,
    Current,
    Plan,
    PostfixConfError,
    join_list,
    postfix_endpoint,
    split_list,
)

FLAG = "--replace-site-sasl"
MISMATCH = ("reject_sender_login_mismatch", "reject_authenticated_sender_login_mismatch",
            "reject_known_sender_login_mismatch",
            "reject_unauthenticated_sender_login_mismatch")
_MERGED = {"smtpd_relay_restrictions": "relay_restrictions",
           "smtpd_data_restrictions": "data_restrictions"}  # keyrelay_<role>_<kind>
_REFERENCE = re.compile(r"\$(?:(\w+)|\{(\w+)\}|\((\w+)\))")
_ONE_REFERENCE = re.compile(r"\$(?:(\w+)|\{(\w+)\}|\((\w+)\))$")
_LATER = ("or set auth.site_auth_socket to keep the site's Dovecot logins and sender rules "
          "beside keyrelay's, docs/coexistence.md")
_SASL, _LOGIN_MAP, _RESTRICTION = "sasl", "login_map", "restriction"
_DOVECOT = "dovecot"
_UNION = "unionmap:{"


@dataclass(frozen=True)
class Conflict:
    """One site setting on one service keyrelay takes over that would break mail."""

    service: str  # master.cf name/type
    config_key: str  # the keyrelay setting that hands the service to keyrelay
    parameter: str
    value: str  # as written
    source: str  # "master.cf -o", "main.cf" or "built-in default"
    kind: str  # _SASL | _LOGIN_MAP | _RESTRICTION
    found: str  # the SASL type, the site's maps, or the mismatch restriction (and its class)
    coexist: bool = False  # auth.site_auth_socket is set, yet this still breaks mail

    def line(self) -> str:
        """The refusal: which service, which parameter, its value, why, what to do."""
        where = f"{self.service}: {self.parameter} = {self.value} ({self.source})"
        name = self.service.rpartition("/")[0]
        leave = (f"leave {name} out of {self.config_key} in the keyrelay configuration and "
                 "keep the site's logins there")
        if self.found.startswith("restriction class "):
            group, _, restriction = self.found[len("restriction class "):].partition(": ")
            return (f"{where} {self._why()}; {leave}, or take {restriction} out of "
                    f"restriction class {group} yourself ({FLAG} does not edit restriction "
                    f"classes, which other services may use; {_LATER})")
        if self.coexist:
            return (f"{where} {self._why()}; {leave}, or rerun with {FLAG} to let keyrelay "
                    f"take {name} over and replace {self._what()} there")
        return (f"{where} {self._why()}; {leave}, or rerun with {FLAG} to let keyrelay take "
                f"{name} over and replace {self._what()} there ({_LATER})")

    def _why(self) -> str:
        if self.kind == _SASL and self.coexist:
            return (f"is the site's own SASL ({self.found}): auth.site_auth_socket passes the "
                    "site's logins on only to a Dovecot auth service, so its users could no "
                    "longer log in on it")
        if self.kind == _LOGIN_MAP and self.coexist:
            return (f"is the site's own sender-login map ({self.found}): auth.site_auth_socket "
                    "joins it with keyrelay's sender_login socketmap, but "
                    "policyd.socketmap_listen is empty, so a *_sender_login_mismatch check "
                    "would refuse every keyrelay sender (553 5.7.1 Sender address rejected: "
                    "not owned by user)")
        if self.kind == _SASL:
            return (f"is the site's own SASL ({self.found}): keyrelay would point this "
                    "service's logins at its own auth service and the site's users could no "
                    "longer log in on it")
        if self.kind == _LOGIN_MAP:
            return (f"is the site's own sender-login map ({self.found}): it knows none of "
                    "keyrelay's logins, so a *_sender_login_mismatch check refuses every "
                    "keyrelay sender (553 5.7.1 Sender address rejected: not owned by user)")
        return (f"holds {self.found}: it checks keyrelay's logins against the site's "
                "sender-login map and refuses every keyrelay message (553 5.7.1 Sender "
                "address rejected: not owned by user)")

    def _what(self) -> str:
        if self.kind == _SASL:
            return "its SASL settings"
        if self.kind == _LOGIN_MAP:
            return "its sender-login map"
        return f"{self.found} in {self.parameter}"


@dataclass(frozen=True)
class _Service:
    key: str  # name/type
    role: str  # submission | smtp
    config_key: str


def taken_over(config: Config) -> list[_Service]:
    """The smtpd services keyrelay takes over, with the setting that names each."""
    pf = config.postfix
    found = [_Service(f"{name}/inet", "submission", "postfix.submission_services")
             for name in pf.submission_services]
    found += [_Service(f"{name}/inet", "submission", "postfix.submissions_services")
              for name in pf.submissions_services]
    if pf.smtp_service:
        found.append(_Service(f"{pf.smtp_service}/inet", "smtp", "postfix.smtp_service"))
    return found


class _Values:
    """A service's parameters as Postfix will see them, ``$name`` expanded."""

    def __init__(self, settings: dict[str, str], main: dict[str, str],
                 effective: dict[str, str], planned: dict[str, str]) -> None:
        self.settings, self.main = settings, main
        self.effective, self.planned = effective, planned

    def raw(self, name: str) -> tuple[str, str]:
        """The value as written, and where: the service's -o, main.cf, or the built-in."""
        if name in self.settings:
            return self.settings[name], "master.cf -o"
        if name.startswith("keyrelay_") and name in self.planned:
            return self.planned[name], "main.cf"
        if name in self.main:
            return self.main[name], "main.cf"
        return self.effective.get(name, ""), "built-in default"

    def expand(self, value: str, depth: int = 0) -> str:
        if depth > 20:  # Postfix itself refuses a loop; do not follow one for ever
            return value

        def one(match: re.Match[str]) -> str:
            name = next(group for group in match.groups() if group)
            return self.expand(self.raw(name)[0], depth + 1)
        return _REFERENCE.sub(one, value)

    def items(self, value: str) -> list[str]:
        return split_list(self.expand(value))

    def classes(self) -> set[str]:
        return set(self.items(self.raw("smtpd_restriction_classes")[0]))

    def mismatch(self, value: str, depth: int = 0) -> str:
        """The first mismatch restriction ``value`` reaches ("CLASS: restriction" through a
        restriction class), or ""."""
        classes = self.classes()
        for item in self.items(value):
            if item in MISMATCH:
                return item
            if item in classes and depth < 10:
                inner = self.mismatch(self.raw(item)[0], depth + 1)
                if inner:
                    return f"restriction class {item}: {inner.rpartition(': ')[2]}"
        return ""


def _values(current: Current, plan_main: dict[str, str], key: str) -> _Values:
    return _Values(current.settings.get(key, {}), current.main, current.effective, plan_main)


def own_login_map(config: Config, queue_directory: str) -> str:
    """keyrelay's ``sender_login`` socketmap as Postfix names it, or "" without one."""
    listen = config.policyd.socketmap_listen
    if not listen:
        return ""
    return f"socketmap:{postfix_endpoint(listen, queue_directory)}:sender_login"


def _site_sasl(values: _Values, own_paths: set[str]) -> tuple[str, str, str] | None:
    """(path as written, where, SASL type) of the site's own SASL on a service, or None."""
    enabled = values.expand(values.raw("smtpd_sasl_auth_enable")[0]).strip().lower()
    path, source = values.raw("smtpd_sasl_path")
    sasl_type = values.expand(values.raw("smtpd_sasl_type")[0]).strip()
    if (enabled == "yes" and values.expand(path).strip() not in own_paths
            and not _reference(path).startswith("keyrelay_")):
        return path, source, sasl_type
    return None


def _own_paths(plan_main: dict[str, str], current: Current) -> set[str]:
    return {plan_main.get("keyrelay_sasl_path", ""),
            current.main.get("keyrelay_sasl_path", "")} - {""}


def _site_maps(values: _Values, value: str, own_map: str) -> list[str]:
    """The site's own maps in a service's ``smtpd_sender_login_maps``: keyrelay's socketmap
    left out, and a ``unionmap:{...}`` of it that :func:`coexist` wrote opened up."""
    found: list[str] = []
    for item in values.items(value):
        if item == own_map:
            continue
        if own_map and item.startswith(_UNION) and item.endswith("}"):
            inner = split_list(item[len(_UNION):-1])
            if own_map in inner:
                found += [one for one in inner if one != own_map]
                continue
        found.append(item)
    return found


def find(config: Config, plan_main: dict[str, str], current: Current) -> list[Conflict]:
    """Each site SASL setting that keyrelay's takeover of a service would break."""
    own_paths = _own_paths(plan_main, current)
    own_map = own_login_map(config, current.queue_directory)
    coexisting = bool(config.auth.site_auth_socket)
    found: list[Conflict] = []
    for service in taken_over(config):
        values = _values(current, plan_main, service.key)

        def conflict(parameter: str, value: str, source: str, kind: str, what: str,
                     service: _Service = service) -> None:
            found.append(Conflict(service.key, service.config_key, parameter, value or '""',
                                  source, kind, what, coexisting))

        sasl = _site_sasl(values, own_paths)
        if sasl is not None and not (coexisting and sasl[2] == _DOVECOT):
            path, source, sasl_type = sasl
            conflict("smtpd_sasl_path", path, source, _SASL, f"smtpd_sasl_type = {sasl_type}")
        maps, source = values.raw("smtpd_sender_login_maps")
        site_maps = _site_maps(values, maps, own_map)
        if site_maps and not (coexisting and own_map):
            conflict("smtpd_sender_login_maps", maps, source, _LOGIN_MAP, ", ".join(site_maps))
        if coexisting:
            continue  # the mismatch checks find every keyrelay login in the joined map
        for parameter in RESTRICTION_LISTS:
            value, source = values.raw(parameter)
            if parameter in _MERGED:  # keyrelay's merged list is what the service will use
                merged = f"keyrelay_{service.role}_{_MERGED[parameter]}"
                if merged in plan_main:
                    hit = values.mismatch(plan_main[merged])
                    if hit and not values.mismatch(value):
                        value, parameter = plan_main[merged], merged
                        source = "the list keyrelay merges from the site's"
                    if hit:
                        conflict(parameter, value, source, _RESTRICTION, hit)
                    continue
            hit = values.mismatch(value)
            if hit:
                conflict(parameter, value, source, _RESTRICTION, hit)
    return found


def coexist(config: Config, plan: Plan, current: Current) -> tuple[Plan, list[str]]:
    """With ``auth.site_auth_socket``: ``plan`` changed so that the site's own rules keep
    working beside keyrelay's on the services keyrelay takes over, and a line per service
    for the report. The site's Dovecot logins reach keyrelay's auth service, which passes
    them on; a site sender-login map becomes ``unionmap:{keyrelay's socketmap, the site's
    maps}`` (``-o smtpd_sender_login_maps``, spaces dropped: a master.cf -o value holds
    none); the site's restrictions stay as they are. What cannot coexist is left to
    :func:`find`."""
    target = config.auth.site_auth_socket
    if not target:
        return plan, []
    own_paths = _own_paths(plan.main, current)
    own_map = own_login_map(config, current.queue_directory)
    extra: dict[str, dict[str, str]] = {}
    report: list[str] = []
    for service in taken_over(config):
        values = _values(current, plan.main, service.key)
        sasl = _site_sasl(values, own_paths)
        if sasl is not None and sasl[2] == _DOVECOT:
            report.append(f"{service.key}: the site's Dovecot logins (smtpd_sasl_path = "
                          f"{sasl[0]}, {sasl[1]}) now reach keyrelay's auth service, which "
                          f"passes them on to auth.site_auth_socket = {target}")
        maps, source = values.raw("smtpd_sender_login_maps")
        site_maps = _site_maps(values, maps, own_map)
        if site_maps and own_map:
            union = _UNION + ",".join([own_map, *site_maps]) + "}"
            extra[service.key] = {"smtpd_sender_login_maps": union}
            report.append(f"{service.key}: smtpd_sender_login_maps = {maps} ({source}) joined "
                          f"with keyrelay's: -o smtpd_sender_login_maps={union}")
    services = [dataclasses.replace(spec, settings={**spec.settings, **extra[spec.key]})
                if spec.key in extra else spec for spec in plan.services]
    return dataclasses.replace(plan, services=services), report


def _reference(value: str) -> str:
    match = _ONE_REFERENCE.match(value.strip())
    return next((group for group in match.groups() if group), "") if match else ""


def take_over(config: Config, plan: Plan, current: Current,
              conflicts: list[Conflict]) -> tuple[Plan, list[str]]:
    """``plan`` changed so that keyrelay replaces the site's settings of ``conflicts`` on
    their services; with a line per replaced setting, for the report."""
    main = dict(plan.main)
    extra: dict[str, dict[str, str]] = {}
    report: list[str] = []
    own_map = own_login_map(config, current.queue_directory)
    roles = {service.key: service.role for service in taken_over(config)}
    for item in conflicts:
        values = _values(current, main, item.service)
        if item.kind == _SASL:
            new = plan_setting(plan, item.service, "smtpd_sasl_path")
            report.append(f"{item.service}: smtpd_sasl_path = {item.value} ({item.source}, "
                          f"{item.found}) replaced by {new} (keyrelay's auth service)")
        elif item.kind == _LOGIN_MAP:
            kept = own_map if own_map in values.items(item.value) else ""
            extra.setdefault(item.service, {})["smtpd_sender_login_maps"] = kept
            report.append(f"{item.service}: smtpd_sender_login_maps = {item.value} "
                          f"({item.source}) replaced by -o smtpd_sender_login_maps={kept}")
        elif item.parameter.startswith("keyrelay_"):
            main[item.parameter] = _merged(values, main[item.parameter], item)
            report.append(f"{item.service}: {item.found} taken out of {item.parameter}")
        elif item.parameter in _MERGED:
            name = f"keyrelay_{roles[item.service]}_{_MERGED[item.parameter]}"
            main[name] = _merged(values, main[name], item)
            report.append(f"{item.service}: {item.found} taken out of {item.parameter} "
                          f"({name})")
        else:
            kept_items = _strip(values, item.value if item.value != '""' else "", item)
            spaced = [kept for kept in kept_items if " " in kept]
            if spaced:
                raise PostfixConfError(
                    f"{item.service}: {item.parameter}: cannot take {item.found} out for "
                    f"{FLAG}: {spaced[0]} holds spaces, which a master.cf -o value cannot; "
                    f"remove {item.found} from it yourself and rerun")
            value = ",".join(kept_items)
            extra.setdefault(item.service, {})[item.parameter] = value
            report.append(f"{item.service}: {item.found} taken out of {item.parameter} "
                          f"(-o {item.parameter}={value})")
    services = [dataclasses.replace(spec, settings={**spec.settings, **extra[spec.key]})
                if spec.key in extra else spec for spec in plan.services]
    return dataclasses.replace(plan, main=main, services=services), report


def plan_setting(plan: Plan, key: str, name: str) -> str:
    spec = next((spec for spec in plan.services if spec.key == key), None)
    return spec.settings.get(name, "") if spec is not None else ""


def _merged(values: _Values, value: str, conflict: Conflict) -> str:
    """keyrelay's merged list without the mismatch; a ``$name`` opened up for it may repeat
    the ``permit_sasl_authenticated`` keyrelay added, which then appears once."""
    items = _strip(values, value, conflict)
    first = items.index(PERMIT_AUTHENTICATED) if PERMIT_AUTHENTICATED in items else -1
    return join_list(item for i, item in enumerate(items)
                     if item != PERMIT_AUTHENTICATED or i == first)


def _strip(values: _Values, value: str, conflict: Conflict, depth: int = 0) -> list[str]:
    """The items of ``value`` without mismatch restrictions; a ``$name`` that reaches one is
    replaced by its own items, stripped. A restriction class that holds one is refused: it
    may serve other services, so the admin edits it."""
    classes = values.classes()
    result: list[str] = []
    for item in split_list(value):
        if item in MISMATCH:
            continue
        if "$" in item and values.mismatch(item):
            name = _reference(item)
            inner = values.raw(name)[0] if name else values.expand(item)
            result += _strip(values, inner, conflict, depth + 1) if depth < 20 else []
            continue
        if item in classes and values.mismatch(item):
            raise PostfixConfError(
                f"{conflict.service}: {conflict.parameter}: {item} is a restriction class "
                f"(smtpd_restriction_classes) holding {conflict.found.rpartition(': ')[2]}; "
                f"{FLAG} does not edit it, since other services may use it: take it out of "
                f"{item} or of {conflict.parameter} yourself and rerun")
        result.append(item)
    return result

