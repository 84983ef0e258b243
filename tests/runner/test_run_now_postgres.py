"""run_now() on PostgreSQL (app/held_back.py ``_run_now_postgres``): the
claim's statement straight on asyncpg fails as ``session.execute`` fails.
A refused statement rolls its whole transaction back, a connection lost
before the statement or during it is invalidated and answered 503 (the run stays claimable and is claimed
again), and a cancellation while the statement waits for a row lock
leaves nothing written and no connection in a transaction behind."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from sqlalchemy import bindparam, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app import db, errors, orm
from app.api.handlers import unexpected_error
from app.runtime import Runtime
from app.services import core_rows, projects, run_execution, thread_lock
from app.settings import Settings
from tests.runner.test_held_back import _RUN, _THREAD

pytestmark = [pytest.mark.timeout(30), pytest.mark.parametrize("database_url", ["postgres"], indirect=True)]

# The cancellation and lost-connection paths on the server's loop (uvloop) too (tests/runner/conftest.py).
_ON_EITHER_LOOP = pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])

_RUNS = orm.Run.__table__
_LEASE = update(_RUNS).where(_RUNS.c.id == bindparam("run_id")).values(lease_owner=bindparam("owner"))


async def _stored_runs(runtime: Runtime, *run_ids: str) -> None:
    async with runtime.transaction() as session:
        await core_rows.insert_row(session, core_rows.record(orm.Thread, **_THREAD))
        for seq, run_id in enumerate(run_ids, start=2):  # the first queued, the others ended (one live run a thread)
            status = {"status": "queued", "expires_at": 2_000_000_000} if seq == 2 else {}
            await core_rows.insert_row(session, core_rows.record(orm.Run, id=run_id, **{**_RUN, "seq": seq, **status}))


async def _lease_owner(runtime: Runtime, run_id: str) -> Any:
    async with runtime.transaction() as session:
        return (await session.execute(select(orm.Run.lease_owner).where(orm.Run.id == run_id))).scalar()


async def test_a_refused_statement_rolls_its_whole_transaction_back(runtime: Runtime) -> None:
    await _stored_runs(runtime, "run_pg_a", "run_pg_b")
    listening = _checked_out(runtime)  # (the run log's LISTEN connection)
    clash = update(_RUNS).where(_RUNS.c.id == bindparam("run_id")).values(id="run_pg_a").returning(_RUNS.c.id)
    with pytest.raises(IntegrityError):
        async with runtime.transaction() as session:
            rows = await db.run_now(session, _LEASE.returning(_RUNS.c.id), {"run_id": "run_pg_a", "owner": "w"})
            assert rows == [{"id": "run_pg_a"}]  # sent, in this transaction
            await db.run_now(session, clash, {"run_id": "run_pg_b"})
    assert await _lease_owner(runtime, "run_pg_a") is None  # the first statement rolled back with it
    assert _checked_out(runtime) == listening


@_ON_EITHER_LOOP
async def test_a_connection_lost_under_the_claim_is_a_503_and_the_run_is_claimed_again(runtime: Runtime) -> None:
    await _stored_runs(runtime, "run_pg_lost")
    with pytest.raises(DBAPIError) as raised:
        async with runtime.transaction() as session:
            connection = await session.connection()
            adapted: Any = connection.sync_connection.connection.dbapi_connection  # type: ignore[union-attr]
            await adapted._connection.close()
            await run_execution.claim_runs(session, "w1", 5, 30.0)
    assert raised.value.connection_invalidated
    assert unexpected_error(raised.value).status == 503
    assert await _lease_owner(runtime, "run_pg_lost") is None  # nothing claimed
    async with runtime.transaction() as session:  # no broken connection handed out; the run still claimable
        (claimed,) = await run_execution.claim_runs(session, "w2", 5, 30.0)
    assert claimed.id == "run_pg_lost" and claimed.lease_owner == "w2"
    assert await _lease_owner(runtime, "run_pg_lost") == "w2"


@_ON_EITHER_LOOP
async def test_a_connection_lost_during_the_statement_is_a_503_and_writes_nothing(runtime: Runtime) -> None:
    """The connection lost while the statement runs (its backend terminated,
    as by a failover or an administrator, while it waits for another
    transaction's row lock): run_now's error says the connection was
    invalidated (503), the broken connection is not handed out again, the
    statement's write never lands, and the pool's next transaction leases
    the run."""
    await _stored_runs(runtime, "run_pg_cut")
    listening = _checked_out(runtime)
    backend: list[int] = []
    raised: list[DBAPIError] = []

    async def leasing() -> None:
        async with runtime.transaction() as session:
            backend.append((await session.execute(text("SELECT pg_backend_pid()"))).scalar_one())
            try:
                await db.run_now(session, _LEASE.returning(_RUNS.c.id), {"run_id": "run_pg_cut", "owner": "cut"})
            except DBAPIError as error:  # run_now's own (the rollback after it fails too, on its own)
                raised.append(error)
                raise

    async with asyncio.timeout(10):
        async with runtime.transaction() as holder:
            locked = select(orm.Run.id).where(orm.Run.id == "run_pg_cut").with_for_update()
            assert (await holder.execute(locked)).scalar() == "run_pg_cut"
            task = asyncio.create_task(leasing())
            assert await _blocked_on_a_lock(runtime), "the statement waits for the row lock"
            async with runtime.engine.connect() as connection:
                autocommit = await connection.execution_options(**db.AUTOCOMMIT)
                terminate = text("SELECT pg_terminate_backend(:pid)")
                assert (await autocommit.execute(terminate, {"pid": backend[0]})).scalar_one()
            with pytest.raises(DBAPIError):
                await task
        (error,) = raised
        assert error.connection_invalidated
        assert unexpected_error(error).status == 503
        assert await _lease_owner(runtime, "run_pg_cut") is None  # nothing written
        assert _checked_out(runtime) == listening
        async with runtime.transaction() as session:  # no broken connection handed out
            rows = await db.run_now(session, _LEASE.returning(_RUNS.c.id), {"run_id": "run_pg_cut", "owner": "w"})
        assert rows == [{"id": "run_pg_cut"}]
        assert await _lease_owner(runtime, "run_pg_cut") == "w"


@_ON_EITHER_LOOP
async def test_a_claim_cancelled_while_it_waits_for_a_row_lock_writes_nothing(runtime: Runtime) -> None:
    """Cancelled mid-statement (blocked on another transaction's row lock):
    the task ends cancelled at once, its connection is invalidated rather
    than handed back to the pool inside a transaction, and the statement's
    write never lands, whatever the lock's holder does next."""
    await _stored_runs(runtime, "run_pg_locked")
    listening = _checked_out(runtime)
    started = asyncio.Event()

    async def leasing() -> None:
        async with runtime.transaction() as session:
            await session.connection()
            started.set()
            await db.run_now(session, _LEASE.returning(_RUNS.c.id), {"run_id": "run_pg_locked", "owner": "late"})

    async with asyncio.timeout(10):
        async with runtime.transaction() as holder:
            locked = select(orm.Run.id).where(orm.Run.id == "run_pg_locked").with_for_update()
            assert (await holder.execute(locked)).scalar() == "run_pg_locked"
            task = asyncio.create_task(leasing())
            await started.wait()
            waited = await _blocked_on_a_lock(runtime)
            assert waited, "the statement waits for the row lock"
            task.cancel()
            done, _pending = await asyncio.wait({task}, timeout=5)
            assert done == {task} and task.cancelled()
            await holder.execute(_LEASE, {"run_id": "run_pg_locked", "owner": "holder"})
        assert await _lease_owner(runtime, "run_pg_locked") == "holder"
        assert _checked_out(runtime) == listening
        async with runtime.transaction() as session:  # the pool's connections work
            rows = await db.run_now(session, _LEASE.returning(_RUNS.c.id), {"run_id": "run_pg_locked", "owner": "w"})
        assert rows == [{"id": "run_pg_locked"}]


def _checked_out(runtime: Runtime) -> int:
    return int(runtime.engine.sync_engine.pool.checkedout())  # type: ignore[attr-defined]


async def _blocked_on_a_lock(runtime: Runtime) -> bool:
    """Whether a backend of this database waits for a lock, asked until one
    does (a deadline: the caller's timeout)."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    while True:
        async with runtime.engine.connect() as connection:
            connection = await connection.execution_options(**db.AUTOCOMMIT)
            if (await connection.exec_driver_sql(query)).scalar():
                return True
        await asyncio.sleep(0.01)


async def test_a_statement_prepared_before_a_schema_change_is_prepared_again(runtime: Runtime) -> None:
    """A column's type changed under the connection's prepared statement
    (an online migration): the next run_now fails once, as session.execute
    does, and the ones after it prepare the statement again, rather than
    reuse the stale one and fail for good (every claim, every run end)."""
    await _stored_runs(runtime, "run_pg_schema")
    returning = _LEASE.returning(_RUNS.c.lease_owner)

    async def lease() -> list[dict[str, Any]] | None:
        async with runtime.transaction() as session:
            return await db.run_now(session, returning, {"run_id": "run_pg_schema", "owner": "w"})

    assert await lease() == [{"lease_owner": "w"}]  # prepared on the connection
    async with runtime.engine.connect() as connection:
        autocommit = await connection.execution_options(**db.AUTOCOMMIT)
        await autocommit.exec_driver_sql("ALTER TABLE runs ALTER COLUMN lease_owner TYPE text")
    with pytest.raises(DBAPIError, match="cached"):
        await lease()
    assert await lease() == [{"lease_owner": "w"}]


class _CountedQueries:
    """Stands in for an asyncpg connection's protocol and keeps the simple
    queries it sends (BEGIN, COMMIT, ROLLBACK: each a round trip)."""

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol
        self.queries: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._protocol, name)
        if name != "query":
            return attribute

        def query(sql: str, *args: Any, **kwargs: Any) -> Any:
            self.queries.append(sql.split()[0].rstrip(";"))
            return attribute(sql, *args, **kwargs)

        return query


@asynccontextmanager
async def _simple_queries(session: AsyncSession) -> AsyncIterator[list[str]]:
    """The simple queries (BEGIN, COMMIT...) the session's connection sends
    within the block, its transaction not begun yet (connecting sends none)."""
    connection = await session.connection()
    driver: Any = connection.sync_connection.connection.driver_connection  # type: ignore[union-attr]
    counted = driver._protocol = _CountedQueries(driver._protocol)
    try:
        yield counted.queries
    finally:
        driver._protocol = counted._protocol


async def test_the_begin_goes_with_the_transactions_first_statement(runtime: Runtime) -> None:
    """The claim's transaction (run_now first in it) sends no BEGIN of its
    own (app/asyncpg_begin.py): the statement runs in the transaction the
    BEGIN sent with it opened, and what follows shares it until COMMIT."""
    await _stored_runs(runtime, "run_pg_begin")
    async with runtime.transaction() as session, _simple_queries(session) as queries:
        (claimed,) = await run_execution.claim_runs(session, "w1", 5, 30.0)
        in_block = await session.execute(text("SELECT now() = statement_timestamp()"))
        assert in_block.scalar_one() is False  # a transaction that began before this statement
        assert queries == []
    assert claimed.id == "run_pg_begin"
    assert await _lease_owner(runtime, "run_pg_begin") == "w1"


async def test_a_creates_thread_lock_takes_its_begin_along(runtime: Runtime) -> None:
    """The thread's lock, a run's or a message's create's first statement,
    goes with its BEGIN (no BEGIN of its own); the thread stays locked for
    the transaction, and a thread of another project is still a 404."""
    await _stored_runs(runtime, "run_pg_lock")
    async with runtime.transaction() as session, _simple_queries(session) as queries:
        live = await thread_lock.live_run_of_owned_thread(session, projects.DEFAULT, _THREAD["id"])
        assert queries == []
        locks = "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND relation = 'threads'::regclass"
        assert (await session.execute(text(locks + " AND mode = 'RowShareLock'"))).scalar_one() == 1
    assert live == "run_pg_lock"
    elsewhere = projects.Project("proj_other", "other")
    with pytest.raises(errors.APIError, match="No thread found"):
        async with runtime.transaction() as session:
            await thread_lock.lock_owned_thread(session, elsewhere, _THREAD["id"])


async def test_a_first_statement_refused_leaves_no_transaction_open(runtime: Runtime) -> None:
    """The transaction's first statement, its BEGIN sent with it, refused by
    the server (a unique key): the transaction is rolled back, and the
    connection goes back to the pool usable, not in an aborted block."""
    await _stored_runs(runtime, "run_pg_first_a", "run_pg_first_b")
    listening = _checked_out(runtime)
    clash = update(_RUNS).where(_RUNS.c.id == bindparam("run_id")).values(id="run_pg_first_a").returning(_RUNS.c.id)
    for _ in range(3):  # every connection of the pool's, had the failure left one aborted
        with pytest.raises(IntegrityError):
            async with runtime.transaction() as session:
                connection = await session.connection()  # (no I/O: the BEGIN goes with the statement)
                driver: Any = connection.sync_connection.connection.driver_connection  # type: ignore[union-attr]
                await db.run_now(session, clash, {"run_id": "run_pg_first_b"})
        assert not driver.is_closed()  # rolled back, kept: the server's answer came
    assert _checked_out(runtime) == listening
    async with runtime.transaction() as session:
        rows = await db.run_now(session, _LEASE.returning(_RUNS.c.id), {"run_id": "run_pg_first_a", "owner": "w"})
        status = await session.execute(text("SELECT count(*) FROM runs"))
        assert status.scalar_one() == 2
    assert rows == [{"id": "run_pg_first_a"}]
    assert await _lease_owner(runtime, "run_pg_first_a") == "w"


@_ON_EITHER_LOOP
async def test_a_first_statement_asyncpg_cannot_send_closes_its_connection(runtime: Runtime) -> None:
    """A parameter asyncpg cannot encode fails the first statement after its
    BEGIN was written (unsynced on the server): the connection is closed and
    invalidated, never handed out again with that BEGIN pending, and the
    pool's next transaction works."""
    await _stored_runs(runtime, "run_pg_encode")
    listening = _checked_out(runtime)
    with pytest.raises(DBAPIError, match="invalid input"):
        async with runtime.transaction() as session:
            connection = await session.connection()  # (no I/O: the BEGIN goes with the statement)
            driver: Any = connection.sync_connection.connection.driver_connection  # type: ignore[union-attr]
            await db.run_now(session, _LEASE.returning(_RUNS.c.id), {"run_id": ["not", "a", "string"], "owner": "w"})
    assert driver.is_closed()
    assert _checked_out(runtime) == listening
    for _ in range(3):
        async with runtime.transaction() as session:
            rows = await db.run_now(session, _LEASE.returning(_RUNS.c.id), {"run_id": "run_pg_encode", "owner": "w"})
        assert rows == [{"id": "run_pg_encode"}]
    assert await _lease_owner(runtime, "run_pg_encode") == "w"


# (review of pgone) The written BEGIN where its statement is prepared in the
# same call (every new connection): the prepare leaves an implicit
# transaction open on the server, which the BEGIN joins.
_RETURNING = _LEASE.returning(_RUNS.c.id)
_ROW = select(_RUNS.c.id, _RUNS.c.lease_owner).where(_RUNS.c.id == bindparam("run_id"))


async def _claims_again(runtime: Runtime, run_id: str, owner: str) -> None:
    """Transactions that begin with run_now still work, each in a block of its own."""
    for _ in range(3):
        async with runtime.transaction() as session:
            rows = await db.run_now(session, _RETURNING, {"run_id": run_id, "owner": owner})
            in_block = await session.execute(text("SELECT now() = statement_timestamp()"))
            assert in_block.scalar_one() is False  # a transaction began before this statement
        assert rows == [{"id": run_id}]
    assert await _lease_owner(runtime, run_id) == owner


@pytest.mark.parametrize("level", ["SERIALIZABLE", "REPEATABLE READ"])
async def test_a_transaction_at_another_isolation_level_begins_with_it(runtime: Runtime, level: str) -> None:
    """PostgreSQL refuses another level once the prepare's implicit
    transaction has begun: such a transaction keeps the adapter's BEGIN
    (written with the statement, every attempt failed as a lost connection)."""
    await _stored_runs(runtime, "run_pg_iso")
    await runtime.engine.dispose()  # new connections: the claim's statement is prepared in its call
    for attempt in range(2):
        async with runtime.transaction() as session:
            await session.connection(execution_options={"isolation_level": level})
            rows = await db.run_now(session, _RETURNING, {"run_id": "run_pg_iso", "owner": f"w{attempt}"})
            isolation = (await session.execute(text("SHOW transaction_isolation"))).scalar_one()
        assert (rows, isolation) == ([{"id": "run_pg_iso"}], level.lower())


async def test_a_deferrable_transaction_begins_with_it(runtime: Runtime) -> None:
    await _stored_runs(runtime, "run_pg_deferrable")
    await runtime.engine.dispose()
    options = {"isolation_level": "SERIALIZABLE", "postgresql_readonly": True, "postgresql_deferrable": True}
    async with runtime.transaction() as session:
        await session.connection(execution_options=options)
        rows = await db.run_now(session, _ROW, {"run_id": "run_pg_deferrable"})
        deferrable = (await session.execute(text("SHOW transaction_deferrable"))).scalar_one()
    assert (rows, deferrable) == ([{"id": "run_pg_deferrable", "lease_owner": None}], "on")


async def test_a_connection_back_from_an_autocommit_use_begins_with_its_statement(runtime: Runtime) -> None:
    """A pooled connection that served an AUTOCOMMIT use goes back with its
    level named (the dialect's default, READ COMMITTED): the written BEGIN
    names it too, which PostgreSQL takes after the prepare."""
    await _stored_runs(runtime, "run_pg_auto")
    await runtime.engine.dispose()
    await db.notify_work(runtime.engine)
    async with runtime.transaction() as session, _simple_queries(session) as simple:
        rows = await db.run_now(session, _ROW, {"run_id": "run_pg_auto"})
    assert rows == [{"id": "run_pg_auto", "lease_owner": None}]
    assert simple == []  # no BEGIN of its own


async def test_unnamed_statements_still_run_after_the_written_begin(settings: Settings) -> None:
    """With ``statement_cache_size=0`` (pgbouncer) asyncpg's statements are
    unnamed, as the written BEGIN's is: asyncpg parses its own again after
    it, or the statement's Bind would run the BEGIN again instead. Given as
    an operator gives it, in the URL's query (db.asyncpg_numbers: asyncpg
    refused the query's string)."""
    url = make_url(settings.database_url).update_query_dict({"statement_cache_size": "0"})
    uncached = settings.model_copy(update={"database_url": url.render_as_string(hide_password=False)})
    runtime = await Runtime.start(uncached)
    try:
        async with runtime.engine.connect() as connection:
            raw = await connection.get_raw_connection()
            assert raw.driver_connection._stmt_cache.get_max_size() == 0  # type: ignore[union-attr]
        await _stored_runs(runtime, "run_pg_unnamed")
        await _claims_again(runtime, "run_pg_unnamed", "w")
    finally:
        await runtime.close()


@_ON_EITHER_LOOP
async def test_a_connection_lost_during_the_begins_batch_is_a_503(runtime: Runtime) -> None:
    """The backend terminated while the BEGIN and the statement run (the
    first statement: its BEGIN written with it): a lost connection,
    invalidated, and the pool's next transactions work."""
    await _stored_runs(runtime, "run_pg_batch")
    listening = _checked_out(runtime)
    sleep = select(text("pg_sleep(5)"))

    async def sleeping() -> None:
        async with runtime.transaction() as session:
            await db.run_now(session, sleep, {})

    task = asyncio.create_task(sleeping())
    pid = await _sleeping_backend(runtime)
    async with runtime.engine.connect() as connection:
        connection = await connection.execution_options(**db.AUTOCOMMIT)
        await connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    with pytest.raises(DBAPIError) as raised:
        await asyncio.wait_for(task, 10)
    assert raised.value.connection_invalidated
    assert unexpected_error(raised.value).status == 503
    assert _checked_out(runtime) == listening
    await _claims_again(runtime, "run_pg_batch", "w")


async def _sleeping_backend(runtime: Runtime) -> int:
    query = (
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND state = 'active' AND query LIKE '%pg_sleep(5)%' AND pid <> pg_backend_pid()"
    )
    while True:
        async with runtime.engine.connect() as connection:
            connection = await connection.execution_options(**db.AUTOCOMMIT)
            if pid := (await connection.exec_driver_sql(query)).scalar():
                return int(pid)
        await asyncio.sleep(0.01)
