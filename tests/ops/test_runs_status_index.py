"""Migration 0015_pg_runs_status_index: PostgreSQL drops ix_runs_status
(its status filters read the live runs' partial index), SQLite keeps it
(its claim reads it); the downgrade puts it back."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import inspect, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from app import db
from app.services import run_execution


def _downgrade(connection: Connection, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(db.MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    command.downgrade(config, revision)


async def _runs_indexes(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as connection:
        indexes = await connection.run_sync(lambda sync: inspect(sync).get_indexes("runs"))
    return {index["name"] for index in indexes if index["name"] is not None}


async def test_postgresql_alone_drops_the_status_index_and_the_downgrade_restores_it(database_url: str) -> None:
    engine = db.create_engine(database_url)
    try:
        await db.migrate(engine)
        kept_at_head = "ix_runs_status" in await _runs_indexes(engine)
        assert kept_at_head is db.is_sqlite(database_url)
        async with engine.begin() as connection:
            await connection.run_sync(_downgrade, "0014_store_file_seq")
        assert "ix_runs_status" in await _runs_indexes(engine)
        await db.migrate(engine)
        assert ("ix_runs_status" in await _runs_indexes(engine)) is kept_at_head
    finally:
        await engine.dispose()


class _Capture:
    """A session that only records the reaper's statements (compiled for asyncpg)."""

    def __init__(self) -> None:
        self.statements: list[tuple[str, list[object]]] = []

    async def scalars(self, query: object, params: dict[str, object] | None = None) -> _Capture:
        compiled = query.compile(dialect=postgresql.asyncpg.dialect())  # type: ignore[attr-defined]
        values = compiled.construct_params(params or {})
        self.statements.append((str(compiled), [values[name] for name in compiled.positiontup]))
        return self

    def all(self) -> list[object]:
        return []


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_the_reapers_plans_read_the_live_runs_index_among_many_ended_runs(database_url: str) -> None:
    engine = db.create_engine(database_url)
    try:
        await db.migrate(engine)
        async with engine.begin() as connection:
            threads = "SELECT 'thread_' || g, g, 1, '{}' FROM generate_series(1, 1000) g"
            await connection.execute(text(f"INSERT INTO threads (id, seq, created_at, metadata) {threads}"))
            await connection.execute(
                text(
                    "INSERT INTO runs (id, seq, created_at, thread_id, assistant_id, status, model, instructions, "
                    "tools, metadata, parallel_tool_calls) SELECT 'run_' || g, g, 1, 'thread_' || (g % 997 + 1), "
                    "'asst_x', CASE WHEN g % 1000 = 0 THEN 'cancelling' ELSE 'completed' END, 'm', '', '[]', '{}', "
                    "true FROM generate_series(1, 20000) g"
                )
            )
            await connection.execute(text("ANALYZE runs"))
        capture = _Capture()
        await run_execution.reap_candidates(capture)  # type: ignore[arg-type]
        assert len(capture.statements) == 3
        raw = await engine.raw_connection()
        try:
            driver = raw.driver_connection
            assert driver is not None
            for sql, parameters in capture.statements:
                # What PostgreSQL runs: its custom plan (the generic one scans the table and costs more).
                plan = "\n".join(row[0] for row in await driver.fetch("EXPLAIN " + sql, *parameters))
                assert "ux_runs_live_thread" in plan and "Seq Scan" not in plan, plan
        finally:
            raw.close()
    finally:
        await engine.dispose()
