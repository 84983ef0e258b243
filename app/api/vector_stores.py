"""/vector_stores, their files, file batches and search.

Adding files only queues them (the worker ingests them), so each route that
adds files wakes the worker after its transaction commits. Retrieves of
files and batches carry ``openai-poll-after-ms`` for the SDK's pollers.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Response
from pydantic import BaseModel

from app.api.deps import PageDep, ProjectDep, RuntimeDep, respond
from app.retrieval import embed
from app.services import vector_store_files, vector_store_search, vector_stores
from app.wire.common import Deleted, ListPage
from app.wire.vector_stores import (
    FileBatch,
    FileBatchCreate,
    FileContentPage,
    SearchRequest,
    SearchResultsPage,
    VectorStore,
    VectorStoreCreate,
    VectorStoreFile,
    VectorStoreFileCreate,
    VectorStoreFileUpdate,
    VectorStoreUpdate,
)

router = APIRouter(tags=["vector_stores"])

FileStatusFilter = Literal["in_progress", "completed", "failed", "cancelled"]


def _polled(model: BaseModel, runtime: RuntimeDep) -> Response:
    response = respond(model)
    response.headers["openai-poll-after-ms"] = str(runtime.settings.poll_after_ms)
    return response


# --- stores ---------------------------------------------------------------------


@router.post("/vector_stores", response_model=VectorStore)
async def create_vector_store(body: VectorStoreCreate, runtime: RuntimeDep, project: ProjectDep) -> Response:
    async with runtime.transaction() as session:
        row = await vector_stores.create(session, project, body)
        wire = await vector_stores.to_wire(session, row)
    runtime.wake()
    return respond(wire)


@router.get("/vector_stores", response_model=ListPage[VectorStore])
async def list_vector_stores(runtime: RuntimeDep, project: ProjectDep, page: PageDep) -> Response:
    async with runtime.transaction() as session:
        return respond(await vector_stores.list_(session, project, page))


@router.get("/vector_stores/{vector_store_id}", response_model=VectorStore)
async def retrieve_vector_store(vector_store_id: str, runtime: RuntimeDep, project: ProjectDep) -> Response:
    async with runtime.transaction() as session:
        return _polled(
            await vector_stores.to_wire(session, await vector_stores.get(session, project, vector_store_id)), runtime
        )


@router.post("/vector_stores/{vector_store_id}", response_model=VectorStore)
async def update_vector_store(
    vector_store_id: str, body: VectorStoreUpdate, runtime: RuntimeDep, project: ProjectDep
) -> Response:
    async with runtime.transaction() as session:
        row = await vector_stores.update(session, project, vector_store_id, body)
        return respond(await vector_stores.to_wire(session, row))


@router.delete("/vector_stores/{vector_store_id}", response_model=Deleted)
async def delete_vector_store(vector_store_id: str, runtime: RuntimeDep, project: ProjectDep) -> Response:
    async with runtime.transaction() as session:
        return respond(await vector_stores.delete(session, project, vector_store_id))


@router.post("/vector_stores/{vector_store_id}/search", response_model=SearchResultsPage)
async def search_vector_store(
    vector_store_id: str, body: SearchRequest, runtime: RuntimeDep, project: ProjectDep
) -> Response:
    queries = vector_store_search.queries_of(body)
    vectors = await embed.start_query_embedding(runtime.settings, queries)
    try:
        # Read-only: on SQLite it neither waits for nor holds the write lock,
        # also while the query's embedding finishes beside the keyword query.
        async with runtime.reading() as session:
            found = await vector_store_search.search(session, project, vector_store_id, body, vectors)
    finally:
        vectors.cancel()  # not awaited when the store is missing or the filter invalid
    stale = [found.store.id] if vector_stores.stale_activity(found.store) else []
    await vector_stores.record_activity(runtime.transaction, stale)
    return respond(found.page)


# --- files ----------------------------------------------------------------------


@router.post("/vector_stores/{vector_store_id}/files", response_model=VectorStoreFile)
async def create_vector_store_file(
    vector_store_id: str, body: VectorStoreFileCreate, runtime: RuntimeDep, project: ProjectDep
) -> Response:
    async with runtime.transaction() as session:
        store = await vector_stores.get_live(session, project, vector_store_id, keep=True)
        wire = vector_store_files.to_wire(await vector_store_files.create(session, store, body))
    runtime.wake()
    return respond(wire)


@router.get("/vector_stores/{vector_store_id}/files", response_model=ListPage[VectorStoreFile])
async def list_vector_store_files(
    vector_store_id: str,
    runtime: RuntimeDep,
    project: ProjectDep,
    page: PageDep,
    filter: FileStatusFilter | None = None,
) -> Response:
    async with runtime.transaction() as session:
        store = await vector_stores.get(session, project, vector_store_id)
        return respond(await vector_store_files.list_(session, store, page, filter))


@router.get("/vector_stores/{vector_store_id}/files/{file_id}", response_model=VectorStoreFile)
async def retrieve_vector_store_file(
    vector_store_id: str, file_id: str, runtime: RuntimeDep, project: ProjectDep
) -> Response:
    async with runtime.transaction() as session:
        store = await vector_stores.get(session, project, vector_store_id)
        return _polled(vector_store_files.to_wire(await vector_store_files.get(session, store, file_id)), runtime)


@router.post("/vector_stores/{vector_store_id}/files/{file_id}", response_model=VectorStoreFile)
async def update_vector_store_file(
    vector_store_id: str, file_id: str, body: VectorStoreFileUpdate, runtime: RuntimeDep, project: ProjectDep
) -> Response:
    async with runtime.transaction() as session:
        store = await vector_stores.get(session, project, vector_store_id)
        row = await vector_store_files.update_attributes(session, store, file_id, body.attributes)
        return respond(vector_store_files.to_wire(row))


@router.delete("/vector_stores/{vector_store_id}/files/{file_id}", response_model=Deleted)
async def delete_vector_store_file(
    vector_store_id: str, file_id: str, runtime: RuntimeDep, project: ProjectDep
) -> Response:
    async with runtime.transaction() as session:
        store = await vector_stores.get(session, project, vector_store_id)
        return respond(await vector_store_files.remove(session, store, file_id))


@router.get("/vector_stores/{vector_store_id}/files/{file_id}/content", response_model=FileContentPage)
async def retrieve_vector_store_file_content(
    vector_store_id: str, file_id: str, runtime: RuntimeDep, project: ProjectDep
) -> Response:
    async with runtime.transaction() as session:
        store = await vector_stores.get(session, project, vector_store_id)
        row = await vector_store_files.get(session, store, file_id)
    return respond(await vector_store_files.content(runtime.storage, row))


# --- batches --------------------------------------------------------------------


@router.post("/vector_stores/{vector_store_id}/file_batches", response_model=FileBatch)
async def create_file_batch(
    vector_store_id: str, body: FileBatchCreate, runtime: RuntimeDep, project: ProjectDep
) -> Response:
    async with runtime.transaction() as session:
        store = await vector_stores.get_live(session, project, vector_store_id, keep=True)
        batch = await vector_store_files.create_batch(session, store, body)
        wire = await vector_store_files.batch_to_wire(session, batch)
    runtime.wake()
    return respond(wire)


@router.get("/vector_stores/{vector_store_id}/file_batches/{batch_id}", response_model=FileBatch)
async def retrieve_file_batch(
    vector_store_id: str, batch_id: str, runtime: RuntimeDep, project: ProjectDep
) -> Response:
    async with runtime.transaction() as session:
        store = await vector_stores.get(session, project, vector_store_id)
        batch = await vector_store_files.get_batch(session, store, batch_id)
        return _polled(await vector_store_files.batch_to_wire(session, batch), runtime)


@router.post("/vector_stores/{vector_store_id}/file_batches/{batch_id}/cancel", response_model=FileBatch)
async def cancel_file_batch(vector_store_id: str, batch_id: str, runtime: RuntimeDep, project: ProjectDep) -> Response:
    async with runtime.transaction() as session:
        # Kept (as when attaching) before the batch's rows are locked: a store
        # delete locks the store first, then its file rows and batches, and
        # waits for this request instead of deadlocking with it (a 500).
        store = await vector_stores.get(session, project, vector_store_id, keep=True)
        batch = await vector_store_files.cancel_batch(session, store, batch_id)
        return respond(await vector_store_files.batch_to_wire(session, batch))


@router.get("/vector_stores/{vector_store_id}/file_batches/{batch_id}/files", response_model=ListPage[VectorStoreFile])
async def list_file_batch_files(
    vector_store_id: str,
    batch_id: str,
    runtime: RuntimeDep,
    project: ProjectDep,
    page: PageDep,
    filter: FileStatusFilter | None = None,
) -> Response:
    async with runtime.transaction() as session:
        store = await vector_stores.get(session, project, vector_store_id)
        await vector_store_files.get_batch(session, store, batch_id)
        return respond(await vector_store_files.list_(session, store, page, filter, batch_id))
