"""app/wire/jsontext.py: orjson's text, the stdlib's values where orjson's would differ."""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import BaseModel

from app.wire import jsontext
from app.wire.events import Event


@dataclass
class Point:
    x: int
    y: int


class _Wire(BaseModel):
    id: str
    text: str


@pytest.mark.parametrize(
    "value",
    [
        {"n": 2**70, "m": -(2**64), "u": 2**64 - 1, "i": -(2**63)},
        {"below_int64": -(2**63) - 1, "nineteen_digits": -(10**19) + 1},  # 19 digits, beyond 64 bits
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
        ('["été", -1234567890123456789012]', ["été", -1234567890123456789012]),  # after non-ASCII text
        ("[-9223372036854775809]", [-9223372036854775809]),  # negative, 19 digits, beyond 64 bits
        ("[-9223372036854775808, 18446744073709551615]", [-(2**63), 2**64 - 1]),  # orjson's own
        ('["\ud800", 123456789012345678901]', ["\ud800", 123456789012345678901]),  # a lone surrogate in the text
        ('["\\ud800", 12345678901234567890]', ["\ud800", 12345678901234567890]),  # one escaped
        ('{"choices": [{"index": 0, "delta": {"content": " w"}}], "created": 1733300000}', None),  # a chunk
    ],
)
def test_text_is_read_as_the_stdlib_reads_it(text: str | bytes, expected: Any) -> None:
    read = jsontext.loads(text)
    assert read == (json.loads(text) if expected is None else expected)
    assert repr(read) == repr(json.loads(text))  # integers stay integers


def test_what_orjson_refuses_is_read_by_the_stdlib() -> None:
    assert math.isnan(jsontext.loads("NaN"))
    assert jsontext.loads("[1e400]") == [math.inf]


def test_nan_is_written_as_null() -> None:
    assert jsontext.dumps({"x": math.nan, "y": math.inf}) == '{"x":null,"y":null}'


def test_line_breaks_other_than_newline_stay_escaped() -> None:
    """A reader splitting lines as str.splitlines does (httpx's iter_lines,
    Node's readline) would cut an SSE data: line at a raw U+2028."""
    text = jsontext.dumps({"instructions": "one\u2028two\u2029three\u0085four é"})
    assert text == '{"instructions":"one\\u2028two\\u2029three\\u0085four é"}'
    assert len(text.splitlines()) == 1


@pytest.mark.parametrize("value", [datetime.datetime(2026, 11, 30), Point(1, 2)])
def test_what_the_stdlib_refuses_is_refused(value: Any) -> None:
    """Not quietly stored as text (a Python-mode dump in a JSON column is a bug to see)."""
    with pytest.raises(TypeError):
        jsontext.dumps({"value": value})


def test_events_of_one_state_share_one_dump_and_its_text() -> None:
    events = Event.each(("thread.message.created", "thread.message.in_progress"), _Wire(id="msg_1", text="é"))
    assert [event.name for event in events] == ["thread.message.created", "thread.message.in_progress"]
    assert all(event.data == {"id": "msg_1", "text": "é"} for event in events)
    assert all(event.json == jsontext.dumps(event.data) for event in events)
