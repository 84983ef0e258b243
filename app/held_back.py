"""Held-back SQLite writes handed straight to the driver (issue 17).

A write executed with ``db.WRITE_BEHIND`` inside a SQLite transaction only
joins the driver's list of writes sent with the transaction's next
statement or its COMMIT (app/sqlite_driver.py). Through ``session.execute``
it still paid for SQLAlchemy's whole execution (the greenlet, the cache
key, an execution context, a cursor, the events, a result): about 50 µs of
CPU for a list append. hold_back() does the append from here: the
statement compiled once per shape (the dialect's own compiler, qmark
style), its parameters made as SQLAlchemy makes them (each ``?``'s source
resolved once per shape as the compiled statement's ``construct_params``
resolves it per call, ``_sources``, that call itself where a source is not
plain; scalar column defaults; each bind's type processor: JSON serialized
by the dialect's serializer, booleans as integers), so the row stored is
the same, byte for byte. The driver then
runs it exactly as before: EXPECT_ROWCOUNT, RETURNED_ROWS_TO and
ROWCOUNT_MISMATCH keep their meaning, and a failure still fails the
statement or COMMIT that carried it.

Whatever does not fit (PostgreSQL, except run_now's statements, which go
straight to asyncpg; a connection that is not the one-hop driver's, an
inline poll connection, a statement with expanding or literal-execute
parameters or a default that must be computed) is left to
``session.execute`` by a False answer, as is a session or connection whose
transaction is no longer active (session.execute raises then). Listeners of
``before_cursor_execute`` (tests and benches that count statements) still
see each held-back statement and each run_now statement (on either
database), with its SQL and parameters as sent and no cursor nor execution
context; what a listener registered with ``retval=True`` returns is not
applied (the server registers none). The other execution events
(``after_cursor_execute``, ``before_execute``, ``handle_error``,
``do_orm_execute``) do not fire for them, and the engine's echo log does not
show them.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar, cast

from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_connection
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.sql import ClauseElement, Executable, TextClause
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.util import greenlet_spawn

from app import asyncpg_begin, sqlite_driver


class _Source(NamedTuple):
    """Where a ``?``'s value comes from, as construct_params would take it
    for the shape's parameter names: the caller's parameter ``given``, else
    ``value`` (a column default or the statement's own bound constant);
    then ``process``, the bind's type processor, if any."""

    given: str | None
    value: Any
    process: Callable[[Any], Any] | None


class _Shape(NamedTuple):
    """A statement compiled for SQLite, for one set of parameter names."""

    compiled: SQLCompiler
    sql: str
    positions: tuple[str, ...]  # each ``?``'s parameter
    processors: Mapping[str, Callable[[Any], Any]]  # bind processors by parameter
    defaults: tuple[tuple[str, Any], ...]  # scalar column defaults (INSERT) or onupdates (UPDATE)
    # Each ``?``'s source (_sources), or None: construct_params makes them per call.
    sources: tuple[_Source, ...] | None


# Shapes by (dialect, statement, parameter names): an engine's dialect
# carries its JSON serializer, which the bind processors close over. A
# text() statement by its text (those are often built per call). None: the
# statement is not for this path.
_SHAPES: dict[tuple[Dialect, object, tuple[str, ...]], _Shape | None] = {}
# Enough for every shape the server sends; beyond (a statement built per
# call, by mistake), the cache starts again rather than grow.
_MOST_SHAPES = 1024


def _compile(dialect: Dialect, statement: ClauseElement, names: tuple[str, ...]) -> _Shape | None:
    # As Connection.execute compiles it: the given parameters' names as the
    # column keys (an INSERT without VALUES sets those columns), one row.
    compiled = statement.compile(dialect=dialect, column_keys=sorted(names))
    assert isinstance(compiled, SQLCompiler)
    if compiled.literal_execute_params or compiled.post_compile_params or not compiled.positional:
        return None  # rendered per call (IN lists): SQLAlchemy's to do
    defaults = []
    prefetch = compiled.insert_prefetch or compiled.update_prefetch  # the columns given a value per execution
    for column in prefetch:
        default = column.default if compiled.insert_prefetch else column.onupdate
        if default is None or not default.is_scalar:
            return None  # a callable or SQL default needs an execution context
        defaults.append((compiled._within_exec_param_key_getter(column), default.arg))  # type: ignore[attr-defined]
    processors = compiled._bind_processors
    if not all(callable(processor) for processor in processors.values()):
        return None  # a tuple type's processors, one per element: flattened per call by SQLAlchemy
    positions = tuple(compiled.positiontup or ())
    typed = cast(Mapping[str, Callable[[Any], Any]], processors)
    return _Shape(
        compiled,
        compiled.string,
        positions,
        typed,
        tuple(defaults),
        _sources(compiled, names, positions, typed, defaults),
    )


def _sources(
    compiled: SQLCompiler,
    names: tuple[str, ...],
    positions: tuple[str, ...],
    processors: Mapping[str, Callable[[Any], Any]],
    defaults: list[tuple[str, Any]],
) -> tuple[_Source, ...] | None:
    """Each ``?``'s source, resolved once per shape as construct_params
    resolves it on every call (issue 17: that general walk over every bind
    took about a fifth of a run INSERT's parameters, JSON encoding included,
    and most of a compare-and-set's): a column default first (set
    over what construct_params made), then the bind's key among ``names``,
    then its name, then its own constant. None (construct_params per call)
    where that is not plain: a value computed per call (callable), a
    missing required value (construct_params raises its error), escaped
    names, a name shared by binds that do not all take the same given
    parameter, parameters collected from elsewhere.

    A name shared by binds of one key the caller gives (the run's INSERT
    checked against its assistant's remembered defaults binds
    ``assistant_id`` for the column and for the check) is plain:
    construct_params gives every one of them that parameter, and the
    processors go by name."""
    if compiled.escaped_bind_names or getattr(compiled, "_collected_params", None):
        return None
    given = set(names)
    binds: dict[str, BindParameter[Any]] = {}
    for bound, name in compiled.bind_names.items():
        first = binds.setdefault(name, bound)
        if first is not bound and not (bound.key == first.key and (bound.key in given or name in given)):
            return None
    by_default = dict(defaults)
    sources = []
    for name in positions:
        process = processors.get(name)
        bind = binds.get(name)
        if name in by_default:
            sources.append(_Source(None, by_default[name], process))
        elif bind is None or (bind.key not in given and name not in given and (bind.required or bind.callable)):
            return None
        elif bind.key in given or name in given:
            sources.append(_Source(bind.key if bind.key in given else name, None, process))
        else:
            sources.append(_Source(None, bind.value, process))
    return tuple(sources)


def _plain_text(statement: TextClause) -> bool:
    """Whether none of the text() statement's parameters carries a value or
    a type of its own (then its text alone is its shape). Known once per
    statement object: a cached statement (run_events' insert, of up to
    dozens of parameters) was checked again on every call (issue 17)."""
    try:
        return _PLAIN_TEXTS[statement]
    except KeyError:
        pass
    if len(_PLAIN_TEXTS) >= _MOST_SHAPES:
        _PLAIN_TEXTS.clear()  # text() built per call: checked again rather than kept
    plain = _PLAIN_TEXTS[statement] = not any(
        not bind.type._isnull or bind.value is not None or bind.expanding or bind.literal_execute or bind.callable
        for bind in statement._bindparams.values()
    )
    return plain


# _plain_text()'s answers, by statement object (a ClauseElement hashes by
# identity; its binds are not changed once it has been executed).
_PLAIN_TEXTS: dict[TextClause, bool] = {}


def _shape(dialect: Dialect, statement: ClauseElement, names: tuple[str, ...]) -> _Shape | None:
    if isinstance(statement, TextClause):
        # Keyed by its text: only when none of its parameters carries a value or a type of its own.
        if not _plain_text(statement):
            return None
        key: tuple[Dialect, object, tuple[str, ...]] = (dialect, statement.text, names)
    else:
        key = (dialect, statement, names)
    try:
        return _SHAPES[key]
    except KeyError:
        pass
    if len(_SHAPES) >= _MOST_SHAPES:
        _SHAPES.clear()
    shape = _SHAPES[key] = _compile(dialect, statement, names)
    return shape


def _parameters(shape: _Shape, params: dict[str, Any]) -> tuple[Any, ...]:
    """The values for the shape's ``?``s, as DefaultExecutionContext makes them."""
    if shape.sources is not None:
        values = []
        for given, value, process in shape.sources:
            if given is not None:
                value = params[given]
            values.append(value if process is None else process(value))
        return tuple(values)
    made = shape.compiled.construct_params(params, escape_names=False)
    for key, default in shape.defaults:
        made[key] = default
    processors = shape.processors
    return tuple(processors[key](made[key]) if key in processors else made[key] for key in shape.positions)


def connection_of(session: AsyncSession, bind: Engine) -> Connection | None:
    """The session's connection to ``bind`` in its open transaction, if it
    has connected yet (found without the greenlet: no I/O)."""
    # The innermost transaction: a savepoint that has not connected yet is
    # begun by session.connection() (its SAVEPOINT sent first), so that its
    # rollback undoes what is held back inside it. The outermost one's
    # connection would skip the SAVEPOINT, and the write would outlive it.
    sync = session.sync_session
    transaction = sync.get_nested_transaction() or sync.get_transaction()
    held = None if transaction is None else transaction._connections.get(bind)  # (connection, transaction, ...)
    return None if held is None else held[0]


async def _active_connection(session: AsyncSession, bind: Engine) -> Connection | None:
    """The session's connection to ``bind`` in its active transaction,
    connected first as session.execute would connect it; None where the
    transaction is no longer active (session.execute says so)."""
    connection = connection_of(session, bind)
    if connection is None:
        connection = (await session.connection()).sync_connection
    if connection is None or connection.closed or connection.invalidated:
        return None
    transaction = connection.get_transaction()
    if transaction is None or not transaction.is_active:
        return None
    return connection


class _Straight(NamedTuple):
    """A statement ready for the driver: its shape, its parameters, and the
    transaction's SQLAlchemy connection and driver connection."""

    shape: _Shape
    parameters: tuple[Any, ...]
    connection: Connection
    driver: sqlite_driver.OneHopConnection


def _bound(
    session: AsyncSession, bind: Engine, shape: _Shape | None, params: dict[str, Any], connection: Connection | None
) -> tuple[_Shape, tuple[Any, ...]] | None:
    """The statement's ``shape`` and its values for ``params``, told to the
    ``before_cursor_execute`` listeners (of ``connection``, else of the
    engine: a session not connected yet); None where ``session.execute``
    must send it."""
    if shape is None or not session.sync_session.is_active:
        return None  # (not active: rolled back in part, a failed flush: session.execute says so)
    try:
        parameters = _parameters(shape, params)
    except Exception as error:  # as SQLAlchemy reports a parameter it cannot bind
        raise sa_exc.StatementError(
            f"({type(error).__module__}.{type(error).__qualname__}) {error}", shape.sql, params, error
        ) from error
    for listener in (connection or bind).dispatch.before_cursor_execute:
        listener(connection, None, shape.sql, parameters, None, False)
    return shape, parameters


async def _straight(session: AsyncSession, statement: ClauseElement, params: dict[str, Any]) -> _Straight | None:
    """``statement`` with ``params`` for the session's SQLite transaction's
    driver connection, told to the ``before_cursor_execute`` listeners;
    None, and nothing done, where ``session.execute`` must send it (see
    the module). The transaction's first statement connects as
    session.execute would (the pool's checkout, the write lock), its
    BEGIN still sent with it (and the writes collected before it: see
    COLLECTED)."""
    bind = session.sync_session.bind
    if not isinstance(bind, Engine) or bind.dialect.name != "sqlite":
        return None
    shape = _shape(bind.dialect, statement, tuple(params))
    if shape is None or not session.sync_session.is_active:
        return None
    connection = await _active_connection(session, bind)
    if connection is None:
        return None
    driver: object = connection.connection.dbapi_connection
    if not isinstance(driver, sqlite_driver.OneHopConnection) or not driver.transaction_open:
        return None
    if driver.inline_wait_ms is not None:
        return None  # a poll's connection writes nothing
    bound = _bound(session, bind, shape, params, connection)
    if bound is None:
        return None
    return _Straight(*bound, connection, driver)


# Session.info key of a SQLite write transaction that has not connected yet
# (Runtime.unit_of_work): the list of its held-back writes so far. While the
# session has no connection they are collected there, without the pool's
# checkout, the write lock or SQLAlchemy's transaction (issue 17); if
# nothing else connects it, sqlite_groups.commit_collected() sends them with BEGIN
# IMMEDIATE and COMMIT in one hop. Anything that connects the session
# (a read, a statement not held back, an ORM flush, a savepoint) first
# hands them to its transaction (hand_over), in order, ahead of its own
# statement: what it writes is then written as it would have been without.
COLLECTED = "sqlite_collected"


def _collect(
    session: AsyncSession, statement: ClauseElement, params: dict[str, Any], options: Mapping[str, Any]
) -> bool:
    """hold_back() into the session's COLLECTED writes, if it collects and
    has not connected yet."""
    collected: list[sqlite_driver.Statement] | None = session.info.get(COLLECTED)
    if collected is None or session.sync_session.in_transaction():
        return False
    bind = session.sync_session.bind
    if not isinstance(bind, Engine) or bind.dialect.name != "sqlite":
        return False
    bound = _bound(session, bind, _shape(bind.dialect, statement, tuple(params)), params, None)
    if bound is None:
        return False
    shape, parameters = bound
    collected.append(_held(shape.sql, parameters, options))
    return True


def hand_over(session: Any, _transaction: Any, connection: Connection) -> None:
    """An ``after_begin`` listener of the server's sessions (db.Session):
    a session that collected writes (COLLECTED) connects; they go first in
    its transaction's held-back writes, and it collects no more."""
    collected: list[sqlite_driver.Statement] | None = session.info.pop(COLLECTED, None)
    if not collected:
        return
    driver: object = connection.connection.dbapi_connection
    assert isinstance(driver, sqlite_driver.OneHopConnection) and driver.transaction_open, "collected on SQLite"
    driver.held_back[:0] = collected


# Session.info key of a collecting session (COLLECTED) that is a provider
# run's end on a SQLite file (Runtime.grouped_writes): its writes go in the
# group queued for the write lock (sqlite_groups), and its run log appends
# are numbered before it holds the lock (RunLog.append: another append of
# the run withdraws it from its group while unsent). Like a raw
# transaction's, its session never connects (db.SyncSession refuses it).
GROUPED = "sqlite_grouped_end"

# session.info's key of a session that never connects and writes nothing
# (execute.take_started: a folded run's first prompt): a read through it
# raises RawSessionConnected, and its caller reads elsewhere instead (SQLite,
# the create committed: a WAL reader, RunExecution._first_prompt; PostgreSQL,
# the create's statement out: a session gated until it has committed).
READS_ELSEWHERE = "reads_elsewhere"


# Session.info key of a SQLite transaction run on a connection checked out
# of the pool raw, outside the session (db.RawTransaction: the worker's
# claim, Runtime.claiming): its Raw. The session never connects (it would
# wait for the write lock its own transaction holds; db.SyncSession refuses
# it): its held-back writes join the raw driver's, its run_now statements
# go straight to that driver.
RAW = "sqlite_raw_transaction"


class Raw(NamedTuple):
    """The driver connection of a raw transaction (RAW), and how to
    invalidate it (the pooled connection's) when it is lost."""

    driver: sqlite_driver.OneHopConnection
    invalidate: Callable[[BaseException | None], None]


# Session.info key of a PostgreSQL unit of work (Runtime.unit_of_work) whose
# one statement may run in autocommit on a connection checked out of the
# pool raw (run_log.append's ``last_statement``; issue 17): None until the
# append checks one out (db.autocommit_connection), then its PostgresRaw.
# Its run_now statement goes straight to that connection, without the
# session's connection, transaction and commit (0.1-0.2 ms of loop CPU a
# unit: bench/README, branch pgraw); the unit of work gives it back.
PG_AUTOCOMMIT = "postgres_autocommit"


class PostgresRaw(NamedTuple):
    """A PostgreSQL connection checked out raw, in autocommit (PG_AUTOCOMMIT):
    the pooled connection (its invalidate() when it is lost) and asyncpg's adapter."""

    pooled: PoolProxiedConnection
    adapted: AsyncAdapt_asyncpg_connection


async def _raw_declined(session: AsyncSession) -> None:
    """A statement run_now declines (session.execute's to run) while the
    unit holds a raw connection (PG_AUTOCOMMIT; none of run_log's do
    today): the raw connection goes back to its pool out of autocommit (it
    sent nothing) and the session connects in autocommit, so that the
    statement goes on one connection, not a second pooled one beside it,
    still its own transaction; the unit of work then commits the session's
    way (nothing to send)."""
    raw: PostgresRaw = session.info[PG_AUTOCOMMIT]
    session.info[PG_AUTOCOMMIT] = None
    raw.adapted.autocommit = False
    await greenlet_spawn(raw.pooled.close)  # into its pool (closed if it overflows)
    await session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})


