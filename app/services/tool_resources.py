"""Validation and storage form of ``tool_resources`` (assistants and threads)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app import errors, orm
from app.services import projects, vector_store_files, vector_stores
from app.services.projects import Project
from app.wire.common import FileSearchResources, ToolResourcesUpdate


async def require_files(session: AsyncSession, project: Project, file_ids: list[str]) -> None:
    """Every id names a file of the project (404 ``No such File object`` otherwise)."""
    await vector_store_files.require_files(session, project, list(dict.fromkeys(file_ids)))


async def require_stores(session: AsyncSession, project: Project, store_ids: list[str]) -> None:
    """Every id names a vector store of the project (404 ``No vector store found``
    otherwise), so a run's file_search can only ever search the project's stores."""
    if not store_ids:
        return
    query = projects.owned(project, orm.VectorStore).where(orm.VectorStore.id.in_(store_ids))
    found = {row.id for row in (await session.scalars(query)).all()}
    for store_id in store_ids:
        if store_id not in found:
            raise errors.not_found("vector store", store_id)


async def to_stored(
    session: AsyncSession,
    project: Project,
    resources: ToolResourcesUpdate | None,
    *,
    param: str = "tool_resources",
    for_thread: bool = False,
) -> dict[str, Any]:
    """The stored (and returned) form; ``{}`` when nothing was given.

    Accepts the create form (ToolResources, with the ``vector_stores`` helper)
    and the modify form (ToolResourcesUpdate, ids only)."""
    if resources is None:
        return {}
    stored: dict[str, Any] = {}
    if resources.code_interpreter is not None:
        file_ids = list(resources.code_interpreter.file_ids)
        await require_files(session, project, file_ids)
        stored["code_interpreter"] = {"file_ids": file_ids}
    if resources.file_search is not None:
        file_search = resources.file_search
        if isinstance(file_search, FileSearchResources) and file_search.vector_stores is not None:
            if file_search.vector_store_ids is not None:
                raise errors.invalid(
                    f"Invalid '{param}.file_search': only one of 'vector_store_ids' or "
                    "'vector_stores' may be provided.",
                    param=f"{param}.file_search",
                )
            # The helper builds a store from file ids (ingested by the worker).
            store = await vector_stores.create_from_helper(
                session,
                project,
                file_search.vector_stores[0],
                f"{param}.file_search.vector_stores[0]",
                for_thread=for_thread,
            )
            stored["file_search"] = {"vector_store_ids": [store.id]}
        else:
            store_ids = list(file_search.vector_store_ids or [])
            await require_stores(session, project, store_ids)
            stored["file_search"] = {"vector_store_ids": store_ids}
    return stored
