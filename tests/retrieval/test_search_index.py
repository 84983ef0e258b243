"""The chunk index on both databases, without HTTP: BM25 order on a small
fixture, scores in range, and attribute filters compiled to SQL agreeing
with their definition on every row."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

from app import ids, orm
from app.retrieval import chunking, embed, filters, index, keyword_postings, postgres_keywords, sqlite_keywords, vectors
from app.retrieval import search as ranking
from app.runtime import Runtime
from app.services import projects, vector_stores
from app.services.vector_store_search import matches
from app.wire.vector_stores import ComparisonFilter, CompoundFilter

pytestmark = pytest.mark.timeout(120)


async def _store(
    runtime: Runtime, files: list[tuple[list[str], dict[str, Any]]], *, embedded: bool = False
) -> tuple[str, list[str]]:
    """A store whose completed files hold these chunks and attributes (with
    hashing embeddings if ``embedded``)."""
    async with runtime.transaction() as session:
        store = vector_stores.new_store(projects.DEFAULT)
        session.add(store)
        await session.flush()
    return store.id, [await _add_file(runtime, store.id, pieces, attributes, embedded) for pieces, attributes in files]


async def _add_file(
    runtime: Runtime, store_id: str, pieces: list[str], attributes: dict[str, Any], embedded: bool = False
) -> str:
    """A completed file of the store holding these chunks."""
    embeddings = await embed.HashingEmbedder().embed(pieces) if embedded else None
    async with runtime.transaction() as session:
        seq = ids.next_seq()
        file_id = ids.new_id(ids.FILE, seq)
        session.add(
            orm.VectorStoreFile(
                vector_store_id=store_id,
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
        await index.add_chunks(session, store_id, file_id, pieces, embeddings)
    if runtime.engine.dialect.name == "postgresql":
        async with runtime.transaction() as session:  # word frequencies come from the planner's statistics
            await session.execute(text("ANALYZE vector_store_chunks"))
    return file_id


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
    ComparisonFilter(type="in", key="year", value=[2020, 1999, "2020", True]),
    ComparisonFilter(type="in", key="wild", value=[True, 1]),
    ComparisonFilter(type="nin", key="wild", value=[False, "x", 2.5]),
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


async def _nearest_files(runtime: Runtime, store_id: str, query: str) -> list[str]:
    """Files of the chunks nearest to the query's embedding (the vector side alone)."""
    query_vector = embed.HashingEmbedder().vector(query)
    async with runtime.transaction() as session:
        hits = await vectors.nearest(session, index.Scope([store_id]), query_vector, 10)
    return [hit.file_id for hit in hits]


async def test_vector_search_sees_every_change_of_the_store_at_once(runtime: Runtime) -> None:
    """SQLite keeps a store's vectors in memory between searches: a chunk
    added or removed, also by a plain DELETE as another process would run
    it, must show in the very next search (on PostgreSQL, pgvector's index)."""
    store_id, (zebra, llama) = await _store(
        runtime, [(["zebras sleep standing in the savanna"], {}), (["llamas hum in the andes"], {})], embedded=True
    )
    assert (await _nearest_files(runtime, store_id, "zebras savanna"))[0] == zebra
    async with runtime.transaction() as session:
        await index.remove_chunks(session, store_id, [zebra])
    assert zebra not in await _nearest_files(runtime, store_id, "zebras savanna")
    okapi = await _add_file(runtime, store_id, ["okapis browse the ituri forest"], {}, embedded=True)
    assert (await _nearest_files(runtime, store_id, "okapis ituri"))[0] == okapi
    async with runtime.transaction() as session:
        await session.execute(text("DELETE FROM vector_store_chunks WHERE file_id = :file"), {"file": okapi})
    assert await _nearest_files(runtime, store_id, "okapis ituri") == [llama]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_vector_cache_stays_within_its_budget(runtime: Runtime) -> None:
    store_id, (zebra, _) = await _store(
        runtime, [(["zebras sleep standing in the savanna"], {}), (["llamas hum in the andes"], {})], embedded=True
    )
    try:
        vectors.set_cache_budget(0)  # nothing kept: each search reads the matrix for itself
        assert (await _nearest_files(runtime, store_id, "zebras"))[0] == zebra
        assert vectors.cached_bytes() == 0
        vectors.set_cache_budget(1024**2)
        assert (await _nearest_files(runtime, store_id, "zebras"))[0] == zebra
        assert 0 < vectors.cached_bytes() <= 1024**2
    finally:
        vectors.set_cache_budget(runtime.settings.vector_cache_mib * 1024**2)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_query_words_are_stemmed_as_the_index_stems_them(runtime: Runtime) -> None:
    """A query word finds the chunks of its indexed stem ("using" is "us",
    "may" is "mai"), through the same tokenizer."""
    store_id, _ = await _store(runtime, [(["using tool one", "it may configure"], {})])
    async with runtime.transaction() as session:
        assert await sqlite_keywords.index_terms(session, ["using", "configuration", "may"]) == {
            "using": ("us",),
            "configuration": ("configur",),
            "may": ("mai",),
        }
        assert len(await ranking.search(session, [store_id], ["use"], 10)) == 1
        assert len(await ranking.search(session, [store_id], ["configured mays"], 10)) == 1


