"""/threads"""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlalchemy.exc import DBAPIError

from app import db, sandbox
from app.api.deps import ProjectDep, RuntimeDep, respond
from app.services import threads
from app.wire.common import Deleted
from app.wire.threads import Thread, ThreadCreate, ThreadUpdate

router = APIRouter(tags=["threads"])


@router.post("/threads", response_model=Thread)
async def create_thread(runtime: RuntimeDep, project: ProjectDep, body: ThreadCreate | None = None) -> Response:
    async with runtime.transaction() as session:
        return respond(threads.to_wire(await threads.create(session, project, body or ThreadCreate())))


@router.get("/threads/{thread_id}", response_model=Thread)
async def retrieve_thread(thread_id: str, runtime: RuntimeDep, project: ProjectDep) -> Response:
    async with runtime.transaction() as session:
        return respond(threads.to_wire(await threads.get(session, project, thread_id)))


@router.post("/threads/{thread_id}", response_model=Thread)
async def update_thread(thread_id: str, body: ThreadUpdate, runtime: RuntimeDep, project: ProjectDep) -> Response:
    async with runtime.transaction() as session:
        return respond(threads.to_wire(await threads.update(session, project, thread_id, body)))


# Transactions a thread's delete may take: each failed only as a deadlock's
# victim (threads.delete says when), the next made after what beat it.
DELETE_ATTEMPTS = 3


@router.delete("/threads/{thread_id}", response_model=Deleted)
async def delete_thread(thread_id: str, runtime: RuntimeDep, project: ProjectDep) -> Response:
    for attempt in range(1, DELETE_ATTEMPTS + 1):
        try:
            async with runtime.transaction() as session:
                deleted = await threads.delete(session, project, thread_id)
            break
        except DBAPIError as error:
            if attempt == DELETE_ATTEMPTS or not db.deadlock_detected(error):
                raise
    # Its code interpreter session and files go too (in this process; a worker
    # elsewhere reclaims them when they have been idle long enough).
    await sandbox.forget(thread_id)
    return respond(deleted)
