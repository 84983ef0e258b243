"""PostgreSQL's one-statement unit of work on a connection checked out raw
(issue 17: Runtime.unit_of_work, db.autocommit_connection, held_back.PG_AUTOCOMMIT):
its statement goes straight on asyncpg in autocommit, with no session
connection, transaction or commit; the connection goes back to the pool out
of autocommit however the unit ends, and one whose statement was cancelled
or lost is invalidated, not handed out again."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from sqlalchemy import bindparam, exc, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from app import db, held_back
from app import run_log as run_log_module
from app.runtime import Runtime

# Built once (run_now takes cached shapes): a statement that waits, and one that fails.
_SLEEP = select(func.pg_sleep(bindparam("seconds")).label("slept"))
_DIVIDE = select((bindparam("one") / bindparam("zero")).label("quotient"))


async def _autocommitted(session: AsyncSession, runtime: Runtime) -> Any:
    """What run_log.append does before its one autocommitted statement, in a unit of work."""
    assert db.PG_AUTOCOMMIT in session.info, "a unit of work that gives a raw connection back"
    raw = await db.autocommit_connection(runtime.engine.sync_engine)
    assert raw is not None
    session.info[db.PG_AUTOCOMMIT] = raw
    session.info[run_log_module._AUTOCOMMITTED] = True
    return raw


def _checked_out(runtime: Runtime) -> int:
    return int(runtime.engine.sync_engine.pool.checkedout())


def raw_checkouts(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Each connection db.autocommit_connection checks out from now on (None
    where it declined one): the units of work whose one statement went raw."""
    found: list[Any] = []
    checkout = db.autocommit_connection

    async def checked_out(engine: Any) -> Any:
        found.append(await checkout(engine))
        return found[-1]

    monkeypatch.setattr(db, "autocommit_connection", checked_out)
    return found


