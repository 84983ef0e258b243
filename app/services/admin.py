"""Test support: wipe every stored object, for per-test isolation.

Used by the admin API (``POST /admin/reset``), which only exists when the
server runs with ``ASSISTANTS_ADMIN_API=true`` (as ``serve --ephemeral``
does). Runs still executing notice their row is gone within a cancel poll
and stop.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncSession

from app.services import run_defaults

# Bookkeeping and configuration that survive a reset: the schema version,
# and the projects and their keys (a reset forgets objects, not who may call).
_KEEP = frozenset({"alembic_version", "projects", "api_keys"})


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sqlite_tables(connection: Connection) -> tuple[list[str], list[str]]:
    """(ordinary tables, FTS virtual tables); virtual tables' shadow tables
    (``<name>_data``, ``<name>_idx``, ...) belong to them and are left alone."""
    rows = connection.execute(
        text("SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
    ).all()
    virtual = [name for name, sql in rows if (sql or "").upper().startswith("CREATE VIRTUAL TABLE")]
    ordinary = [
        name
        for name, _ in rows
        if name not in virtual and name not in _KEEP and not any(name.startswith(v + "_") for v in virtual)
    ]
    return ordinary, virtual


async def reset(session: AsyncSession) -> None:
    connection = await session.connection()
    # Every assistant goes: no process keeps the run defaults it remembered.
    run_defaults.forget_all()
    await run_defaults.announce_change(session, run_defaults.EVERY_ASSISTANT)
    if connection.dialect.name == "sqlite":
        ordinary, virtual = await connection.run_sync(_sqlite_tables)
        await session.execute(text("PRAGMA defer_foreign_keys = ON"))
        for name in ordinary:
            await session.execute(text(f"DELETE FROM {_quote(name)}"))  # noqa: S608 (names from the catalogue)
        for name in virtual:
            # External-content FTS tables are emptied with their own command.
            await session.execute(text(f"INSERT INTO {_quote(name)}({_quote(name)}) VALUES ('delete-all')"))  # noqa: S608
        return
    names = (
        await session.execute(
            text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY tablename")
        )
    ).scalars()
    tables = [name for name in names if name not in _KEEP]
    if tables:
        await session.execute(text(f"TRUNCATE {', '.join(_quote(n) for n in tables)} RESTART IDENTITY CASCADE"))
