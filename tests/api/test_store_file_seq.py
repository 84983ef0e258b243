"""A file's seq is unique within its vector store (migration 0014): files
that share one (two processes created them in the same nanosecond) are both
attached, each with its own seq, listed once each, and told apart by a
filtered search; a conflict with another transaction's insert is retried,
never a 500."""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Awaitable
from typing import Any, TypeVar

import httpx2
import openai
import pytest
from fastapi import FastAPI
from sqlalchemy import select, text, update

from app import db, ids, orm
from app.retrieval import chunking, keyword_postings
from app.services import projects, vector_store_files, vector_stores
from tests.retrieval.test_postings_migration import _downgrade

pytestmark = pytest.mark.timeout(120)

T = TypeVar("T")


async def _same_seq_files(client: openai.AsyncOpenAI, app: FastAPI) -> tuple[str, str]:
    zebra = (await client.files.create(file=("zebra.txt", b"zebras graze the savanna"), purpose="assistants")).id
    llama = (await client.files.create(file=("llama.txt", b"llamas cross the andes"), purpose="assistants")).id
    async with app.state.runtime.transaction() as session:
        seq = await session.scalar(select(orm.File.seq).where(orm.File.id == zebra))
        await session.execute(update(orm.File).where(orm.File.id == llama).values(seq=seq))
    return zebra, llama


async def _answered_at_once(*requests: Awaitable[T]) -> list[T]:
    """The answers of requests sent at once. A failure names what each
    request that failed met (its status, body and request id, or its
    exception), which never answered, and the errors the server logged
    meanwhile (a 500's cause), rather than the first error alone or a bare
    timeout: a run of these tests once failed under load with no error text
    to read."""
    logged = _Collected()
    logging.getLogger("app").addHandler(logged)
    try:
        tasks = [asyncio.ensure_future(request) for request in requests]
        done, unanswered = await asyncio.wait(tasks, timeout=60)
        for task in unanswered:
            task.cancel()
        # Awaited once cancelled: none is left pending past the test.
        await asyncio.gather(*unanswered, return_exceptions=True)
    finally:
        logging.getLogger("app").removeHandler(logged)
    problems = [f"request {number}: no answer in 60 s" for number, task in enumerate(tasks) if task in unanswered]
    for number, task in enumerate(tasks):
        if task in done and task.exception() is not None:
            problems.append(f"request {number}: {_described(task.exception())}")
    if problems:
        problems += [f"the server logged: {text}" for text in logged.texts]
    assert not problems, "\n".join(problems)
    return [task.result() for task in tasks]


