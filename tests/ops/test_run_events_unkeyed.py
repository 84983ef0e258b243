"""Migration 0018_pg_run_events_unkeyed: PostgreSQL's run_events loses its
foreign key to runs (its check a trigger query per event row), SQLite's
keeps it; the downgrade deletes the logs of runs that are gone and puts the
key back."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from app import db


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
