"""Migration 0016_pgjson: PostgreSQL's JSON columns become json (the text
as written: key order and numbers kept), rows already stored keep their
content (in jsonb's order, as jsonb had it); the downgrade makes them jsonb
again. SQLite: nothing changes (its JSON columns are text)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import JSON, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from app import db, orm
from tests.ops.test_runs_status_index import _downgrade

_WRITTEN = '{"b": "1", "a": 1e23, "zeta": {"y": [1.5, 2], "x": null}}'


# Every JSON column the ORM maps: the migration must turn each of them.
_JSON_COLUMNS = [
    (table.name, column.name)
    for table in orm.Base.metadata.tables.values()
    for column in table.columns
    if isinstance(column.type, JSON)
]


async def _types(engine: AsyncEngine) -> set[str]:
    """The data types of every JSON column."""
    async with engine.connect() as connection:
        columns = "SELECT table_name, column_name, data_type FROM information_schema.columns"
        rows = await connection.execute(text(columns + " WHERE table_schema = current_schema()"))
        found = {(row[0], row[1]): row[2] for row in rows}
    return {found[table, name] for table, name in _JSON_COLUMNS}


async def _metadata(engine: AsyncEngine, thread_id: str) -> Any:
    sessionmaker = db.create_sessionmaker(engine)
    async with sessionmaker() as session:
        return await session.scalar(select(orm.Thread.metadata_).where(orm.Thread.id == thread_id))


async def _insert(engine: AsyncEngine, thread_id: str, seq: int) -> None:
    async with engine.begin() as connection:
        await connection.execute(
            text("INSERT INTO threads (id, seq, created_at, metadata) VALUES (:id, :seq, 1, :metadata)"),
            {"id": thread_id, "seq": seq, "metadata": _WRITTEN},
        )


async def test_the_json_columns_turn_json_keeping_stored_rows_and_the_downgrade_turns_them_back(
    database_url: str,
) -> None:
    postgres = not db.is_sqlite(database_url)
    engine = db.create_engine(database_url)
    try:
        await db.migrate(engine)
        async with engine.begin() as connection:
            await connection.run_sync(_downgrade, "0015_pg_runs_status_index")
        await engine.dispose()  # (its connections' prepared statements name the old types)
        if postgres:
            assert await _types(engine) == {"jsonb"}
        await _insert(engine, "thread_before", 1)
        before = await _metadata(engine, "thread_before")
        if postgres:  # jsonb's order (shortest key first) and its whole number for 1e23
            assert list(before) == ["a", "b", "zeta"] and list(before["zeta"]) == ["x", "y"]
            assert before == {"a": 10**23, "b": "1", "zeta": {"x": None, "y": [1.5, 2]}}

        await db.migrate(engine)
        await engine.dispose()
        if postgres:
            assert await _types(engine) == {"json"}
        kept = await _metadata(engine, "thread_before")
        assert kept == before and list(kept) == list(before)  # the stored rows' content, unchanged
        await _insert(engine, "thread_after", 2)
        after = await _metadata(engine, "thread_after")
        assert list(after) == ["b", "a", "zeta"] and list(after["zeta"]) == ["y", "x"]
        assert after["a"] == 1e23 and isinstance(after["a"], float)  # the number as written
        # A NUL (a provider's answer may hold one) json keeps and jsonb refuses,
        # beside the text of its escape, which is no NUL.
        async with engine.begin() as connection:
            await connection.execute(
                text("INSERT INTO threads (id, seq, created_at, metadata) VALUES ('thread_nul', 3, 1, :metadata)"),
                {"metadata": json.dumps({"nul": "a\x00b", "escape": "\\u0000", "both": "\\\x00"})},
            )
        assert await _metadata(engine, "thread_nul") == {"nul": "a\x00b", "escape": "\\u0000", "both": "\\\x00"}

        async with engine.begin() as connection:
            await connection.run_sync(_downgrade, "0015_pg_runs_status_index")
        await engine.dispose()  # (its connections' prepared statements name the old types)
        if postgres:
            assert await _types(engine) == {"jsonb"}
            assert list(await _metadata(engine, "thread_after")) == ["a", "b", "zeta"]  # valid jsonb, reordered
            # The NUL written as U+FFFD, the escape's text as it was.
            nul = await _metadata(engine, "thread_nul")
            assert nul == {"nul": "a\ufffdb", "escape": "\\u0000", "both": "\\\ufffd"}
        await db.migrate(engine)
        await engine.dispose()
        if postgres:
            assert await _types(engine) == {"json"}
    finally:
        await engine.dispose()
