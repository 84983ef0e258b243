"""A thread is locked while one of its runs is live (OpenAI: 400, not 409).

The rule holds under concurrency because the check and the write that
follows it are atomic on both engines: on PostgreSQL the thread row stays
locked until the transaction ends (live_run_of_owned_thread() and
active_run() below), on SQLite every
transaction that reads or checks holds the write lock from its first
statement (app/db.py; a unit of held-back writes alone, which checks
nothing, takes it for its one commit hop). Behind both, a
partial unique index (orm.Run, ``ux_runs_live_thread``) refuses a second live
run whatever a check saw.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Select, bindparam, literal_column, select
from sqlalchemy.ext.asyncio import AsyncSession

from app import db, errors, ids, orm
from app.services.common import require_id
from app.services.projects import Project

LIVE_RUN_STATUSES = orm.LIVE_RUN_STATUSES


async def active_run(session: AsyncSession, thread_id: str) -> orm.Run | None:
    """The thread's live run, if any; the thread stays locked for the rest of
    the transaction, so a message and a run (or two runs) created at the same
    moment cannot both pass this check.

    FOR NO KEY UPDATE rather than FOR UPDATE: it excludes the other creators
    but not the foreign-key checks (FOR KEY SHARE) of rows the worker inserts
    into the thread meanwhile, so a run's own progress never waits on it.
    """
    if session.bind is None or session.bind.dialect.name != "sqlite":
        # (SQLite has no row locks, nor needs them: the transaction holds the write lock.)
        await session.execute(select(orm.Thread.id).where(orm.Thread.id == thread_id).with_for_update(key_share=True))
    query = (
        select(orm.Run)
        .where(orm.Run.thread_id == thread_id, orm.Run.status.in_(LIVE_RUN_STATUSES))
        .order_by(orm.Run.seq.desc())
        .limit(1)
    )
    return (await session.scalars(query)).first()


# Core statements built once with bound parameters (issue 17: the checks
# before a message or a run is added, with no ORM instance or identity map).
_THREADS = orm.Thread.__table__.c
_RUNS = orm.Run.__table__.c
# The live statuses written into the SQL as constants, not bound: an IN list
# of bound values is rendered again at every execution (SQLAlchemy's
# "post-compile" step, about 5 % of a create's CPU on a thread), and keeps
# the statement off the driver's straight path (held_back.run_now), which
# takes only statements compiled once. (PostgreSQL also sees the live-run
# index's own predicate.)
_IS_LIVE = _RUNS.status.in_([literal_column(f"'{status}'") for status in LIVE_RUN_STATUSES])
_LIVE_RUN = (
    select(_RUNS.id).where(_RUNS.thread_id == bindparam("thread_id"), _IS_LIVE).order_by(_RUNS.seq.desc()).limit(1)
)
# SQLite: the thread's owner and its live run in one statement (one thread
# hop): the transaction holds the write lock, nothing changes in between.
# Brief (two index lookups): a lone process runs it, and the transaction it
# begins, on the event loop's thread (issue 17: no hop for a run's or a
# message's create on a thread).
_OWNER_AND_LIVE_RUN = (
    select(_THREADS.project_id, _LIVE_RUN.scalar_subquery())
    .where(_THREADS.id == bindparam("thread_id"))
    .execution_options(**db.BRIEF)
)
# PostgreSQL: the thread's owner, its row locked (see active_run); the live
# run is read by the next statement, whose snapshot is taken after the lock
# is granted: a subquery of this one would not see a run committed while it
# waited.
_LOCKED_OWNER = select(_THREADS.project_id).where(_THREADS.id == bindparam("thread_id")).with_for_update(key_share=True)


async def live_run_of_owned_thread(session: AsyncSession, project: Project, thread_id: str) -> str | None:
    """The id of the project's thread's live run, if any, as active_run()
    finds it and with the thread locked as it does; 404 ``No thread found``
    for a thread the project does not own, as threads.get answers. One
    statement on SQLite, two on PostgreSQL (three with threads.get and
    active_run: issue 17)."""
    require_id("thread_id", thread_id, ids.THREAD)
    parameters = {"thread_id": thread_id}
    if session.bind is not None and session.bind.dialect.name == "sqlite":
        return (await _owner_and_live_run(session, project, thread_id, _OWNER_AND_LIVE_RUN))[1]  # type: ignore[no-any-return]
    await _lock_owned(session, project, parameters)
    return await _live_run_of(session, parameters)


def with_column(column: ColumnElement[Any]) -> Select[Any]:
    """SQLite: live_run_of_owned_thread()'s statement with one more value
    read in it (of the thread, whose table it reads as ``threads``), for
    live_run_and_value_of_owned_thread(). Built once by its caller."""
    return _OWNER_AND_LIVE_RUN.add_columns(column)


def locked_with_column(column: ColumnElement[Any]) -> Select[Any]:
    """PostgreSQL: lock_owned_thread()'s statement with one more value read
    in it (of the thread, as with_column()), for lock_owned_thread()'s
    ``statement``. Its snapshot is taken before the lock is granted: a
    value read so may miss what the lock's holder committed while it
    waited (see _LOCKED_OWNER). Built once by its caller."""
    return _LOCKED_OWNER.add_columns(column)


async def live_run_and_value_of_owned_thread(
    session: AsyncSession, project: Project, thread_id: str, statement: Select[Any]
) -> tuple[str | None, Any]:
    """SQLite: live_run_of_owned_thread(), and the value of the column
    ``statement`` (with_column()) adds, in its one statement."""
    require_id("thread_id", thread_id, ids.THREAD)
    found = await _owner_and_live_run(session, project, thread_id, statement)
    return found[1], found[2]


async def _owner_and_live_run(session: AsyncSession, project: Project, thread_id: str, statement: Select[Any]) -> Any:
    # Straight on the driver where it can (issue 17: without SQLAlchemy's
    # execution, its result and the greenlet), its BEGIN in the same hop.
    parameters = {"thread_id": thread_id}
    rows = await db.run_now(session, statement, parameters)
    if rows is None:
        found = (await session.execute(statement, parameters)).first()
    else:
        # (By column name: run_now declines a statement with two columns of one name.)
        found = tuple(rows[0].values()) if rows else None
    if found is None or found[0] != project.id:
        raise errors.not_found("thread", thread_id)
    return found


async def lock_owned_thread(
    session: AsyncSession, project: Project, thread_id: str, statement: Select[Any] = _LOCKED_OWNER
) -> Any:
    """PostgreSQL: live_run_of_owned_thread() without the read of the live
    run, for a writer whose own statement finds it (runs.create: the
    live-run index refuses its run; issue 17, a round trip). With
    ``statement`` (locked_with_column()'s), returns the value its column
    adds, read in the same statement; else None."""
    require_id("thread_id", thread_id, ids.THREAD)
    found = await _lock_owned(session, project, {"thread_id": thread_id}, statement)
    return found[1] if len(found) > 1 else None


async def _lock_owned(
    session: AsyncSession, project: Project, parameters: dict[str, str], statement: Select[Any] = _LOCKED_OWNER
) -> tuple[Any, ...]:
    # Straight on asyncpg: as the transaction's first statement (a run's or
    # a message's create), its BEGIN goes with it (issue 17: a round trip).
    rows = await db.run_now(session, statement, parameters)
    if rows is None:
        row = (await session.execute(statement, parameters)).first()
        found = None if row is None else tuple(row)
    else:
        found = tuple(rows[0].values()) if rows else None
    if found is None or found[0] != project.id:
        raise errors.not_found("thread", parameters["thread_id"])
    return found


async def live_run(session: AsyncSession, thread_id: str) -> str | None:
    """The id of the thread's live run, if any (PostgreSQL: read under the
    thread's lock, lock_owned_thread's)."""
    return await _live_run_of(session, {"thread_id": thread_id})


async def _live_run_of(session: AsyncSession, parameters: dict[str, str]) -> str | None:
    # Straight on the driver where it can (issue 17), as _lock_owned's statement.
    rows = await db.run_now(session, _LIVE_RUN, parameters)
    if rows is None:
        return (await session.execute(_LIVE_RUN, parameters)).scalar()
    return rows[0]["id"] if rows else None
