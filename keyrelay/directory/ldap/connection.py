"""Talking to the LDAP server with ldap3: the typed connection, connecting, and turning
ldap3's answers and errors into keyrelay's.

ldap3 ships no type hints (setup.cfg lets mypy import it untyped, so ``ldap3.Connection``
would be ``Any``): ``Connection`` below is the part of ``ldap3.Connection`` keyrelay uses,
which mypy checks every call against; ``connect`` returns a real ``ldap3.Connection``.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol, TypedDict

import ldap3
from ldap3.core.exceptions import LDAPException

from ...errors import DirectoryUnavailable

if TYPE_CHECKING:
    from ...config import LdapConfig


class ResponseItem(TypedDict, total=False):
    """One item of ``Connection.response`` (a search's entries and references)."""

    type: str  # "searchResEntry" for an entry
    dn: str
    raw_attributes: dict[str, list[bytes | str]]


class Result(TypedDict, total=False):
    """``Connection.result``: the outcome of the last operation."""

    result: int  # 0: success
    description: str
    message: str
    referrals: list[str] | None


# attribute -> [(ldap3.MODIFY_ADD | MODIFY_DELETE | MODIFY_REPLACE, values), ...]
Changes = dict[str, list[tuple[str, list[str]]]]


class _StandardExtensions(Protocol):
    def paged_search(self, search_base: str, search_filter: str, search_scope: str, *,
                     attributes: list[str], paged_size: int, generator: bool
                     ) -> Iterator[ResponseItem]: ...


class _Extensions(Protocol):
    @property
    def standard(self) -> _StandardExtensions: ...


class Connection(Protocol):
    """The part of ``ldap3.Connection`` keyrelay uses (opened with ``raise_exceptions``:
    a failed operation raises an ``LDAPException``, except the few that return False,
    which ``done`` turns into an error)."""

    @property
    def response(self) -> list[ResponseItem] | None: ...

    @property
    def result(self) -> Result | None: ...

    @property
    def entries(self) -> Sequence[object]: ...

    @property
    def extend(self) -> _Extensions: ...

    def search(self, search_base: str, search_filter: str, search_scope: str = ..., *,
               attributes: list[str] | None = None, size_limit: int = 0) -> bool: ...

    def add(self, dn: str, *, attributes: dict[str, list[str]]) -> bool: ...

    def modify(self, dn: str, changes: Changes) -> bool: ...

    def delete(self, dn: str) -> bool: ...

    def unbind(self) -> bool: ...


def connect(config: LdapConfig, password: str | None) -> Connection:
    """A bound ldap3 connection to the first of ``urls`` that answers (StartTLS first when
    configured). Raises ``DirectoryUnavailable`` naming every server's fault; callers go
    through ``LdapDirectory._guarded``, which turns later LDAP and socket errors into the same.

    The servers are tried here, in order, rather than by an ldap3 ``ServerPool``: after a
    failed round the pool waits ``POOLING_LOOP_TIMEOUT`` (10 s) before giving up, which
    held a refresh, and every command of the CLI, for 10 s whenever LDAP was down.
    """
    tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=config.ca_file or None,
                    version=ssl.PROTOCOL_TLS_CLIENT)
    timeout = max(1, round(config.timeout))  # ldap3 #1068: whole seconds
    faults = []
    for url in config.urls:
        server = ldap3.Server(url, use_ssl=url.startswith("ldaps://"), tls=tls,
                              get_info=ldap3.NONE, connect_timeout=timeout)
        conn = ldap3.Connection(server, user=config.bind_dn or None, password=password,
                                receive_timeout=timeout, raise_exceptions=True,
                                auto_bind=ldap3.AUTO_BIND_NONE, read_only=False,
                                # a replica's referral for a write: an error, never a
                                # second bind elsewhere (ldap3 would skip StartTLS there)
                                auto_referrals=False)
        try:
            conn.open()
            if config.start_tls and not server.ssl:
                conn.start_tls()
            conn.bind()
        except (LDAPException, OSError) as exc:
            unbind(conn)
            faults.append(f"{url}: {reason(exc)}")
            continue
        bound: Connection = conn  # ldap3 is untyped: typed from here on
        return bound
    raise DirectoryUnavailable(f"LDAP {'; '.join(faults)}")


def done(conn: Connection, ok: bool, what: str) -> None:
    """Raise when an operation did not succeed without raising itself: ldap3 returns False
    for a referral (a read-only replica asked to write), a size or a time limit."""
    if ok:
        return
    result = conn.result or {}
    text = " ".join(str(p) for p in (result.get("description"), result.get("message")) if p)
    referrals = result.get("referrals")
    if referrals:
        text += (f" (referral to {', '.join(referrals)}: a read-only replica; give the "
                 "keyrelay CLI a configuration whose urls list the provider first)")
    raise DirectoryUnavailable(f"LDAP refused {what}: {text or 'no reason given'}")


def attributes_of(item: ResponseItem) -> dict[str, list[str]]:
    """An ldap3 response item's raw attributes, names lowercased, values decoded."""
    raw = item.get("raw_attributes", {})
    return {name.lower(): [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]
            for name, values in raw.items()}


def entries_in(conn: Connection) -> list[ResponseItem]:
    """The entries of the last search's answer (not its references)."""
    return [item for item in conn.response or () if item.get("type") == "searchResEntry"]


def reason(exc: Exception) -> str:
    description = getattr(exc, "description", None)
    message = getattr(exc, "message", None)
    text = " ".join(str(p) for p in (description, message) if p) or str(exc) or type(exc).__name__
    return text.strip()


def unbind(conn: Connection) -> None:
    with contextlib.suppress(Exception):
        conn.unbind()
