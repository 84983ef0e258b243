"""Attribute filters applied inside the search: a filtered search ranks as
the unfiltered one restricted to the passing files (whatever share of the
files passes), on both engines; on SQLite the passing set kept on the
connection (app.retrieval.passing_files) is used again only while the
database is unchanged."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from sqlalchemy import event, text

from app.retrieval import embed, filters, index, vectors
from app.retrieval import search as ranking
from app.runtime import Runtime
from app.services.vector_store_search import matches
from app.wire.vector_stores import ComparisonFilter, CompoundFilter
from tests.retrieval.test_search_index import _store

pytestmark = pytest.mark.timeout(60)

FILES: list[tuple[list[str], dict[str, Any]]] = [
    (["zebras graze on the savanna in herds", "a zebra foal stands within an hour"], {"animal": "zebra", "legs": 4}),
    (["llamas carry loads across the andes", "a llama spits when annoyed by herds"], {"animal": "llama", "legs": 4}),
    (["herons wade in the shallows of the savanna river"], {"animal": "heron", "legs": 2}),
    (["an okapi browses leaves in the rainforest", "okapi herds are rare: it lives alone"], {"animal": "okapi"}),
]

QUERY = "herds of the savanna and the andes"

CONDITIONS: dict[str, ComparisonFilter | CompoundFilter] = {
    "no file": ComparisonFilter(type="eq", key="animal", value="unicorn"),
    "every file": ComparisonFilter(type="ne", key="animal", value="unicorn"),
    "one file": ComparisonFilter(type="eq", key="animal", value="heron"),
    "all but one (missing key)": ComparisonFilter(type="nin", key="legs", value=[2]),
    "and": CompoundFilter(
        type="and",
        filters=[
            ComparisonFilter(type="eq", key="legs", value=4),
            ComparisonFilter(type="ne", key="animal", value="zebra"),
        ],
    ),
    "or": CompoundFilter(
        type="or",
        filters=[
            ComparisonFilter(type="lt", key="legs", value=3),
            ComparisonFilter(type="in", key="animal", value=["okapi", "zebra"]),
        ],
    ),
}


def _dialect(runtime: Runtime) -> filters.Dialect:
    return "postgresql" if runtime.engine.dialect.name == "postgresql" else "sqlite"


async def test_a_filtered_search_ranks_as_the_unfiltered_one_restricted_to_the_passing_files(
    runtime: Runtime,
) -> None:
    """For filters passing no file, every file, one, all but one, and/or:
    the keyword list and the vector list are the unfiltered ones without
    the failing files (the store is small: both are exact), the same again
    when asked twice (on SQLite the second reuses the kept passing set)."""
    store_id, file_ids = await _store(runtime, FILES, embedded=True)
    attributes = {file_id: attrs for file_id, (_, attrs) in zip(file_ids, FILES, strict=True)}
    query_vector = embed.HashingEmbedder().vector(QUERY)
    async with runtime.reading() as session:
        keyword_all = await index.keyword_search(session, index.Scope([store_id]), QUERY, 20)
        vector_all = await vectors.nearest(session, index.Scope([store_id]), query_vector, 20)
    assert {hit.file_id for hit in keyword_all} == set(file_ids) == {hit.file_id for hit in vector_all}
    for name, condition in CONDITIONS.items():
        passing = {file_id for file_id, attrs in attributes.items() if matches(condition, attrs)}
        compiled = filters.compile_filter(condition, _dialect(runtime))
        for _ in range(2):
            async with runtime.reading() as session:
                keyword = await index.keyword_search(session, index.Scope([store_id], compiled), QUERY, 20)
                nearest = await vectors.nearest(session, index.Scope([store_id], compiled), query_vector, 20)
                fused = await ranking.search(
                    session, [store_id], [QUERY], 20, condition=compiled, query_vectors=[query_vector]
                )
            assert [hit.chunk_id for hit in keyword] == [h.chunk_id for h in keyword_all if h.file_id in passing], name
            assert [hit.chunk_id for hit in nearest] == [h.chunk_id for h in vector_all if h.file_id in passing], name
            assert {hit.file_id for hit in fused} == passing, name


def _count_filter_passes(runtime: Runtime) -> tuple[list[str], Any]:
    """A list that gathers the statements evaluating a filter over file rows, and the listener's remover."""
    seen: list[str] = []

    def listener(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.startswith("INSERT INTO temp.search_passing_") and "FROM vector_store_files f" in statement:
            seen.append(statement)

    event.listen(runtime.read_engine.sync_engine, "before_cursor_execute", listener)
    return seen, lambda: event.remove(runtime.read_engine.sync_engine, "before_cursor_execute", listener)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # PostgreSQL filters inside its one statement
async def test_a_kept_passing_set_serves_only_while_the_database_is_unchanged(runtime: Runtime) -> None:
    store_id, file_ids = await _store(runtime, FILES)
    zebras, llamas = file_ids[:2]
    zebra = filters.compile_filter(ComparisonFilter(type="eq", key="animal", value="zebra"), "sqlite")
    four_legs = filters.compile_filter(ComparisonFilter(type="eq", key="legs", value=4), "sqlite")
    passes, stop = _count_filter_passes(runtime)

    async def found(condition: filters.Compiled) -> set[str]:
        async with runtime.reading() as session:
            hits = await ranking.search(
                session, [store_id], [QUERY + " zebra llama heron okapi"], 20, condition=condition
            )
        return {hit.file_id for hit in hits}

    try:
        assert await found(zebra) == {zebras} and len(passes) == 1
        assert await found(zebra) == {zebras} and len(passes) == 1  # kept: no second pass over the files
        # Another process's (or this one's) write: the next search evaluates the filter again.
        async with runtime.transaction() as session:
            await session.execute(
                text("UPDATE vector_store_files SET attributes = :a WHERE vector_store_id = :s AND file_id = :f"),
                {"a": '{"animal": "zebra", "legs": 4}', "s": store_id, "f": llamas},
            )
        assert await found(zebra) == {zebras, llamas} and len(passes) == 2
        # Another filter is its own set, and replaces the kept one.
        assert await found(four_legs) == {zebras, llamas} and len(passes) == 3
        assert await found(zebra) == {zebras, llamas} and len(passes) == 4
        # A search that fills the set for another filter and is rolled back
        # leaves the kept set as it was, and it is still right.
        with contextlib.suppress(ZeroDivisionError):
            async with runtime.reading() as session:
                await ranking.search(session, [store_id], [QUERY], 20, condition=four_legs)
                raise ZeroDivisionError
        assert await found(zebra) == {zebras, llamas} and len(passes) == 5
        async with runtime.transaction() as session:
            await session.execute(
                text("UPDATE vector_store_files SET status = 'failed' WHERE vector_store_id = :s AND file_id = :f"),
                {"s": store_id, "f": zebras},
            )
        assert await found(zebra) == {llamas}
        every = filters.compile_filter(ComparisonFilter(type="ne", key="animal", value="unicorn"), "sqlite")
        assert await found(every) == set(file_ids) - {zebras}
        # Files passing on both sides of one that is not completed (the
        # second file; seqs follow the files' order): its postings lie within
        # the passing seqs' range, and stay out.
        for status, file_id in (("in_progress", llamas), ("completed", zebras)):
            async with runtime.transaction() as session:
                await session.execute(
                    text("UPDATE vector_store_files SET status = :t WHERE vector_store_id = :s AND file_id = :f"),
                    {"t": status, "s": store_id, "f": file_id},
                )
        assert await found(every) == set(file_ids) - {llamas}
    finally:
        stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # PostgreSQL filters inside its one statement
async def test_a_search_on_a_connection_that_writes_sees_its_own_changes(runtime: Runtime) -> None:
    """A connection's own commits do not move its data_version: a search in
    a write transaction (or on an in-memory database, whose one connection
    does everything) evaluates the filter every time."""
    store_id, file_ids = await _store(runtime, FILES)
    zebras, llamas = file_ids[:2]
    zebra = filters.compile_filter(ComparisonFilter(type="eq", key="animal", value="zebra"), "sqlite")
    for attributes, expected in (('{"animal": "llama"}', {zebras}), ('{"animal": "zebra"}', {zebras, llamas})):
        async with runtime.transaction() as session:
            await session.execute(
                text("UPDATE vector_store_files SET attributes = :a WHERE vector_store_id = :s AND file_id = :f"),
                {"a": attributes, "s": store_id, "f": llamas},
            )
            hits = await ranking.search(session, [store_id], [QUERY + " zebra llama"], 20, condition=zebra)
            assert {hit.file_id for hit in hits} == expected
