"""A thread is locked while one of its runs is live (OpenAI: 400, not 409)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app import orm

# requires_action counts: the run still owns the thread until outputs arrive.
LIVE_RUN_STATUSES = ("queued", "in_progress", "requires_action", "cancelling")


async def active_run(session: AsyncSession, thread_id: str) -> orm.Run | None:
    query = (
        select(orm.Run)
        .where(orm.Run.thread_id == thread_id, orm.Run.status.in_(LIVE_RUN_STATUSES))
        .order_by(orm.Run.seq.desc())
        .limit(1)
    )
    return (await session.scalars(query)).first()
