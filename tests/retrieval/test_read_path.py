"""Searches run in read-only transactions (Runtime.reading): on SQLite a WAL
reader beside the process's writers, never taking or waiting for the write
lock that every other SQLite transaction holds; on both engines a write
through one is refused rather than done. On SQLite a filtered search reads
each store's passing files once (index.Scope.passing)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from typing import Any

import openai
import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError, OperationalError

from app import ids, orm
from app.retrieval import chunking, embed, filters, index
from app.retrieval import search as ranking
from app.runtime import Runtime
from app.services import projects, vector_store_search, vector_stores
from app.wire.vector_stores import ComparisonFilter, SearchRequest
from tests.retrieval.test_search_index import _store

pytestmark = pytest.mark.timeout(60)

ZEBRAS = ["zebras graze on the savanna in herds", "the striped coat of a zebra confuses lions"]
LLAMAS = ["llamas carry loads across the andes", "a llama spits when annoyed"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_search_completes_while_another_transaction_holds_the_write_lock(runtime: Runtime) -> None:
    store_id, (zebras, _) = await _store(
        runtime, [(ZEBRAS, {"animal": "zebra"}), (LLAMAS, {"animal": "llama"})], embedded=True
    )
    holding, release = asyncio.Event(), asyncio.Event()

    async def writer() -> None:
        async with runtime.transaction() as session:
            await session.execute(text("UPDATE vector_stores SET name = 'busy' WHERE id = :id"), {"id": store_id})
            holding.set()  # the process's write lock and SQLite's are held from here
            await release.wait()

    held = asyncio.create_task(writer())
    try:
        await asyncio.wait_for(holding.wait(), 10)
        condition = filters.compile_filter(ComparisonFilter(type="eq", key="animal", value="zebra"), "sqlite")
        vectors = embed.HashingEmbedder()
        async with asyncio.timeout(10):  # the lock's own timeout is 30 s: waiting on it would fail here
            async with runtime.reading() as session:
                hits = await ranking.search(
                    session,
                    [store_id],
                    ["striped savanna herds"],
                    5,
                    condition=condition,
                    query_vectors=await vectors.embed(["striped savanna herds"]),
                )
        assert hits and {hit.file_id for hit in hits} == {zebras}
        assert not held.done()  # the writer still holds the lock: the search never waited for it
    finally:
        release.set()
        await held


async def test_a_write_through_the_read_path_is_refused(runtime: Runtime) -> None:
    store_id, _ = await _store(runtime, [(ZEBRAS, {})])
    with pytest.raises(DBAPIError) as refused:
        async with runtime.reading() as session:
            await session.execute(text("UPDATE vector_stores SET name = 'written' WHERE id = :id"), {"id": store_id})
    # SQLite: "attempt to write a readonly database"; PostgreSQL: "cannot execute UPDATE in a read-only transaction".
    assert re.search(r"read-?only", str(refused.value.orig))
    async with runtime.reading() as session:
        name = (await session.execute(text("SELECT name FROM vector_stores WHERE id = :id"), {"id": store_id})).scalar()
    assert name != "written"


async def test_the_store_search_reads_only_and_its_use_is_recorded_after(runtime: Runtime) -> None:
    """The service reads in the read-only transaction (its store's activity
    is left to the caller's write transaction): it does not fail there."""
    store_id, (zebras,) = await _store(runtime, [(ZEBRAS, {})])
    async with runtime.reading() as session:
        found = await vector_store_search.search(
            session, projects.DEFAULT, store_id, SearchRequest(query="zebra savanna"), None
        )
    assert found.store.id == store_id and [item.file_id for item in found.page.data][:1] == [zebras]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_filtered_hybrid_search_reads_the_passing_files_once(runtime: Runtime) -> None:
    """SQLite: the filter is evaluated in one pass over the store's file
    rows, shared by the keyword and the vector side and by every query."""
    store_id, (zebras, _) = await _store(
        runtime, [(ZEBRAS, {"animal": "zebra"}), (LLAMAS, {"animal": "llama"})], embedded=True
    )
    queries = ["striped savanna herds", "zebra coat lions"]
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(runtime.read_engine.sync_engine, "before_cursor_execute", seen)
    try:
        async with runtime.reading() as session:
            hits = await ranking.search(
                session,
                [store_id],
                queries,
                5,
                condition=filters.compile_filter(ComparisonFilter(type="eq", key="animal", value="zebra"), "sqlite"),
                query_vectors=await embed.HashingEmbedder().embed(queries),
            )
    finally:
        event.remove(runtime.read_engine.sync_engine, "before_cursor_execute", seen)
    assert hits and {hit.file_id for hit in hits} == {zebras}
    assert sum("FROM vector_store_files f" in statement for statement in statements) == 1


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_filter_over_two_stores_tells_their_files_apart_by_store(runtime: Runtime) -> None:
    """A file's seq is unique within its store only (one file may be in two
    stores): each store's passing files are its own set."""
    seq = ids.next_seq()
    stores = []
    for animal in ("zebra", "llama"):
        async with runtime.transaction() as session:
            store = vector_stores.new_store(projects.DEFAULT)
            session.add(store)
            file_id = ids.new_id(ids.FILE, seq)
            session.add(
                orm.VectorStoreFile(
                    vector_store_id=store.id,
                    file_id=file_id,
                    seq=seq,  # the same in both stores
                    created_at=ids.seconds(seq),
                    filename=f"{animal}.txt",
                    status="completed",
                    usage_bytes=0,
                    chunking_strategy=chunking.static(),
                    attributes={"animal": animal},
                )
            )
            await session.flush()
            await index.add_chunks(session, store.id, file_id, ["animals of the savanna and the andes"], None)
        stores.append(store.id)
    condition = filters.compile_filter(ComparisonFilter(type="eq", key="animal", value="zebra"), "sqlite")
    async with runtime.reading() as session:
        hits = await ranking.search(session, stores, ["savanna andes animals"], 5, condition=condition)
    assert [hit.vector_store_id for hit in hits] == [stores[0]]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_filtered_search_after_one_rolled_back_on_its_connection_still_works(runtime: Runtime) -> None:
    """The temp table of passing files is created inside the search's
    transaction, so a search that fails afterwards (a cancelled run) rolls
    the table back too: the next filtered search on that connection must
    make it again, not assume it is there."""
    store_id, (zebras, _) = await _store(runtime, [(ZEBRAS, {"animal": "zebra"}), (LLAMAS, {"animal": "llama"})])
    condition = filters.compile_filter(ComparisonFilter(type="eq", key="animal", value="zebra"), "sqlite")
    for outcome in ("rolled back", "answered"):
        with pytest.raises(ZeroDivisionError) if outcome == "rolled back" else contextlib.nullcontext():
            async with runtime.reading() as session:
                hits = await ranking.search(session, [store_id], ["striped savanna herds"], 5, condition=condition)
                assert {hit.file_id for hit in hits} == {zebras}
                if outcome == "rolled back":
                    raise ZeroDivisionError


async def test_a_search_answers_when_recording_its_store_activity_fails(
    client: openai.AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's last_active_at is written after the read-only search, best
    effort: a failing write (SQLite's lock busy past its timeout) is logged
    and the search's answer stands."""
    zebra = (await client.files.create(file=("zebra.txt", ZEBRAS[0].encode()), purpose="assistants")).id
    store = await client.vector_stores.create(name="animals")
    await client.vector_stores.files.create_and_poll(file_id=zebra, vector_store_id=store.id)

    async def busy(*_args: Any) -> None:
        raise OperationalError("UPDATE vector_stores", {}, sqlite3.OperationalError("database is locked"))

    monkeypatch.setattr(vector_stores, "touch_ids", busy)
    monkeypatch.setattr(vector_stores, "stale_activity", lambda _row: True)
    found = await client.vector_stores.search(store.id, query="zebras savanna")
    assert [item.file_id for item in found.data] == [zebra]
