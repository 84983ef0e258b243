"""Attribute filters of a search as SQL over vector_store_files.attributes.

A search used to load every completed file row of the store to test the
filter in Python (295 ms at 9,500 files); compiled to SQL, the filter runs
inside the chunk query and only the rows of the hits are ever read.

Semantics (the same as OpenAI's, and as ``matches`` in
app.services.vector_store_search, which tests them on one row):
- eq / ne: equal value of the same JSON kind (number, string, boolean);
- gt / gte / lt / lte: both numbers or both strings, else false;
- in / nin: equal to one of the listed values;
- a missing key satisfies only the negative comparisons (ne, nin).

Every leaf is wrapped in COALESCE(..., FALSE) so a missing key is false, not
NULL, and NOT of it is true (two-valued logic, as in Python).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from app.wire.vector_stores import ComparisonFilter, CompoundFilter

Dialect = Literal["sqlite", "postgresql"]
Scalar = str | int | float | bool

# The most parameters a compiled filter may bind: below asyncpg's 32,767
# (and SQLite's default 32,766; Debian builds SQLite with 250,000), with room
# for the search's own. Past it the search is refused (FilterTooLarge, a
# 400); on PostgreSQL it failed with a 500.
# (An ``in`` list is one per kind of value: an ``or`` of thousands of
# ``eq`` is what reaches it, at about 30,000 on PostgreSQL, 7,500 on SQLite.)
MOST_PARAMETERS = 30_000


class FilterTooLarge(ValueError):
    """A filter whose SQL would bind more than MOST_PARAMETERS values."""


@dataclass
class Compiled:
    """A boolean SQL expression over the file row aliased ``alias``, with its bound parameters."""

    sql: str
    params: dict[str, object] = field(default_factory=dict)


class _Compiler:
    def __init__(self, dialect: Dialect, alias: str) -> None:
        self.dialect = dialect
        self.alias = alias
        self.params: dict[str, object] = {}
        self._names: Iterator[int] = itertools.count()
        # Each key's parameter, bound once however many comparisons name it.
        self._keys: dict[str, str] = {}

    def bind(self, value: object) -> str:
        name = f"attr_{next(self._names)}"
        self.params[name] = value
        return f":{name}"

    def _kind_and_value(self, key: str) -> tuple[str, str, str]:
        """SQL for the JSON kind of the key's value (number / string / boolean,
        anything else as it is), its value as text, and as a number."""
        column = f"{self.alias}.attributes"
        if self.dialect == "postgresql":
            key_param = self._key(key)
            # (json: the attributes' text as written, migration 0016_pgjson)
            kind = f"json_typeof({column} -> {key_param})"
            as_text = f"({column} ->> {key_param})"
            as_number = f"CASE WHEN {kind} = 'number' THEN ({column} ->> {key_param})::float8 END"
            return kind, as_text, as_number
        path = self._key('$."' + key.replace('"', '\\"') + '"')
        raw_kind = f"json_type({column}, {path})"
        kind = (
            f"CASE {raw_kind} WHEN 'integer' THEN 'number' WHEN 'real' THEN 'number' WHEN 'text' THEN 'string' "
            f"WHEN 'true' THEN 'boolean' WHEN 'false' THEN 'boolean' ELSE {raw_kind} END"
        )
        value = f"json_extract({column}, {path})"
        return kind, f"CAST({value} AS TEXT)", f"CAST({value} AS REAL)"

    def _equal(self, key: str, expected: Scalar) -> str:
        kind, as_text, as_number = self._kind_and_value(key)
        if isinstance(expected, bool):
            if self.dialect == "postgresql":
                return f"({kind} = 'boolean' AND {as_text} = {self.bind('true' if expected else 'false')})"
            return f"({kind} = 'boolean' AND {as_number} = {self.bind(1 if expected else 0)})"
        if isinstance(expected, int | float):
            return f"({kind} = 'number' AND {as_number} = {self.bind(float(expected))})"
        return f"({kind} = 'string' AND {as_text} = {self.bind(expected)})"

    def _one_of(self, key: str, items: Sequence[object]) -> str:
        """Equal to one of the items (as ``_equal``; the wire allows booleans,
        numbers and strings), the key's kind and value read once, with one
        membership test per kind of item: an OR of an equality per item read
        them again for each (a 12-value ``in`` over 11k file rows: ~40 ms of
        SQLite). Each kind's values are bound as one parameter (``_member``)."""
        booleans = [item for item in items if isinstance(item, bool)]
        numbers = [float(item) for item in items if isinstance(item, int | float) and not isinstance(item, bool)]
        strings = [item for item in items if isinstance(item, str)]
        kind, as_text, as_number = self._kind_and_value(key)
        parts: list[str] = []
        if booleans:
            if self.dialect == "postgresql":
                values = self._member(as_text, ["true" if item else "false" for item in booleans])
            else:
                values = self._member(as_number, [1 if item else 0 for item in booleans])
            parts.append(f"({kind} = 'boolean' AND {values})")
        if numbers:
            parts.append(f"({kind} = 'number' AND {self._member(as_number, numbers)})")
        if strings:
            parts.append(f"({kind} = 'string' AND {self._member(as_text, strings)})")
        return "(" + " OR ".join(parts) + ")" if parts else "FALSE"

    def _member(self, expression: str, values: Sequence[str | float | int]) -> str:
        """``expression`` is one of ``values`` (all of one kind), bound as ONE
        parameter however many there are: a parameter per value passed the
        databases' limits (SQLite 32,766, asyncpg 32,767) at ~32k values and
        the search answered 500. SQLite reads them from a JSON array (its
        values keep their kind: text, integer, real); PostgreSQL gets an array
        whose element type it infers from ``expression`` (text or float8).
        The same two forms as app.services.common.one_of, which builds them
        from SQLAlchemy columns; this one writes SQL text (see there why two)."""
        if self.dialect == "postgresql":
            return f"{expression} = ANY({self.bind(list(values))})"
        listed = self.bind(_json_array(values))
        return f"{expression} IN (SELECT value FROM json_each({listed}))"  # noqa: S608 (bound values only)

    def _order(self, key: str, op: str, expected: object) -> str:
        symbol = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}[op]
        kind, as_text, as_number = self._kind_and_value(key)
        if isinstance(expected, bool):
            return "FALSE"
        if isinstance(expected, int | float):
            return f"({kind} = 'number' AND {as_number} {symbol} {self.bind(float(expected))})"
        if isinstance(expected, str):
            collate = ' COLLATE "C"' if self.dialect == "postgresql" else ""
            return f"({kind} = 'string' AND {as_text}{collate} {symbol} {self.bind(expected)}{collate})"
        return "FALSE"

    def comparison(self, condition: ComparisonFilter) -> str:
        op, key, expected = condition.type, condition.key, condition.value
        if op in ("eq", "ne"):
            positive = self._equal(key, expected) if isinstance(expected, Scalar) else "FALSE"
        elif op in ("in", "nin"):
            positive = self._one_of(key, expected) if isinstance(expected, list) else "FALSE"
        else:
            positive = self._order(key, op, expected)
        leaf = f"COALESCE({positive}, FALSE)"
        return f"(NOT {leaf})" if op in ("ne", "nin") else leaf

    def compile(self, condition: ComparisonFilter | CompoundFilter) -> str:
        if isinstance(condition, ComparisonFilter):
            return self.comparison(condition)
        parts = [self.compile(item) for item in condition.filters]
        if not parts:
            return "TRUE" if condition.type == "and" else "FALSE"
        return _balanced(parts, f" {condition.type.upper()} ")

    def _key(self, bound: str) -> str:
        if bound not in self._keys:
            self._keys[bound] = self.bind(bound)
        return self._keys[bound]