def _raw_bound(
    session: AsyncSession, statement: ClauseElement, params: dict[str, Any]
) -> tuple[Raw, _Shape, tuple[Any, ...]] | None:
    """``statement`` with ``params`` for the session's raw transaction
    (RAW), told to the engine's ``before_cursor_execute`` listeners; None
    where the session has none or the statement does not fit (then
    ``session.execute``, which the raw session refuses: a loud bug)."""
    raw: Raw | None = session.info.get(RAW)
    if raw is None:
        return None
    bind = session.sync_session.bind
    assert isinstance(bind, Engine) and bind.dialect.name == "sqlite", "a raw transaction on SQLite"
    bound = _bound(session, bind, _shape(bind.dialect, statement, tuple(params)), params, None)
    return None if bound is None else (raw, *bound)


def _held(sql: str, parameters: tuple[Any, ...], options: Mapping[str, Any]) -> sqlite_driver.Statement:
    return sqlite_driver.Statement(
        sql,
        parameters,
        False,
        options.get(sqlite_driver.RETURNED_ROWS_TO),
        options.get(sqlite_driver.EXPECT_ROWCOUNT),
        options.get(sqlite_driver.ROWCOUNT_MISMATCH),
    )


async def hold_back(
    session: AsyncSession, statement: ClauseElement, params: dict[str, Any], options: Mapping[str, Any]
) -> bool:
    """Add ``statement`` with ``params``, executed with ``options``
    (db.WRITE_BEHIND and its companions), to the writes the session's
    SQLite transaction sends with its next statement or COMMIT; False, and
    nothing done, where ``session.execute`` must do it (see the module).
    ``statement`` must be built once (cached), or a text() construct.
    A session that collects (COLLECTED) and has not connected keeps it there."""
    if _collect(session, statement, params, options):
        return True
    if RAW in session.info:
        found = _raw_bound(session, statement, params)
        if found is None:
            return False
        raw, shape, parameters = found
        raw.driver.held_back.append(_held(shape.sql, parameters, options))
        return True
    straight = await _straight(session, statement, params)
    if straight is None:
        return False
    straight.driver.held_back.append(_held(straight.shape.sql, straight.parameters, options))
    return True


