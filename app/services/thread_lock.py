"""A thread is locked while one of its runs is live (OpenAI: 400, not 409)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app import orm

# requires_action counts: the run still owns the thread until outputs arrive.
LIVE_RUN_STATUSES = ("queued", "in_progress", "requires_action", "cancelling")


async def active_run(session: AsyncSession, thread_id: str) -> orm.Run | None:
    """The thread's live run, if any. On PostgreSQL the thread row is locked
    for the rest of the transaction, so a message and a run (or two runs)
    created at the same moment cannot both pass this check."""
    await session.execute(select(orm.Thread.id).where(orm.Thread.id == thread_id).with_for_update())
    query = (
        select(orm.Run)
        .where(orm.Run.thread_id == thread_id, orm.Run.status.in_(LIVE_RUN_STATUSES))
        .order_by(orm.Run.seq.desc())
        .limit(1)
    )
    return (await session.scalars(query)).first()
