"""JSON text on a run's hot path: the run log and SSE frames (wire/events.py)
and the databases' JSON columns (db.py's engines), written and read by orjson
(issue 17: a sixth of the stdlib's CPU for the same text).

orjson and the stdlib agree on what these values are, with three
differences handled here:

* Non-ASCII text is written as UTF-8 rather than ``\\uXXXX`` escapes: the
  same JSON to every reader (SQLite's JSON functions, PostgreSQL's jsonb,
  the SDKs), and what pydantic's own JSON (every response body) writes.
  Lone surrogates, which UTF-8 cannot carry, are refused at the edge
  (``_all_storable`` in wire/common.py); should one come, the stdlib
  writes it as before.
* orjson refuses integers beyond 64 bits and non-string keys: the stdlib
  writes those values. Free-form objects from requests (a function's
  ``parameters``, a ``json_schema``) may hold any integer.
* orjson reads an integer beyond 64 bits as a float. Any such integer has
  at least 20 digits, so text with a run of 20 digits is read by the stdlib
  (exactly, as before); so is what orjson refuses (``NaN``, ``1e400``).

Floats are written in their shortest form as before, spelled as JSON allows
(``1e16``, not ``1e+16``); NaN and the infinities, which JSON has no words
for, are written as ``null``, as pydantic writes them in response bodies
(the stdlib wrote ``NaN``, which PostgreSQL's jsonb and JSON.parse refuse).
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

_STDLIB_DUMPS = json.JSONEncoder(separators=(",", ":")).encode
# Every integer beyond orjson's 64 bits (-2**63 .. 2**64-1) has 20 digits or more.
_LONG_DIGITS = re.compile(r"[0-9]{20}")
_LONG_DIGITS_BYTES = re.compile(rb"[0-9]{20}")


def dumps(value: Any) -> str:
    """``value`` as compact JSON text (no spaces after ``,`` and ``:``)."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return _STDLIB_DUMPS(value)


def loads(text: str | bytes) -> Any:
    """The value of JSON ``text``, integers of any size kept exact."""
    found = _LONG_DIGITS.search(text) if isinstance(text, str) else _LONG_DIGITS_BYTES.search(text)
    if found is None:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return json.loads(text)
