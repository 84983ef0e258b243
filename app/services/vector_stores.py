"""Vector stores: create, retrieve, modify, delete, list, expiry and activity.

``file_counts``, ``usage_bytes`` and ``status`` are counted from the store's
files on every read, never cached, so they are exact at every poll.
A store with ``expires_after`` expires ``days`` after it was last active
(created, searched, or used by a run); an expired store is kept, reported
``expired`` and refused by search and runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from sqlalchemy import delete as sql_delete
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app import errors, ids, orm
from app.retrieval import index
from app.services import pagination, projects, vector_store_files
from app.services.common import metadata_or_empty, one_of, require_id
from app.services.projects import Project
from app.wire.common import Deleted, ListPage, VectorStoreHelper
from app.wire.vector_stores import ExpiresAfter, FileCounts, VectorStore, VectorStoreCreate, VectorStoreUpdate

DAY = 86400
# Stores made by the thread helpers (tool_resources, message attachments).
THREAD_STORE_EXPIRY = {"anchor": "last_active_at", "days": 7}

log = logging.getLogger(__name__)


def _expires_at(row: orm.VectorStore) -> int | None:
    if not row.expires_after:
        return None
    return row.last_active_at + int(row.expires_after["days"]) * DAY


def is_expired(row: orm.VectorStore) -> bool:
    return row.expires_at is not None and row.expires_at <= ids.now()


def touch(row: orm.VectorStore) -> None:
    """The store was used: push its expiry back (an expired store stays expired)."""
    if not is_expired(row):
        row.last_active_at = ids.now()
        row.expires_at = _expires_at(row)


def stale_activity(row: orm.VectorStore) -> bool:
    """Whether touch() would change the row: a store searched many times a
    second is written once a second (its activity is kept in whole seconds)."""
    return not is_expired(row) and row.last_active_at < ids.now()


async def touch_ids(session: AsyncSession, store_ids: Sequence[str]) -> None:
    """touch() these stores (a search read them in a read-only transaction:
    their use is written in a transaction of its own)."""
    for store_id in store_ids:
        row = await session.get(orm.VectorStore, store_id)
        if row is not None:
            touch(row)


async def record_activity(
    transaction: Callable[[], AbstractAsyncContextManager[AsyncSession]], store_ids: Sequence[str]
) -> None:
    """touch() the stores a search read (those stale_activity() named), in a
    write transaction of its own after the read-only search. Best effort: a
    search that found its chunks answers even if this write fails (SQLite's
    lock busy past its timeout, a dropped connection); the next search of
    the store writes its activity."""
    if not store_ids:
        return
    try:
        async with transaction() as session:
            await touch_ids(session, store_ids)
    except Exception as error:  # any failure (a refused connection is an OSError, not SQLAlchemy's)
        log.warning("could not record the activity of vector stores %s (%s)", ", ".join(store_ids), error)


def new_store(
    project: Project,
    *,
    name: str | None = None,
    description: str | None = None,
    expires_after: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> orm.VectorStore:
    seq = ids.next_seq()
    row = orm.VectorStore(
        id=ids.new_id(ids.VECTOR_STORE, seq),
        project_id=project.id,
        seq=seq,
        created_at=ids.seconds(seq),
        name=name,
        description=description,
        last_active_at=ids.seconds(seq),
        expires_after=expires_after,
        metadata_=metadata_or_empty(metadata),
    )
    row.expires_at = _expires_at(row)
    return row


def _expiry(value: ExpiresAfter | None) -> dict[str, Any] | None:
    return value.model_dump() if value is not None else None


async def create(session: AsyncSession, project: Project, body: VectorStoreCreate) -> orm.VectorStore:
    row = new_store(
        project,
        name=body.name,
        description=body.description,
        expires_after=_expiry(body.expires_after),
        metadata=body.metadata,
    )
    strategy = vector_store_files.resolve_strategy(body.chunking_strategy, "chunking_strategy")
    file_ids = list(dict.fromkeys(body.file_ids or []))
    files = await vector_store_files.require_files(session, project, file_ids)
    session.add(row)
    await session.flush()
    await vector_store_files.attach(session, row, [(files[file_id], strategy, None) for file_id in file_ids])
    return row


async def create_from_helper(
    session: AsyncSession, project: Project, helper: VectorStoreHelper, param: str, *, for_thread: bool = False
) -> orm.VectorStore:
    """The ``tool_resources.file_search.vector_stores`` helper of assistant and
    thread create; a thread's store expires 7 days after it was last active."""
    row = new_store(project, metadata=helper.metadata, expires_after=dict(THREAD_STORE_EXPIRY) if for_thread else None)
    strategy = vector_store_files.resolve_strategy(helper.chunking_strategy, f"{param}.chunking_strategy")
    file_ids = list(dict.fromkeys(helper.file_ids))
    files = await vector_store_files.require_files(session, project, file_ids)
    session.add(row)
    await session.flush()
    await vector_store_files.attach(session, row, [(files[file_id], strategy, None) for file_id in file_ids])
    return row


