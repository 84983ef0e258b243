"""Assistants: create, retrieve, update, delete, list."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete as sql_delete
from sqlalchemy.ext.asyncio import AsyncSession

from app import errors, ids, orm
from app.services import pagination, projects, run_defaults, tool_resources
from app.services.common import metadata_or_empty, require_id
from app.services.projects import Project
from app.wire.assistants import Assistant, AssistantCreate, AssistantUpdate
from app.wire.common import Deleted, ListPage, response_format_to_wire, tool_to_wire


async def create(session: AsyncSession, project: Project, body: AssistantCreate) -> orm.Assistant:
    seq = ids.next_seq()
    row = orm.Assistant(
        id=ids.new_id(ids.ASSISTANT, seq),
        project_id=project.id,
        seq=seq,
        created_at=ids.seconds(seq),
        model=body.model,
        name=body.name,
        description=body.description,
        instructions=body.instructions,
        reasoning_effort=body.reasoning_effort,
        tools=[tool_to_wire(tool) for tool in body.tools or []],
        tool_resources=await tool_resources.to_stored(session, project, body.tool_resources),
        metadata_=metadata_or_empty(body.metadata),
        temperature=body.temperature,
        top_p=body.top_p,
        response_format=response_format_to_wire(body.response_format),
    )
    session.add(row)
    return row


async def get(session: AsyncSession, project: Project, assistant_id: str) -> orm.Assistant:
    require_id("assistant_id", assistant_id, ids.ASSISTANT)
    return await projects.lookup(
        session, project, orm.Assistant, assistant_id, lambda: errors.not_found("assistant", assistant_id)
    )


async def update(session: AsyncSession, project: Project, assistant_id: str, body: AssistantUpdate) -> orm.Assistant:
    row = await get(session, project, assistant_id)
    run_defaults.forget(assistant_id)
    await run_defaults.announce_change(session, assistant_id)
    given = body.model_fields_set
    # A field sent as null means "unchanged" (go-openai sends nulls and "model": "").
    if body.model:
        row.model = body.model
    for field in ("name", "description", "instructions", "reasoning_effort", "temperature", "top_p"):
        if field in given and getattr(body, field) is not None:
            setattr(row, field, getattr(body, field))
    if body.tools is not None:
        row.tools = [tool_to_wire(tool) for tool in body.tools]
    if body.tool_resources is not None:
        # On modify, tool_resources replaces the whole object.
        row.tool_resources = await tool_resources.to_stored(session, project, body.tool_resources)
    if body.metadata is not None:
        row.metadata_ = dict(body.metadata)
    if body.response_format is not None:
        row.response_format = response_format_to_wire(body.response_format)
    return row


async def delete(session: AsyncSession, project: Project, assistant_id: str) -> Deleted:
    await get(session, project, assistant_id)
    run_defaults.forget(assistant_id)
    await run_defaults.announce_change(session, assistant_id)
    await session.execute(sql_delete(orm.Assistant).where(orm.Assistant.id == assistant_id))
    return Deleted(id=assistant_id, object="assistant.deleted")


async def list_(session: AsyncSession, project: Project, params: pagination.PageParams) -> ListPage[Any]:
    rows, has_more = await pagination.fetch_page(
        session, projects.owned(project, orm.Assistant), orm.Assistant.seq, params, ids.ASSISTANT
    )
    return pagination.page([to_wire(row) for row in rows], has_more)


def to_wire(row: orm.Assistant) -> Assistant:
    return Assistant(
        id=row.id,
        created_at=row.created_at,
        name=row.name,
        description=row.description,
        model=row.model,
        instructions=row.instructions,
        tools=row.tools,
        tool_resources=row.tool_resources,
        metadata=row.metadata_,
        temperature=1.0 if row.temperature is None else row.temperature,
        top_p=1.0 if row.top_p is None else row.top_p,
        response_format=row.response_format or "auto",
    )
