"""A thread is locked while one of its runs is live (OpenAI: 400, not 409).

The rule holds under concurrency because the check and the write that
follows it are atomic on both engines: on PostgreSQL the thread row stays
locked until the transaction ends (active_run() below), on SQLite every
transaction holds the write lock from its start (app/db.py). Behind both, a
partial unique index (orm.Run, ``ux_runs_live_thread``) refuses a second live
run whatever a check saw; is_live_run_conflict() recognises its error.
"""

from __future__ import annotations

from sqlalchemy import exc, select
from sqlalchemy.ext.asyncio import AsyncSession

from app import orm

LIVE_RUN_STATUSES = orm.LIVE_RUN_STATUSES
LIVE_RUN_INDEX = "ux_runs_live_thread"


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


def is_live_run_conflict(error: exc.IntegrityError) -> bool:
    """Whether ``error`` is the live-run index refusing a second live run
    (PostgreSQL names the index; SQLite names the column)."""
    text = str(error.orig)
    return LIVE_RUN_INDEX in text or "runs.thread_id" in text
