"""JSON text on a run's hot path: the run log and SSE frames (wire/events.py)
and the databases' JSON columns (db.py's engines), written and read by orjson
(issue 17: a sixth of the stdlib's CPU for the same text).

orjson and the stdlib agree on what these values are, with three
differences handled here:

* Non-ASCII text is written as UTF-8 rather than ``\\uXXXX`` escapes: the
  same JSON to every reader (SQLite's JSON functions, PostgreSQL's json,
  the SDKs), and what pydantic's own JSON (every response body) writes.
  Lone surrogates, which UTF-8 cannot carry, are refused at the edge
  (``_all_storable`` in wire/common.py); should one come, the stdlib
  writes it as before.
* orjson refuses integers beyond 64 bits and non-string keys: the stdlib
  writes those values. Free-form objects from requests (a function's
  ``parameters``, a ``json_schema``) may hold any integer.
* orjson reads an integer beyond 64 bits as a float. Any such integer has
  20 digits or more, or is negative with 19 (-2**63-1 and below), so text
  with such a run of digits is read by the stdlib (exactly, as before); so
  is what orjson refuses (``NaN``, ``1e400``).

U+2028, U+2029 and U+0085 stay escaped as the stdlib escaped them: readers
that split lines as Python's ``str.splitlines`` does (httpx's
``iter_lines``, Node's readline) would cut an SSE ``data:`` line at them.
datetimes and dataclasses, which the stdlib refuses, are refused still
(orjson would quietly write them as text).

Floats are written in their shortest form as before (a small exponent
without its leading zero: ``1e-7``, not ``1e-07``); NaN and the infinities,
which JSON has no words for, are written as ``null``, as pydantic writes
them in response bodies (the stdlib wrote ``NaN``, which PostgreSQL's json
and JSON.parse refuse). A value orjson refuses as a whole (an integer
beyond 64 bits, a non-string key) is written by the stdlib, NaN and the
infinities in it spelled as the stdlib always spelled them.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

_STDLIB_DUMPS = json.JSONEncoder(separators=(",", ":")).encode
# Every integer beyond orjson's 64 bits (-2**63 .. 2**64-1) has 20 digits
# or more, or is negative with 19. They are looked for in the text's UTF-8
# with every ASCII digit made "0", "-" kept and every other byte made a
# space: one C pass and two substring searches, where a regular expression
# for the same runs took longer than the stdlib's whole parse of a
# 200-byte provider chunk (issue 17: each streamed token is one).
_DIGITS_MASK = bytes(
    ord("0") if byte in b"0123456789" else ord("-") if byte == ord("-") else ord(" ") for byte in range(256)
)
_TWENTY_DIGITS = b"0" * 20
_MINUS_NINETEEN_DIGITS = b"-" + b"0" * 19
_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS  # refused, as by the stdlib
_LINE_BREAKS = ("\u2028", "\u2029", "\u0085")


def dumps(value: Any) -> str:
    """``value`` as compact JSON text (no spaces after ``,`` and ``:``)."""
    try:
        text = orjson.dumps(value, option=_OPTIONS).decode()
    except orjson.JSONEncodeError:
        return _STDLIB_DUMPS(value)
    if text.isascii():  # a flag's read: the common case costs nothing more
        return text
    for line_break in _LINE_BREAKS:
        if line_break in text:
            text = text.replace(line_break, f"\\u{ord(line_break):04x}")
    return text


def loads(text: str | bytes) -> Any:
    """The value of JSON ``text``, integers of any size kept exact."""
    if not _long_digits(text):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return json.loads(text)


def _long_digits(text: str | bytes) -> bool:
    """Whether ``text`` has a run of digits that may be an integer beyond 64
    bits (in a string too: then the stdlib reads it, as exactly)."""
    # (surrogatepass: a lone surrogate, which orjson refuses, is no digit.)
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    masked = data.translate(_DIGITS_MASK)
    return _TWENTY_DIGITS in masked or _MINUS_NINETEEN_DIGITS in masked
