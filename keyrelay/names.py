"""Normalising and validating the names admins and clients type.

Every module compares names in the normal form made here: account and subuser names, principal
identifiers, domains (lowercase, no trailing dot, IDN as A-labels per IDNA 2008), mail addresses
and CIDR networks. Each function raises ``UserError`` with one line that says what to fix.
"""

from __future__ import annotations

import functools
import ipaddress
import re

import idna

# idna loads its UTS #46 table at the first non-ASCII domain; loaded here, at start, while
# the daemons can still read everything: after they drop root a first use deep in a
# message failed (ModuleNotFoundError, an internal error, 451) where the venv is root's only
import idna.uts46data

from .errors import UserError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$")
_LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# RFC 5322 dot-atom local part (printable ASCII without specials); quoted local parts are
# refused on purpose: no application needs them and they are a favourite of spoofing tricks.
_LOCAL_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")


def account_name(text: str) -> str:
    """An account or subuser name: 1-32 of a-z, 0-9 and inner hyphens."""
    if not _NAME_RE.match(text):
        raise UserError(
            f"invalid name {text!r}: use 1-32 lowercase letters, digits and inner hyphens"
        )
    return text


def principal_id(text: str) -> tuple[str, str | None]:
    """Split ``account`` or ``account/subuser`` into its validated parts."""
    account, slash, sub = text.partition("/")
    if slash and not sub:
        raise UserError(f"invalid principal {text!r}: expected ACCOUNT or ACCOUNT/SUBUSER")
    return account_name(account), (account_name(sub) if slash else None)


@functools.lru_cache(maxsize=65536)
def domain(text: str) -> str:
    """A domain in normal form: lowercase A-labels, no trailing dot, at least two labels.

    Cached: the daemons normalise the same few sender domains thousands of times a second.
    """
    raw = text.strip().rstrip(".")
    if not raw or any(c.isspace() for c in raw):
        raise UserError(f"invalid domain {text!r}: it must not be empty or contain spaces")
    if not raw.isascii():
        try:
            raw = idna.encode(raw, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise UserError(f"invalid internationalised domain {text!r}: {exc}") from None
    name = raw.lower()
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2:
        raise UserError(f"invalid domain {text!r}: expected a name like example.com")
    for label in labels:
        if not _LABEL_RE.match(label):
            raise UserError(
                f"invalid domain {text!r}: label {label!r} must be 1-63 letters, digits or "
                "inner hyphens"
            )
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except idna.IDNAError as exc:
                raise UserError(f"invalid domain {text!r}: bad A-label {label!r}: {exc}") from None
    if labels[-1].isdigit():
        raise UserError(f"invalid domain {text!r}: the last label cannot be numeric")
    return name


@functools.lru_cache(maxsize=65536)
def address(text: str) -> str:
    """A mail address in normal form ``local@domain``, compared case-insensitively (cached)."""
    local, at, dom = text.strip().rpartition("@")
    if not at or not local:
        raise UserError(f"invalid address {text!r}: expected local-part@domain")
    if len(local) > 64 or not _LOCAL_RE.match(local):
        raise UserError(f"invalid address {text!r}: unsupported local part {local!r}")
    return f"{local.lower()}@{domain(dom)}"


_MAPPED_V4 = ipaddress.IPv6Network("::ffff:0:0/96")


def network(text: str) -> IPNetwork:
    """A CIDR network (a bare address means a single host). Host bits must be zero.

    An IPv4-mapped IPv6 network (``::ffff:192.0.2.0/120``) becomes its IPv4 network, because
    client addresses are compared as IPv4 (``ip_address``) and the rule could never match.
    """
    try:
        net = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            raise UserError(f"invalid CIDR {text!r}: {exc}") from None
        raise UserError(
            f"invalid CIDR {text!r}: host bits are set; did you mean {loose}?"
        ) from None
    mapped = _MAPPED_V4
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(mapped) and net.prefixlen >= 96:
        first = net.network_address.ipv4_mapped
        assert first is not None
        return ipaddress.IPv4Network((first, net.prefixlen - 96))
    return net


def ip_address(text: str) -> IPAddress:
    """An IP address; IPv4-mapped IPv6 addresses become IPv4 so that IPv4 rules apply."""
    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        raise UserError(f"invalid IP address {text!r}") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr
