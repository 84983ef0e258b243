"""Validation and storage form of ``tool_resources`` (assistants and threads)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app import errors, orm
from app.services import vector_stores
from app.wire.common import FileSearchResources, ToolResourcesUpdate


async def require_files(session: AsyncSession, file_ids: list[str]) -> None:
    """Every id names an existing file (404 ``No such File object`` otherwise)."""
    if not file_ids:
        return
    found = set((await session.scalars(select(orm.File.id).where(orm.File.id.in_(file_ids)))).all())
    for file_id in file_ids:
        if file_id not in found:
            raise errors.file_not_found(file_id)


async def to_stored(
    session: AsyncSession,
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
        await require_files(session, file_ids)
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
                session, file_search.vector_stores[0], f"{param}.file_search.vector_stores[0]", for_thread=for_thread
            )
            stored["file_search"] = {"vector_store_ids": [store.id]}
        else:
            stored["file_search"] = {"vector_store_ids": list(file_search.vector_store_ids or [])}
    return stored