async def add_to_thread_store(session: AsyncSession, project: Project, thread_id: str, file_ids: list[str]) -> None:
    """Message attachments for file_search: into the thread's store, which is
    created (expiring 7 days after last activity) if the thread has none.
    The store is kept (kept()) before its rows are touched: a delete of it
    waits for this request, where the insert met the deleted store's foreign
    key (PostgreSQL: retried as a seq clash, then a 500); a store deleted
    first is none, and a new one is made."""
    if not file_ids:
        return
    thread = await session.get(orm.Thread, thread_id)
    if thread is None:
        return
    resources = dict(thread.tool_resources or {})
    store_ids = list((resources.get("file_search") or {}).get("vector_store_ids") or [])
    store = await kept(session, store_ids[0]) if store_ids else None
    if store is None or store.project_id != project.id or is_expired(store):
        store = new_store(project, expires_after=dict(THREAD_STORE_EXPIRY))
        session.add(store)
        await session.flush()
        resources["file_search"] = {"vector_store_ids": [store.id]}
        thread.tool_resources = resources
    present = set(
        (
            await session.scalars(
                select(orm.VectorStoreFile.file_id).where(
                    orm.VectorStoreFile.vector_store_id == store.id,
                    one_of(session, orm.VectorStoreFile.file_id, file_ids),
                )
            )
        ).all()
    )
    wanted = [file_id for file_id in dict.fromkeys(file_ids) if file_id not in present]
    files = await vector_store_files.require_files(session, project, wanted)
    await vector_store_files.attach(
        session, store, [(files[f], vector_store_files.resolve_strategy(None, ""), None) for f in wanted]
    )
    touch(store)


async def get(
    session: AsyncSession, project: Project, vector_store_id: str, *, for_update: bool = False, keep: bool = False
) -> orm.VectorStore:
    """The project's store (404 otherwise). ``keep``: not deleted before this
    transaction ends (a request adding files to it or cancelling a batch of
    it; see delete())."""
    require_id("vector_store_id", vector_store_id, ids.VECTOR_STORE)
    return await projects.lookup(
        session,
        project,
        orm.VectorStore,
        vector_store_id,
        lambda: errors.not_found("vector store", vector_store_id),
        for_update=for_update,
        key_share=keep,
    )


async def kept(session: AsyncSession, vector_store_id: str) -> orm.VectorStore | None:
    """The store with this id (of any project: the caller checks), kept as
    get(keep=True) keeps it, for attaching files to a store the request
    found by itself (a thread's, an assistant's); None if there is none, or
    it was deleted while this waited."""
    return await session.get(orm.VectorStore, vector_store_id, with_for_update={"key_share": True, "read": True})


