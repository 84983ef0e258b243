"""Migration 0012_keyword_postings on a database written before it: the
chunks already there get their postings, and keyword search finds them."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Connection

from app import db, ids, orm
from app.retrieval import chunking, filters, keyword_postings
from app.retrieval import search as ranking
from app.services import projects, vector_stores
from app.wire.vector_stores import ComparisonFilter

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


async def test_upgrade_gives_each_posting_its_file(database_url: str) -> None:
    """Migration 0013_postings_file: postings written before it get their
    file row's seq (0 without a row), so a filtered search finds them."""
    engine = db.create_engine(database_url)
    sessionmaker = db.create_sessionmaker(engine)
    try:
        await db.migrate(engine)
        async with engine.begin() as connection:
            await connection.run_sync(_downgrade, "0012_keyword_postings")
        async with sessionmaker() as session, session.begin():
            store = vector_stores.new_store(projects.DEFAULT)
            session.add(store)
            seqs = {}
            for name, attributes in (("a", {"kind": "amphibian"}), ("b", {"kind": "bird"})):
                seq = ids.next_seq()
                seqs[name] = seq
                session.add(
                    orm.VectorStoreFile(
                        vector_store_id=store.id,
                        file_id=f"file-{name}",
                        seq=seq,
                        created_at=ids.seconds(seq),
                        filename=f"{name}.txt",
                        status="completed",
                        usage_bytes=0,
                        chunking_strategy=chunking.static(),
                        attributes=attributes,
                    )
                )
            await session.flush()
            for chunk_id, name in enumerate(("a", "b", "gone"), 1):
                await session.execute(
                    text(
                        "INSERT INTO vector_store_chunks (id, vector_store_id, file_id, position, text) "
                        "VALUES (:id, :store, :file, 0, :text)"
                    ),
                    {"id": chunk_id, "store": store.id, "file": f"file-{name}", "text": "an axolotl"},
                )
            # As 0012's code wrote them ("axolotl" is its own stem and lexeme).
            await session.execute(
                text(
                    f"INSERT INTO {keyword_postings.TABLE} (term, store_key, impact, chunk_id) "
                    "VALUES (:term, :key, 1000, :chunk)"
                ),
                [
                    {"term": "axolotl", "key": keyword_postings.store_key(store.id), "chunk": chunk}
                    for chunk in (1, 2, 3, 4)  # 4: a posting whose chunk is gone
                ],
            )
        await db.migrate(engine)
        async with sessionmaker() as session:
            rows = await session.execute(text(f"SELECT chunk_id, file_seq FROM {keyword_postings.TABLE}"))
            assert sorted(rows.all()) == [(1, seqs["a"]), (2, seqs["b"]), (3, 0)]
            dialect: filters.Dialect = "postgresql" if engine.dialect.name == "postgresql" else "sqlite"
            amphibians = filters.compile_filter(ComparisonFilter(type="eq", key="kind", value="amphibian"), dialect)
            hits = await ranking.search(session, [store.id], ["axolotl"], 10, condition=amphibians)
            assert [hit.file_id for hit in hits] == ["file-a"]
    finally:
        await engine.dispose()
