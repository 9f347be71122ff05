"""Which webhook URLs keyrelay sends to: the URL policy that guards against SSRF
(docs/webhooks.md, "Which URLs are allowed").

Tenants may choose their webhook's URL, and keyrelay POSTs to it from inside the relay's
network: a URL must not reach what only the relay can reach. So:

- only ``http`` and ``https`` URLs with a host, without credentials (``user:pass@``), without
  a fragment, in ASCII (a host in its A-label form, a path percent-encoded);
- every address the host resolves to (the system resolver, at ``webhook set`` and again at
  every delivery) must be a public one: not loopback, private (RFC 1918, ULA), link-local,
  shared (CGNAT, 100.64.0.0/10), reserved or otherwise special-purpose, nor an IPv4-mapped
  or NAT64 form of those, unless ``webhooks.allow_private_targets`` says so; multicast and
  unspecified addresses never;
- the delivery connects to an address that was checked (``Target.addresses``), never to a
  name resolved again inside the HTTP library: a name that answered a public address at the
  check and a private one a moment later (DNS rebinding) cannot reach the private one.

Every refusal is a ``TargetRefused`` with one line that names the URL and the reason.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from ..errors import UserError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]
"""``resolver(host, port)``: the addresses of ``host`` as strings; raises OSError when the
name does not resolve. ``system_resolver`` is the default; tests pass their own."""

MAX_URL = 2048
_ALLOW_HINT = "set webhooks.allow_private_targets: true to allow it"
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_RFC1918 = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12",
                                                     "192.168.0.0/16"))
_ULA = ipaddress.IPv6Network("fc00::/7")


class TargetRefused(UserError):
    """A webhook URL the policy refuses, or whose host does not resolve: one line."""


class TargetUnresolved(TargetRefused):
    """The URL's host did not resolve (now): may pass, unlike the policy's refusals."""


@dataclass(frozen=True, slots=True)
class Url:
    """A webhook URL that passed the syntax rules (no resolution yet)."""

    text: str
    scheme: str  # http | https
    host: str  # as the URL writes it, without brackets; lowercase
    port: int
    path: str  # path and query, as sent in the request line

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Target:
    """A URL and the addresses of its host that the policy allowed, to connect to."""

    url: Url
    addresses: tuple[IPAddress, ...]


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses of ``host`` from the system resolver (getaddrinfo), in its order."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in found))


def parse_url(text: str) -> Url:
    """Check the URL's syntax: scheme, host, no credentials, no fragment, ASCII."""
    def refuse(reason: str) -> TargetRefused:
        return TargetRefused(f"webhook URL {_shown(text)}: {reason}")

    if not text or len(text) > MAX_URL:
        raise refuse(f"expected an http:// or https:// URL of at most {MAX_URL} characters")
    if not text.isascii() or any(c.isspace() or ord(c) < 0x21 or ord(c) == 0x7f for c in text):
        raise refuse("a URL is written in ASCII without spaces: the host in its A-label "
                     "(xn--) form, the path percent-encoded")
    try:
        parts: SplitResult = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise refuse(f"not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        got = f"{scheme}://" if scheme else "no scheme"
        raise refuse(f"only http:// and https:// URLs are allowed, got {got}")
    if "@" in parts.netloc:
        raise refuse("a URL with credentials (user:password@) is not allowed: the "
                     "deliveries are signed (X-Keyrelay-Signature) instead")
    host = (parts.hostname or "").lower()
    if not host:
        raise refuse("the URL has no host")
    if parts.fragment or text.endswith("#"):
        raise refuse("a URL with a fragment (#...) is not allowed: it is never sent")
    if port == 0:
        raise refuse("port 0 is not a port to connect to")
    if ":" not in host and not all(c.isalnum() or c in ".-_" for c in host):
        raise refuse(f"{host!r} is not a host name")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Url(text, scheme, host, port or (443 if scheme == "https" else 80), path)


def address_problem(address: IPAddress) -> str | None:
    """What kind of non-public address ``address`` is ("a private address"), or None for a
    public one. An IPv4-mapped (::ffff:a.b.c.d) or NAT64 (64:ff9b::a.b.c.d) address is
    judged by the IPv4 address it carries."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = address.ipv4_mapped
        if inner is None and address in _NAT64:
            inner = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if inner is not None:
            problem = address_problem(inner)
            return None if problem is None else f"{problem} ({inner}, IPv4 inside IPv6)"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if isinstance(address, ipaddress.IPv4Address) and address in _CGNAT:
        return "a shared (CGNAT, RFC 6598) address"
    if (any(address in n for n in _RFC1918) if isinstance(address, ipaddress.IPv4Address)
            else address in _ULA):
        return "a private address"
    if address.is_reserved:
        return "a reserved address"
    if not address.is_global:
        return "a special-purpose address (not globally routable)"
    return None


def _never(problem: str) -> bool:
    """Kinds refused even with allow_private_targets: nothing to connect to."""
    return problem.startswith(("an unspecified", "a multicast"))


def check(url: str | Url, allow_private: bool,
          resolver: Resolver = system_resolver) -> Target:
    """The URL's target when the policy allows it: its syntax, then every address its host
    resolves to now. ``TargetRefused`` otherwise, one line naming URL and reason."""
    parsed = url if isinstance(url, Url) else parse_url(url)
    shown = _shown(parsed.text)
    try:
        literal: IPAddress | None = ipaddress.ip_address(parsed.host)
    except ValueError:
        literal = None
    if literal is not None:
        answers = [literal]
    else:
        try:
            found = resolver(parsed.host, parsed.port)
        except (OSError, UnicodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise TargetUnresolved(f"webhook URL {shown}: {parsed.host} does not resolve "
                                f"({reason})") from None
        answers = []
        for text in found:
            try:
                answers.append(ipaddress.ip_address(text.partition("%")[0]))
            except ValueError:
                raise TargetRefused(f"webhook URL {shown}: {parsed.host} resolves to "
                                    f"{text!r}, not an IP address") from None
        if not answers:
            raise TargetUnresolved(f"webhook URL {shown}: {parsed.host} has no address")
    for address in answers:
        problem = address_problem(address)
        if problem is None or (allow_private and not _never(problem)):
            continue
        what = (f"{address} is {problem}" if literal is not None
                else f"{parsed.host} resolves to {address}, {problem}")
        hint = "" if _never(problem) else f"; {_ALLOW_HINT}"
        raise TargetRefused(f"webhook URL {shown}: {what}{hint}")
    return Target(parsed, tuple(answers))


def _shown(text: str) -> str:
    """A URL as errors and logs quote it: at most 200 characters, controls escaped."""
    short = text if len(text) <= 200 else text[:197] + "..."
    return short if short.isprintable() and " " not in short else repr(short)