def _bm25(chunks: list[list[str]], query: list[str], average: float) -> list[float]:
    """Plain BM25 over already tokenized chunks with the postings' constants
    (avgdl fixed per engine): the order the index must reproduce."""
    scores = []
    for words in chunks:
        score = 0.0
        for term in query:
            documents = sum(1 for other in chunks if term in other)
            tf = words.count(term)
            if tf:
                length = len(words) / average
                part = tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * length))
                score += keyword_postings.idf(documents, len(chunks)) * part
        scores.append(score)
    return scores


async def test_top_chunks_are_exact_bm25_whatever_the_depth(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lists read whole (shorter than the depth) rank in BM25's order; and
    with lists cut at 3 postings the candidates are still scored exactly."""
    words = ["zebra", "yak", "wombat", "vole"]
    chunks = [[words[(n * k) % 4] for k in range(1 + n % 7)] + [f"n{n}"] * (n % 5) for n in range(40)]
    store_id, file_ids = await _store(runtime, [([" ".join(chunk)], {}) for chunk in chunks])
    postgres = runtime.engine.dialect.name == "postgresql"
    average = postgres_keywords.AVERAGE_LENGTH if postgres else sqlite_keywords.AVERAGE_LENGTH
    for query in (["zebra"], ["zebra", "vole"], ["yak", "wombat", "vole"]):
        async with runtime.transaction() as session:
            hits = await index.keyword_search(session, index.Scope([store_id]), " ".join(query), 8)
        expected = _bm25(chunks, query, average)
        got = [file_ids.index(hit.file_id) for hit in hits]
        best = sorted(range(len(chunks)), key=lambda n: (-expected[n], n))[: len(got)]
        assert sorted(expected[n] for n in got) == pytest.approx(sorted(expected[n] for n in best), rel=1e-2), query
        assert all(0 < hit.score <= 1 for hit in hits)
    monkeypatch.setattr(keyword_postings, "DEPTH", 3)  # lists cut at max(3, 2 x 4) postings
    async with runtime.transaction() as session:
        hits = await index.keyword_search(session, index.Scope([store_id]), "yak wombat vole", 4)
    expected = _bm25(chunks, ["yak", "wombat", "vole"], average)
    got = [expected[file_ids.index(hit.file_id)] for hit in hits]
    assert len(got) == 4 and got == pytest.approx(sorted(got, reverse=True), rel=1e-2)
    for hit, score in zip(hits, got, strict=True):  # relative to the best, exactly
        assert hit.score * got[0] == pytest.approx(score * hits[0].score, rel=1e-2)


async def test_removed_files_and_stores_leave_the_postings(runtime: Runtime) -> None:
    store_id, (kept, removed) = await _store(runtime, [(["quokka habitat"], {}), (["quokka diet", "quokka sleep"], {})])
    other_id, (elsewhere,) = await _store(runtime, [(["quokka elsewhere"], {})])

    async def postings(store: str) -> int:
        async with runtime.transaction() as session:
            count = await session.execute(
                text(f"SELECT count(*) FROM {keyword_postings.TABLE} WHERE store_key = :key"),
                {"key": keyword_postings.store_key(store)},
            )
            return int(count.scalar_one())

    assert await postings(store_id) == 6 and await postings(other_id) == 2
    async with runtime.transaction() as session:
        await index.remove_chunks(session, store_id, [removed])
    assert await postings(store_id) == 2
    async with runtime.transaction() as session:
        hits = await ranking.search(session, [store_id, other_id], ["quokka"], 10)
    assert sorted(hit.file_id for hit in hits) == sorted([kept, elsewhere])
    async with runtime.transaction() as session:
        await index.remove_chunks(session, store_id)
    assert await postings(store_id) == 0 and await postings(other_id) == 2
    async with runtime.transaction() as session:
        assert await ranking.search(session, [store_id], ["quokka"], 10) == []


async def test_the_database_removes_postings_with_their_chunks_files_and_stores(runtime: Runtime) -> None:
    """Postings follow a plain DELETE of a chunk, of a file's row in the
    store (its chunks go too) and of the store (its file rows go by their
    foreign key): no application code needed."""
    store_id, (first, second, third) = await _store(
        runtime, [(["quokka habitat"], {}), (["quokka diet", "quokka sleep"], {}), (["quokka tail"], {})]
    )
    other_id, _ = await _store(runtime, [(["quokka elsewhere"], {})])

    async def count(sql: str, **params: object) -> int:
        async with runtime.transaction() as session:
            return int((await session.execute(text(sql), params)).scalar_one())

    def postings(store: str) -> int:
        key = keyword_postings.store_key(store)
        return count(f"SELECT count(*) FROM {keyword_postings.TABLE} WHERE store_key = :key", key=key)

    assert await postings(store_id) == 8
    async with runtime.transaction() as session:
        await session.execute(
            text("DELETE FROM vector_store_chunks WHERE file_id = :file AND position = 1"), {"file": second}
        )
    assert await postings(store_id) == 6
    async with runtime.transaction() as session:
        await session.execute(text("DELETE FROM vector_store_files WHERE file_id = :file"), {"file": first})
    assert await postings(store_id) == 4
    assert await count("SELECT count(*) FROM vector_store_chunks WHERE file_id = :file", file=first) == 0
    assert await _keyword_files(runtime, store_id, "quokka") == [second, third]
    async with runtime.transaction() as session:
        await session.execute(text("DELETE FROM vector_stores WHERE id = :store"), {"store": store_id})
    assert await postings(store_id) == 0 and await postings(other_id) == 2
    assert await count("SELECT count(*) FROM vector_store_chunks WHERE vector_store_id = :s", s=store_id) == 0


async def test_a_filter_is_checked_against_the_file_row_of_each_store(runtime: Runtime) -> None:
    """The same file in two stores with different attributes passes a filter
    in one store only; a file not completed never passes one."""
    store_id, (shared, pending) = await _store(
        runtime, [(["gecko lamps"], {"keep": True}), (["gecko food"], {"keep": True})]
    )
    other_id, _ = await _store(runtime, [])
    async with runtime.transaction() as session:
        row = await session.get(orm.VectorStoreFile, (store_id, shared))
        assert row is not None
        session.add(
            orm.VectorStoreFile(
                vector_store_id=other_id,
                file_id=shared,
                seq=row.seq,
                created_at=row.created_at,
                filename=row.filename,
                status="completed",
                usage_bytes=0,
                chunking_strategy=chunking.static(),
                attributes={"keep": False},
            )
        )
        await index.add_chunks(session, other_id, shared, ["gecko lamps"], None)
        pending_row = await session.get(orm.VectorStoreFile, (store_id, pending))
        assert pending_row is not None
        pending_row.status = "in_progress"
    dialect: filters.Dialect = "postgresql" if runtime.engine.dialect.name == "postgresql" else "sqlite"
    keep = filters.compile_filter(ComparisonFilter(type="eq", key="keep", value=True), dialect)
    async with runtime.transaction() as session:
        hits = await ranking.search(session, [store_id, other_id], ["gecko"], 10, condition=keep)
        unfiltered = await ranking.search(session, [store_id, other_id], ["gecko"], 10)
    assert [(hit.vector_store_id, hit.file_id) for hit in hits] == [(store_id, shared)]
    assert len(unfiltered) == 3


async def _keyword_files(runtime: Runtime, store_id: str, query: str) -> list[str]:
    async with runtime.transaction() as session:
        return [hit.file_id for hit in await index.keyword_search(session, index.Scope([store_id]), query, 10)]


async def test_a_word_searched_before_its_file_arrived_is_found_after(runtime: Runtime) -> None:
    """Word counts are cached, but a word's absence is not: upload, wait,
    search again is the usual way to test an assistant."""
    store_id, _ = await _store(runtime, [(["llamas hum in the andes"], {})])
    assert await _keyword_files(runtime, store_id, "okapis") == []
    okapi = await _add_file(runtime, store_id, ["okapis browse the ituri forest"], {})
    assert await _keyword_files(runtime, store_id, "okapis") == [okapi]


async def test_a_query_of_hundreds_of_indexed_terms_is_answered(runtime: Runtime) -> None:
    """The tokenizer splits a_b_c into terms: a query may hold more of them
    than one statement's lists allow (SQLite: 500 in a UNION ALL)."""
    numbers = " ".join(str(n) for n in range(700))
    store_id, (file_id,) = await _store(runtime, [([numbers], {})])
    assert await _keyword_files(runtime, store_id, "_".join(str(n) for n in range(700))) == [file_id]


async def test_a_full_word_cache_still_answers_every_query_word(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Remembering a query's new words may evict its older ones from the
    bounded per-process cache of stems (lexemes on PostgreSQL)."""
    monkeypatch.setattr(sqlite_keywords, "_CACHED_WORDS", 2)
    monkeypatch.setattr(postgres_keywords, "_CACHED_WORDS", 2)
    store_id, (file_id,) = await _store(runtime, [(["zebras sleep standing in the savanna"], {})])
    assert await _keyword_files(runtime, store_id, "zebras") == [file_id]
    assert await _keyword_files(runtime, store_id, "zebras savanna standing") == [file_id]
    assert await _keyword_files(runtime, store_id, "savanna") == [file_id]
