"""The decision log line: values quoted exactly when a reader could misread them."""

from __future__ import annotations

import io
import json

import pytest

from keyrelay.config import default_config
from keyrelay.logs import DecisionLog


def _line(fields: dict[str, str]) -> str:
    stream = io.StringIO()
    DecisionLog(default_config().logging, stream).emit("keyrelay.test", "policy", fields)
    line = stream.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    return line.split(": policy ", 1)[1][:-1]


def test_plain_values_are_bare_and_empty_ones_left_out() -> None:
    fields = {"service": "policy", "queue_id": "", "sender": "a@b.example", "verdict": "allow"}
    assert _line(fields) == "service=policy sender=a@b.example verdict=allow"


@pytest.mark.parametrize(
    "value",
    ["two words", 'a"quote', "a=b", "back\\slash", "tab\there", "new\nline", "caf\u00e9",
     "nul\x00", "del\x7f", "surrogate\udce9"],
)
def test_a_value_a_reader_could_misread_is_quoted_as_json(value: str) -> None:
    line = _line({"service": "policy", "reply": value, "verdict": "refuse"})
    assert line == f"service=policy reply={json.dumps(value, ensure_ascii=False)} verdict=refuse"