# Each result column's name and its type's result processor, by shape and
# the driver's column types (PostgreSQL's oids; None on SQLite).
_RESULTS: dict[tuple[SQLCompiler, tuple[int, ...] | None], tuple[tuple[str, Callable[[Any], Any] | None], ...]] = {}


def _results(
    dialect: Dialect, compiled: SQLCompiler, coltypes: tuple[int, ...] | None = None
) -> tuple[tuple[str, Callable[[Any], Any] | None], ...]:
    """The statement's result columns (a RETURNING's or a SELECT's) as
    SQLAlchemy's cursor result takes them: by name, each value through its
    type's result processor (JSON decoded by the dialect's deserializer,
    booleans from integers), chosen for the driver's type of the column
    where the dialect asks (``coltypes``: PostgreSQL's type oids, which
    pick a float's or a numeric's processor)."""
    # By the driver's types too: a column's type changed under a running
    # server (a migration) picks its new processor.
    found = _RESULTS.get((compiled, coltypes))
    if found is None:
        if len(_RESULTS) >= _MOST_SHAPES:
            _RESULTS.clear()
        types = coltypes or (None,) * len(compiled._result_columns)
        found = _RESULTS[compiled, coltypes] = tuple(
            (column.keyname, column.type._cached_result_processor(dialect, coltype))
            for column, coltype in zip(compiled._result_columns, types, strict=True)
        )
    return found


async def run_now(
    session: AsyncSession, statement: ClauseElement, params: dict[str, Any]
) -> list[dict[str, Any]] | None:
    """``statement`` with ``params`` run at once in the session's SQLite
    transaction straight on the driver, in the hop that carries the
    transaction's deferred BEGIN and held-back writes, without SQLAlchemy's
    execution (issue 17: the claim's UPDATE ... RETURNING); on PostgreSQL
    straight on asyncpg (_run_now_postgres): its rows, each
    by column name, their values as SQLAlchemy's result gives them; None,
    and nothing done, where ``session.execute`` must run it (see the
    module). A failure is SQLAlchemy's error for it (sqlalchemy.exc's
    IntegrityError, OperationalError...), as from ``session.execute``; the
    transaction is then the caller's to roll back, as after any failed
    statement. ``statement`` must be built once (cached)."""
    bind = session.sync_session.bind
    if isinstance(bind, Engine) and bind.dialect.name == "postgresql":
        found_rows = await _run_now_postgres(session, bind, statement, params)
        if found_rows is None and isinstance(session.info.get(PG_AUTOCOMMIT), PostgresRaw):
            await _raw_declined(session)
        return found_rows
    assert isinstance(bind, Engine)
    if _names_repeat(bind.dialect, statement, params):
        return None  # rows by column name would lose a column (as _run_now_postgres), told before anything is done
    if RAW in session.info:
        found = _raw_bound(session, statement, params)
        if found is None:
            return None
        raw, shape, parameters = found
        driver, invalidate = raw
    else:
        straight = await _straight(session, statement, params)
        if straight is None:
            return None
        shape, parameters, driver, invalidate = (
            straight.shape,
            straight.parameters,
            straight.driver,
            straight.connection.invalidate,
        )
    columns = _results(bind.dialect, shape.compiled)
    brief = isinstance(statement, Executable) and bool(statement.get_execution_options().get(sqlite_driver.BRIEF))
    _description, _rowcount, _lastrowid, rows = await sent(
        driver.send(sqlite_driver.Statement(shape.sql, parameters, False, brief=brief)),
        shape.sql,
        parameters,
        bind.dialect,
        invalidate,
    )
    return [
        {
            name: value if process is None else process(value)
            for (name, process), value in zip(columns, row, strict=True)
        }
        for row in rows
    ]


