"""Strict parsing of the address headers the identity check reads (From:, Sender:).

The check is only as good as its agreement with what the recipient's mail program shows, so
anything ambiguous is refused rather than guessed: a header the RFC 5322 parser reports any
defect for (obsolete routes, unbalanced brackets, NUL bytes, bare words) is an error. Common
shapes (``addr``, ``Name <addr>``, ``"Name" <addr>``) take a fast path; everything else goes
through the standard library's full RFC 5322 parser.
"""

from __future__ import annotations

import re
from email.errors import HeaderParseError
from email.headerregistry import HeaderRegistry
from email.utils import getaddresses

_ADDR = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?"
# Possessive "*+": the display name and the blanks around it overlap, and plain backtracking
# took cubic time on a run of blanks (4000 spaces: about a minute).
_SIMPLE = re.compile(
    rf"""[ \t]*+(?:
        (?:[^<>"(),;:@\\\[\]\x00-\x1f\x7f]*+|"(?:[^"\\\x00-\x1f\x7f]|\\[^\x00-\x1f\x7f])*")
        [ \t]*<(?P<bracketed>{_ADDR})>
      | (?P<bare>{_ADDR})
    )[ \t]*""",
    re.VERBOSE,
)
_FOLD = re.compile(r"\r?\n(?=[ \t])")
# Control characters (C0 but the tab, DEL, C1) have no place in an address header. Python's
# "\s" counts \x1c-\x1f and \x85 as blanks, so "app@example.com\x1f" read as
# app@example.com here while a mail program reads the address with the \x1f in it: the fast
# path below takes only spaces and tabs as blanks, and these are refused first.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
# The stdlib parser is quadratic on some inputs (long runs of quotes or comments take seconds at
# 16 kB, and Postfix passes headers up to header_size_limit, 100 kB by default). No real From:
# or Sender: comes near this; refusing longer ones bounds the work per message.
MAX_LENGTH = 2048


def _plain(address: str) -> str:
    """An address as compared across parsers: without quotes, in lower case."""
    return address.replace('"', "").lower()


class HeaderError(ValueError):
    """The header cannot be read unambiguously; the message says why."""


def mailboxes(value: str) -> tuple[str, ...]:
    """The addresses of an address-list header value, in order (group syntax flattened)."""
    if len(value) > MAX_LENGTH:
        raise HeaderError(f"is longer than {MAX_LENGTH} characters")
    unfolded = _FOLD.sub("", value)
    if not unfolded:
        raise HeaderError("is empty")  # RFC 5322 address-list: at least one address
    if _CONTROL.search(unfolded):
        raise HeaderError("contains control characters")
    simple = _SIMPLE.fullmatch(unfolded)
    if simple:
        return (simple.group("bracketed") or simple.group("bare"),)
    try:
        header = HeaderRegistry()("from", unfolded)
    # stdlib parser edge cases: besides its own errors it raises IndexError ("a@"),
    # AttributeError ("g:9a[<\"x\";9"), TypeError ("\t.,\ud800@"), UnboundLocalError
    # ("0@[ ", found by the fuzzer) and RecursionError (one level per nested comment
    # "((((...") on hostile input. Whatever it raises, the header cannot be read: a clear
    # refusal, not an internal error (which would be a 451 the sender retries forever).
    except RecursionError:
        raise HeaderError("cannot be parsed (too deeply nested)") from None
    except HeaderParseError as exc:
        raise HeaderError(f"cannot be parsed ({exc})") from None
    except MemoryError:
        raise  # ours, not the header's: the milter answers 451 and the sender retries
    except Exception as exc:  # noqa: BLE001 - see above
        raise HeaderError(f"cannot be parsed ({type(exc).__name__} in Python's parser)") from None
    if header.defects:
        raise HeaderError(f"is malformed ({header.defects[0]})")
    found = []
    for address in header.addresses:  # type: ignore[attr-defined]
        if not address.username or not address.domain or address.domain.startswith("["):
            raise HeaderError(f"has an address without a domain name: {address.addr_spec!r}")
        found.append(str(address.addr_spec))
    # Mail programs do not all parse as fully as RFC 5322 allows: the simpler parser many of
    # them use (email.utils.getaddresses) reads "app@example.com (,)" as no address at all.
    # A value the two parsers read differently is ambiguous: refused, never guessed.
    # Quotes around a local part are spelling, not a different address: '"j"@example.com' is
    # j@example.com to both (the full parser drops quotes it does not need).
    simpler = [address for _, address in getaddresses([unfolded]) if address]
    if [_plain(a) for a in simpler] != [_plain(a) for a in found]:
        raise HeaderError("is ambiguous: mail programs read different addresses in it; write "
                          "it as Name <address>")
    return tuple(found)
