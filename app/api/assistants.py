"""/assistants"""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.api.deps import PageDep, ProjectDep, RuntimeDep, respond
from app.services import assistants
from app.wire.assistants import Assistant, AssistantCreate, AssistantUpdate
from app.wire.common import Deleted, ListPage

router = APIRouter(tags=["assistants"])


@router.post("/assistants", response_model=Assistant)
async def create_assistant(body: AssistantCreate, runtime: RuntimeDep, project: ProjectDep) -> Response:
    async with runtime.transaction() as session:
        return respond(assistants.to_wire(await assistants.create(session, project, body)))


@router.get("/assistants", response_model=ListPage[Assistant])
async def list_assistants(runtime: RuntimeDep, project: ProjectDep, page: PageDep) -> Response:
    async with runtime.transaction() as session:
        return respond(await assistants.list_(session, project, page))


@router.get("/assistants/{assistant_id}", response_model=Assistant)
async def retrieve_assistant(assistant_id: str, runtime: RuntimeDep, project: ProjectDep) -> Response:
    async with runtime.transaction() as session:
        return respond(assistants.to_wire(await assistants.get(session, project, assistant_id)))


@router.post("/assistants/{assistant_id}", response_model=Assistant)
async def update_assistant(
    assistant_id: str, body: AssistantUpdate, runtime: RuntimeDep, project: ProjectDep
) -> Response:
    async with runtime.transaction() as session:
        return respond(assistants.to_wire(await assistants.update(session, project, assistant_id, body)))


@router.delete("/assistants/{assistant_id}", response_model=Deleted)
async def delete_assistant(assistant_id: str, runtime: RuntimeDep, project: ProjectDep) -> Response:
    async with runtime.transaction() as session:
        return respond(await assistants.delete(session, project, assistant_id))