def _names_repeat(dialect: Dialect, statement: ClauseElement, params: dict[str, Any]) -> bool:
    """Whether two of ``statement``'s result columns have one name (its
    shape cached, as the steps after it find it again; a statement with no
    shape is declined by those steps)."""
    shape = None if isinstance(statement, TextClause) else _shape(dialect, statement, tuple(params))
    if shape is None:
        return False
    columns = _results(dialect, shape.compiled)
    return len({name for name, _process in columns}) != len(columns)


async def _run_now_postgres(
    session: AsyncSession, bind: Engine, statement: ClauseElement, params: dict[str, Any]
) -> list[dict[str, Any]] | None:
    """run_now() on PostgreSQL: the statement as SQLAlchemy's asyncpg cursor
    sends it (the transaction's BEGIN first if not sent yet, the connection's
    cached prepared statement, one round trip for the statement), without
    the execution context, cursor, result and greenlet of
    ``session.execute`` (issue 17: the claim's statement, once per claim).
    None where ``session.execute`` must run it: a shape SQLAlchemy renders
    per call, a text() statement, result columns of the same name, a
    transaction no longer active, a connection not asyncpg's. It follows
    the adapter's private steps (``_execute_mutex``, ``_start_transaction``,
    ``_prepare``, ``_handle_exception``, the dialect's schema-cache stamp)
    as SQLAlchemy's pinned version has them: an upgrade must check them
    against ``AsyncAdapt_asyncpg_cursor._prepare_and_execute``."""
    if isinstance(statement, TextClause):
        return None  # its result columns are not known before it runs
    shape = _shape(bind.dialect, statement, tuple(params))
    if shape is None or not session.sync_session.is_active:
        return None
    names = [column.keyname for column in shape.compiled._result_columns]
    if len(set(names)) != len(names):
        return None  # rows by column name would lose a column
    raw: PostgresRaw | None = session.info.get(PG_AUTOCOMMIT)
    connection: Connection | None = None
    invalidate: Callable[[BaseException | None], None]
    if raw is not None:  # autocommit on a raw connection: no BEGIN (begin_sql), no session transaction
        adapted: object = raw.adapted
        invalidate = raw.pooled.invalidate
    else:
        # (Its checkout may ping or connect; the BEGIN is sent with the statement, the adapter's lazy begin.)
        connection = await _active_connection(session, bind)
        if connection is None:
            return None
        adapted = connection.connection.dbapi_connection
        invalidate = connection.invalidate
    if not isinstance(adapted, AsyncAdapt_asyncpg_connection):
        return None
    bound = _bound(session, bind, shape, params, connection)
    if bound is None:
        return None
    sql, parameters, dialect = shape.sql, bound[1], bind.dialect
    fetched = _fetched_on_asyncpg(adapted, sql, parameters, dialect)
    # (A cancellation, as SQLAlchemy's execution on an exit exception: the
    # statement may still be running, its outcome unread; the connection goes with it.)
    records, attributes = await sent(fetched, sql, parameters, dialect, invalidate, adapted)
    columns = _results(dialect, shape.compiled, tuple(attribute.type.oid for attribute in attributes))
    return [
        {
            name: value if process is None else process(value)
            for (name, process), value in zip(columns, record, strict=True)
        }
        for record in records
    ]


