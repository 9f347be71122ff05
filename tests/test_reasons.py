"""The answer catalogue (keyrelay/decisions/reasons.py) is complete and docs/answers.md shows it
as it is: every reason tag has one documented answer, and the page is the catalogue."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from keyrelay.decisions import ANSWERS, LookupResult, Reason
from keyrelay.decisions.reasons import LOOKUP_ANSWERS, catalogue

DOC = Path(__file__).resolve().parent.parent / "docs" / "answers.md"
BEGIN, END = "<!-- generated: python -m keyrelay.decisions -->\n", "<!-- end generated -->"


def test_every_reason_and_lookup_result_has_one_documented_answer() -> None:
    assert list(ANSWERS) == list(Reason)
    assert list(LOOKUP_ANSWERS) == list(LookupResult)
    for reason, answer in ANSWERS.items():
        assert answer.texts and answer.when, reason
        allows = answer.code in {"-", "235 / -"}
        assert allows == (answer.texts == ("-",)), reason


def test_docs_answers_md_is_the_catalogue() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert BEGIN in text and END in text, "the generated block's markers are missing"
    shown = text.split(BEGIN, 1)[1].split(END, 1)[0]
    assert shown == catalogue(), "docs/answers.md is stale: regenerate its table with " \
        "python -m keyrelay.decisions"


@pytest.mark.parametrize("reason", list(Reason))
def test_every_reason_is_in_the_page(reason: Reason) -> None:
    assert re.search(rf"^\| `{reason}` \|", DOC.read_text(encoding="utf-8"), re.M)


def text_matches(reason: str, text: str) -> bool:
    """``text`` is one of the catalogue's texts for ``reason`` (``<...>`` stands for anything)."""
    for pattern in ANSWERS[Reason(reason)].texts:
        parts = re.split(r"<[^<>]*[a-z][^<>]*>", pattern)  # "<>" (the null sender) stays
        if re.fullmatch(".+".join(map(re.escape, parts)), text, re.S):
            return True
    return False


def test_text_patterns_match_what_they_stand_for_and_nothing_else() -> None:
    assert text_matches("revoked_key", "API key abcdefgh12345678 was revoked; create a new key")
    assert not text_matches("revoked_key", "API key x expired; create a new key")
    assert text_matches("sender_not_owned", "envelope sender: the null sender <> is not "
                        "accepted from an application; use an address of your verified domain")
