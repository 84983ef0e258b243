"""The ingestion jobs on both databases, without HTTP: claims with leases
(two workers never take the same file; a lapsed lease is taken over), and a
commit only by the current lease holder."""

from __future__ import annotations

import asyncio

from sqlalchemy import select, update

from app import ids, orm
from app.retrieval import chunking, ingest
from app.runtime import Runtime
from app.services import projects, vector_store_files, vector_stores


async def _store_with_files(runtime: Runtime, texts: list[str]) -> str:
    async with runtime.transaction() as session:
        store = vector_stores.new_store(projects.DEFAULT)
        session.add(store)
        rows = []
        for number, content in enumerate(texts):
            seq = ids.next_seq()
            row = orm.File(
                id=ids.new_id(ids.FILE, seq),
                project_id=projects.DEFAULT_ID,
                seq=seq,
                created_at=ids.seconds(seq),
                bytes=len(content),
                filename=f"doc{number}.txt",
                purpose="assistants",
                status="processed",
            )
            runtime.storage.path(row.id).write_text(content)
            session.add(row)
            rows.append(row)
        await session.flush()
        await vector_store_files.attach(session, store, [(row, chunking.static(), None) for row in rows])
        return store.id


async def _statuses(runtime: Runtime, store_id: str) -> list[str]:
    async with runtime.transaction() as session:
        rows = await session.scalars(select(orm.VectorStoreFile).where(orm.VectorStoreFile.vector_store_id == store_id))
        return sorted(row.status for row in rows)


async def _drain(worker: ingest.Ingestion) -> None:
    """Tick until a tick claims nothing (the worker takes a few files at a time)."""
    while True:
        await worker.tick()
        if not worker.tasks:
            return
        await asyncio.wait_for(asyncio.gather(*worker.tasks.values()), timeout=30)


async def test_two_workers_never_claim_the_same_file(runtime: Runtime) -> None:
    store_id = await _store_with_files(runtime, ["alpha", "beta", "gamma"])
    first = ingest.Ingestion(runtime, "worker-1", wake=lambda: None)
    second = ingest.Ingestion(runtime, "worker-2", wake=lambda: None)
    claimed = await first.claim(10)
    assert len(claimed) == 3 and await second.claim(10) == []
    # worker-1 dies: once its leases lapse, worker-2 takes the files over and
    # worker-1's late results (if it came back) would be discarded.
    async with runtime.transaction() as session:
        await session.execute(update(orm.VectorStoreFile).values(lease_expires_at=1.0))
    await _drain(second)
    assert await _statuses(runtime, store_id) == ["completed"] * 3


async def test_a_stale_worker_cannot_commit(runtime: Runtime) -> None:
    store_id = await _store_with_files(runtime, ["alpha"])
    stale = ingest.Ingestion(runtime, "stale", wake=lambda: None)
    (key,) = await stale.claim(1)
    async with runtime.transaction() as session:
        await session.execute(update(orm.VectorStoreFile).values(lease_owner="someone-else"))
    await stale._ingest(key)
    assert await _statuses(runtime, store_id) == ["in_progress"]


async def test_failures_stay_with_their_file(runtime: Runtime) -> None:
    store_id = await _store_with_files(runtime, ["fine text", "   "])
    await _drain(ingest.Ingestion(runtime, "w", wake=lambda: None))
    assert await _statuses(runtime, store_id) == ["completed", "failed"]
