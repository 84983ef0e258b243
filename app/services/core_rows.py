"""Writing new rows with one Core INSERT each instead of the ORM's unit of
work (issue 17): the hot create path (a thread, its messages, a run) builds
ORM objects as plain records, never adds them to the session, and inserts
them here. The ORM's flush (change tracking, dependency sorting, identity
map bookkeeping) cost more CPU than the statements themselves.

record() builds such an object without the mapped constructor's attribute
events. Only attributes that were set go into the INSERT, so column defaults apply
to the rest exactly as they would through the ORM. The objects stay
transient: a later ``session.get`` of the same id loads a separate instance,
and a change to one is written with update_row(), naming what changed (the
executor's answer message and its steps, app/runner).

``write_behind``: on SQLite the statement may wait for the transaction's
next statement or COMMIT instead of a thread hop of its own (app/db.py
WRITE_BEHIND): for rows nothing reads back in the same statement's outcome.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar

from sqlalchemy import Exists, Insert, Table, Update, bindparam, exists, insert, inspect, select, table, update
from sqlalchemy.ext.asyncio import AsyncSession

from app import db
from app.orm import Base

_Row = TypeVar("_Row", bound=Base)


@cache
def _maker(model: type[Base]) -> tuple[Callable[[], Any], frozenset[str]]:
    """The mapped class's maker of bare instances (with their ORM state), and its attributes."""
    mapper = inspect(model)
    return mapper.class_manager.new_instance, frozenset(attr.key for attr in mapper.column_attrs)


def record(model: type[_Row], /, **values: Any) -> _Row:
    """A new row of ``model`` as a record for insert_row() and new_rows:
    ``values`` (by attribute name) set straight into the instance, without
    the mapped constructor's attribute events (issue 17: a run's 22 values
    cost 19 µs of CPU that way, 2 µs here; a thread 9). The object is the
    ORM's own, transient, unchanged as to what reads or writes it later (an
    attribute set afterwards goes through the ORM as usual); a name that
    is no mapped attribute is a TypeError, as the constructor's."""
    new_instance, attributes = _maker(model)
    if not attributes.issuperset(values):
        raise TypeError(f"{sorted(values.keys() - attributes)!r} are not attributes of {model.__name__}")
    row: _Row = new_instance()
    row.__dict__.update(values)
    return row


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


def insert_statement(row: Base) -> Insert:
    """The row's INSERT with its values bound (to be sent inside another
    statement, as a data-modifying CTE on PostgreSQL)."""
    statement, _columns = _layout(type(row))
    return statement.values(values(row))


async def insert_row(session: AsyncSession, row: Base, *, write_behind: bool = False) -> None:
    statement, _columns = _layout(type(row))
    row_values = values(row)
    if write_behind:
        await db.write_behind(session, statement, row_values, db.WRITE_BEHIND)
    else:
        await session.execute(statement, row_values)


def update_statement(row: Base, keys: tuple[str, ...], *, unless_status: str | None = None) -> Update:
    """The UPDATE of update_row(), values bound."""
    insert_statement, columns = _layout(type(row))
    table = insert_statement.table
    assert isinstance(table, Table)
    state = row.__dict__
    changing = update(table).where(table.c.id == state["id"]).values({columns[key]: state[key] for key in keys})
    return changing if unless_status is None else changing.where(table.c.status != unless_status)


async def update_row(
    session: AsyncSession,
    row: Base,
    keys: tuple[str, ...],
    *,
    write_behind: bool = False,
    unless_status: str | None = None,
) -> None:
    """Write the attributes ``keys`` of a row inserted by insert_row() (by
    its primary key ``id``); the other columns are left as the database has
    them (another writer may have changed them meanwhile: message metadata).
    With ``unless_status``, only if the database's row has another status
    (else nothing is written, and that is no error)."""
    if write_behind:
        # Held back as the statement built once per shape (update_write's),
        # not one built per call with its values bound in.
        write = update_write(row, keys, _HELD_BACK_PREFIX, unless_status=unless_status)
        await db.write_behind(session, write.statement, write.params, db.WRITE_BEHIND)
        return
    await session.execute(update_statement(row, keys, unless_status=unless_status))


# The parameters' prefix of update_row's held-back UPDATE.
_HELD_BACK_PREFIX = "behind_"


@dataclass(frozen=True)
class Write:
    """A row's write for another statement to carry as a CTE (PostgreSQL):
    a statement built once per table, columns and place (bound parameters
    named ``<prefix><column>``: SQLAlchemy memoizes the cache key of a
    statement it sees again, issue 17), and its values."""

    statement: Insert | Update
    params: dict[str, Any]


def _only_with(guard: str) -> Exists:
    """The condition that the statement's CTE named ``guard`` returned a row."""
    return exists().select_from(table(guard))


@cache
def _insert_template(model: type[Base], columns: tuple[str, ...], prefix: str, guard: str | None = None) -> Insert:
    statement, _columns = _layout(model)
    if guard is None:
        return statement.values({column: bindparam(prefix + column) for column in columns})
    target = statement.table
    assert isinstance(target, Table)
    # Selected rather than VALUES, so that it may select nothing; typed, as
    # a select list's parameters get no type from the column they go in.
    selected = [bindparam(prefix + column, type_=target.c[column].type) for column in columns]
    return statement.from_select(list(columns), select(*selected).where(_only_with(guard)))


@cache
def _update_template(
    model: type[Base], columns: tuple[str, ...], prefix: str, guard: str | None = None, with_status: bool = False
) -> Update:
    statement, _columns = _layout(model)
    target = statement.table
    assert isinstance(target, Table)
    changing = (
        update(target)
        .where(target.c.id == bindparam(prefix + "id"))
        .values({column: bindparam(prefix + column) for column in columns})
    )
    if with_status:  # (the status it must not have: a parameter, never among ``columns``' names)
        changing = changing.where(target.c.status != bindparam(prefix + _UNLESS_STATUS))
    return changing if guard is None else changing.where(_only_with(guard))


# update_write's parameter (after its prefix) of the status a row must not have.
_UNLESS_STATUS = "unless_status"


def insert_write(row: Base, prefix: str, *, guard: str | None = None) -> Write:
    """insert_statement() as a Write (see there); with ``guard``, a write
    made only if the statement's CTE of that name returns a row (one the
    carrying statement defines before it)."""
    row_values = values(row)
    statement = _insert_template(type(row), tuple(row_values), prefix, guard)
    return Write(statement, {prefix + column: value for column, value in row_values.items()})


def update_write(
    row: Base, keys: tuple[str, ...], prefix: str, *, guard: str | None = None, unless_status: str | None = None
) -> Write:
    """update_statement() as a Write (see there); ``guard`` as insert_write()'s,
    ``unless_status`` as update_row()'s."""
    _statement, columns = _layout(type(row))
    state = row.__dict__
    changed = {columns[key]: state[key] for key in keys}
    params = {prefix + column: value for column, value in changed.items()}
    params[prefix + "id"] = state["id"]
    if unless_status is not None:
        params[prefix + _UNLESS_STATUS] = unless_status
    template = _update_template(type(row), tuple(changed), prefix, guard, unless_status is not None)
    return Write(template, params)