class _Collected(logging.Handler):
    """The server's error records, each with its traceback."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(self.format(record))


def _described(exc: BaseException | None) -> str:
    if isinstance(exc, openai.APIStatusError):
        return f"{exc.status_code} (x-request-id {exc.response.headers.get('x-request-id')}): {exc.body}"
    return "".join(traceback.format_exception(exc)) if exc is not None else "no exception"


async def _until_waiting(engine: Any, other: asyncio.Future[Any]) -> None:
    """Until another transaction waits for a lock (PostgreSQL shows it in
    pg_stat_activity), or ``other`` has ended without waiting; at most 30 s."""
    waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
    async with asyncio.timeout(30):
        while True:
            if other.done() or (await db.read_rows(engine, waiting, {}))[0][0]:
                return
            await asyncio.sleep(0.005)


async def _store_seqs(app: FastAPI, store_id: str) -> dict[str, int]:
    async with app.state.runtime.transaction() as session:
        rows = await session.execute(
            select(orm.VectorStoreFile.file_id, orm.VectorStoreFile.seq).where(
                orm.VectorStoreFile.vector_store_id == store_id
            )
        )
        return {str(file_id): int(seq) for file_id, seq in rows.all()}


async def test_files_sharing_a_seq_are_both_attached_listed_and_filtered_apart(
    client: openai.AsyncOpenAI, app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    zebra, llama = await _same_seq_files(client, app)
    store = await client.vector_stores.create(name="animals")
    await client.vector_stores.files.create_and_poll(file_id=zebra, vector_store_id=store.id, attributes={"k": "z"})

    # Another process's insert lands between this request's check and its
    # insert: the check sees nothing, the insert meets the unique index.
    real = vector_store_files.taken_seqs
    calls: list[int] = []

    async def stale_once(*args: Any) -> set[int]:
        calls.append(1)
        return set() if len(calls) == 1 else await real(*args)

    monkeypatch.setattr(vector_store_files, "taken_seqs", stale_once)
    attached = await client.vector_stores.files.create_and_poll(
        file_id=llama, vector_store_id=store.id, attributes={"k": "l"}
    )
    assert attached.status == "completed" and len(calls) == 3  # retried once (the seq moved to checked too), not a 500

    seqs = await _store_seqs(app, store.id)
    assert seqs[zebra] != seqs[llama]
    # Paging one at a time (from either end) lists each file once.
    for order in ("asc", "desc"):
        listed, after = [], None
        while True:
            page = await client.vector_stores.files.list(
                store.id, limit=1, order=order, **({"after": after} if after else {})
            )  # type: ignore[arg-type]
            listed += [item.id for item in page.data]
            if not page.has_more:
                break
            after = page.data[-1].id
        assert sorted(listed) == sorted([zebra, llama]), order
    found = await client.vector_stores.search(
        store.id, query="llamas andes zebras savanna", filters={"type": "eq", "key": "k", "value": "l"}
    )
    assert [item.file_id for item in found.data] == [llama]


async def test_a_batch_of_files_sharing_a_seq_is_attached(client: openai.AsyncOpenAI, app: FastAPI) -> None:
    zebra, llama = await _same_seq_files(client, app)
    store = await client.vector_stores.create(name="animals")
    batch = await client.vector_stores.file_batches.create_and_poll(store.id, file_ids=[zebra, llama])
    assert batch.file_counts.completed == 2
    assert len(set((await _store_seqs(app, store.id)).values())) == 2


async def test_a_seq_moved_past_a_taken_one_is_checked_before_the_insert(
    client: openai.AsyncOpenAI, app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file whose seq is taken moves to the next free one, and the one it
    moves to is checked too (a file moved earlier may hold it): with no
    retry to spare, the attach still succeeds at once."""
    zebra, llama = await _same_seq_files(client, app)
    yak = (await client.files.create(file=("yak.txt", b"yaks roam the plateau"), purpose="assistants")).id
    async with app.state.runtime.transaction() as session:
        seq = await session.scalar(select(orm.File.seq).where(orm.File.id == zebra))
        await session.execute(update(orm.File).where(orm.File.id == yak).values(seq=seq + 1))
    store = await client.vector_stores.create(name="animals")
    for file_id in (yak, zebra):
        await client.vector_stores.files.create_and_poll(file_id=file_id, vector_store_id=store.id)
    monkeypatch.setattr(vector_store_files, "SEQ_ATTEMPTS", 1)
    await client.vector_stores.files.create_and_poll(file_id=llama, vector_store_id=store.id)
    assert await _store_seqs(app, store.id) == {zebra: seq, yak: seq + 1, llama: seq + 2}


async def test_a_batch_naming_one_file_twice_attaches_it_once(client: openai.AsyncOpenAI) -> None:
    """files=[A, A] (each with its own attributes): one row, the last entry's
    attributes, not a 500 from inserting the row twice."""
    zebra = (await client.files.create(file=("zebra.txt", b"zebras graze the savanna"), purpose="assistants")).id
    store = await client.vector_stores.create(name="animals")
    batch = await client.vector_stores.file_batches.create_and_poll(
        store.id,
        files=[{"file_id": zebra, "attributes": {"k": "first"}}, {"file_id": zebra, "attributes": {"k": "last"}}],
    )
    assert batch.status == "completed"
    listed = (await client.vector_stores.files.list(store.id)).data
    assert [(item.id, item.attributes) for item in listed] == [(zebra, {"k": "last"})]


