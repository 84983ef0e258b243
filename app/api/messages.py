"""/threads/{thread_id}/messages"""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.api.deps import PageDep, ProjectDep, RuntimeDep, respond
from app.services import messages
from app.wire.common import Deleted, ListPage
from app.wire.messages import Message, MessageCreate, MessageUpdate

router = APIRouter(tags=["messages"])


@router.post("/threads/{thread_id}/messages", response_model=Message)
async def create_message(thread_id: str, body: MessageCreate, runtime: RuntimeDep, project: ProjectDep) -> Response:
    async with runtime.transaction() as session:
        return respond(messages.to_wire(await messages.create(session, project, thread_id, body)))


@router.get("/threads/{thread_id}/messages", response_model=ListPage[Message])
async def list_messages(
    thread_id: str, runtime: RuntimeDep, project: ProjectDep, page: PageDep, run_id: str | None = None
) -> Response:
    async with runtime.transaction() as session:
        return respond(await messages.list_(session, project, thread_id, page, run_id))


@router.get("/threads/{thread_id}/messages/{message_id}", response_model=Message)
async def retrieve_message(thread_id: str, message_id: str, runtime: RuntimeDep, project: ProjectDep) -> Response:
    async with runtime.transaction() as session:
        return respond(messages.to_wire(await messages.get(session, project, thread_id, message_id)))


@router.post("/threads/{thread_id}/messages/{message_id}", response_model=Message)
async def update_message(
    thread_id: str, message_id: str, body: MessageUpdate, runtime: RuntimeDep, project: ProjectDep
) -> Response:
    async with runtime.transaction() as session:
        return respond(messages.to_wire(await messages.update(session, project, thread_id, message_id, body)))


@router.delete("/threads/{thread_id}/messages/{message_id}", response_model=Deleted)
async def delete_message(thread_id: str, message_id: str, runtime: RuntimeDep, project: ProjectDep) -> Response:
    async with runtime.transaction() as session:
        return respond(await messages.delete(session, project, thread_id, message_id))