async def _fetched_on_asyncpg(
    adapted: AsyncAdapt_asyncpg_connection, sql: str, parameters: tuple[Any, ...], dialect: Dialect
) -> tuple[list[Any], Any]:
    """_run_now_postgres()'s statement on asyncpg, as the adapter's cursor
    sends it: its records and their attributes; a failure is the adapter's
    DB-API error for it."""
    dbapi = dialect.loaded_dbapi
    try:
        async with adapted._execute_mutex:  # as the adapter's cursor: one statement at a time
            begin = asyncpg_begin.begin_sql(adapted, dialect) if adapted._transaction is None else None
            if adapted._transaction is None and begin is None:
                await adapted._start_transaction()  # type: ignore[no-untyped-call]  # (raises the adapter's error)
            try:
                invalidated_at = dialect._invalidate_schema_cache_asof  # type: ignore[attr-defined]
                prepared, attributes = await adapted._prepare(sql, invalidated_at)  # type: ignore[no-untyped-call]
                if begin is None:
                    return await prepared.fetch(*parameters), attributes
                # The BEGIN goes with the statement (issue 17: a round trip fewer).
                asyncpg_begin.write_begin(adapted, begin)
                return await asyncpg_begin.fetched(adapted, prepared, parameters), attributes
            except Exception as error:
                adapted._handle_exception(error)  # the adapter's DB-API error for it, as its cursor raises
    except (dbapi.InvalidCachedStatementError, dbapi.InternalServerError):
        # A prepared statement a schema change made stale ("cached plan
        # must not change result type"): every connection prepares its
        # statements again from now on, as SQLAlchemy's asyncpg execution
        # context does on this error; else run_now would reuse it forever.
        dialect._invalidate_schema_cache()  # type: ignore[attr-defined]
        raise