async def get_live(
    session: AsyncSession, project: Project, vector_store_id: str, *, keep: bool = False
) -> orm.VectorStore:
    """The store, refusing an expired one (400: the request cannot be served)."""
    row = await get(session, project, vector_store_id, keep=keep)
    if is_expired(row):
        raise errors.invalid(f"Vector store {vector_store_id} is expired and can no longer be used.")
    return row


async def update(
    session: AsyncSession, project: Project, vector_store_id: str, body: VectorStoreUpdate
) -> orm.VectorStore:
    row = await get(session, project, vector_store_id)
    given = body.model_fields_set
    if body.name is not None:
        row.name = body.name
    if "expires_after" in given:
        row.expires_after = _expiry(body.expires_after)
        row.expires_at = _expires_at(row)
    if body.metadata is not None:
        row.metadata_ = dict(body.metadata)
    return row


async def delete(session: AsyncSession, project: Project, vector_store_id: str) -> Deleted:
    # Locked first, before any of its rows: a request adding files or
    # cancelling a batch holds the store (get(keep=True)) until it commits,
    # and is waited for here, so its rows are deleted with the store instead
    # of meeting a deleted store's foreign key (PostgreSQL: retried, then a
    # 500) or, deleted row by row meanwhile, locking rows in the other order
    # (a cancel locks the batch, then its files: a deadlock). A store deleted
    # while this waited is a 404 on the other side.
    await get(session, project, vector_store_id, for_update=True)
    # File rows before chunks (their triggers remove their chunks), the order
    # ingestion's _finish locks them in; then any chunk without a file row.
    for table in (orm.VectorStoreFile, orm.VectorStoreFileBatch):
        await session.execute(sql_delete(table).where(table.vector_store_id == vector_store_id))
    await index.remove_chunks(session, vector_store_id)
    await session.execute(sql_delete(orm.VectorStore).where(orm.VectorStore.id == vector_store_id))
    return Deleted(id=vector_store_id, object="vector_store.deleted")


async def list_(session: AsyncSession, project: Project, params: pagination.PageParams) -> ListPage[Any]:
    rows, has_more = await pagination.fetch_page(
        session, projects.owned(project, orm.VectorStore), orm.VectorStore.seq, params, ids.VECTOR_STORE
    )
    return pagination.page(await to_wire_many(session, rows), has_more)


async def _counts(session: AsyncSession, store_ids: Sequence[str]) -> dict[str, tuple[FileCounts, int]]:
    """Per store: file counts by status and bytes used (of completed files)."""
    table = orm.VectorStoreFile
    query = (
        select(table.vector_store_id, table.status, func.count(), func.coalesce(func.sum(table.usage_bytes), 0))
        .where(table.vector_store_id.in_(store_ids))
        .group_by(table.vector_store_id, table.status)
    )
    result: dict[str, tuple[FileCounts, int]] = {}
    for store_id, status, count, usage in (await session.execute(query)).all():
        counts, used = result.get(store_id, (FileCounts(), 0))
        setattr(counts, status, getattr(counts, status) + int(count))
        counts.total += int(count)
        result[store_id] = (counts, used + int(usage))
    return result


async def to_wire_many(session: AsyncSession, rows: Sequence[orm.VectorStore]) -> list[VectorStore]:
    counted = await _counts(session, [row.id for row in rows])
    return [_render(row, *counted.get(row.id, (FileCounts(), 0))) for row in rows]


async def to_wire(session: AsyncSession, row: orm.VectorStore) -> VectorStore:
    return (await to_wire_many(session, [row]))[0]


def _render(row: orm.VectorStore, counts: FileCounts, usage_bytes: int) -> VectorStore:
    status = "expired" if is_expired(row) else "in_progress" if counts.in_progress else "completed"
    return VectorStore(
        id=row.id,
        created_at=row.created_at,
        name=row.name or "",
        usage_bytes=usage_bytes,
        file_counts=counts,
        status=status,  # type: ignore[arg-type]
        expires_after=row.expires_after,
        expires_at=row.expires_at,
        last_active_at=row.last_active_at,
        metadata=row.metadata_,
    )
