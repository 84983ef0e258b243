"""/files (no OpenAI-Beta header: the SDKs never send it here)."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse

from app.api import uploads
from app.api.deps import ProjectDep, RuntimeDep, respond
from app.services import files
from app.services.pagination import PageParams
from app.wire.common import Deleted, ListPage
from app.wire.files import FileObject

router = APIRouter(tags=["files"])


def file_page_params(
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> PageParams:
    # /files pages differ from the others: up to 10,000 items, and no `before`.
    return PageParams(limit=limit, order=order, after=after)


@router.post("/files", response_model=FileObject)
async def create_file(request: Request, runtime: RuntimeDep, project: ProjectDep) -> Response:
    # The body is read by hand (no FastAPI Form/UploadFile) so it streams to disk.
    storage = runtime.storage
    async with (
        uploads.receive_form(
            request,
            storage.temp_path(),
            file_field="file",
            max_file_bytes=runtime.settings.max_upload_bytes,
            check_field=files.check_field,
        ) as form,
        runtime.transaction() as session,
    ):
        row = await files.create(session, storage, project, form.fields, form.file)
    return respond(files.to_wire(row))


@router.get("/files", response_model=ListPage[FileObject])
async def list_files(
    runtime: RuntimeDep,
    project: ProjectDep,
    page: Annotated[PageParams, Depends(file_page_params)],
    purpose: str | None = None,
) -> Response:
    async with runtime.transaction() as session:
        return respond(await files.list_(session, runtime.storage, project, page, purpose))


@router.get("/files/{file_id}", response_model=FileObject)
async def retrieve_file(file_id: str, runtime: RuntimeDep, project: ProjectDep) -> Response:
    async with runtime.transaction() as session:
        return respond(files.to_wire(await files.get(session, runtime.storage, project, file_id)))


@router.delete("/files/{file_id}", response_model=Deleted)
async def delete_file(file_id: str, runtime: RuntimeDep, project: ProjectDep) -> Response:
    async with runtime.transaction() as session:
        return respond(await files.delete(session, runtime.storage, project, file_id))


@router.get("/files/{file_id}/content")
async def retrieve_file_content(file_id: str, runtime: RuntimeDep, project: ProjectDep) -> Response:
    # Allowed for every purpose: OpenAI refuses `assistants` files, but on a
    # self-hosted server the uploader owns the bytes anyway.
    async with runtime.transaction() as session:
        row, path = await files.content_path(session, runtime.storage, project, file_id)
    # filename* only (RFC 6266): the name is user input and may hold quotes or non-ASCII.
    disposition = f"attachment; filename*=utf-8''{quote(row.filename, safe='')}"
    return FileResponse(path, media_type="application/octet-stream", headers={"Content-Disposition": disposition})
