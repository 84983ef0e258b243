"""Migration 0012_keyword_postings on a database written before it: the
chunks already there get their postings, and keyword search finds them."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Connection

from app import db
from app.retrieval import keyword_postings
from app.retrieval import search as ranking

pytestmark = pytest.mark.timeout(120)


def _downgrade(connection: Connection, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(db.MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    command.downgrade(config, revision)


async def test_upgrade_indexes_the_chunks_already_stored(database_url: str) -> None:
    engine = db.create_engine(database_url)
    sessionmaker = db.create_sessionmaker(engine)
    try:
        await db.migrate(engine)
        async with engine.begin() as connection:
            await connection.run_sync(_downgrade, "0008_run_events")
        async with sessionmaker() as session, session.begin():
            await session.execute(
                text(
                    "INSERT INTO vector_store_chunks (vector_store_id, file_id, position, text) "
                    "VALUES (:store, :file, :position, :text)"
                ),
                [
                    {"store": "vs_old", "file": "file-a", "position": 0, "text": "the axolotl regrows its limbs"},
                    {"store": "vs_old", "file": "file-b", "position": 0, "text": "a heron stands in the shallows"},
                    {"store": "vs_other", "file": "file-c", "position": 0, "text": "axolotl care sheet"},
                ],
            )
        await db.migrate(engine)
        async with sessionmaker() as session:
            count = await session.execute(
                text(f"SELECT count(*) FROM {keyword_postings.TABLE} WHERE store_key = :key"),
                {"key": keyword_postings.store_key("vs_old")},
            )
            assert count.scalar_one() >= 6
            hits = await ranking.search(session, ["vs_old"], ["axolotls regrowing"], 10)
        assert [(hit.vector_store_id, hit.file_id) for hit in hits] == [("vs_old", "file-a")]
    finally:
        await engine.dispose()
