"""app/wire/jsontext.py: orjson's text, the stdlib's values where orjson's would differ."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from app.wire import jsontext


@pytest.mark.parametrize(
    "value",
    [
        {"n": 2**70, "m": -(2**64), "u": 2**64 - 1, "i": -(2**63)},
        {1: "a non-string key", "b": [None, True, 2.5]},
        {"text": "Grüße, 世界 \u2028"},
        [[[[{"deep": []}]]]],
    ],
)
def test_values_written_and_read_back_unchanged(value: Any) -> None:
    text = jsontext.dumps(value)
    assert jsontext.loads(text) == json.loads(json.dumps(value))
    assert jsontext.loads(text.encode()) == json.loads(json.dumps(value))


def test_non_ascii_is_written_as_utf8_compactly() -> None:
    assert jsontext.dumps({"a": "é", "b": [1, 2]}) == '{"a":"é","b":[1,2]}'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"n": 123456789012345678901234}', {"n": 123456789012345678901234}),  # a float to orjson
        (b"[18446744073709551616]", [18446744073709551616]),
        ('"12345678901234567890 in a string"', "12345678901234567890 in a string"),
        ('"\\u00e9t\\u00e9"', "été"),  # as the stdlib wrote rows before
    ],
)
def test_text_is_read_as_the_stdlib_reads_it(text: str | bytes, expected: Any) -> None:
    assert jsontext.loads(text) == expected


def test_what_orjson_refuses_is_read_by_the_stdlib() -> None:
    assert math.isnan(jsontext.loads("NaN"))
    assert jsontext.loads("[1e400]") == [math.inf]


def test_nan_is_written_as_null() -> None:
    assert jsontext.dumps({"x": math.nan, "y": math.inf}) == '{"x":null,"y":null}'
