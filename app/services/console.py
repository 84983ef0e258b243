"""Read-only queries the web console needs beyond the OpenAI API's own:
recent threads (the API cannot list threads), a thread's runs and messages
in pages, per-file chunk counts of a vector store."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app import ids, orm
from app.services import pagination, projects
from app.services.pagination import PageParams
from app.services.projects import Project


async def recent_threads(session: AsyncSession, project: Project, params: PageParams) -> tuple[list[orm.Thread], bool]:
    query = projects.owned(project, orm.Thread)
    rows, has_more = await pagination.fetch_page(session, query, orm.Thread.seq, params, ids.THREAD)
    return rows, has_more


async def runs_of_thread(session: AsyncSession, thread: orm.Thread, params: PageParams) -> tuple[list[orm.Run], bool]:
    thread_id = thread.id  # a thread row: only threads.get() hands them out, for the request's project
    query = select(orm.Run).where(orm.Run.thread_id == thread_id)
    rows, has_more = await pagination.fetch_page(session, query, orm.Run.seq, params, ids.RUN)
    return rows, has_more


async def chunk_counts(session: AsyncSession, store: orm.VectorStore, file_ids: Sequence[str]) -> dict[str, int]:
    store_id = store.id
    if not file_ids:
        return {}
    query = (
        select(orm.VectorStoreChunk.file_id, func.count())
        .where(orm.VectorStoreChunk.vector_store_id == store_id, orm.VectorStoreChunk.file_id.in_(file_ids))
        .group_by(orm.VectorStoreChunk.file_id)
    )
    return {file_id: int(count) for file_id, count in (await session.execute(query)).all()}