def refused_checkouts(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on db.autocommit_connection's checkout must connect (the pool
    emptied first) and PostgreSQL refuses it, as when it restarts or fails
    over (asyncpg raises CannotConnectNowError); every other checkout
    connects. Each refusal recorded."""
    refused: list[str] = []
    checkout = db.autocommit_connection
    connect = asyncpg.connect

    async def refusing(*_args: Any, **_kwargs: Any) -> Any:
        refused.append("the database system is starting up")
        raise asyncpg.exceptions.CannotConnectNowError(refused[-1])

    async def checked_out(engine: Any) -> Any:
        await runtime.engine.dispose()  # no pooled connection: the checkout connects
        asyncpg.connect = refusing
        try:
            return await checkout(engine)
        finally:
            asyncpg.connect = connect

    monkeypatch.setattr(db, "autocommit_connection", checked_out)
    return refused


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # SQLite has no autocommit path
async def test_a_units_one_statement_goes_on_a_raw_connection_given_back_out_of_autocommit(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _checked_out(runtime)
    connected: list[object] = []
    connection = AsyncSession.connection

    async def counted(self: AsyncSession, *args: Any, **kwargs: Any) -> Any:
        connected.append(self)
        return await connection(self, *args, **kwargs)

    monkeypatch.setattr(AsyncSession, "connection", counted)
    async with runtime.unit_of_work() as session:
        raw = await _autocommitted(session, runtime)
        assert raw.adapted.autocommit
        assert await db.run_now(session, _SLEEP, {"seconds": 0}) == [{"slept": None}]
        assert not session.in_transaction()
    assert connected == []  # no session connection, no transaction begun
    assert not raw.adapted.autocommit and not raw.adapted._connection.is_closed()  # back in the pool, open
    assert db.PG_AUTOCOMMIT not in session.info
    assert _checked_out(runtime) == out


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_raw_statements_failure_is_sqlalchemys_and_its_connection_goes_back_sound(runtime: Runtime) -> None:
    out = _checked_out(runtime)
    with pytest.raises(exc.DBAPIError, match="division by zero"):  # as session.execute raises it
        async with runtime.unit_of_work() as session:
            raw = await _autocommitted(session, runtime)
            await db.run_now(session, _DIVIDE, {"one": 1, "zero": 0})
    assert not raw.adapted.autocommit and not raw.adapted._connection.is_closed()  # nothing left to abort
    assert _checked_out(runtime) == out
    async with runtime.transaction() as session:  # the pool's connections work on
        assert await session.scalar(select(func.count()).select_from(select(1).subquery())) == 1


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_raw_statement_cancelled_in_flight_invalidates_its_connection(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As SQLAlchemy's execution on an exit exception (held_back.sent): the
    statement may still be running, its outcome unread; the connection is
    closed with it, never handed out again."""
    out = _checked_out(runtime)
    found: list[Any] = []
    sent = asyncio.Event()
    fetch = asyncpg.prepared_stmt.PreparedStatement.fetch

    async def sending(self: Any, *args: Any, **kwargs: Any) -> Any:
        sent.set()  # the statement is written before the fetch below first waits
        return await fetch(self, *args, **kwargs)

    monkeypatch.setattr(asyncpg.prepared_stmt.PreparedStatement, "fetch", sending)

    async def unit() -> None:
        async with runtime.unit_of_work() as session:
            found.append(await _autocommitted(session, runtime))
            await db.run_now(session, _SLEEP, {"seconds": 30})

    task = asyncio.create_task(unit())
    async with asyncio.timeout(20):
        await sent.wait()
        assert found[0].adapted._execute_mutex.locked()  # in flight
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    (raw,) = found
    assert raw.adapted._connection.is_closed()
    assert _checked_out(runtime) == out
    async with runtime.transaction() as session:
        assert await session.scalar(select(func.count()).select_from(select(1).subquery())) == 1


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # the notifier is PostgreSQL's
async def test_the_notifiers_statement_goes_on_a_raw_connection(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run log notifier's NOTIFY (its own autocommitted statement) goes on
    a connection checked out raw, given back out of autocommit; no session
    connection. (That another process hears it: test_run_events.)"""
    out = _checked_out(runtime)
    raw = raw_checkouts(monkeypatch)
    connected: list[object] = []
    connection = AsyncSession.connection

    async def counted(self: AsyncSession, *args: Any, **kwargs: Any) -> Any:
        connected.append(self)
        return await connection(self, *args, **kwargs)

    monkeypatch.setattr(AsyncSession, "connection", counted)
    await runtime.run_log._send_news(["run_a", "run_b"])
    assert len(raw) == 1 and connected == []
    assert not raw[0].adapted.autocommit and not raw[0].adapted._connection.is_closed()
    assert _checked_out(runtime) == out


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_raw_connection_lost_before_its_statement_is_invalidated_and_the_pool_works_on(
    runtime: Runtime,
) -> None:
    """Its backend terminated (a restart, an administrator): the statement
    raises SQLAlchemy's error with connection_invalidated (a 503, a run left
    to be resumed), the connection is closed, not handed out again, and the
    next transaction gets a sound one."""
    out = _checked_out(runtime)
    with pytest.raises(exc.DBAPIError) as raised:
        async with runtime.unit_of_work() as session:
            raw = await _autocommitted(session, runtime)
            async with runtime.engine.connect() as other:
                terminating = await other.execution_options(**db.AUTOCOMMIT)
                pid = raw.adapted._connection.get_server_pid()
                await terminating.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            await db.run_now(session, _SLEEP, {"seconds": 0})
    assert raised.value.connection_invalidated
    assert raw.adapted._connection.is_closed()
    assert _checked_out(runtime) == out
    async with runtime.transaction() as session:
        assert await session.scalar(select(func.count()).select_from(select(1).subquery())) == 1


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_raw_checkout_the_database_refuses_raises_sqlalchemys_error(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a session's checkout raises it (Connection's constructor), never
    the adapter's: callers sort database failures by DBAPIError."""
    refused = refused_checkouts(runtime, monkeypatch)
    with pytest.raises(exc.DBAPIError, match="starting up"):
        await db.autocommit_connection(runtime.engine.sync_engine)
    assert refused
    async with runtime.transaction() as session:  # connecting again, once it accepts
        assert await session.scalar(select(func.count()).select_from(select(1).subquery())) == 1


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_statement_run_now_declines_goes_on_the_sessions_connection_alone_in_autocommit(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(None of run_log's statements is declined today.) Declined with a raw
    connection held, the statement goes by session.execute: the raw one is
    given back first, the session connects in autocommit (its own
    transaction still, no BEGIN), one connection checked out, not two."""
    out = _checked_out(runtime)
    monkeypatch.setattr(held_back, "_run_now_postgres", _declining)
    async with runtime.unit_of_work() as session:
        raw = await _autocommitted(session, runtime)
        assert await db.run_now(session, _SLEEP, {"seconds": 0}) is None
        assert session.info[db.PG_AUTOCOMMIT] is None  # given back: the unit of work gives back none
        await session.execute(_SLEEP, {"seconds": 0})
        assert _checked_out(runtime) == out + 1  # the session's alone (the raw one again, from the pool)
        pooled = await (await session.connection()).get_raw_connection()
        assert pooled.dbapi_connection is not None and pooled.dbapi_connection.autocommit  # no BEGIN
        assert not pooled.driver_connection.is_in_transaction()
    assert _checked_out(runtime) == out
    assert not raw.adapted.autocommit


async def _declining(*_args: Any) -> None:
    return None
