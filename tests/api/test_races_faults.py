"""Database faults under API requests (issue 10): a dropped PostgreSQL
connection and a SQLite database held by another writer. Requests after the
fault succeed; none answers 500."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import asyncpg
import openai
import pytest
import sqlalchemy
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from app import db
from app.api import handlers
from app.settings import Settings
from tests import pg
from tests.api.test_races import concurrently


@pytest.fixture
def no_worker(settings: Settings) -> Settings:
    settings.embedded_worker = False
    return settings


async def _terminate_backends(server: pg.EmbeddedPostgres, database: str) -> int:
    """Drop every connection to ``database``, as a server restart or a
    failover would; returns how many there were, once they are gone."""
    admin = await asyncpg.connect(user="postgres", database="postgres", host=server.socket_dir)
    try:
        pids = await admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", database
        )
        for row in pids:  # waiting up to 5 s for each to be gone
            await admin.execute("SELECT pg_terminate_backend($1, 5000)", row["pid"])
    finally:
        await admin.close()
    return len(pids)


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_requests_after_dropped_connections_succeed(
    no_worker: Settings, client: openai.AsyncOpenAI, database_url: str, postgres: pg.EmbeddedPostgres
) -> None:
    database = make_url(database_url).database
    assert database is not None
    assistant = await client.beta.assistants.create(model="gpt-4o")
    thread = await client.beta.threads.create()
    for _trial in range(3):
        # Several requests at once, so that the pool holds several connections.
        await concurrently([client.beta.threads.retrieve(thread.id) for _ in range(8)])
        assert await _terminate_backends(postgres, database) >= 1
        calls: list[Any] = []
        for i in range(4):
            calls += [
                client.beta.threads.retrieve(thread.id),
                client.beta.threads.messages.create(thread.id, role="user", content=f"m{i}"),
                client.beta.threads.messages.list(thread.id),
                client.beta.assistants.retrieve(assistant.id),
            ]
        outcomes = await concurrently(calls)
        assert outcomes.refused == [] and len(outcomes.ok) == 16
    assert await _terminate_backends(postgres, database) >= 1
    run = await client.beta.threads.runs.create(thread.id, assistant_id=assistant.id)
    assert await _terminate_backends(postgres, database) >= 1
    assert (await client.beta.threads.runs.cancel(run.id, thread_id=thread.id)).status == "cancelling"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_requests_wait_for_a_locked_sqlite(
    no_worker: Settings, client: openai.AsyncOpenAI, database_url: str
) -> None:
    """Another process holds SQLite's write lock for a moment: requests wait
    for it (under the busy timeout) and then succeed, reads and writes alike."""
    assistant = await client.beta.assistants.create(model="gpt-4o")
    thread = await client.beta.threads.create()
    # Its calls run in a thread: waiting for the lock on the event loop's
    # thread would stall a server transaction that holds it.
    other = sqlite3.connect(make_url(database_url).database or "", isolation_level=None, check_same_thread=False)
    try:
        for trial in range(3):
            await asyncio.to_thread(other.execute, "BEGIN IMMEDIATE")
            other.execute("UPDATE threads SET metadata = metadata WHERE id = ?", (thread.id,))
            calls: list[Any] = []
            for i in range(5):
                calls += [
                    client.beta.threads.messages.create(thread.id, role="user", content=f"m{trial}.{i}"),
                    client.beta.threads.messages.list(thread.id),
                    client.beta.assistants.retrieve(assistant.id),
                ]
            requests = asyncio.ensure_future(concurrently(calls))
            await asyncio.sleep(0.3)  # the other writer's moment
            assert not requests.done()  # everyone waits for it
            other.execute("COMMIT")
            outcomes = await requests
            assert outcomes.refused == [] and len(outcomes.ok) == 15
        run = await client.beta.threads.runs.create(thread.id, assistant_id=assistant.id)
        await asyncio.to_thread(other.execute, "BEGIN IMMEDIATE")
        cancel = asyncio.ensure_future(client.beta.threads.runs.cancel(run.id, thread_id=thread.id))
        await asyncio.sleep(0.1)
        other.execute("COMMIT")
        assert (await cancel).status == "cancelling"
    finally:
        other.close()


def test_a_locked_database_is_a_retryable_503(tmp_path: Any) -> None:
    """When SQLite stays locked past the busy timeout (here: none at all), the
    request answers a clear 503, which the SDKs retry, not a 500."""
    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")
    engine = sqlalchemy.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    try:
        with pytest.raises(sqlalchemy.exc.OperationalError) as caught, engine.begin() as connection:
            connection.exec_driver_sql("INSERT INTO t VALUES (1)")
        error = handlers.unexpected_error(caught.value)
        assert error.status == 503 and "retry" in error.message
        assert handlers.unexpected_error(RuntimeError("boom")).status == 500
    finally:
        engine.dispose()
        holder.close()


async def test_sqlite_writers_queue_and_always_release(tmp_path: Any) -> None:
    """The in-process queue in front of SQLite's write lock: transactions
    wait their turn, give it up however they end (commit, error, a cancelled
    task), and one that waits too long gets the retryable 503."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'queue.db'}")
    # A wait far longer than a turn needs until the last step, which is the
    # one about a wait too long: a loaded machine's COMMIT (an fsync here)
    # could outlast a short limit on an earlier turn.
    writers = db.SQLiteWriters(timeout=30)
    writers.listen(engine)
    try:
        async with engine.begin() as connection:
            await connection.exec_driver_sql("CREATE TABLE t (x)")
        order: list[str] = []
        async with engine.begin() as first:
            await first.exec_driver_sql("INSERT INTO t VALUES (1)")
            second = asyncio.ensure_future(_insert(engine, order, "second"))
            await asyncio.sleep(0.05)
            assert not second.done()
            order.append("first")
        await second
        assert order == ["first", "second"]

        with pytest.raises(ZeroDivisionError):
            async with engine.begin() as failing:
                await failing.exec_driver_sql("INSERT INTO t VALUES (2)")
                raise ZeroDivisionError
        await _insert(engine, order, "after an error")

        holding = asyncio.Event()

        async def cancelled_midway() -> None:
            async with engine.begin() as connection:
                await connection.exec_driver_sql("INSERT INTO t VALUES (3)")
                holding.set()
                await asyncio.Event().wait()

        task = asyncio.ensure_future(cancelled_midway())
        await holding.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _insert(engine, order, "after a cancel")

        writers.timeout = 0.5
        async with engine.begin() as blocking:
            await blocking.exec_driver_sql("INSERT INTO t VALUES (4)")
            with pytest.raises(sqlalchemy.exc.OperationalError) as caught:
                await _insert(engine, order, "too late")
        assert handlers.unexpected_error(caught.value).status == 503
        assert order == ["first", "second", "after an error", "after a cancel"]
    finally:
        await engine.dispose()


async def _insert(engine: Any, order: list[str], name: str) -> None:
    async with engine.begin() as connection:
        await connection.exec_driver_sql("INSERT INTO t VALUES (0)")
        order.append(name)