T = TypeVar("T")


async def sent(
    hop: Awaitable[T],
    sql: str,
    parameters: tuple[Any, ...] | None,
    dialect: Dialect,
    invalidate: Callable[[BaseException | None], None],
    driver_connection: object = None,
) -> T:
    """``hop`` (a statement or transaction sent straight to the driver,
    outside SQLAlchemy's execution: run_now on SQLite and on PostgreSQL,
    sqlite_groups.commit_collected, db.commit_straight, db.RawTransaction.commit),
    failing as SQLAlchemy's
    execution fails. A driver error is SQLAlchemy's error for it
    (DBAPIError.instance: IntegrityError, OperationalError...); a lost
    connection (``driver_connection``, the DB-API connection the dialect
    asks about, if it needs one) is invalidated (``invalidate``: the
    Connection's or the pooled connection's) and its error says so
    (connection_invalidated: answered 503, as from ``session.execute``),
    never handed back to the pool as it is. A cancellation invalidates the
    connection too, as SQLAlchemy does for an exit exception: the statement
    may still be running, its outcome unread (on SQLite the connection's
    thread may still be about to run what was sent, a BEGIN IMMEDIATE among
    it, after any rollback here would have found nothing to undo); closed,
    it takes that with it."""
    try:
        return await hop
    except asyncio.CancelledError:
        await greenlet_spawn(invalidate, None)
        raise
    except Exception as error:
        orig = _driver_error(dialect, error)
        if orig is None:
            raise
        lost = dialect.is_disconnect(orig, driver_connection, None)  # type: ignore[arg-type]
        if lost:
            await greenlet_spawn(invalidate, orig)
        raise worded(orig, sql, parameters, dialect, lost=lost) from error


