"""Files in vector stores and file batches.

Adding a file inserts (or resets) its vector_store_files row as
``in_progress``: that row is the ingestion job the worker claims
(app.retrieval.ingest). Nothing is parsed inside the request. A file added
again is ingested again with its new chunking strategy and attributes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete as sql_delete
from sqlalchemy import func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app import db, errors, ids, orm
from app.retrieval import chunking, parse
from app.services import pagination, projects
from app.services.common import one_of, require_id
from app.services.projects import Project
from app.storage import Storage
from app.wire.common import AutoChunking, ChunkingStrategy, Deleted, ListPage
from app.wire.vector_stores import (
    FileBatch,
    FileBatchCreate,
    FileContentPage,
    FileCounts,
    TextContent,
    VectorStoreFile,
    VectorStoreFileCreate,
)


def resolve_strategy(strategy: ChunkingStrategy | None, param: str) -> dict[str, Any]:
    """The stored (response) form: ``auto`` becomes static 800/400; the
    overlap may be at most half the chunk size."""
    if strategy is None or isinstance(strategy, AutoChunking):
        return chunking.static()
    size, overlap = strategy.static.max_chunk_size_tokens, strategy.static.chunk_overlap_tokens
    if overlap > size // 2:
        raise errors.invalid(
            f"Invalid '{param}.static.chunk_overlap_tokens': chunk_overlap_tokens must be less than or equal "
            f"to half of max_chunk_size_tokens ({size // 2}), but got {overlap}.",
            param=f"{param}.static.chunk_overlap_tokens",
            code="invalid_value",
        )
    return chunking.static(size, overlap)


def _live_file() -> Any:
    return or_(orm.File.expires_at.is_(None), orm.File.expires_at > ids.now())


async def require_files(session: AsyncSession, project: Project, file_ids: Sequence[str]) -> dict[str, orm.File]:
    """The project's files by id; 404 ``No such File object`` for the first
    one missing (or another project's: the same answer)."""
    if not file_ids:
        return {}
    for file_id in file_ids:
        require_id("file_id", file_id, ids.FILE)
    query = projects.owned(project, orm.File).where(one_of(session, orm.File.id, file_ids), _live_file())
    rows = (await session.scalars(query)).all()
    found = {row.id: row for row in rows}
    for file_id in file_ids:
        if file_id not in found:
            raise errors.file_not_found(file_id)
    return found


async def attach(
    session: AsyncSession,
    store: orm.VectorStore,
    items: Sequence[tuple[orm.File, dict[str, Any], dict[str, Any] | None]],
    batch_id: str | None = None,
) -> list[orm.VectorStoreFile]:
    """Queue (file, chunking strategy, attributes) for ingestion into the
    store: each file's row inserted, or reset if the file is attached
    already (a batch naming a file twice: its last entry wins). Returns the
    rows in ``items``' order."""
    if not items:
        return []  # a store made without files: no statement at all
    now = ids.now()
    wanted: dict[str, dict[str, Any]] = {}
    for file, strategy, attributes in items:
        wanted[file.id] = {
            "vector_store_id": store.id,
            "file_id": file.id,
            "seq": file.seq,
            "created_at": now,
            "filename": file.filename,
            "status": "in_progress",
            "last_error": None,
            "usage_bytes": 0,
            "chunking_strategy": strategy,
            "attributes": attributes,
            "batch_id": batch_id,
            "lease_owner": None,
            "lease_expires_at": None,
        }
    attached = await _upsert_with_free_seqs(session, store.id, [wanted[file_id] for file_id in sorted(wanted)])
    return [attached[file.id] for file, _strategy, _attributes in items]


# Attempts at inserting a store's new file rows, each after another
# process took one of their seqs (all but unheard of: see below).
SEQ_ATTEMPTS = 5
# Rows per upsert statement (its bound values stay far under either
# engine's limit); a page follows the one before in file id order.
UPSERT_PAGE_ROWS = 500

# What attaching a file again resets; its seq and created_at stay.
_QUEUED_COLUMNS = (
    "filename",
    "status",
    "last_error",
    "usage_bytes",
    "chunking_strategy",
    "attributes",
    "batch_id",
    "lease_owner",
    "lease_expires_at",
)


async def taken_seqs(session: AsyncSession, store_id: str, seqs: Sequence[int]) -> set[int]:
    """Which of these seqs files of the store already hold."""
    query = select(orm.VectorStoreFile.seq).where(
        orm.VectorStoreFile.vector_store_id == store_id, one_of(session, orm.VectorStoreFile.seq, seqs)
    )
    return set((await session.scalars(query)).all())


async def _upsert_with_free_seqs(
    session: AsyncSession, store_id: str, values: Sequence[dict[str, Any]]
) -> dict[str, orm.VectorStoreFile]:
    """Upsert the store's file rows (``values``, in file id order), a new
    one with a seq no other file of the store holds (unique, migration 0014:
    a filtered search knows a file by its seq). A row's seq is its file's,
    the id's sequence, which is unique within a process; two processes can
    issue the same one in the same nanosecond. The later file then takes the
    next free value (listing pages by it: the file keeps its place but for
    that nanosecond). A conflict with a file inserted by another transaction
    after the check rolls back this savepoint alone and is retried: a seq
    clash is never a 500, nor a deadlock it leads to (within the limits
    _retried_clash gives).

    One statement per page inserts the new rows and resets those already
    there, so requests attaching the same files at once wait for each
    other's rows in one order, file id order (on PostgreSQL, rows found
    first and reset, then others inserted, took locks in two orders: two
    overlapping batches deadlocked, a 500), and the later one resets the row
    the earlier inserted (no clash on the row's key). Returns the rows by
    file id."""
    query = select(orm.VectorStoreFile.file_id).where(
        orm.VectorStoreFile.vector_store_id == store_id,
        one_of(session, orm.VectorStoreFile.file_id, [value["file_id"] for value in values]),
    )
    existing = set((await session.scalars(query)).all())  # their seqs stay: none to choose
    new = [value for value in values if value["file_id"] not in existing]
    for attempt in range(SEQ_ATTEMPTS):
        await _choose_free_seqs(session, store_id, new)
        try:
            async with session.begin_nested():
                rows: dict[str, orm.VectorStoreFile] = {}
                for start in range(0, len(values), UPSERT_PAGE_ROWS):
                    for row in await _upsert(session, values[start : start + UPSERT_PAGE_ROWS]):
                        rows[row.file_id] = row
                return rows
        except DBAPIError as exc:
            if attempt == SEQ_ATTEMPTS - 1 or not _retried_clash(exc):
                raise
    raise AssertionError("unreachable: the last attempt returns or raises")


def _retried_clash(exc: DBAPIError) -> bool:
    """Whether the upsert failed on a seq another transaction holds, which
    another attempt, its seqs checked again, gets past:

    - a unique violation: the other transaction's row committed after the check;
    - on PostgreSQL, a deadlock. Attaches wait for each other's rows in
      file id order (the upsert's key), which cannot cycle; but a new row
      whose seq another transaction's uncommitted row holds waits for that
      transaction (the seq index is checked, not the upsert's arbiter), in
      any order: two attaches whose new rows share seqs in crossed file id
      order wait for each other. PostgreSQL fails one; its savepoint rolled
      back lets the other go on, and the retry waits for that one and then
      meets its seqs as a unique violation.

      That holds while the victim's part of the deadlock is inside the
      savepoint: rolling it back releases the upsert's locks only, not rows
      the transaction locked before attach(). v1_files.sync_store removes
      rows of the store first (in file id order, as attaching takes them);
      a request attaching at once a file it removes and, before that one in
      file id order, a file it adds can deadlock with it; if sync_store is
      the victim, each retry meets the same deadlock and the last one's
      error is raised (a 500).

    Nothing else fails here for concurrency alone: transactions run READ
    COMMITTED (PostgreSQL's default; the app does not change it), where no
    statement fails to serialize."""
    if isinstance(exc, IntegrityError):
        return True
    return db.deadlock_detected(exc)


async def _upsert(session: AsyncSession, values: Sequence[dict[str, Any]]) -> Sequence[orm.VectorStoreFile]:
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    statement = insert(orm.VectorStoreFile).values(list(values))
    statement = statement.on_conflict_do_update(
        index_elements=[orm.VectorStoreFile.vector_store_id, orm.VectorStoreFile.file_id],
        set_={column: statement.excluded[column] for column in _QUEUED_COLUMNS},
    )
    returning = statement.returning(orm.VectorStoreFile)
    return (await session.scalars(returning, execution_options={"populate_existing": True})).all()


async def _choose_free_seqs(session: AsyncSession, store_id: str, values: Sequence[dict[str, Any]]) -> None:
    """Move each new row's seq up past those the store's files hold and
    those given to the rows before it. A seq moved to is checked too (a file
    moved earlier may hold it): asked again until every row's seq is known
    free."""
    checked: set[int] = set()
    taken: set[int] = set()
    while unknown := {value["seq"] for value in values} - checked:
        taken |= await taken_seqs(session, store_id, sorted(unknown))
        checked |= unknown
        given: set[int] = set()
        for value in values:
            while value["seq"] in taken or value["seq"] in given:
                value["seq"] += 1
            given.add(value["seq"])


async def create(session: AsyncSession, store: orm.VectorStore, body: VectorStoreFileCreate) -> orm.VectorStoreFile:
    strategy = resolve_strategy(body.chunking_strategy, "chunking_strategy")
    files = await require_files(session, projects.owner_of(store), [body.file_id])
    return (await attach(session, store, [(files[body.file_id], strategy, body.attributes)]))[0]


# The functions below take the store's row, which only vector_stores.get()
# hands out (for the request's project): a store's files, batches and chunks
# are reached through their store.


async def get(session: AsyncSession, store: orm.VectorStore, file_id: str) -> orm.VectorStoreFile:
    require_id("file_id", file_id, ids.FILE)
    row = await session.get(orm.VectorStoreFile, (store.id, file_id))
    if row is None:
        raise errors.not_found("vector store file", file_id)
    return row


async def update_attributes(
    session: AsyncSession, store: orm.VectorStore, file_id: str, attributes: dict[str, Any] | None
) -> orm.VectorStoreFile:
    row = await get(session, store, file_id)
    row.attributes = attributes
    return row


async def remove(session: AsyncSession, store: orm.VectorStore, file_id: str) -> Deleted:
    """The file leaves the store (and its index); the file object survives."""
    await get(session, store, file_id)
    # The row alone: the database removes its chunks and their postings
    # (migration 0013's triggers). Locking the file row before its chunks, as
    # ingestion's _finish does, so that a removal during ingestion cannot
    # deadlock with it on PostgreSQL.
    await session.execute(
        sql_delete(orm.VectorStoreFile).where(
            orm.VectorStoreFile.vector_store_id == store.id, orm.VectorStoreFile.file_id == file_id
        )
    )
    return Deleted(id=file_id, object="vector_store.file.deleted")


async def forget_file(session: AsyncSession, file_id: str) -> None:
    """A deleted file leaves every store it was in."""
    # Its chunks and postings go with its rows (migration 0013's triggers),
    # file row first as in remove().
    await session.execute(sql_delete(orm.VectorStoreFile).where(orm.VectorStoreFile.file_id == file_id))


async def list_(
    session: AsyncSession,
    store: orm.VectorStore,
    params: pagination.PageParams,
    status: str | None,
    batch_id: str | None = None,
) -> ListPage[Any]:
    query = select(orm.VectorStoreFile).where(orm.VectorStoreFile.vector_store_id == store.id)
    if status is not None:
        query = query.where(orm.VectorStoreFile.status == status)
    if batch_id is not None:
        query = query.where(orm.VectorStoreFile.batch_id == batch_id)
    # A cursor that is a file of the store pages from its row's seq, which
    # differs from its id's for a file whose seq was taken (_upsert_with_free_seqs).
    cursors = [cursor for cursor in (params.after, params.before) if cursor]
    positions = {}
    if cursors:
        found = await session.execute(
            select(orm.VectorStoreFile.file_id, orm.VectorStoreFile.seq).where(
                orm.VectorStoreFile.vector_store_id == store.id, orm.VectorStoreFile.file_id.in_(cursors)
            )
        )
        positions = {str(file_id): int(seq) for file_id, seq in found.all()}
    rows, has_more = await pagination.fetch_page(
        session, query, orm.VectorStoreFile.seq, params, ids.FILE, positions=positions
    )
    return pagination.page([to_wire(row) for row in rows], has_more)


def to_wire(row: orm.VectorStoreFile) -> VectorStoreFile:
    return VectorStoreFile(
        id=row.file_id,
        usage_bytes=row.usage_bytes,
        created_at=row.created_at,
        vector_store_id=row.vector_store_id,
        status=row.status,  # type: ignore[arg-type]
        last_error=row.last_error,
        chunking_strategy=row.chunking_strategy,
        attributes=row.attributes or {},
    )


# --- batches --------------------------------------------------------------------


async def create_batch(
    session: AsyncSession, store: orm.VectorStore, body: FileBatchCreate
) -> orm.VectorStoreFileBatch:
    if body.file_ids is None and body.files is None:
        raise errors.invalid(
            "Missing required parameter: 'file_ids'.", param="file_ids", code="missing_required_parameter"
        )
    if body.file_ids is not None and body.files is not None:
        raise errors.invalid(
            "Invalid request: only one of 'file_ids' or 'files' may be provided.", param="files", code="invalid_value"
        )
    default = resolve_strategy(body.chunking_strategy, "chunking_strategy")
    wanted: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = []
    if body.file_ids is not None:
        wanted = [(file_id, default, body.attributes) for file_id in dict.fromkeys(body.file_ids)]
    for position, item in enumerate(body.files or []):
        strategy = (
            resolve_strategy(item.chunking_strategy, f"files[{position}].chunking_strategy")
            if item.chunking_strategy
            else default
        )
        wanted.append((item.file_id, strategy, item.attributes if item.attributes is not None else body.attributes))
    files = await require_files(session, projects.owner_of(store), [file_id for file_id, _, _ in wanted])
    seq = ids.next_seq()
    batch = orm.VectorStoreFileBatch(
        id=ids.new_id(ids.FILE_BATCH, seq),
        seq=seq,
        created_at=ids.seconds(seq),
        vector_store_id=store.id,
        cancelled=False,
    )
    session.add(batch)
    await attach(session, store, [(files[file_id], strategy, attrs) for file_id, strategy, attrs in wanted], batch.id)
    return batch


async def get_batch(session: AsyncSession, store: orm.VectorStore, batch_id: str) -> orm.VectorStoreFileBatch:
    require_id("batch_id", batch_id, ids.FILE_BATCH)
    row = await session.get(orm.VectorStoreFileBatch, batch_id)
    if row is None or row.vector_store_id != store.id:
        raise errors.not_found("vector store file batch", batch_id)
    return row


async def cancel_batch(session: AsyncSession, store: orm.VectorStore, batch_id: str) -> orm.VectorStoreFileBatch:
    """Files of the batch not yet ingested become ``cancelled``; an ingestion
    already under way notices at its commit and discards its work."""
    batch = await get_batch(session, store, batch_id)
    batch.cancelled = True
    table = orm.VectorStoreFile
    waiting = (table.batch_id == batch_id) & (table.status == "in_progress")
    # The rows locked in file id order first, the order attaching takes them
    # in (_upsert_with_free_seqs): the UPDATE alone took them in the order it
    # found them, and a cancel and an attach of the same files deadlocked on
    # PostgreSQL (a 500).
    await session.execute(select(table.file_id).where(waiting).order_by(table.file_id).with_for_update())
    await session.execute(
        update(table)
        .where(waiting)
        .values(status="cancelled", lease_owner=None, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    return batch


async def batch_to_wire(session: AsyncSession, batch: orm.VectorStoreFileBatch) -> FileBatch:
    table = orm.VectorStoreFile
    query = select(table.status, func.count()).where(table.batch_id == batch.id).group_by(table.status)
    counts = FileCounts()
    for status, count in (await session.execute(query)).all():
        setattr(counts, status, int(count))
        counts.total += int(count)
    if batch.cancelled:
        status = "cancelled"
    elif counts.in_progress:
        status = "in_progress"
    else:
        status = "failed" if counts.total and counts.failed == counts.total else "completed"
    return FileBatch(
        id=batch.id,
        created_at=batch.created_at,
        vector_store_id=batch.vector_store_id,
        status=status,  # type: ignore[arg-type]
        file_counts=counts,
    )


async def content(storage: Storage, row: orm.VectorStoreFile) -> FileContentPage:
    """The file's parsed text (parsed again, in a thread: the index holds
    overlapping chunks, not the text itself)."""
    path = storage.path(row.file_id)
    if not path.is_file():
        raise errors.file_not_found(row.file_id)
    try:
        text = await asyncio.to_thread(parse.extract_text, path, row.filename)
    except parse.ParseError:
        text = ""
    return FileContentPage(data=[TextContent(text=text)] if text else [])
