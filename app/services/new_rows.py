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

Only for a few rows (MAX_ROWS_TOGETHER): SQLAlchemy compiles such a statement
in time quadratic in its CTEs (on the event loop: 0.2 s for 100 messages,
2.9 s for 400), asyncpg refuses more than 32,767 parameters (about 2,340
messages), and every shape would be a statement of its own in the caches.
More rows go table by table, each run of rows of one table and columns in
one executemany INSERT (a thread, then its messages, then its run).

POST /threads/runs puts these CTEs in the statement that logs the run's
opening events (run_events.insert_with_rows, through with_inserts()).

A Condition (a run made from remembered assistant defaults: run_defaults)
makes the statement all or nothing: its last row (the run) is inserted
``SELECT <values> WHERE <condition>`` and every other row, the events too,
``SELECT <values> FROM <that insert's RETURNING>``: where the condition
fails no row goes in and nothing fails (no foreign key left dangling). A
Condition may also name a partial unique index of the last row's table
(Unique) whose refusal counts as the condition failing: its insert is ``ON
CONFLICT DO NOTHING`` on that index (POST /threads/{id}/runs: a run of the
thread already live).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import CTE, ColumnElement, Select, Table, TextClause, bindparam, insert, literal, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.selectable import HasCTE

from app import orm
from app.services import core_rows

# The most rows inserted by one statement of CTEs: a thread, 16 messages, a run.
MAX_ROWS_TOGETHER = 18

# A statement's shape: each row's table and the columns it sets, in order.
Shape = tuple[tuple[Table, tuple[str, ...]], ...]


@dataclass(frozen=True)
class Unique:
    """A partial unique index: its ``columns`` over the rows ``where`` holds."""

    columns: tuple[str, ...]
    where: ColumnElement[bool] | TextClause


@dataclass(frozen=True, eq=False)
class Condition:
    """A condition new rows go in under, built once with bound parameters
    (a module's constant): the statement caches key on it by identity.
    ``unless_in``: nor where that index of the last row's table already
    holds a row like it (its insert does nothing rather than fail)."""

    clause: ColumnElement[bool]
    unless_in: Unique | None = None


@dataclass(frozen=True)
class OnlyIf:
    """A statement's new rows go in only if ``condition`` holds, its
    parameters ``parameters``; else none does and the caller raises what
    ``refused(session)`` says (it may read in the session's transaction,
    which the refusal leaves usable)."""

    condition: Condition
    parameters: Mapping[str, Any]
    refused: Callable[[AsyncSession], Awaitable[Exception]]


@dataclass
class Unwritten:
    """New rows a change left for its caller to insert with their events
    (run_log.append's ``inserting``, in that order), and the condition they
    go in under, if any (``inserting_only_if``)."""

    rows: list[orm.Base] = field(default_factory=list)
    only_if: OnlyIf | None = None


# The CTE of a Condition's last row: every other insert of the statement
# selects from it (run_events' log insert names it in its SQL text).
GUARDED_CTE = "guarded_row"

_Statement = TypeVar("_Statement", bound=HasCTE)


def with_inserts(statement: _Statement, shape: Shape, condition: Condition | None = None) -> _Statement:
    """``statement`` with an INSERT CTE per row of ``shape``, its values the
    parameters that shape_of() names; with ``condition``, the last row's
    CTE (GUARDED_CTE) goes first, and every row goes in only if it holds
    (see the module's docstring)."""
    guarded: CTE | None = None
    if condition is not None:
        index, (table, columns) = len(shape) - 1, shape[-1]
        values = select(*_parameters(index, table, columns)).where(condition.clause)
        key = next(iter(table.primary_key.columns))
        guarded = _guarded_insert(table, columns, values, condition.unless_in).returning(key).cte(GUARDED_CTE)
        statement = statement.add_cte(guarded)
        shape = shape[:-1]
    for index, (table, columns) in enumerate(shape):
        if guarded is None:
            inserted = insert(table).values(dict(zip(columns, _parameters(index, table, columns), strict=True)))
        else:
            from_guarded = select(*_parameters(index, table, columns)).select_from(guarded)
            inserted = insert(table).from_select(list(columns), from_guarded)
        statement = statement.add_cte(inserted.cte(f"inserted_{index}"))
    return statement


def _guarded_insert(
    table: Table, columns: tuple[str, ...], values: Select[Any], unless_in: Unique | None
) -> postgresql.Insert:
    inserted = postgresql.insert(table).from_select(list(columns), values)
    if unless_in is None:
        return inserted
    indexed = [table.c[column] for column in unless_in.columns]
    return inserted.on_conflict_do_nothing(index_elements=indexed, index_where=unless_in.where)


def _parameters(index: int, table: Table, columns: tuple[str, ...]) -> list[Any]:
    return [bindparam(f"r{index}_{column}", type_=table.c[column].type) for column in columns]


@functools.lru_cache(maxsize=256)  # a shape per number of messages (at most 16), mostly
def _statement(shape: Shape) -> Select[Any]:
    return with_inserts(select(literal(1)), shape)


def shape_of(rows: Sequence[orm.Base]) -> tuple[Shape, dict[str, Any]]:
    """The shape of ``rows`` (only the attributes set go in, as
    core_rows.insert_row does) and the parameters of with_inserts()'s CTEs."""
    shape: list[tuple[Table, tuple[str, ...]]] = []
    parameters: dict[str, Any] = {}
    for index, row in enumerate(rows):
        table = type(row).__table__
        assert isinstance(table, Table)
        values = core_rows.values(row)
        shape.append((table, tuple(values)))
        parameters.update({f"r{index}_{column}": value for column, value in values.items()})
    return tuple(shape), parameters


async def insert_together(session: AsyncSession, rows: Sequence[orm.Base]) -> None:
    """Insert ``rows`` (new, in an order their foreign keys accept) with one
    statement (a few: MAX_ROWS_TOGETHER; more go table by table); only the
    attributes set go in, as core_rows.insert_row does."""
    if len(rows) > MAX_ROWS_TOGETHER:
        await _insert_by_table(session, rows)
        return
    shape, parameters = shape_of(rows)
    await session.execute(_statement(shape), parameters)


async def _insert_by_table(session: AsyncSession, rows: Sequence[orm.Base]) -> None:
    """Insert ``rows`` in their order, each run of rows of one table and
    columns with one executemany INSERT (SQLAlchemy sends it in batches the
    driver accepts)."""

    def table_and_values(row: orm.Base) -> tuple[Table, dict[str, Any]]:
        table = type(row).__table__
        assert isinstance(table, Table)
        return table, core_rows.values(row)

    def shape(item: tuple[Table, dict[str, Any]]) -> tuple[Table, tuple[str, ...]]:
        return item[0], tuple(item[1])

    for (table, _columns), same in itertools.groupby(map(table_and_values, rows), key=shape):
        await session.execute(insert(table), [values for _table, values in same])
