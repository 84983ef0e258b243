"""Migration 0018_pg_run_events_unkeyed: PostgreSQL's run_events loses its
foreign key to runs (its check a trigger query per event row), SQLite's
keeps it; the downgrade deletes the logs of runs that are gone and puts the
key back."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from app import db
from app.services import run_events


def _downgrade(connection: Connection, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(db.MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    command.downgrade(config, revision)


async def _keys(engine: AsyncEngine) -> list[tuple[str, str | None]]:
    """run_events' foreign keys: (the table referred to, ON DELETE)."""
    async with engine.connect() as connection:
        keys = await connection.run_sync(lambda sync: inspect(sync).get_foreign_keys("run_events"))
    return [(key["referred_table"], key.get("options", {}).get("ondelete")) for key in keys]


async def _log_count(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(text("SELECT count(*) FROM run_events"))).scalar_one())


async def test_postgresql_alone_drops_the_run_logs_key_and_the_downgrade_restores_it(database_url: str) -> None:
    sqlite = db.is_sqlite(database_url)
    engine = db.create_engine(database_url)
    try:
        await db.migrate(engine)
        assert await _keys(engine) == ([("runs", "CASCADE")] if sqlite else [])
        if not sqlite:
            # A log whose run is gone (left by an older server version's
            # thread delete, say) is accepted now, and keeps the downgrade's
            # key from being added unless it is deleted first.
            async with engine.begin() as connection:
                await connection.execute(
                    text(
                        "INSERT INTO run_events (run_id, seq, event, data, created_at) "
                        "VALUES ('run_gone', 1, 'thread.run.created', '{}', 1)"
                    )
                )
            assert await _log_count(engine) == 1
        async with engine.begin() as connection:
            await connection.run_sync(_downgrade, "0017_pg_flush_function")
        assert await _keys(engine) == [("runs", "CASCADE")]
        assert await _log_count(engine) == 0
        await db.migrate(engine)
        assert await _keys(engine) == ([("runs", "CASCADE")] if sqlite else [])
    finally:
        await engine.dispose()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # SQLite's key refuses such a log
async def test_a_log_whose_run_is_gone_is_pruned_once_older_than_the_retention(database_url: str) -> None:
    """PostgreSQL's log has no key to refuse a log whose run is gone (an
    older server version's thread delete leaves one): the prune takes it once
    its rows are older than the retention, and not before."""
    engine = db.create_engine(database_url)
    try:
        await db.migrate(engine)
        async with engine.begin() as connection:
            for run_id, created_at in (("run_gone_long_ago", 100), ("run_gone_just_now", 5_000)):
                await connection.execute(
                    text(
                        "INSERT INTO run_events (run_id, seq, event, data, created_at) "
                        "VALUES (:run_id, 1, 'thread.run.created', '{}', :created_at)"
                    ),
                    {"run_id": run_id, "created_at": created_at},
                )
        async with AsyncSession(engine) as session, session.begin():
            assert await run_events.prune(session, older_than=1_000) == 1
        async with engine.connect() as connection:
            left = (await connection.execute(text("SELECT run_id FROM run_events"))).scalars().all()
        assert left == ["run_gone_just_now"]
    finally:
        await engine.dispose()
