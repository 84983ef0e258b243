"""Writing new rows with one Core INSERT each instead of the ORM's unit of
work (issue 17): the hot create path (a thread, its messages, a run) builds
ORM objects as plain records, never adds them to the session, and inserts
them here. The ORM's flush (change tracking, dependency sorting, identity
map bookkeeping) cost more CPU than the statements themselves.

Only attributes that were set go into the INSERT, so column defaults apply
to the rest exactly as they would through the ORM. The objects stay
transient: a later ``session.get`` of the same id loads a separate instance.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from sqlalchemy import Insert, Table, insert, inspect
from sqlalchemy.ext.asyncio import AsyncSession

from app.orm import Base


@cache
def _layout(model: type[Base]) -> tuple[Insert, dict[str, str]]:
    """The table's INSERT, and each mapped attribute's column name."""
    mapper = inspect(model)
    table = mapper.local_table
    assert isinstance(table, Table), model
    columns = {attr.key: attr.columns[0].name for attr in mapper.column_attrs}
    return insert(table), columns


def values(row: Base) -> dict[str, Any]:
    """The row's set attributes, keyed by column name."""
    _statement, columns = _layout(type(row))
    state = row.__dict__
    return {column: state[key] for key, column in columns.items() if key in state}


async def insert_row(session: AsyncSession, row: Base) -> None:
    statement, _columns = _layout(type(row))
    await session.execute(statement, values(row))