async def test_upgrade_separates_files_that_share_a_seq(database_url: str) -> None:
    engine = db.create_engine(database_url)
    sessionmaker = db.create_sessionmaker(engine)
    try:
        await db.migrate(engine)
        async with engine.begin() as connection:
            await connection.run_sync(_downgrade, "0013_postings_file")
        seq = ids.next_seq()
        async with sessionmaker() as session, session.begin():
            store = vector_stores.new_store(projects.DEFAULT)
            session.add(store)
            for chunk_id, name in enumerate(("a", "b", "c"), 1):
                session.add(
                    orm.VectorStoreFile(
                        vector_store_id=store.id,
                        file_id=f"file-{name}",
                        seq=seq + 1 if name == "c" else seq,  # b shares a's; the next value is c's
                        created_at=ids.seconds(seq),
                        filename=f"{name}.txt",
                        status="completed",
                        usage_bytes=0,
                        chunking_strategy=chunking.static(),
                    )
                )
                await session.flush()
                await session.execute(
                    text(
                        "INSERT INTO vector_store_chunks (id, vector_store_id, file_id, position, text) "
                        "VALUES (:id, :store, :file, 0, 'an axolotl')"
                    ),
                    {"id": chunk_id, "store": store.id, "file": f"file-{name}"},
                )
                await session.execute(
                    text(
                        f"INSERT INTO {keyword_postings.TABLE} (term, store_key, impact, chunk_id, file_seq) "
                        "VALUES ('axolotl', :key, 1000, :chunk, :seq)"
                    ),
                    {"key": keyword_postings.store_key(store.id), "chunk": chunk_id, "seq": seq + (name == "c")},
                )
        await db.migrate(engine)
        async with sessionmaker() as session:
            files = await session.execute(
                select(orm.VectorStoreFile.file_id, orm.VectorStoreFile.seq).order_by(orm.VectorStoreFile.file_id)
            )
            assert files.all() == [("file-a", seq), ("file-b", seq + 2), ("file-c", seq + 1)]
            postings = await session.execute(text(f"SELECT chunk_id, file_seq FROM {keyword_postings.TABLE}"))
            assert sorted(postings.all()) == [(1, seq), (2, seq + 2), (3, seq + 1)]
    finally:
        await engine.dispose()


async def test_one_file_attached_to_one_store_by_simultaneous_requests(
    client: openai.AsyncOpenAI, app: FastAPI
) -> None:
    """Requests attaching the same file to the same store at once (on
    PostgreSQL both may find no row, and the later insert meets the row's
    key) each answer the attachment, as attaching an attached file does:
    one row, never a 500. Single files and batches, several rounds."""
    zebra = (await client.files.create(file=("zebra.txt", b"zebras graze the savanna"), purpose="assistants")).id
    for _round in range(6):
        store = await client.vector_stores.create(name="animals")
        attaching = [client.vector_stores.files.create(file_id=zebra, vector_store_id=store.id) for _ in range(3)]
        batches = [client.vector_stores.file_batches.create(store.id, file_ids=[zebra]) for _ in range(2)]
        answers = await _answered_at_once(*attaching, *batches)
        assert [answer.id for answer in answers[:3]] == [zebra] * 3
        assert all(answer.vector_store_id == store.id for answer in answers)
        assert list(await _store_seqs(app, store.id)) == [zebra]


