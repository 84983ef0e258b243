"""Threads: create (with initial messages), retrieve, update, delete."""

from __future__ import annotations

from sqlalchemy import delete as sql_delete
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app import ids, orm
from app.services import core_rows, messages, tool_resources
from app.services.common import metadata_or_empty
from app.services.projects import Project
from app.wire.common import Deleted
from app.wire.threads import Thread, ThreadCreate, ThreadUpdate


async def create(
    session: AsyncSession, project: Project, body: ThreadCreate, *, inserting: list[orm.Base] | None = None
) -> orm.Thread:
    """The thread and its messages, inserted with Core statements (issue 17:
    this is half of every POST /threads/runs). Given ``inserting``, the rows
    are appended to it instead, for the caller to insert with its own
    (runs.create_thread_and_run: on PostgreSQL in one statement), unless a
    message's file_search attachment must find the thread inserted already
    (its store is added to the thread's row)."""
    seq = ids.next_seq()
    row = core_rows.record(
        orm.Thread,
        id=ids.new_id(ids.THREAD, seq),
        project_id=project.id,
        seq=seq,
        created_at=ids.seconds(seq),
        tool_resources=await tool_resources.to_stored(session, project, body.tool_resources, for_thread=True),
        metadata_=metadata_or_empty(body.metadata),
    )
    searches = any(messages.searches_files(message) for message in body.messages or [])
    if inserting is not None and not searches:
        inserting.append(row)
        for message in body.messages or []:
            inserting.append(await messages.build(session, project, row.id, message))
        return row
    # Before the messages, which reference it. Held back (SQLite): sent with
    # the transaction's next statement, a thread hop fewer each (issue 17).
    await core_rows.insert_row(session, row, write_behind=True)
    for message in body.messages or []:
        await core_rows.insert_row(session, await messages.build(session, project, row.id, message), write_behind=True)
    if searches:
        # The messages' file_search attachments gave the thread a store: the
        # session's own (changed) instance of the thread is the one to answer.
        changed = await session.get(orm.Thread, row.id)
        assert changed is not None
        return changed
    return row


async def get(session: AsyncSession, project: Project, thread_id: str) -> orm.Thread:
    return await messages.thread_of(session, project, thread_id)


async def update(session: AsyncSession, project: Project, thread_id: str, body: ThreadUpdate) -> orm.Thread:
    row = await get(session, project, thread_id)
    # null means "unchanged": go-openai sends "metadata": null on every modify.
    if body.tool_resources is not None:
        row.tool_resources = await tool_resources.to_stored(session, project, body.tool_resources)
    if body.metadata is not None:
        row.metadata_ = dict(body.metadata)
    return row


async def delete(session: AsyncSession, project: Project, thread_id: str) -> Deleted:
    await get(session, project, thread_id)
    # Rows locked in the order a run's own writes take them (PostgreSQL;
    # SQLite's transaction holds the write lock already): its runs first,
    # then the thread. A run's end holds its run's row and then share-locks
    # the thread (its message's foreign key); taking the thread first would
    # deadlock with it, and PostgreSQL would abort the delete. One order is
    # left that no locking here avoids: a run created after the runs were
    # locked (its create commits while the delete waits for the thread's
    # row), whose end then comes between them. PostgreSQL fails one of the
    # two; the API makes a failed delete again (api/threads.py), which then
    # locks that run too and waits for its end.
    run_ids = select(orm.Run.id).where(orm.Run.thread_id == thread_id)
    await session.execute(run_ids.with_for_update())
    # The thread's row: a run created in it meanwhile (its insert
    # share-locks the thread) has committed before the deletes below read
    # the thread's runs, or fails on the thread gone. Else the thread's
    # delete would take such a run by its cascade, and leave its log.
    await session.execute(select(orm.Thread.id).where(orm.Thread.id == thread_id).with_for_update())
    # Explicit rather than trusting ON DELETE CASCADE alone (SQLite only
    # honours it with the foreign_keys pragma on; PostgreSQL's run_events
    # has no foreign key: migration 0018).
    await session.execute(sql_delete(orm.RunStep).where(orm.RunStep.run_id.in_(run_ids)))
    deleted = await session.scalars(sql_delete(orm.Run).where(orm.Run.thread_id == thread_id).returning(orm.Run.id))
    # The logs after the runs: their rows' delete waits for any append that
    # holds one (each append locks its run, or inserts it), so an append
    # committed before is deleted here, and one after finds its run gone.
    gone = list(deleted.all())
    if gone:
        await session.execute(sql_delete(orm.RunEvent).where(orm.RunEvent.run_id.in_(gone)))
    await session.execute(sql_delete(orm.Message).where(orm.Message.thread_id == thread_id))
    await session.execute(sql_delete(orm.Thread).where(orm.Thread.id == thread_id))
    return Deleted(id=thread_id, object="thread.deleted")


def to_wire(row: orm.Thread) -> Thread:
    return Thread(
        id=row.id,
        created_at=row.created_at,
        tool_resources=row.tool_resources,
        metadata=row.metadata_,
    )
