"""Messages of a thread: create, retrieve, update (metadata), delete, list."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete as sql_delete
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app import errors, ids, orm
from app.services import core_rows, pagination, projects, row_reads, thread_lock, vector_stores
from app.services.common import metadata_or_empty, require_id
from app.services.projects import Project
from app.services.tool_resources import require_files
from app.wire.common import Deleted, ListPage
from app.wire.messages import ContentPart, ImageFilePart, ImageUrlPart, Message, MessageCreate, MessageUpdate


def text_part(value: str) -> dict[str, Any]:
    return {"type": "text", "text": {"value": value, "annotations": []}}


def content_to_wire(content: str | list[ContentPart]) -> list[dict[str, Any]]:
    """Request content (a string or request parts) in its response form."""
    if isinstance(content, str):
        return [text_part(content)]
    parts: list[dict[str, Any]] = []
    for part in content:
        if isinstance(part, ImageFilePart):
            parts.append({"type": "image_file", "image_file": part.image_file.model_dump(exclude_none=True)})
        elif isinstance(part, ImageUrlPart):
            parts.append({"type": "image_url", "image_url": part.image_url.model_dump(exclude_none=True)})
        else:
            parts.append(text_part(part.text))
    return parts


def _referenced_files(body: MessageCreate) -> list[str]:
    file_ids = [attachment.file_id for attachment in body.attachments or []]
    if not isinstance(body.content, str):
        file_ids += [part.image_file.file_id for part in body.content if isinstance(part, ImageFilePart)]
    return file_ids


def searches_files(body: MessageCreate) -> bool:
    """Whether adding the message changes its thread (its file_search store)."""
    return any(tool.type == "file_search" for attachment in body.attachments or [] for tool in attachment.tools)


async def build(
    session: AsyncSession,
    project: Project,
    thread_id: str,
    body: MessageCreate,
    *,
    assistant_id: str | None = None,
    run_id: str | None = None,
) -> orm.Message:
    """A completed message for a thread known to exist, checked (its files)
    but not added to the session; its file_search attachments are added to
    the thread's store already."""
    await require_files(session, project, _referenced_files(body))
    # Attachments for file_search go into the thread's vector store.
    searched = [a.file_id for a in body.attachments or [] if any(tool.type == "file_search" for tool in a.tools)]
    await vector_stores.add_to_thread_store(session, project, thread_id, searched)
    seq = ids.next_seq()
    return core_rows.record(
        orm.Message,
        id=ids.new_id(ids.MESSAGE, seq),
        seq=seq,
        created_at=ids.seconds(seq),
        thread_id=thread_id,
        role=body.role,
        content=content_to_wire(body.content),
        status="completed",
        incomplete_details=None,
        completed_at=ids.seconds(seq),
        incomplete_at=None,
        assistant_id=assistant_id,
        run_id=run_id,
        attachments=[attachment.model_dump() for attachment in body.attachments or []],
        metadata_=metadata_or_empty(body.metadata),
    )


async def thread_of(session: AsyncSession, project: Project, thread_id: str) -> orm.Thread:
    """The project's thread (threads.get; here because threads imports this module)."""
    require_id("thread_id", thread_id, ids.THREAD)
    return await projects.lookup(session, project, orm.Thread, thread_id, lambda: errors.not_found("thread", thread_id))


async def create(session: AsyncSession, project: Project, thread_id: str, body: MessageCreate) -> orm.Message:
    live_run = await thread_lock.live_run_of_owned_thread(session, project, thread_id)
    if live_run is not None:
        raise errors.thread_locked_for_messages(thread_id, live_run)
    row = await build(session, project, thread_id, body)
    # One Core INSERT, sent with the COMMIT on SQLite (issue 17: no ORM
    # flush, one thread hop fewer); the row stays transient, as threads.create's.
    await core_rows.insert_row(session, row, write_behind=True)
    return row


async def get(session: AsyncSession, project: Project, thread_id: str, message_id: str) -> orm.Message:
    await thread_of(session, project, thread_id)
    require_id("message_id", message_id, ids.MESSAGE)
    row = await session.get(orm.Message, message_id)
    if row is None or row.thread_id != thread_id:
        raise errors.not_found("message", message_id)
    return row


async def update(
    session: AsyncSession, project: Project, thread_id: str, message_id: str, body: MessageUpdate
) -> orm.Message:
    row = await get(session, project, thread_id, message_id)
    if body.metadata is not None:
        row.metadata_ = dict(body.metadata)
    return row


async def delete(session: AsyncSession, project: Project, thread_id: str, message_id: str) -> Deleted:
    await get(session, project, thread_id, message_id)
    await session.execute(sql_delete(orm.Message).where(orm.Message.id == message_id))
    return Deleted(id=message_id, object="thread.message.deleted")


async def list_(
    session: AsyncSession, project: Project, thread_id: str, params: pagination.PageParams, run_id: str | None = None
) -> ListPage[Any]:
    await thread_of(session, project, thread_id)
    query = select(orm.Message).where(orm.Message.thread_id == thread_id)
    if run_id is not None:
        query = query.where(orm.Message.run_id == run_id)
    rows, has_more = await pagination.fetch_page(session, query, orm.Message.seq, params, ids.MESSAGE)
    return pagination.page([to_wire(row) for row in rows], has_more)


_MESSAGE_FIELDS = row_reads.fields(Message.model_fields)


def to_wire(row: orm.Message) -> Message:
    found = row_reads.values(row, _MESSAGE_FIELDS)
    found["attachments"] = found["attachments"] or []
    return Message.model_validate(found)