async def test_batches_naming_the_same_new_files_in_other_orders_at_once(
    client: openai.AsyncOpenAI, app: FastAPI
) -> None:
    """Batches attaching the same new files to a store at once, each naming
    them in its own order: each answers its whole batch, every file attached
    once (on PostgreSQL, a batch reset the rows it found, then inserted the
    others or reset them once they appeared: row locks taken in two orders,
    and overlapping batches deadlocked, a 500)."""
    file_ids = [
        (await client.files.create(file=(f"animal{n}.txt", b"an animal roams"), purpose="assistants")).id
        for n in range(120)
    ]
    for _round in range(4):
        store = await client.vector_stores.create(name="animals")
        orders = [file_ids, file_ids[::-1], file_ids[60:] + file_ids[:60]]
        batches = await _answered_at_once(
            *(client.vector_stores.file_batches.create(store.id, file_ids=order) for order in orders)
        )
        assert all(batch.file_counts.total == len(file_ids) for batch in batches)
        assert sorted(await _store_seqs(app, store.id)) == sorted(file_ids)


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_store_deleted_while_files_are_added_to_it(
    client: openai.AsyncOpenAI, app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store deleted between an attaching request's read of it and its
    insert (PostgreSQL; SQLite's transactions are serial): the delete waits
    for the attach and deletes its rows with the store, where the insert met
    the deleted store's foreign key, was retried as a seq clash and answered
    500."""
    zebra = (await client.files.create(file=("zebra.txt", b"zebras graze the savanna"), purpose="assistants")).id
    store = await client.vector_stores.create(name="animals")
    engine = app.state.runtime.engine
    real = vector_store_files.require_files
    deleting: list[asyncio.Task[Any]] = []

    async def delete_meanwhile(*args: Any) -> Any:
        deleting.append(asyncio.ensure_future(client.vector_stores.delete(store.id)))
        await _until_waiting(engine, deleting[0])  # the delete waits for this request
        return await real(*args)

    monkeypatch.setattr(vector_store_files, "require_files", delete_meanwhile)
    async with asyncio.timeout(60):
        attached = await client.vector_stores.files.create(file_id=zebra, vector_store_id=store.id)
        deleted = await deleting[0]
    assert attached.id == zebra and deleted.deleted
    with pytest.raises(openai.NotFoundError):
        await client.vector_stores.retrieve(store.id)
    assert await _store_seqs(app, store.id) == {}


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_batches_whose_new_files_share_seqs_in_crossed_order(
    client: openai.AsyncOpenAI, app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two batches at once whose new files share seqs in crossed order (A's
    is D's, B's is C's: files two processes made in the same nanoseconds).
    PostgreSQL's check of the seq index (not the upsert's arbiter) waits for
    the other transaction's row: A, C, then B waits for C and D for A, a
    deadlock, and its victim answered 500. The victim's savepoint is rolled
    back and retried: both batches are attached, each file with its own seq
    (PostgreSQL only: SQLite's writers are serial)."""
    a, b, c, d = [
        (await client.files.create(file=(f"{name}.txt", b"an animal roams"), purpose="assistants")).id
        for name in "abcd"
    ]
    async with app.state.runtime.transaction() as session:
        seqs = {str(file_id): int(seq) for file_id, seq in (await session.execute(select(orm.File.id, orm.File.seq)))}
        await session.execute(update(orm.File).where(orm.File.id == d).values(seq=seqs[a]))
        await session.execute(update(orm.File).where(orm.File.id == c).values(seq=seqs[b]))
    store = await client.vector_stores.create(name="animals")

    # One row per statement, and the first rows of both batches inserted
    # before either inserts its second.
    monkeypatch.setattr(vector_store_files, "UPSERT_PAGE_ROWS", 1)
    first_rows = {a: asyncio.Event(), c: asyncio.Event()}
    real = vector_store_files._upsert

    async def in_step(session: Any, values: Any) -> Any:
        file_id = values[0]["file_id"]
        if file_id == c:
            await first_rows[a].wait()
        if file_id in (b, d):
            await asyncio.gather(*(event.wait() for event in first_rows.values()))
            # Found in a tenth of a second rather than PostgreSQL's default second.
            await session.execute(text("SET LOCAL deadlock_timeout = '100ms'"))
        rows = await real(session, values)
        if file_id in first_rows:
            first_rows[file_id].set()
        return rows

    monkeypatch.setattr(vector_store_files, "_upsert", in_step)
    await _answered_at_once(
        client.vector_stores.file_batches.create(store.id, file_ids=[a, b]),
        client.vector_stores.file_batches.create(store.id, file_ids=[c, d]),
    )
    attached = await _store_seqs(app, store.id)
    assert sorted(attached) == sorted([a, b, c, d]) and len(set(attached.values())) == 4


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_batch_cancelled_while_its_files_are_attached_again(
    client: openai.AsyncOpenAI, app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch cancelled while another batch attaches the same files again
    (PostgreSQL; SQLite's writers are serial). The attach resets the rows in
    file id order; the cancel took them in the order it found them (the
    table's, which updates change): X reset, Y cancelled, then each waited
    for the other's, a deadlock, and the cancel answered 500."""
    x, y = [
        (await client.files.create(file=(f"{name}.txt", b"an animal roams"), purpose="assistants")).id for name in "xy"
    ]
    store = await client.vector_stores.create(name="animals")
    first = await client.vector_stores.file_batches.create_and_poll(store.id, file_ids=[x, y])
    table = orm.VectorStoreFile
    async with app.state.runtime.transaction() as session:
        # Still in progress, leased far ahead (so the worker leaves them),
        # and X's row written after Y's: Y's is found first by the cancel.
        for file_id in (y, x):
            await session.execute(
                update(table)
                .where(table.vector_store_id == store.id, table.file_id == file_id)
                .values(status="in_progress", lease_owner="elsewhere", lease_expires_at=ids.now() + 3600)
            )

    monkeypatch.setattr(vector_store_files, "UPSERT_PAGE_ROWS", 1)
    engine = app.state.runtime.engine
    cancelling: list[asyncio.Task[Any]] = []
    real = vector_store_files._upsert

    async def cancel_between_rows(session: Any, values: Any) -> Any:
        if values[0]["file_id"] == y and not cancelling:  # X reset: the cancel starts, and waits for X
            cancelling.append(
                asyncio.ensure_future(client.vector_stores.file_batches.cancel(first.id, vector_store_id=store.id))
            )
            await _until_waiting(engine, cancelling[0])  # the cancel waits for this request
        return await real(session, values)

    monkeypatch.setattr(vector_store_files, "_upsert", cancel_between_rows)
    [again] = await _answered_at_once(client.vector_stores.file_batches.create(store.id, file_ids=[x, y]))
    [cancelled] = await _answered_at_once(cancelling[0])
    assert cancelled.status == "cancelled"
    async with app.state.runtime.transaction() as session:
        rows = (await session.scalars(select(table).where(table.vector_store_id == store.id))).all()
    assert {row.file_id: row.batch_id for row in rows} == {x: again.id, y: again.id}


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_store_deleted_while_a_batch_of_it_is_cancelled(
    client: openai.AsyncOpenAI, app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store deleted while one of its batches is cancelled (PostgreSQL;
    SQLite's transactions are serial). The cancel locked the batch's row,
    then its file rows; the delete locked the store, deleted its file rows,
    then waited for the batch's: each waited for the other, a deadlock, a
    500. The cancel now holds the store first (as attaching does): the
    delete waits for it, and both answer."""
    x, y = [
        (await client.files.create(file=(f"{name}.txt", b"an animal roams"), purpose="assistants")).id for name in "xy"
    ]
    store = await client.vector_stores.create(name="animals")
    batch = await client.vector_stores.file_batches.create_and_poll(store.id, file_ids=[x, y])
    table = orm.VectorStoreFile
    async with app.state.runtime.transaction() as session:
        # Still in progress, leased far ahead (the worker leaves them): rows the cancel locks.
        await session.execute(
            update(table)
            .where(table.vector_store_id == store.id)
            .values(status="in_progress", lease_owner="elsewhere", lease_expires_at=ids.now() + 3600)
        )

    engine = app.state.runtime.engine
    deleting: asyncio.Future[asyncio.Task[Any]] = asyncio.get_running_loop().create_future()
    real = vector_store_files.get_batch

    async def delete_meanwhile(session: Any, *args: Any) -> Any:
        row = await real(session, *args)
        row.cancelled = True
        await session.flush()  # the batch's row locked, as the cancel's next statement would
        # A deadlock found in a tenth of a second rather than PostgreSQL's default second.
        await session.execute(text("SET LOCAL deadlock_timeout = '100ms'"))
        deleting.set_result(asyncio.ensure_future(client.vector_stores.delete(store.id)))
        await _until_waiting(engine, deleting.result())  # the delete waits for a lock the cancel holds
        return row

    async def deleted() -> openai.types.VectorStoreDeleted:
        return await (await deleting)

    monkeypatch.setattr(vector_store_files, "get_batch", delete_meanwhile)
    cancelled, gone = await _answered_at_once(
        client.vector_stores.file_batches.cancel(batch.id, vector_store_id=store.id), deleted()
    )
    assert cancelled.status == "cancelled" and cancelled.file_counts.cancelled == 2
    assert gone.deleted
    with pytest.raises(openai.NotFoundError):
        await client.vector_stores.retrieve(store.id)
    assert await _store_seqs(app, store.id) == {}


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_v1_files_dropped_while_a_batch_attaches_them_again(
    client: openai.AsyncOpenAI, app: FastAPI, http: httpx2.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A v1 request dropping an assistant's files (removing its managed
    store's rows) while a v2 batch attaches them to that store again
    (PostgreSQL; SQLite's transactions are serial). The batch resets the
    rows in file id order; the removal took them in a set's order: the batch
    held a row the removal then wanted and waited for one it had removed, a
    deadlock, and the v1 request answered 500 (unless the set yielded the
    smallest of the 12 files first). The removal now goes in file id order
    too: the batch waits for it."""
    file_ids = sorted(
        [(await client.files.create(file=(f"{n}.txt", b"an animal roams"), purpose="assistants")).id for n in range(12)]
    )
    v1 = {"OpenAI-Beta": "assistants=v1"}
    created = await http.post(
        "/v1/assistants", headers=v1, json={"model": "gpt-4", "tools": [{"type": "retrieval"}], "file_ids": file_ids}
    )
    assert created.status_code == 200, created.text
    assistant = await client.beta.assistants.retrieve(created.json()["id"])
    assert assistant.tool_resources is not None and assistant.tool_resources.file_search is not None
    (store_id,) = assistant.tool_resources.file_search.vector_store_ids or []
    async with asyncio.timeout(60):  # ingested: the worker locks none of the rows meanwhile
        while True:
            if (await client.vector_stores.retrieve(store_id)).file_counts.completed == len(file_ids):
                break
            await asyncio.sleep(0.05)

    engine = app.state.runtime.engine
    attaching: asyncio.Future[asyncio.Task[Any]] = asyncio.get_running_loop().create_future()
    real = vector_store_files.remove

    async def attach_after_the_first(session: Any, *args: Any) -> Any:
        removed = await real(session, *args)
        if not attaching.done():
            # A deadlock found in a tenth of a second, by this request (the batch's retry would hide it).
            await session.execute(text("SET LOCAL deadlock_timeout = '100ms'"))
            attaching.set_result(
                asyncio.ensure_future(client.vector_stores.file_batches.create(store_id, file_ids=file_ids))
            )
            await _until_waiting(engine, attaching.result())  # the batch waits for the removed row
        return removed

    async def dropped() -> httpx2.Response:
        return await http.post(f"/v1/assistants/{assistant.id}", headers=v1, json={"file_ids": []})

    async def attached() -> Any:
        return await (await attaching)

    monkeypatch.setattr(vector_store_files, "remove", attach_after_the_first)
    answer, batch = await _answered_at_once(dropped(), attached())
    assert answer.status_code == 200, answer.text
    assert answer.json()["file_ids"] == []
    assert batch.file_counts.total == len(file_ids)
    assert sorted(await _store_seqs(app, store_id)) == file_ids  # attached again, after the removal


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
@pytest.mark.parametrize("adder", ["message", "v1 assistant file"])
async def test_a_store_deleted_while_the_server_adds_files_to_it_itself(
    client: openai.AsyncOpenAI, app: FastAPI, http: httpx2.AsyncClient, monkeypatch: pytest.MonkeyPatch, adder: str
) -> None:
    """A store deleted while the server adds a file to it on its own: a
    message's file_search attachment into its thread's store, a v1
    assistant's file into its managed store (PostgreSQL; SQLite's
    transactions are serial). The store was read without a lock: the delete
    went first, the insert met the deleted store's foreign key, was retried
    as a seq clash and answered 500. The store is now kept first, as the
    API's attaching routes keep it: the delete waits, and deletes the new
    row with the store."""
    zebra, llama = [
        (await client.files.create(file=(f"{name}.txt", b"an animal roams"), purpose="assistants")).id
        for name in ("zebra", "llama")
    ]
    v1 = {"OpenAI-Beta": "assistants=v1"}
    searched = [{"file_id": zebra, "tools": [{"type": "file_search"}]}]
    if adder == "message":
        owner = await client.beta.threads.create(
            messages=[{"role": "user", "content": "zebras", "attachments": searched}]
        )
        resources = (await client.beta.threads.retrieve(owner.id)).tool_resources
    else:
        body = {"model": "gpt-4", "tools": [{"type": "retrieval"}], "file_ids": [zebra]}
        created = await http.post("/v1/assistants", headers=v1, json=body)
        assert created.status_code == 200, created.text
        resources = (await client.beta.assistants.retrieve(created.json()["id"])).tool_resources
    assert resources is not None and resources.file_search is not None
    (store_id,) = resources.file_search.vector_store_ids or []

    engine = app.state.runtime.engine
    deleting: asyncio.Future[asyncio.Task[Any]] = asyncio.get_running_loop().create_future()
    real = vector_store_files.attach

    async def delete_meanwhile(*args: Any) -> Any:
        if not deleting.done():  # the store read, the new file's row not yet inserted
            deleting.set_result(asyncio.ensure_future(client.vector_stores.delete(store_id)))
            await _until_waiting(engine, deleting.result())  # the delete waits for this request
        return await real(*args)

    async def added() -> Any:
        if adder == "message":
            return await client.beta.threads.messages.create(
                owner.id, role="user", content="llamas", attachments=[{**searched[0], "file_id": llama}]
            )
        answer = await http.post(f"/v1/assistants/{created.json()['id']}/files", headers=v1, json={"file_id": llama})
        assert answer.status_code == 200, answer.text
        return answer

    async def deleted() -> Any:
        return await (await deleting)

    monkeypatch.setattr(vector_store_files, "attach", delete_meanwhile)
    _added, gone = await _answered_at_once(added(), deleted())
    assert gone.deleted
    with pytest.raises(openai.NotFoundError):
        await client.vector_stores.retrieve(store_id)
    assert await _store_seqs(app, store_id) == {}  # the new row deleted with the store
