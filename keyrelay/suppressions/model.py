"""What a suppression is, the interface both stores share, and the cleaning of what is stored
(docs/suppressions.md).

A suppression is per account: ``(account, address)``, the address in keyrelay's normal form
(``names.address``: lower case). Its ``reason`` and ``status`` usually come from a remote
server's bounce (hostile text): ``clean_text`` keeps them printable, on one line and short
before anything stores them, so neither a log line nor an SMTP reply can be driven by them.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Literal, Protocol

from .. import names
from ..errors import KeyrelayError, UserError

Source = Literal["bounce", "manual", "import"]
SOURCES: tuple[Source, ...] = ("bounce", "manual", "import")
# longest reason and status kept (characters); a remote server may send kilobytes
MAX_REASON = 300
MAX_STATUS = 16
_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
_SPACES = re.compile(r"\s+")


class SuppressionsUnavailable(KeyrelayError):
    """The suppression store cannot answer (Redis away, the SQLite file unreadable): a
    temporary answer, never an unchecked accept."""


def clean_text(text: str, most: int = MAX_REASON) -> str:
    """``text`` on one line of printable characters (controls, format characters and line
    breaks become one space), at most ``most`` characters (cut with "...")."""
    kept = "".join(" " if unicodedata.category(c)[0] in "CZ" and c != " " else c
                   for c in text)
    kept = _SPACES.sub(" ", kept).strip()
    if len(kept) > most:
        kept = kept[:most - 3].rstrip() + "..."
    return kept


def clean_status(text: str) -> str:
    """An enhanced status code (``5.1.1``), or "" for anything else."""
    text = text.strip()
    return text if _STATUS.fullmatch(text) else ""


def address(text: str) -> str:
    """``text`` as the address a suppression is keyed by; UserError naming it otherwise
    (control characters, no @, a bad domain)."""
    if any(not c.isprintable() or c.isspace() for c in text.strip()):
        raise UserError(f"invalid address {text.strip()!r}: control characters or spaces")
    return names.address(text)


@dataclass(frozen=True, slots=True)
class Suppression:
    """One suppressed address of an account."""

    address: str  # normal form (``address``)
    reason: str  # clean_text: e.g. the remote server's "550 5.1.1 user unknown"
    status: str  # enhanced status of the bounce, "" when not known
    created: int  # Unix seconds: when it was first suppressed
    source: Source  # bounce, manual or import

    def value(self) -> str:
        """The compact JSON both stores keep beside the address."""
        return json.dumps({"reason": self.reason, "status": self.status,
                           "created": self.created, "source": self.source},
                          separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_value(cls, address: str, value: str) -> Suppression:
        """The record kept under ``address``; SuppressionsUnavailable when it is not ours."""
        try:
            found = json.loads(value)
            source = found.get("source", "manual")
            return cls(address, clean_text(str(found.get("reason", ""))),
                       clean_status(str(found.get("status", ""))), int(found["created"]),
                       source if source in SOURCES else "manual")
        except (ValueError, TypeError, KeyError, AttributeError):
            raise SuppressionsUnavailable(
                f"the suppression of {address} is not a record keyrelay wrote") from None

    def to_json(self) -> dict[str, object]:
        return {"email": self.address, "created": self.created, "status": self.status,
                "reason": self.reason, "source": self.source}


def make(address_text: str, reason: str, status: str, created: int,
         source: Source) -> Suppression:
    """A suppression with its address normalised and its texts cleaned."""
    return Suppression(address(address_text), clean_text(reason), clean_status(status),
                       int(created), source)


class SuppressionStore(Protocol):
    """Where an account's suppressions live: SQLite (one node, ``counters.backend:
    memory``) or Redis (every node, ``counters.backend: redis``); docs/suppressions.md.
    Every method raises SuppressionsUnavailable when the store cannot answer."""

    def get(self, account: str, address: str) -> Suppression | None:
        """The suppression of ``address`` (normal form) for ``account``, or None."""

    def add(self, account: str, suppression: Suppression, *, replace: bool = True) -> bool:
        """Keep ``suppression``; True when the address was not suppressed yet. An address
        already suppressed keeps its ``created`` and ``source``; its reason and status are
        replaced when ``replace``."""

    def add_many(self, account: str, suppressions: list[Suppression]) -> int:
        """Keep each of ``suppressions`` (``add`` with replace); how many were new."""

    def remove(self, account: str, address: str) -> bool:
        """Forget the suppression; True when there was one."""

    def list(self, account: str, after: str = "", limit: int = 1000) -> list[Suppression]:
        """Up to ``limit`` suppressions of ``account`` whose addresses sort after ``after``,
        in address order (paging: pass the last address seen)."""

    def count(self, account: str) -> int:
        """How many addresses ``account`` suppresses."""

    def close(self) -> None:
        """Let go of the file or connection."""