def _balanced(parts: Sequence[str], operator: str) -> str:
    """The parts joined by ``operator`` as a balanced tree: a flat chain is
    as deep as it is long, and SQLite refuses an expression deeper than
    1,000 (a 500 for an ``or`` of 1,000 comparisons)."""
    if len(parts) == 1:
        return parts[0]
    middle = len(parts) // 2
    return f"({_balanced(parts[:middle], operator)}{operator}{_balanced(parts[middle:], operator)})"


def compile_filter(condition: ComparisonFilter | CompoundFilter, dialect: Dialect, alias: str = "f") -> Compiled:
    """FilterTooLarge if it would bind more than MOST_PARAMETERS values."""
    compiler = _Compiler(dialect, alias)
    compiled = Compiled(compiler.compile(condition), compiler.params)
    # SQLite's driver takes positional parameters: each use of a name is one.
    bound = len(compiled.params) if dialect == "postgresql" else compiled.sql.count(":attr_")
    if bound > MOST_PARAMETERS:
        raise FilterTooLarge(
            f"Invalid 'filters': the filter is too large: it needs {bound:,} bound values, "
            f"and at most {MOST_PARAMETERS:,} are supported. Compare long lists of values with 'in' or 'nin'."
        )
    return compiled


def _json_array(values: Sequence[str | float | int]) -> str:
    """The values as SQLite's JSON reads them back: infinities as 9e999 (read
    as the infinite real a bound infinity is), NaN left out (bound alone it
    was NULL, equal to nothing); JSON has neither."""
    if all(isinstance(value, str) or math.isfinite(value) for value in values):
        return json.dumps(list(values))
    kept = [value for value in values if not (isinstance(value, float) and math.isnan(value))]
    return "[" + ", ".join(_json_number(value) for value in kept) + "]"


def _json_number(value: str | float | int) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "9e999" if value > 0 else "-9e999"
    return json.dumps(value)
