"""The chunk index on both databases, without HTTP: BM25 order on a small
fixture, scores in range, and attribute filters compiled to SQL agreeing
with their definition on every row."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from app import ids, orm
from app.retrieval import chunking, filters, index
from app.retrieval import search as ranking
from app.runtime import Runtime
from app.services import projects, vector_stores
from app.services.vector_store_search import matches
from app.settings import Settings
from app.wire.vector_stores import ComparisonFilter, CompoundFilter

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def runtime(database_url: str, tmp_path: Path) -> AsyncIterator[Runtime]:
    started = await Runtime.start(Settings(data_dir=tmp_path / "data", database_url=database_url))
    try:
        yield started
    finally:
        await started.close()


async def _store(runtime: Runtime, files: list[tuple[list[str], dict[str, Any]]]) -> tuple[str, list[str]]:
    """A store whose completed files hold these chunks and attributes."""
    file_ids = []
    async with runtime.transaction() as session:
        store = vector_stores.new_store(projects.DEFAULT)
        session.add(store)
        await session.flush()
        for pieces, attributes in files:
            seq = ids.next_seq()
            file_id = ids.new_id(ids.FILE, seq)
            session.add(
                orm.VectorStoreFile(
                    vector_store_id=store.id,
                    file_id=file_id,
                    seq=seq,
                    created_at=ids.seconds(seq),
                    filename=f"{file_id}.txt",
                    status="completed",
                    usage_bytes=0,
                    chunking_strategy=chunking.static(),
                    attributes=attributes,
                )
            )
            await index.add_chunks(session, store.id, file_id, pieces, None)
            file_ids.append(file_id)
    if runtime.engine.dialect.name == "postgresql":
        async with runtime.transaction() as session:  # word frequencies come from the planner's statistics
            await session.execute(text("ANALYZE vector_store_chunks"))
    return store.id, file_ids


FILLER = [f"python module reference page number {n} about lists and functions" for n in range(40)]


async def test_rare_words_outrank_repeated_common_ones(runtime: Runtime) -> None:
    store_id, (_, _, rare) = await _store(
        runtime,
        [
            (FILLER, {}),
            (["python python python lists lists lists functions functions module"], {}),
            (["a bisection algorithm keeps the sequence ordered"], {}),
        ],
    )
    async with runtime.transaction() as session:
        hits = await ranking.search(session, [store_id], ["python lists bisection"], 5)
    assert hits[0].file_id == rare  # by word rarity, though the others repeat two query words
    assert hits[0].score == pytest.approx(1 / 3, abs=0.01)  # the best chunk has one word of three
    assert all(0 < hit.score <= 1 for hit in hits)
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
    async with runtime.transaction() as session:
        assert await ranking.search(session, [store_id], ["zeppelin"], 5) == []
        both = await ranking.search(session, [store_id], ["bisection ordered"], 5)
    assert both[0].file_id == rare and both[0].score == 1.0


ATTRIBUTES: list[dict[str, Any]] = [
    {"region": "africa", "year": 2020, "wild": True, "weight": 2.5},
    {"region": "america", "year": 2024, "wild": False},
    {"region": "Ärmelkanal", "year": 1999.0, "wild": 1},
    {"year": "2020", "tags": "x"},
    {},
]

CONDITIONS: list[ComparisonFilter | CompoundFilter] = [
    ComparisonFilter(type="eq", key="region", value="africa"),
    ComparisonFilter(type="ne", key="region", value="africa"),
    ComparisonFilter(type="eq", key="year", value=2020),
    ComparisonFilter(type="eq", key="year", value="2020"),
    ComparisonFilter(type="eq", key="wild", value=True),
    ComparisonFilter(type="eq", key="wild", value=1),
    ComparisonFilter(type="ne", key="wild", value=False),
    ComparisonFilter(type="gt", key="year", value=2000),
    ComparisonFilter(type="lte", key="year", value=1999),
    ComparisonFilter(type="gte", key="region", value="america"),
    ComparisonFilter(type="lt", key="region", value="b"),
    ComparisonFilter(type="gt", key="region", value=3),
    ComparisonFilter(type="gt", key="wild", value=False),
    ComparisonFilter(type="lt", key="weight", value=3),
    ComparisonFilter(type="in", key="region", value=["europe", "africa", "Ärmelkanal"]),
    ComparisonFilter(type="in", key="year", value=[2024, "2020"]),
    ComparisonFilter(type="nin", key="region", value=["africa"]),
    ComparisonFilter(type="in", key="region", value="africa"),
    ComparisonFilter(type="eq", key='it\'s "quoted"', value="x"),
    CompoundFilter(
        type="or",
        filters=[
            ComparisonFilter(type="lt", key="year", value=2000),
            CompoundFilter(
                type="and",
                filters=[
                    ComparisonFilter(type="ne", key="region", value="africa"),
                    ComparisonFilter(type="nin", key="year", value=[1]),
                ],
            ),
        ],
    ),
    CompoundFilter(type="and", filters=[]),
    CompoundFilter(type="or", filters=[]),
]


async def test_filters_in_sql_agree_with_their_definition(runtime: Runtime) -> None:
    store_id, file_ids = await _store(runtime, [([f"chunk of file {n}"], a) for n, a in enumerate(ATTRIBUTES)])
    dialect: filters.Dialect = "postgresql" if runtime.engine.dialect.name == "postgresql" else "sqlite"
    for condition in CONDITIONS:
        compiled = filters.compile_filter(condition, dialect)
        async with runtime.transaction() as session:
            rows = await session.execute(
                text(f"SELECT f.file_id FROM vector_store_files f WHERE f.vector_store_id = :store AND {compiled.sql}"),
                {"store": store_id, **compiled.params},
            )
            found = set(rows.scalars())
            hits = await ranking.search(session, [store_id], ["chunk"], 10, condition=compiled)
        expected = {
            file_id for file_id, attributes in zip(file_ids, ATTRIBUTES, strict=True) if matches(condition, attributes)
        }
        assert found == expected, condition
        assert {hit.file_id for hit in hits} == expected, condition
