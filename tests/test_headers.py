"""Strict parsing of From:/Sender: values (keyrelay.headers.mailboxes).

The identity check is only as good as this parser: what it returns must be what a mail program
shows, and anything it cannot read unambiguously must raise ``HeaderError`` — never another
exception, which a front end would turn into a temporary failure instead of an explained 550.
"""

from __future__ import annotations

import random

import pytest

from keyrelay.headers import MAX_LENGTH, HeaderError, mailboxes

READABLE: dict[str, tuple[str, tuple[str, ...]]] = {
    # name: (header value, addresses)
    "bare address": ("user@example.com", ("user@example.com",)),
    "angle address": ("<user@example.com>", ("user@example.com",)),
    "display name": ("Jane Doe <jane@example.com>", ("jane@example.com",)),
    "quoted display name": ('"Jane Doe" <jane@example.com>', ("jane@example.com",)),
    "quoted comma in display name": ('"Doe, Jane" <jane@example.com>', ("jane@example.com",)),
    "quoted address in display name": (
        '"ceo@bank.example" <me@example.com>', ("me@example.com",)
    ),
    "escaped quote in display name": (
        r'"Jane \"JD\" Doe" <jane@example.com>', ("jane@example.com",)
    ),
    "encoded word, q": ("=?utf-8?q?J=C3=B6rg?= <j@example.com>", ("j@example.com",)),
    "encoded word, b": ("=?utf-8?b?SsO2cmc=?= <j@example.com>", ("j@example.com",)),
    "encoded word holding an address": (
        "=?utf-8?q?ceo=40bank=2Eexample?= <me@example.com>", ("me@example.com",)
    ),
    "non-ASCII display name": ("Jörg Müller <j@example.com>", ("j@example.com",)),
    "IDN domain, bare": ("j@bücher.example", ("j@bücher.example",)),
    "IDN domain, display name": ("Jörg <j@bücher.example>", ("j@bücher.example",)),
    "IDN domain, A-label": ("j@xn--bcher-kva.example", ("j@xn--bcher-kva.example",)),
    "two addresses": ("a@example.com, b@example.org", ("a@example.com", "b@example.org")),
    "two named addresses": (
        '"A, B" <a@example.com>, C <c@example.org>', ("a@example.com", "c@example.org")
    ),
    "group": ("team: a@example.com, b@example.org;", ("a@example.com", "b@example.org")),
    "group among addresses": (
        "x@example.net, team: a@example.com;", ("x@example.net", "a@example.com")
    ),
    "empty group": ("undisclosed-recipients:;", ()),
    "comment": ("user@example.com (the user)", ("user@example.com",)),
    # quotes the local part does not need: the same address to every parser (not ambiguous)
    "quoted local part": ('"j"@example.com', ("j@example.com",)),
    "quoted local part ending in a dot": ('"a."@example.com', ("a.@example.com",)),
    "quoted local part in brackets": ('Joe <"j"@example.com>', ("j@example.com",)),
    "folded": ("Jane Doe\r\n <jane@example.com>", ("jane@example.com",)),
    "folded with LF only": ("Jane Doe\n\t<jane@example.com>", ("jane@example.com",)),
    "surrounding blanks": ("  Jane <jane@example.com>  ", ("jane@example.com",)),
    "case kept": ("Jane@Example.COM", ("Jane@Example.COM",)),
    "plus and dots": ("first.last+tag@mail.example.com", ("first.last+tag@mail.example.com",)),
}


@pytest.mark.parametrize("case", READABLE.values(), ids=READABLE.keys())
def test_mailboxes_returns_every_address_in_order(case: tuple[str, tuple[str, ...]]) -> None:
    value, expected = case
    assert mailboxes(value) == expected


