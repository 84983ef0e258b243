"""Migration 0005_live_run_per_thread on a database written before it, which
may hold threads with several live runs (SQLite let them through)."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from app import db, ids, orm


def _downgrade(connection: Connection, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(db.MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    command.downgrade(config, revision)


def _run(thread_id: str, status: str) -> orm.Run:
    seq = ids.next_seq()
    return orm.Run(
        id=ids.new_id(ids.RUN, seq),
        seq=seq,
        created_at=ids.seconds(seq),
        thread_id=thread_id,
        assistant_id="asst_x",
        status=status,
        model="gpt-4o",
        instructions="",
        tools=[],
        metadata_={},
        lease_owner="gone-worker" if status == "in_progress" else None,
    )


async def test_upgrade_keeps_the_oldest_live_run_per_thread(database_url: str) -> None:
    engine = db.create_engine(database_url)
    sessionmaker = db.create_sessionmaker(engine)
    try:
        await db.migrate(engine)
        async with engine.begin() as connection:
            await connection.run_sync(_downgrade, "0004")
        seq = ids.next_seq()
        thread_id = ids.new_id(ids.THREAD, seq)
        runs = [_run(thread_id, status) for status in ("completed", "in_progress", "queued", "requires_action")]
        async with sessionmaker() as session, session.begin():
            # The thread as its table was then (the ORM's has columns added since).
            await session.execute(
                insert(orm.Thread.__table__).values(id=thread_id, seq=seq, created_at=ids.seconds(seq), metadata={})
            )
            session.add_all(runs)
        await db.migrate(engine)
        async with sessionmaker() as session:
            stored = {run.id: run for run in (await session.scalars(select(orm.Run))).all()}
        assert [stored[run.id].status for run in runs] == ["completed", "in_progress", "failed", "failed"]
        for run in runs[2:]:
            failed = stored[run.id]
            assert failed.failed_at is not None and failed.lease_owner is None and failed.expires_at is None
            assert failed.last_error is not None and failed.last_error["code"] == "server_error"
        with pytest.raises(IntegrityError):
            async with sessionmaker() as session, session.begin():
                session.add(_run(thread_id, "queued"))
    finally:
        await engine.dispose()
