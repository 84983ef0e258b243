"""Small rules shared by the resource services."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Select, any_, bindparam, func, literal_column, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from app import errors

T = TypeVar("T", str, int)


def require_id(param: str, value: str, prefix: str) -> str:
    """OpenAI checks a path id's prefix before looking it up (400, not 404)."""
    if not value.startswith(prefix):
        raise errors.invalid_id(param, value, prefix)
    return value


def metadata_or_empty(value: dict[str, Any] | None) -> dict[str, str]:
    return dict(value or {})


def one_of(session: AsyncSession, column: InstrumentedAttribute[T], values: Iterable[T]) -> ColumnElement[bool]:
    """``column IN values`` with the values bound as ONE parameter, however
    many a request lists (message attachments, a thread's files): ``in_()``
    binds one per value, and past asyncpg's 32,767 (SQLite's 250,000 as
    Debian builds it) the statement fails, a 500. PostgreSQL gets an array
    (``= ANY``), SQLite a JSON array it reads back with json_each.

    app/retrieval/filters.py (``_Compiler._member``) writes the same two
    forms as SQL text, for the filter it splices into the search's text
    query; it stays apart: it binds by name into that text, infers the
    array's type from a JSON expression rather than a column, and writes
    infinities SQLite's JSON can read (ids and seqs here need none of it).
    services/run_execution.py (``_not_executing``) writes the negated form
    for the claim, with a named parameter the claim's statement is built
    around once."""
    listed = list(values)
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(bindparam(None, listed, type_=ARRAY(column.type)))
    rows: Select[tuple[Any]] = select(literal_column("value")).select_from(
        func.json_each(bindparam(None, json.dumps(listed)))
    )
    return column.in_(rows.scalar_subquery())
