"""New rows of several tables in one statement on PostgreSQL (issue 17): a
POST /threads/runs's thread, its messages and its run, each an INSERT in a
data-modifying CTE of one ``SELECT``, so one round trip instead of one per
row. PostgreSQL runs every such CTE to completion whether the query reads it
or not, and checks foreign keys at the statement's end, so a message may
reference the thread inserted beside it.

The statement is built once per shape (the tables, in order, and the columns
each row sets) with bound parameters: SQLAlchemy memoizes its cache key on
the statement, where a statement rebuilt around each row's values is keyed
again on every call (about 0.5 ms of CPU for a thread, a message and a run).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, Table, bindparam, insert, literal, select
from sqlalchemy.ext.asyncio import AsyncSession

from app import orm
from app.services import core_rows

# A statement's shape: each row's table and the columns it sets, in order.
_Shape = tuple[tuple[Table, tuple[str, ...]], ...]


@functools.lru_cache(maxsize=256)  # a shape per number of messages, mostly
def _statement(shape: _Shape) -> Select[Any]:
    statement = select(literal(1))
    for index, (table, columns) in enumerate(shape):
        values = {column: bindparam(f"r{index}_{column}", type_=table.c[column].type) for column in columns}
        statement = statement.add_cte(insert(table).values(values).cte(f"inserted_{index}"))
    return statement


async def insert_together(session: AsyncSession, rows: Sequence[orm.Base]) -> None:
    """Insert ``rows`` (new, in an order their foreign keys accept) with one
    statement; only the attributes set go in, as core_rows.insert_row does."""
    shape: list[tuple[Table, tuple[str, ...]]] = []
    parameters: dict[str, Any] = {}
    for index, row in enumerate(rows):
        table = type(row).__table__
        assert isinstance(table, Table)
        values = core_rows.values(row)
        shape.append((table, tuple(values)))
        parameters.update({f"r{index}_{column}": value for column, value in values.items()})
    await session.execute(_statement(tuple(shape)), parameters)