UNREADABLE: dict[str, str] = {
    "empty": "",
    "blank": " ",
    "tab only": "\t",
    "unterminated quote": '"Jane <jane@example.com>',
    "unterminated angle bracket": "Jane <jane@example.com",
    "stray closing angle bracket": "jane@example.com>",
    "two angle addresses": "Jane <a@example.com> <b@example.com>",
    "address as display name": "ceo@bank.example <me@example.com>",
    "two bare addresses without comma": "a@example.com b@example.com",
    "NUL after address": "jane@example.com\x00",
    "NUL inside address": "ja\x00ne@example.com",
    "NUL in display name": "Ja\x00ne <jane@example.com>",
    "header injection": "jane@example.com\r\nBcc: victim@example.org",
    "bare CR": "jane@example.com\rx",
    "no domain": "jane@",
    "no local part": "@example.com",
    "no at sign": "jane",
    "double at sign": "jane@@example.com",
    "address literal": "jane@[192.0.2.1]",
    "obsolete route": "<@relay.example:jane@example.com>",
    "null address": "<>",
    "empty list element": "a@example.com,,b@example.com",
    "only a comma": ",",
    "unterminated group": "team: a@example.com",
    "unterminated comment": "jane@example.com (comment",
    "only a colon": ":",
    "only a semicolon": ";",
    "unbalanced square bracket": "[jane@example.com",
    "lone surrogate": "\ud800@example.com",
    "surrogate after domain": "jane@example.com\udcff",
    "non-ASCII local part": "jäne\u3000@example.com",
    "deeply nested comments": "(" * 1500 + "jane@example.com",
    "stdlib AttributeError input": 'g:9a[<"x";9',
    "stdlib TypeError input": "\t.,\ud800@",
    "stdlib UnboundLocalError input (found by the fuzzer)": "0@[ ",
    "stdlib UnboundLocalError input, bracketed": "<0@[ ",
    "too long, otherwise valid": "a" * MAX_LENGTH + "@example.com",
    "too long list": "a@example.com, " * 1000,
    "very long blanks": " " * 100_000 + "x",
    "very long quotes": '"' * 100_001,
    "very long comments": "(a)" * 30_000,
    "very long angle brackets": "<" * 100_000,
    # read as no address by email.utils.getaddresses, as app@t93.example by the full parser
    # (found by test_fuzz_e2e.py): mail programs would disagree on who sent it
    "comment with a comma after the address (found by the fuzzer)": "app@t93.example (,)",
    "comment with a comma after a bracketed address": "<a@x.example> (x,y)",
    "comment with a comma, after a bare address": "alice@acme.example (Alice, in a comment)",
    # read as app@t54.example here, as 'app@t54.example\x1f' by mail programs (found by
    # test_fuzz_e2e.py): Python's \s counts \x1c-\x1f and \x85 as blanks
    "unit separator after the address (found by the fuzzer)": "a@t54.example\x1f",
    "file separator before the address": "\x1ca@example.com",
    "C1 next line in the display name": "x\x85 <a@example.com>",
    "C1 control as the domain (found by the fuzzer)": "0@\x80",
    "DEL after a bracketed address": "<a@example.com>\x7f",
    "no-break space after the address": "a@example.com\xa0",
}


def header_error(value: str) -> HeaderError:
    """The HeaderError ``mailboxes(value)`` raises; any other outcome fails the test."""
    try:
        found = mailboxes(value)
    except HeaderError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - any other exception is the failure reported
        # short report: pytest spends minutes rendering a RecursionError's 1000 frames
        pytest.fail(f"{type(exc).__name__} instead of HeaderError: {exc}", pytrace=False)
    pytest.fail(f"no HeaderError; got {found!r}", pytrace=False)


@pytest.mark.parametrize("value", UNREADABLE.values(), ids=UNREADABLE.keys())
@pytest.mark.timeout(10)
def test_mailboxes_refuses_ambiguous_or_hostile_input_with_header_error(value: str) -> None:
    assert str(header_error(value)), "the message says what is wrong"


@pytest.mark.timeout(10)
def test_mailboxes_blanks_just_under_the_length_limit_do_not_backtrack_for_ever() -> None:
    # the fast-path regex once took cubic time on a run of blanks: 2000 took 7 s, 4000 a minute;
    # ten such values must not add up to the timeout
    for blank in " \t\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0":
        header_error(blank * (MAX_LENGTH - 1) + "x")
    assert mailboxes(" " * (MAX_LENGTH - 20) + "a@example.com") == ("a@example.com",)


def test_mailboxes_accepts_a_value_of_exactly_the_maximum_length() -> None:
    value = "Jane <" + "j" * (MAX_LENGTH - len("Jane <@example.com>")) + "@example.com>"
    assert len(value) == MAX_LENGTH
    assert mailboxes(value) == (value[6:-1],)


def test_header_error_is_a_value_error_so_callers_can_catch_it_narrowly() -> None:
    assert issubclass(HeaderError, ValueError)


_FUZZ_ALPHABET = [
    *'aZ9@.<>"(),;:\\[] \t\r\n=?-_\x00\x7fé\u202e\ud800',
    "=?utf-8?q?", "?=", "a@b.example", "<a@b.example>", '"x"', "(c)", "g:", ";", "\r\n ",
    "=?utf-8?b?", "xn--", "\udcff",
]


@pytest.mark.parametrize("seed", range(4))
def test_mailboxes_on_random_input_returns_addresses_or_raises_header_error(seed: int) -> None:
    rnd = random.Random(seed)
    for _ in range(5000):
        value = "".join(rnd.choice(_FUZZ_ALPHABET) for _ in range(rnd.randint(0, 40)))
        try:
            found = mailboxes(value)
        except HeaderError:
            continue
        except Exception as exc:  # noqa: BLE001 - any other exception is the failure reported
            pytest.fail(f"{type(exc).__name__} on {value!r}: {exc}", pytrace=False)
        assert isinstance(found, tuple), value
        assert all(isinstance(a, str) and "@" in a for a in found), (value, found)
