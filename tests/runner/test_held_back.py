"""app/held_back.py: a held-back SQLite write handed straight to the driver
stores exactly what SQLAlchemy's execution of it stores, keeps its
rowcount check and returned rows, is seen by statement listeners, and
leaves to SQLAlchemy what it cannot do (PostgreSQL above all)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any
from unittest.mock import AsyncMock

import pytest
import uvloop
from sqlalchemy import bindparam, event, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, InvalidRequestError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import make_transient_to_detached

from app import db, held_back, orm, sqlite_driver, sqlite_groups
from app.api.handlers import unexpected_error
from app.runtime import Runtime
from app.services import core_rows, run_defaults, run_events, run_execution, run_state
from app.services import runs as runs_service
from app.wire import jsontext
from app.wire.events import Event
from tests.runner.helpers import until

pytestmark = pytest.mark.timeout(30)

_THREAD = {"id": "thread_behind", "project_id": orm.DEFAULT_PROJECT_ID, "seq": 1, "created_at": 1, "metadata_": {}}
# Values of every kind a run stores: JSON objects, lists, a JSON string,
# None in a JSON column (stored as JSON null) and in others (SQL NULL),
# floats, non-ASCII text; parallel_tool_calls left to its column default.
_RUN = {
    "seq": 2,
    "created_at": 1_700_000_000,
    "thread_id": "thread_behind",
    "assistant_id": "asst_behind",
    "status": "completed",
    "required_action": None,
    "expires_at": None,
    "model": "offline",
    "instructions": "Réponds brièvement ✓",
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"a": [1, 2.5, None, True]}}}],
    "metadata_": {"k": "v", "ü": "\u2028"},
    "temperature": 0.7,
    "top_p": 1.0,
    "truncation_strategy": {"type": "auto", "last_messages": None},
    "tool_choice": "auto",
    "response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": False}},
}


def _stored(path: str, table: str, row_id: str) -> list[tuple[str, Any]]:
    """The row as SQLite stores it: each value's storage class and value."""
    with sqlite3.connect(path) as connection:
        names = [row[1] for row in connection.execute(f"PRAGMA table_info({table})")]
        found = connection.execute(
            f"SELECT {', '.join(f'typeof({name}), {name}' for name in names)} FROM {table} WHERE id = ?",
            (row_id,),
        ).fetchone()
    pairs = list(zip(found[::2], found[1::2], strict=True))
    return [pair for name, pair in zip(names, pairs, strict=True) if name != "id"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_row_written_straight_to_the_driver_is_stored_as_sqlalchemy_stores_it(runtime: Runtime) -> None:
    path = make_url(runtime.settings.resolved_database_url()).database
    assert path is not None
    through_sqlalchemy = core_rows.record(orm.Run, id="run_sqlalchemy", **_RUN)
    straight = core_rows.record(orm.Run, id="run_straight", **_RUN)
    async with runtime.transaction() as session:
        thread = core_rows.record(orm.Thread, **_THREAD)
        statement, _columns = core_rows._layout(orm.Thread)
        # The transaction's first statement: it connects (and takes the write lock) first.
        assert await db.hold_back(session, statement, core_rows.values(thread), db.WRITE_BEHIND)
        await core_rows.insert_row(session, through_sqlalchemy)  # not held back: sent through SQLAlchemy
        statement, _columns = core_rows._layout(orm.Run)
        assert await db.hold_back(session, statement, core_rows.values(straight), db.WRITE_BEHIND)
    assert _stored(path, "runs", "run_straight") == _stored(path, "runs", "run_sqlalchemy")
    async with runtime.transaction() as session:
        read = {run.id: run for run in (await session.execute(select(orm.Run))).scalars()}
    for key in (*_RUN, "parallel_tool_calls"):
        assert getattr(read["run_straight"], key) == getattr(read["run_sqlalchemy"], key), key
    assert read["run_straight"].parallel_tool_calls is True  # the column's default

    # An update of JSON, None and a float both ways (update_row: straight once a connection is open).
    changes = {"usage": {"total_tokens": 3}, "required_action": None, "last_error": None, "temperature": 0.25}
    for run in (through_sqlalchemy, straight):
        run.__dict__.update(changes)
    async with runtime.transaction() as session:
        await session.execute(text("SELECT 1"))
        await core_rows.update_row(session, straight, tuple(changes), write_behind=True)
        await core_rows.update_row(session, through_sqlalchemy, tuple(changes))
    assert _stored(path, "runs", "run_straight") == _stored(path, "runs", "run_sqlalchemy")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_write_straight_to_the_driver_keeps_its_checks_rows_and_listeners(runtime: Runtime) -> None:
    """EXPECT_ROWCOUNT with ROWCOUNT_MISMATCH fails the COMMIT with that
    error; RETURNED_ROWS_TO receives the rows; listeners see the statement."""
    seen: list[tuple[str, Any]] = []

    def before(_connection: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        seen.append((statement, parameters))

    class Missed(db.sqlite_driver.HeldBackWriteMismatch):
        pass

    runs = orm.Run.__table__
    cas = update(runs).where(runs.c.id == bindparam("run_id"), runs.c.status == "queued").values(status="failed")
    cannot_miss = {**db.WRITE_BEHIND, db.EXPECT_ROWCOUNT: 1, db.ROWCOUNT_MISMATCH: Missed}
    async with runtime.transaction() as session:
        await core_rows.insert_row(session, core_rows.record(orm.Thread, **_THREAD))
        await core_rows.insert_row(session, core_rows.record(orm.Run, id="run_cas", **{**_RUN, "status": "queued"}))
    event.listen(runtime.engine.sync_engine, "before_cursor_execute", before)
    try:
        returned: list[Any] = []
        async with runtime.transaction() as session:
            await session.execute(text("SELECT 1"))
            assert await db.hold_back(session, cas, {"run_id": "run_cas"}, cannot_miss)
            await run_events.insert_behind(
                session, "run_cas", [Event("thread.run.failed", {"id": "run_cas"})], returned
            )
            assert returned == []  # not sent yet
        assert [tuple(row) for row in returned] == [("run_cas", 1)]
        assert [statement.split()[0] for statement, _parameters in seen] == ["SELECT", "UPDATE", "WITH"]
        assert seen[1][1] == ("failed", "run_cas", "queued")
        with pytest.raises(IntegrityError) as raised:
            async with runtime.transaction() as session:  # held back as its first statement
                assert await db.hold_back(session, cas, {"run_id": "run_cas"}, cannot_miss)  # failed already: no row
        assert isinstance(raised.value.orig, Missed)
    finally:
        event.remove(runtime.engine.sync_engine, "before_cursor_execute", before)
    async with runtime.transaction() as session:
        assert (await session.execute(select(orm.Run.status).where(orm.Run.id == "run_cas"))).scalar() == "failed"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_held_move_goes_straight_to_the_driver_and_is_still_checked(runtime: Runtime) -> None:
    """run_state.write_held's compare-and-set, held back without SQLAlchemy:
    with the lease it moves the run; without, the COMMIT fails, nothing written."""
    async with runtime.transaction() as session:
        await core_rows.insert_row(session, core_rows.record(orm.Thread, **_THREAD))
        queued = {**_RUN, "status": "queued", "lease_owner": "me"}
        await core_rows.insert_row(session, core_rows.record(orm.Run, id="run_move", **queued))
    for owner, moved in (("another", False), ("me", True)):
        run = core_rows.record(orm.Run, id="run_move", **queued)
        seen: list[str] = []

        def listener(*args: Any, seen: list[str] = seen) -> None:
            seen.append(args[2])

        event.listen(runtime.engine.sync_engine, "before_cursor_execute", listener)
        try:
            if moved:
                async with runtime.transaction() as session:
                    await session.execute(text("SELECT 1"))
                    await run_state.write_held(session, run, run_state.hold(run, "in_progress")[1], lease_owner=owner)
            else:
                with pytest.raises(IntegrityError, match="changed 0 rows, not 1"):
                    async with runtime.transaction() as session:
                        await session.execute(text("SELECT 1"))
                        held = run_state.hold(run, "in_progress")[1]
                        await run_state.write_held(session, run, held, lease_owner=owner)
        finally:
            event.remove(runtime.engine.sync_engine, "before_cursor_execute", listener)
        assert len(seen) == 2 and seen[1].startswith("UPDATE runs SET status=?")
        async with runtime.transaction() as session:
            status = (await session.execute(select(orm.Run.status).where(orm.Run.id == "run_move"))).scalar()
        assert status == ("in_progress" if moved else "queued")


async def test_postgres_and_statements_it_cannot_send_are_left_to_sqlalchemy(runtime: Runtime) -> None:
    runs = orm.Run.__table__
    expanding = update(runs).where(runs.c.id.in_(bindparam("ids", expanding=True))).values(status="failed")
    async with runtime.transaction() as session:
        await session.execute(text("SELECT 1"))
        assert not await db.hold_back(session, expanding, {"ids": ["a", "b"]}, db.WRITE_BEHIND)
        thread = core_rows.record(orm.Thread, **_THREAD)
        statement, _columns = core_rows._layout(orm.Thread)
        held = await db.hold_back(session, statement, core_rows.values(thread), db.WRITE_BEHIND)
        assert held is (runtime.engine.dialect.name == "sqlite")
        if not held:
            await core_rows.insert_row(session, thread, write_behind=True)
    async with runtime.transaction() as session:
        assert (
            await session.execute(select(orm.Thread.metadata_).where(orm.Thread.id == "thread_behind"))
        ).scalar() == {}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_session_rolled_back_in_part_holds_nothing_back(runtime: Runtime) -> None:
    """After a failed flush, session.execute refuses the write (the
    transaction was rolled back); hold_back must not take it instead."""
    async with runtime.transaction() as session:
        await core_rows.insert_row(session, core_rows.record(orm.Thread, **_THREAD))
    statement, _columns = core_rows._layout(orm.Thread)
    other = core_rows.values(core_rows.record(orm.Thread, **{**_THREAD, "id": "thread_other"}))
    async with runtime.transaction() as session:
        session.add(orm.Thread(**_THREAD))  # its id is taken
        with pytest.raises(IntegrityError):
            await session.flush()
        assert not await db.hold_back(session, statement, other, db.WRITE_BEHIND)
        with pytest.raises(InvalidRequestError, match="rolled back"):
            await session.execute(statement.execution_options(**db.WRITE_BEHIND), other)
    async with runtime.transaction() as session:
        assert (await session.execute(select(orm.Thread.id))).scalars().all() == ["thread_behind"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_each_engine_binds_with_its_own_json_serializer(runtime: Runtime) -> None:
    """A shape is compiled per dialect: an engine made with another JSON
    serializer stores its rows with that one, not the first engine's."""
    url = runtime.settings.resolved_database_url()
    other = create_async_engine(
        url, module=sqlite_driver.OneHopDBAPI(), json_serializer=lambda value: json.dumps(value, indent=1)
    )
    event.listen(other.sync_engine, "connect", db._sqlite_connect)
    db.SQLiteWriters(timeout=5).listen(other)
    statement, _columns = core_rows._layout(orm.Thread)
    metadata = {"a": 1}
    try:
        for engine, thread_id in ((runtime.engine, "thread_default"), (other, "thread_indented")):
            async with db.create_sessionmaker(engine)() as session, session.begin():
                thread = core_rows.record(orm.Thread, **{**_THREAD, "id": thread_id, "metadata_": metadata})
                assert await db.hold_back(session, statement, core_rows.values(thread), db.WRITE_BEHIND)
    finally:
        await other.dispose()
    path = make_url(url).database
    assert path is not None
    with sqlite3.connect(path) as connection:
        stored = dict(connection.execute("SELECT id, metadata FROM threads").fetchall())
    assert stored == {"thread_default": jsontext.dumps(metadata), "thread_indented": json.dumps(metadata, indent=1)}


class _Undo(Exception):
    pass


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("connected_first", [True, False], ids=["connected", "unconnected"])
async def test_a_write_held_back_in_a_savepoint_is_undone_with_it(runtime: Runtime, connected_first: bool) -> None:
    """As session.execute's: the savepoint is begun before the write joins
    the list, whether or not the outer transaction has connected."""
    statement, _columns = core_rows._layout(orm.Thread)
    async with runtime.transaction() as session:
        if connected_first:
            await session.execute(text("SELECT 1"))
        with pytest.raises(_Undo):
            async with session.begin_nested():
                thread = core_rows.record(orm.Thread, **_THREAD)
                assert await db.hold_back(session, statement, core_rows.values(thread), db.WRITE_BEHIND)
                raise _Undo
    async with runtime.transaction() as session:
        assert (await session.execute(select(orm.Thread.id))).scalars().all() == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_text_statement_whose_parameters_are_not_plain_is_left_to_sqlalchemy(runtime: Runtime) -> None:
    sql = "UPDATE runs SET status = 'failed' WHERE id IN (:ids)"
    async with runtime.transaction() as session:
        await session.execute(text("SELECT 1"))
        plain = text(sql)
        expanding = text(sql).bindparams(bindparam("ids", expanding=True))
        literal = text(sql).bindparams(bindparam("ids", literal_execute=True))
        assert not await db.hold_back(session, expanding, {"ids": ["a"]}, db.WRITE_BEHIND)
        assert not await db.hold_back(session, literal, {"ids": "a"}, db.WRITE_BEHIND)
        # The plain text's shape, cached under the same text, is not reused for the others.
        assert await db.hold_back(session, plain, {"ids": "a"}, db.WRITE_BEHIND)
        assert not await db.hold_back(session, expanding, {"ids": ["a"]}, db.WRITE_BEHIND)


def test_each_value_resolved_once_per_shape_is_what_construct_params_makes() -> None:
    """A shape's ``?`` values, resolved once (held_back._sources), are those
    SQLAlchemy's construct_params and the column defaults make per call: the
    caller's parameters, the statement's own constants, a column default;
    a value SQLAlchemy must compute or refuse per call is left to it."""
    dialect = create_async_engine("sqlite+aiosqlite://", module=sqlite_driver.OneHopDBAPI()).dialect
    runs = orm.Run.__table__
    run = core_rows.record(orm.Run, id="run_resolved", **_RUN)
    events = run_events._sqlite_params({"run_resolved": [Event("thread.run.failed", {"id": "run_resolved"})]})
    cases: list[tuple[Any, dict[str, Any]]] = [
        (core_rows._layout(orm.Run)[0], core_rows.values(run)),  # parallel_tool_calls by its default
        (
            update(runs).where(runs.c.id == bindparam("run_id"), runs.c.status == "queued").values(status="failed"),
            {"run_id": "r"},
        ),
        (
            run_state._update(("status", "usage"), False, True),
            {"run_id": "r", "source": "queued", "lease_holder": "me", "set_status": "failed", "set_usage": {"a": 1.5}},
        ),
        (run_events._insert_sqlite_statement(events[0]), events[1]),
        # assistant_id bound twice, for the column and for the check (review: it fell back per call)
        (
            run_defaults._checked_insert(tuple(core_rows.values(run))),
            {**core_rows.values(run), **dict.fromkeys(run_defaults._GUARD_PARAMS)},
        ),
    ]
    for statement, params in cases:
        shape = held_back._shape(dialect, statement, tuple(params))
        assert shape is not None and shape.sources is not None, statement
        assert held_back._parameters(shape, params) == held_back._parameters(shape._replace(sources=None), params)
    computed = update(runs).where(runs.c.id == bindparam("run_id", callable_=lambda: "r")).values(status="failed")
    shape = held_back._shape(dialect, computed, ())
    assert shape is not None and shape.sources is None
    assert held_back._parameters(shape, {}) == ("failed", "r")
    required = held_back._shape(dialect, update(runs).where(runs.c.id == bindparam("run_id")).values(status="x"), ())
    assert required is not None and required.sources is None
    with pytest.raises(InvalidRequestError, match="A value is required for bind parameter 'run_id'"):
        held_back._parameters(required, {})


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_statement_run_straight_on_the_driver_returns_what_sqlalchemy_returns(runtime: Runtime) -> None:
    """run_now(): the claim's UPDATE ... RETURNING gives the rows
    session.execute gives (JSON decoded, booleans, floats), sent in one hop
    with the transaction's held-back writes, seen by listeners; a refusal
    is SQLAlchemy's error, and its transaction rolls back."""
    runs = orm.Run.__table__
    returning = (
        update(runs)
        .where(runs.c.id == bindparam("run_id"))
        .values(lease_owner=bindparam("owner"))
        .returning(*runs.c, run_execution._earlier_messages_column("sqlite"))
    )
    async with runtime.transaction() as session:
        await core_rows.insert_row(session, core_rows.record(orm.Thread, **_THREAD))
        for seq, run_id in enumerate(("run_now_a", "run_now_b"), start=2):  # ended: no live run in the way
            await core_rows.insert_row(session, core_rows.record(orm.Run, id=run_id, **{**_RUN, "seq": seq}))
    seen: list[str] = []

    def listener(*args: Any) -> None:
        seen.append(args[2].split()[0])

    event.listen(runtime.engine.sync_engine, "before_cursor_execute", listener)
    try:
        async with runtime.transaction() as session:
            by_sqlalchemy = dict(
                (await session.execute(returning, {"run_id": "run_now_a", "owner": "w"})).one()._mapping
            )
        async with runtime.transaction() as session:
            statement, _columns = core_rows._layout(orm.Thread)
            other = core_rows.values(core_rows.record(orm.Thread, **{**_THREAD, "id": "thread_now"}))
            assert await db.hold_back(session, statement, other, db.WRITE_BEHIND)
            straight = await db.run_now(session, returning, {"run_id": "run_now_b", "owner": "w"})
    finally:
        event.remove(runtime.engine.sync_engine, "before_cursor_execute", listener)
    assert straight is not None and len(straight) == 1
    assert seen == ["UPDATE", "INSERT", "UPDATE"]
    row = straight[0]
    assert row["id"] == "run_now_b" and row["lease_owner"] == "w"
    assert {key: value for key, value in row.items() if key not in ("id", "seq")} == {
        str(key): value for key, value in by_sqlalchemy.items() if key not in ("id", "seq")
    }
    assert row["parallel_tool_calls"] is True and row["earlier_messages"] is None  # (queued runs' only)
    async with runtime.transaction() as session:
        assert (await session.execute(select(orm.Thread.id).where(orm.Thread.id == "thread_now"))).scalar()
    # A refusal: SQLAlchemy's IntegrityError, the held-back write with it rolled back.
    clash = update(runs).where(runs.c.id == bindparam("run_id")).values(id="run_now_a").returning(runs.c.id)
    with pytest.raises(IntegrityError):
        async with runtime.transaction() as session:
            other = core_rows.values(core_rows.record(orm.Thread, **{**_THREAD, "id": "thread_undone"}))
            assert await db.hold_back(session, statement, other, db.WRITE_BEHIND)
            await db.run_now(session, clash, {"run_id": "run_now_b"})
    async with runtime.transaction() as session:
        assert (await session.execute(select(orm.Thread.id).where(orm.Thread.id == "thread_undone"))).scalar() is None


async def test_a_statement_to_run_now_is_sent_straight_on_both_databases(runtime: Runtime) -> None:
    """run_now() sends the claim's kind of statement on either database
    (PostgreSQL through asyncpg: tests/runner/test_run_now_postgres.py);
    a statement SQLAlchemy renders per call (an IN list) is left to it."""
    runs = orm.Run.__table__
    returning = update(runs).where(runs.c.id == bindparam("run_id")).values(lease_owner="w").returning(runs.c.id)
    expanding = update(runs).where(runs.c.id.in_(bindparam("ids", expanding=True))).values(lease_owner="w")
    async with runtime.transaction() as session:
        rows = await db.run_now(session, returning, {"run_id": "run_none"})
        per_call = await db.run_now(session, expanding.returning(runs.c.id), {"ids": ["run_none"]})
    assert rows == [] and per_call is None


async def test_a_statement_whose_columns_share_a_name_is_declined_before_anything_is_done(runtime: Runtime) -> None:
    """run_now() gives rows by column name, so a statement with two result
    columns of one name is left to session.execute, declined before it is
    bound or told to the statement listeners (on SQLite too: the
    fallback then runs it once, as the only statement the listeners see)."""
    runs = orm.Run.__table__
    twice = select(runs.c.id.label("x"), runs.c.thread_id.label("x")).where(runs.c.id == bindparam("run_id"))
    engine = runtime.engine.sync_engine
    told: list[str] = []

    def noted(_connection: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        told.append(statement)

    event.listen(engine, "before_cursor_execute", noted)
    try:
        async with runtime.transaction() as session:
            assert await db.run_now(session, twice, {"run_id": "run_none"}) is None
            assert told == []
            assert (await session.execute(twice, {"run_id": "run_none"})).all() == []
    finally:
        event.remove(engine, "before_cursor_execute", noted)
    assert len([statement for statement in told if "AS x" in statement]) == 1


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_unit_of_held_back_writes_alone_commits_without_connecting_its_session(runtime: Runtime) -> None:
    """Runtime.unit_of_work on a SQLite file: writes held back before the
    session connects are collected and committed in one hop, with no
    SQLAlchemy transaction; statement listeners still see them."""
    begins: list[object] = []
    seen: list[str] = []

    def listener(*args: Any) -> None:
        seen.append(args[2].split()[0])

    event.listen(runtime.engine.sync_engine, "begin", lambda *_args: begins.append(1))
    event.listen(runtime.engine.sync_engine, "before_cursor_execute", listener)
    statement, _columns = core_rows._layout(orm.Thread)
    async with runtime.unit_of_work() as session:
        assert await db.hold_back(session, statement, core_rows.values(core_rows.record(orm.Thread, **_THREAD)), {})
        assert not session.in_transaction() and len(session.info[db.COLLECTED]) == 1
    assert begins == [] and seen == ["INSERT"]
    async with runtime.transaction() as session:
        assert (await session.execute(select(orm.Thread.id).where(orm.Thread.id == "thread_behind"))).scalar()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_unit_that_connects_sends_its_collected_writes_first(runtime: Runtime) -> None:
    """A read after collected writes connects the session: they go first in
    its transaction (the read sees them), then the unit commits as any."""
    statement, _columns = core_rows._layout(orm.Thread)
    async with runtime.unit_of_work() as session:
        assert await db.hold_back(session, statement, core_rows.values(core_rows.record(orm.Thread, **_THREAD)), {})
        read = select(orm.Thread.id).where(orm.Thread.id == "thread_behind")
        assert (await session.execute(read)).scalar() == "thread_behind"
        assert db.COLLECTED not in session.info
        other = core_rows.values(core_rows.record(orm.Thread, **{**_THREAD, "id": "thread_after"}))
        assert await db.hold_back(session, statement, other, {})  # into the transaction's own held-back writes
    async with runtime.transaction() as session:
        found = (await session.execute(select(orm.Thread.id).order_by(orm.Thread.id))).scalars().all()
    assert found == ["thread_after", "thread_behind"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_collected_write_that_misses_fails_the_unit_whole(runtime: Runtime) -> None:
    """A collected compare-and-set that misses fails the one-hop commit with
    SQLAlchemy's IntegrityError carrying its ROWCOUNT_MISMATCH (as
    run_defaults.is_stale reads it); nothing of the unit is written, and the
    write lock is free again."""

    class Missed(db.sqlite_driver.HeldBackWriteMismatch):
        pass

    runs = orm.Run.__table__
    cas = update(runs).where(runs.c.id == bindparam("run_id")).values(status="failed")
    statement, _columns = core_rows._layout(orm.Thread)
    with pytest.raises(IntegrityError) as raised:
        async with runtime.unit_of_work() as session:
            assert await db.hold_back(session, statement, core_rows.values(core_rows.record(orm.Thread, **_THREAD)), {})
            missing = {db.EXPECT_ROWCOUNT: 1, db.ROWCOUNT_MISMATCH: Missed}
            assert await db.hold_back(session, cas, {"run_id": "run_none"}, missing)
    assert db.sqlite_driver.raised_within(raised.value, Missed)
    async with runtime.transaction() as session:  # the lock was given back: this does not wait
        assert (await session.execute(select(orm.Thread.id))).scalar() is None


async def test_a_unit_collects_only_on_a_sqlite_file(runtime: Runtime) -> None:
    async with runtime.unit_of_work() as session:
        assert (db.COLLECTED in session.info) is (runtime.engine.dialect.name == "sqlite")


# Review of sqlcore (issue 17): the collected commit and run_now beside
# SQLAlchemy's own writers, cancellations, lost connections, rollbacks.
# SQLite-only by nature: nothing here exists on PostgreSQL (hold_back and
# run_now answer False/None there, and a unit collects only on a SQLite file).
# Those where a cancellation, a lost connection or the order of waiters
# matters run on uvloop too, the server's loop (tests/runner/conftest.py).
_ON_EITHER_LOOP = pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])


@_ON_EITHER_LOOP
async def test_a_test_on_either_loop_runs_on_the_one_its_id_names(request: pytest.FixtureRequest) -> None:
    on_uvloop = isinstance(asyncio.get_running_loop(), uvloop.Loop)
    assert on_uvloop is request.node.name.endswith("[uvloop]")


async def _ticks(count: int = 20) -> None:
    """Turns of the event loop (no wall-clock wait): tasks blocked on
    asyncio futures alone (the pool's queue, the write lock) get there."""
    for _ in range(count):
        await asyncio.sleep(0)


@_ON_EITHER_LOOP
async def test_a_collected_commit_takes_its_connection_before_the_write_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One pooled connection, the write lock held; a collected commit, then
    a transaction, come to write. Had the collected commit queued for the
    lock before checking a connection out, the transaction would take the
    connection and queue for the lock behind it, the lock then go to the
    collected commit, each waiting for the other until the pool's timeout.
    Checked out first, as every writer is, both commit."""
    monkeypatch.setattr(db, "SQLITE_CONNECTIONS", 1)
    monkeypatch.setattr(db, "SQLITE_WRITER_OVERFLOW", 0)
    engine = db.create_engine(f"sqlite+aiosqlite:///{tmp_path / 'pool.db'}")
    engine.sync_engine.pool._timeout = 3  # type: ignore[attr-defined]  # production: 30 s
    writers = db._WRITERS[engine.sync_engine]
    maker = db.create_sessionmaker(engine)
    try:
        async with engine.begin() as connection:
            await connection.execute(text("CREATE TABLE t (v TEXT)"))

        async def transaction() -> None:
            async with maker() as session, session.begin():
                await session.execute(text("INSERT INTO t VALUES ('transaction')"))

        await writers.hold()
        try:
            collected = asyncio.create_task(
                sqlite_groups.commit_collected(
                    engine, [sqlite_driver.Statement("INSERT INTO t VALUES ('collected')", None, False)]
                )
            )
            await _ticks()
            then = asyncio.create_task(transaction())
            await _ticks()
        finally:
            writers.free()
        done, _pending = await asyncio.wait({collected, then}, timeout=2)  # well within the pool's timeout
        assert done == {collected, then}
        assert collected.exception() is None and then.exception() is None
        async with engine.connect() as connection:
            stored = (await connection.execute(text("SELECT v FROM t ORDER BY rowid"))).scalars().all()
        assert stored == ["collected", "transaction"]
    finally:
        await engine.dispose()


@_ON_EITHER_LOOP
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_collected_unit_cancelled_waiting_for_the_write_lock_rolls_back_at_once(runtime: Runtime) -> None:
    """Cancelled while it queues for the write lock, a collected unit has
    sent nothing: it ends at once (not once the lock comes, up to its hop's
    outcome wait) and writes nothing."""
    writers = db._WRITERS[runtime.engine.sync_engine]
    statement, _columns = core_rows._layout(orm.Thread)

    async def unit() -> None:
        async with runtime.unit_of_work() as session:
            assert await db.hold_back(session, statement, core_rows.values(core_rows.record(orm.Thread, **_THREAD)), {})

    await writers.hold()
    try:
        task = asyncio.create_task(unit())
        await _ticks()
        assert writers._lock._waiters, "the unit queued for the lock"
        task.cancel()
        done, _pending = await asyncio.wait({task}, timeout=2)  # not held until the lock is free
        assert done == {task} and task.cancelled()
    finally:
        writers.free()
    async with runtime.transaction() as session:
        assert (await session.execute(select(orm.Thread.id))).scalar() is None
    assert runtime.engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@_ON_EITHER_LOOP
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_statement_run_now_cancelled_before_its_thread_runs_it_leaves_no_transaction_behind(
    runtime: Runtime,
) -> None:
    """run_now cancelled while its statement waits for the connection's
    thread: the thread still runs it (BEGIN IMMEDIATE and the UPDATE) after
    the caller's rollback found nothing to undo. The connection is
    invalidated, as SQLAlchemy's execution does on a cancellation, so that
    its transaction is closed with it instead of going back to the pool
    open (the next transaction there failing, SQLite's lock held)."""
    async with runtime.transaction() as session:
        await core_rows.insert_row(session, core_rows.record(orm.Thread, **_THREAD))
    runs = orm.Run.__table__
    claim = update(runs).where(runs.c.id == bindparam("run_id")).values(lease_owner="w").returning(runs.c.id)
    waiting = asyncio.Event()
    release = threading.Event()  # set once the cancel is made: the statement is still queued then
    busy: list[asyncio.Future[Any]] = []

    async def claiming() -> None:
        async with runtime.transaction() as session:
            connection = await session.connection()
            driver: Any = connection.sync_connection.connection.dbapi_connection  # type: ignore[union-attr]
            # Its thread busy (as under load) until the cancel is made: the
            # statement waits in its queue, then runs whatever happened meanwhile.
            busy.append(asyncio.ensure_future(driver._connection._execute(release.wait, 30.0)))
            await asyncio.sleep(0)  # one turn: that job is queued to the thread before the statement
            waiting.set()
            await db.run_now(session, claim, {"run_id": "run_none"})

    task = asyncio.create_task(claiming())
    await waiting.wait()  # claiming() is now awaiting its statement's hop
    task.cancel()
    release.set()
    done, _pending = await asyncio.wait({task}, timeout=5)
    assert done == {task} and task.cancelled()
    async with asyncio.timeout(5):
        await asyncio.gather(*busy)
        async with runtime.transaction() as session:  # the pool's last connection first (LIFO)
            await core_rows.insert_row(session, core_rows.record(orm.Thread, **{**_THREAD, "id": "thread_next"}))
    with sqlite3.connect(
        str(make_url(runtime.settings.database_url).database), timeout=0
    ) as other:  # SQLite's lock is free
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")


@_ON_EITHER_LOOP
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_connection_lost_under_a_straight_statement_is_invalidated_as_sqlalchemy_does(
    runtime: Runtime,
) -> None:
    """A connection closed under run_now or a collected commit: the error
    says the connection was invalidated (answered 503, as from
    session.execute), and the broken connection does not go back to the pool."""
    runs = orm.Run.__table__
    claim = update(runs).where(runs.c.id == bindparam("run_id")).values(lease_owner="w").returning(runs.c.id)
    with pytest.raises(DBAPIError) as raised:
        async with runtime.transaction() as session:
            connection = await session.connection()
            driver: Any = connection.sync_connection.connection.dbapi_connection  # type: ignore[union-attr]
            await driver._connection.close()
            await db.run_now(session, claim, {"run_id": "run_none"})
    assert raised.value.connection_invalidated
    assert unexpected_error(raised.value).status == 503
    pooled = await runtime.engine.raw_connection()
    await pooled.dbapi_connection._connection.close()  # type: ignore[union-attr]
    pooled.close()
    with pytest.raises(DBAPIError) as raised:
        await sqlite_groups.commit_collected(runtime.engine, [sqlite_driver.Statement("SELECT 1", None, False)])
    assert raised.value.connection_invalidated
    assert unexpected_error(raised.value).status == 503
    async with runtime.transaction() as session:  # no broken connection handed out
        await core_rows.insert_row(session, core_rows.record(orm.Thread, **_THREAD))


@_ON_EITHER_LOOP
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("mismatch", "level"),
    [({db.ROWCOUNT_MISMATCH: run_defaults.AssistantChanged}, logging.DEBUG), ({}, logging.WARNING)],
    ids=["stale_defaults", "cannot_miss"],
)
async def test_a_routine_miss_of_a_cancelled_collected_commit_is_only_noted(
    runtime: Runtime, caplog: pytest.LogCaptureFixture, mismatch: dict[str, Any], level: int
) -> None:
    """A collected unit cancelled once its hop is sent waits for the hop's
    outcome (sqlite_groups.commit_collected_seen_through). Its checked write missing
    there is noted (debug) when the miss is routine (the assistant changed:
    run_defaults.AssistantChanged, which the caller would have retried), and
    a warning when the write could not miss (run_state's _CANNOT_MISS: no
    ROWCOUNT_MISMATCH kind, a bug)."""
    caplog.set_level(logging.DEBUG, logger="app.db")
    writers = db._WRITERS[runtime.engine.sync_engine]
    runs = orm.Run.__table__
    cas = update(runs).where(runs.c.id == bindparam("run_id")).values(status="failed")
    missing = {db.EXPECT_ROWCOUNT: 1, **mismatch}

    async def unit() -> None:
        async with runtime.unit_of_work() as session:
            assert await db.hold_back(session, cas, {"run_id": "run_none"}, missing)

    # Another process's write lock: the hop's BEGIN IMMEDIATE waits for it on the connection's thread.
    holder = sqlite3.connect(str(make_url(runtime.settings.database_url).database), isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        task = asyncio.create_task(unit())
        await until(lambda: writers._lock._held, "the unit's hop to be sent")  # (past the lock: sent)
        task.cancel()
        await _ticks()
    finally:
        holder.close()  # its lock freed: the hop goes on, and misses
    done, _pending = await asyncio.wait({task}, timeout=10)
    assert done == {task} and task.cancelled()
    (noted,) = [record for record in caplog.records if "a cancelled transaction's COMMIT failed" in record.message]
    assert noted.levelno == level


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_collected_writes_are_sent_when_the_session_begins_without_connecting(runtime: Runtime) -> None:
    """session.add() of a clean row begins the session without connecting:
    its commit would connect nothing. The unit connects it first, so the
    collected writes go with its transaction instead of being dropped."""
    statement, _columns = core_rows._layout(orm.Thread)
    async with runtime.transaction() as session:
        await core_rows.insert_row(session, core_rows.record(orm.Thread, **{**_THREAD, "id": "thread_old"}))
    async with runtime.unit_of_work() as session:
        new = core_rows.values(core_rows.record(orm.Thread, **{**_THREAD, "id": "thread_new", "seq": 2}))
        assert await db.hold_back(session, statement, new, {})
        old = core_rows.record(orm.Thread, **{**_THREAD, "id": "thread_old"})
        make_transient_to_detached(old)
        session.add(old)
        assert session.in_transaction() and db.COLLECTED in session.info
    async with runtime.transaction() as session:
        found = (await session.execute(select(orm.Thread.id).order_by(orm.Thread.id))).scalars().all()
    assert found == ["thread_new", "thread_old"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("how", ["session.rollback()", "a begin() block that raised"])
async def test_a_rollback_drops_the_collected_writes(runtime: Runtime, how: str) -> None:
    """As a rollback drops the writes held back on its connection; whether
    the session or its transaction's block rolled back."""
    async with runtime.unit_of_work() as session:
        await core_rows.insert_row(session, core_rows.record(orm.Thread, **_THREAD), write_behind=True)
        assert session.info[db.COLLECTED]
        if how == "session.rollback()":
            await session.rollback()
        else:
            with contextlib.suppress(RuntimeError):
                async with session.begin():
                    raise RuntimeError("refused")
    async with runtime.transaction() as session:
        assert (await session.execute(select(orm.Thread.id))).scalar() is None


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_an_append_to_a_run_not_created_here_connects_a_collecting_unit_first(runtime: Runtime) -> None:
    """run_log predicts a run's next event number; in a unit still
    collecting (no write lock yet) another writer could take it before the
    hop. For a run the unit is not creating, the append connects first (the
    lock taken), and the numbers are those stored."""
    async with runtime.transaction() as session:
        await core_rows.insert_row(session, core_rows.record(orm.Thread, **_THREAD))
        await core_rows.insert_row(session, core_rows.record(orm.Run, **{**_RUN, "id": "run_behind"}))
        await runtime.run_log.append(session, "run_behind", [Event("thread.run.created", {"id": "run_behind"})])
    async with runtime.unit_of_work() as session:
        entries = await runtime.run_log.append(
            session, "run_behind", [Event("thread.run.in_progress", {"id": "run_behind"})], run_locked=True
        )
        assert db.COLLECTED not in session.info and session.in_transaction()
    async with runtime.transaction() as session:
        stored = await run_events.read(session, "run_behind", 0)
    assert [entry.seq for entry in entries] == [stored[-1].seq]


def test_a_sqlite_url_without_a_database_name_is_in_memory_and_collects_nothing() -> None:
    engine = db.create_engine("sqlite+aiosqlite://")
    try:
        assert not db.collects(engine)
    finally:
        engine.sync_engine.dispose()


def _typed(value: Any) -> Any:
    """``value`` with each leaf's type beside it: ``==`` alone takes 1, True and 1.0 for one."""
    if isinstance(value, dict):
        return {key: _typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_typed(item) for item in value]
    return (type(value).__name__, value)


class _AnswersKept:
    """run_now() (or a stand-in), keeping what each call answered."""

    def __init__(self, run_now: Any) -> None:
        self.run_now = run_now
        self.answers: list[Any] = []

    async def __call__(self, *args: Any) -> Any:
        self.answers.append(await self.run_now(*args))
        return self.answers[-1]


async def test_a_run_claimed_straight_on_the_driver_is_the_run_sqlalchemy_claims(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queued run claimed through run_now and one claimed through
    session.execute: the same wire form, the same values of the same
    types on the row, and the same earlier messages prefetched (JSON
    decoded, non-ASCII kept)."""
    async with runtime.transaction() as session:
        await core_rows.insert_row(session, core_rows.record(orm.Thread, **_THREAD))
        for index in range(2):
            content = [{"type": "text", "text": {"value": f"hé {index}", "annotations": []}}]
            message = {"id": f"msg_{index}", "seq": 10 + index, "created_at": 1, "thread_id": "thread_behind"}
            await core_rows.insert_row(
                session,
                core_rows.record(
                    orm.Message, **message, role="user", content=content, status="completed", metadata_={}
                ),
            )
    claimed_as: list[tuple[Any, ...]] = []
    for index, straight in enumerate((False, True)):
        run_id = f"run_claimed_{index}"
        queued = {**_RUN, "seq": 100 + index, "status": "queued", "expires_at": 2_000_000_000}
        async with runtime.transaction() as session:
            await core_rows.insert_row(session, core_rows.record(orm.Run, id=run_id, **queued))
        sending = _AnswersKept(db.run_now if straight else AsyncMock(return_value=None))  # None: session.execute
        with monkeypatch.context() as patched:
            patched.setattr(db, "run_now", sending)
            async with runtime.transaction() as session:
                (run,) = await run_execution.claim_runs(session, "w1", 5, 30.0)
        assert run.id == run_id
        assert len(sending.answers) == 1 and (sending.answers[0] is not None) == straight  # on either database
        wire = runs_service.to_wire(run).model_dump()
        state = {key: value for key, value in vars(run).items() if not key.startswith("_sa")}
        for varying in ("id", "seq", "lease_expires_at", "started_at"):
            wire.pop(varying, None)
            state.pop(varying, None)
        claimed_as.append((_typed(wire), _typed(state), repr(run_execution._PREFETCHED.get(run))))
        async with runtime.transaction() as session:  # ended: no live run in the next one's way
            await session.execute(update(orm.Run).where(orm.Run.id == run_id).values(status="completed"))
    by_sqlalchemy, straight_on_the_driver = claimed_as
    assert straight_on_the_driver == by_sqlalchemy
    assert "hé 1" in by_sqlalchemy[2]  # the earlier messages were prefetched, and compared