def worded(
    error: Exception,
    sql: str | None,
    parameters: Sequence[Any] | Mapping[str, Any] | None,
    dialect: Dialect,
    *,
    lost: bool = False,
) -> Exception:
    """``error``, raised by a hop running ``sql``, as sent() raises it: a
    driver error as SQLAlchemy's error for it (DBAPIError.instance:
    IntegrityError, OperationalError...; ``lost``: its connection
    invalidated), any other as it is (sqlite_groups._send_group words its members'
    failures so, each as it would fail alone)."""
    orig = _driver_error(dialect, error)
    if orig is None:
        return error
    return sa_exc.DBAPIError.instance(
        sql, parameters, orig, dialect.loaded_dbapi.Error, dialect=dialect, connection_invalidated=lost
    )


def _driver_error(dialect: Dialect, error: Exception) -> Exception | None:
    """The dialect's DB-API error that ``error``, raised by a hop, is or
    stands for; None if it is not the driver's (raised as it is). (SQLite's
    DB-API errors are sqlite3's.)"""
    if isinstance(error, dialect.loaded_dbapi.Error):
        return error
    if dialect.name == "sqlite" and isinstance(error, ValueError):
        # aiosqlite's connection closed under us, worded as SQLAlchemy's adapter words it.
        return sqlite3.OperationalError(*error.args)
    return None


async def write_behind(
    session: AsyncSession, statement: ClauseElement, params: dict[str, Any], options: Mapping[str, Any]
) -> int:
    """The write, held back (hold_back) or else executed with ``options``
    (``session.execute``: PostgreSQL, or what hold_back leaves to it); its
    rowcount, -1 when held back."""
    if await hold_back(session, statement, params, options):
        return -1
    result = await session.execute(cast(Executable, statement), params, execution_options=options)
    return int(getattr(result, "rowcount", -1))
