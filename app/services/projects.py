"""Projects: the isolation boundary between API keys (issue 15).

Every top-level object (assistant, thread, file, vector store) carries the id
of the project whose key created it; messages, runs and run steps belong to
their thread's project, a store's files, batches and chunks to the store's.
A request acts for one :class:`Project` (resolved from its key by
app.services.api_keys, handed to every service call by the routes), and the
services reach top-level rows only through :func:`lookup` and :func:`owned`
below: another project's object is answered exactly like a missing one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession

from app import errors, ids, orm

DEFAULT_ID = orm.DEFAULT_PROJECT_ID
DEFAULT_NAME = "default"
PROJECT = "proj_"


@dataclass(frozen=True)
class Project:
    """The project a request acts for."""

    id: str
    name: str


# The project of ASSISTANTS_API_KEYS, of an open server (no keys), and of
# every object stored before projects existed (migration 0009_projects).
DEFAULT = Project(DEFAULT_ID, DEFAULT_NAME)


OwnedRow = TypeVar("OwnedRow", orm.Assistant, orm.Thread, orm.File, orm.VectorStore)


async def lookup(
    session: AsyncSession,
    project: Project,
    table: type[OwnedRow],
    object_id: str,
    missing: Callable[[], errors.APIError],
    *,
    for_update: bool = False,
    key_share: bool = False,
) -> OwnedRow:
    """The row with this id if ``project`` owns it; ``missing()`` otherwise
    (the same answer for another project's object as for none at all).
    ``for_update`` locks the row; ``key_share`` only keeps it from being
    deleted until the transaction ends (PostgreSQL's FOR KEY SHARE, the
    lock a foreign key takes; SQLite's transactions are serial)."""
    lock: bool | dict[str, bool] = {"key_share": True, "read": True} if key_share else for_update
    row = await session.get(table, object_id, with_for_update=lock)
    if row is None or row.project_id != project.id:
        raise missing()
    return row


def owned(project: Project, table: type[OwnedRow]) -> Select[OwnedRow]:
    """The base query of every list: the project's rows of ``table`` only."""
    return select(table).where(table.project_id == project.id)


def owner_of(row: OwnedRow) -> Project:
    """The project a stored object belongs to, for acting on its behalf (its
    store's files, its assistant's managed store); only the id is known."""
    return Project(row.project_id, "")


async def ensure(session: AsyncSession, name: str) -> Project:
    """The project called ``name``, created if there is none (the CLI's ``keys create --project``)."""
    row = (await session.scalars(select(orm.Project).where(orm.Project.name == name))).first()
    if row is None:
        seq = ids.next_seq()
        row = orm.Project(id=ids.new_id(PROJECT, seq), name=name, created_at=ids.seconds(seq))
        session.add(row)
        await session.flush()
    return Project(row.id, row.name)
