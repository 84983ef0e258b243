"""Assistants v1's file lists over v2's storage (app/api/v1compat).

An assistant's v1 ``file_ids`` are its ``tool_resources.code_interpreter.file_ids``.
While its tools include retrieval (``file_search``), the same files are also
kept in a vector store the server manages for it, marked with the metadata
``{"assistants_v1": "retrieval"}``, so retrieval searches them. v1 clients
never see that store (v1 has no vector stores); v2 clients see it as the
assistant's file_search store.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app import errors, orm
from app.services import projects, tool_resources, vector_store_files, vector_stores
from app.services.projects import Project

MANAGED = ("assistants_v1", "retrieval")


def code_interpreter_files(resources: dict[str, Any] | None) -> list[str]:
    return list(((resources or {}).get("code_interpreter") or {}).get("file_ids") or [])


def _store_ids(resources: dict[str, Any] | None) -> list[str]:
    return list(((resources or {}).get("file_search") or {}).get("vector_store_ids") or [])


async def file_ids_of(session: AsyncSession, assistant_ids: Iterable[str], limit: int = 20) -> dict[str, list[str]]:
    """Each assistant's v1 file_ids: its code_interpreter files, then the files
    of its file_search stores (for assistants made by v2 clients), at most ``limit``."""
    wanted = list(dict.fromkeys(assistant_ids))
    if not wanted:
        return {}
    rows = (
        await session.execute(
            select(orm.Assistant.id, orm.Assistant.tool_resources).where(orm.Assistant.id.in_(wanted))
        )
    ).all()
    found: dict[str, list[str]] = {}
    store_of: dict[str, list[str]] = {}
    for assistant_id, resources in rows:
        found[assistant_id] = code_interpreter_files(resources)
        store_of[assistant_id] = _store_ids(resources)
    all_stores = {store for stores in store_of.values() for store in stores}
    in_store: dict[str, list[str]] = {}
    if all_stores:
        query = (
            select(orm.VectorStoreFile.vector_store_id, orm.VectorStoreFile.file_id)
            .where(orm.VectorStoreFile.vector_store_id.in_(all_stores))
            .order_by(orm.VectorStoreFile.seq)
        )
        for store_id, file_id in (await session.execute(query)).all():
            in_store.setdefault(store_id, []).append(file_id)
    for assistant_id, stores in store_of.items():
        merged = dict.fromkeys(found[assistant_id])
        for store_id in stores:
            merged.update(dict.fromkeys(in_store.get(store_id, [])))
        found[assistant_id] = list(merged)[:limit]
    return found


def is_managed(store: orm.VectorStore) -> bool:
    return (store.metadata_ or {}).get(MANAGED[0]) == MANAGED[1]


async def _managed_store(session: AsyncSession, assistant: orm.Assistant) -> orm.VectorStore | None:
    # Kept until the transaction ends (as attaching through the API keeps
    # its store): a delete of the store waits for sync_store's changes
    # rather than their insert meeting its foreign key (a 500).
    for store_id in _store_ids(assistant.tool_resources):
        store = await vector_stores.kept(session, store_id)
        if store is not None and store.project_id == assistant.project_id and is_managed(store):
            return store
    return None


def _has_retrieval(assistant: orm.Assistant) -> bool:
    return any(isinstance(tool, dict) and tool.get("type") == "file_search" for tool in assistant.tools or [])


async def set_files(session: AsyncSession, assistant: orm.Assistant, file_ids: Sequence[str]) -> None:
    """Make ``file_ids`` the assistant's v1 files (and its managed store's, with retrieval on)."""
    await tool_resources.require_files(session, projects.owner_of(assistant), list(file_ids))
    resources = dict(assistant.tool_resources or {})
    resources["code_interpreter"] = {"file_ids": list(file_ids)}
    assistant.tool_resources = resources
    await sync_store(session, assistant)


async def sync_store(session: AsyncSession, assistant: orm.Assistant) -> None:
    """With retrieval on, the managed store holds exactly the v1 files."""
    if not _has_retrieval(assistant):
        return
    file_ids = code_interpreter_files(assistant.tool_resources)
    store = await _managed_store(session, assistant)
    if store is None:
        if not file_ids and _store_ids(assistant.tool_resources):
            return  # a v2 client's own store: leave it alone
        store = vector_stores.new_store(projects.owner_of(assistant), metadata=dict([MANAGED]), expires_after=None)
        session.add(store)
        await session.flush()
        resources = dict(assistant.tool_resources or {})
        resources["file_search"] = {"vector_store_ids": [store.id]}
        assistant.tool_resources = resources
    present = set(
        (
            await session.scalars(
                select(orm.VectorStoreFile.file_id).where(orm.VectorStoreFile.vector_store_id == store.id)
            )
        ).all()
    )
    # Removed in file id order, the order attaching locks a store's rows
    # in: a concurrent attach of the same files waits for these rows in the
    # same order (unsorted, the two could each hold a row the other wanted,
    # on PostgreSQL a deadlock). These locks precede attach()'s savepoint,
    # which its retry of a deadlock does not release: see
    # vector_store_files._retried_clash.
    for file_id in sorted(present - set(file_ids)):
        await vector_store_files.remove(session, store, file_id)
    missing = [file_id for file_id in file_ids if file_id not in present]
    files = await vector_store_files.require_files(session, projects.owner_of(assistant), missing)
    strategy = vector_store_files.resolve_strategy(None, "")
    await vector_store_files.attach(session, store, [(files[file_id], strategy, None) for file_id in missing])


async def add_file(session: AsyncSession, assistant: orm.Assistant, file_id: str, limit: int) -> orm.File:
    await tool_resources.require_files(session, projects.owner_of(assistant), [file_id])
    current = code_interpreter_files(assistant.tool_resources)
    if file_id not in current:
        if len(current) >= limit:
            raise errors.invalid(
                f"The assistant {assistant.id} already has {limit} files, the most an assistant may have.",
                param="file_id",
            )
        await set_files(session, assistant, [*current, file_id])
    file = await session.get(orm.File, file_id)
    assert file is not None
    return file


async def remove_file(session: AsyncSession, assistant: orm.Assistant, file_id: str) -> None:
    current = code_interpreter_files(assistant.tool_resources)
    if file_id not in current:
        raise errors.not_found("assistant file", file_id)
    await set_files(session, assistant, [item for item in current if item != file_id])


async def files_by_id(session: AsyncSession, project: Project, file_ids: Sequence[str]) -> dict[str, orm.File]:
    if not file_ids:
        return {}
    query = select(orm.File).where(orm.File.id.in_(file_ids), orm.File.project_id == project.id)
    rows = (await session.scalars(query)).all()
    return {row.id: row for row in rows}
