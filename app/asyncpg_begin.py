"""A PostgreSQL transaction's BEGIN sent with its first statement (issue 17).

SQLAlchemy's asyncpg adapter begins a transaction lazily, before the first
statement, with asyncpg's ``Transaction.start()``: a simple query of its
own, a round trip (the server's backend woken, this process woken again)
before the statement can go. held_back.run_now's statements (the worker's
claim first of all) begin their transaction here instead: the BEGIN goes
as extended-protocol messages (Parse, Bind, Execute of the unnamed
statement, no Sync) written just ahead of the statement's own Bind,
Execute and Sync, so both reach the server in one write and come back in
one answer. The server runs them in order as one batch: the BEGIN opens the
transaction block, the statement runs in it, and the Sync after it leaves
the block open (its ReadyForQuery says "in a transaction"). asyncpg reads
that answer as the statement's (it skips ParseComplete and BindComplete in
a bind-execute, and the statement's CommandComplete comes after BEGIN's),
and the adapter is handed the asyncpg transaction as ``start()`` would have
left it, so its COMMIT and ROLLBACK go as before.

Only where the adapter's BEGIN would be a plain one at the level the
connection starts its transactions at (the dialect's default, or none
named), never DEFERRABLE: the statement's prepare, when it is not cached
yet, goes before the BEGIN (Parse, Describe, Flush, no Sync), which leaves
an implicit transaction open on the server at that default level; the
written BEGIN joins it, and PostgreSQL refuses to set another level, or
DEFERRABLE, after a query ("must be called before any query"). READ ONLY
may still be set then. Elsewhere the adapter's own BEGIN goes first, as
before. It follows private steps of SQLAlchemy's adapter (``_transaction``, ``isolation_level``,
``readonly``, ``deferrable``) and of asyncpg (``Connection._transport``,
``_top_xact``, ``Transaction._state``) as the pinned versions have them: an
upgrade must check them against ``AsyncAdapt_asyncpg_connection.
_start_transaction`` and ``asyncpg.transaction.Transaction.start``. With
``statement_cache_size=0`` (pgbouncer) asyncpg's statements are unnamed
too: the BEGIN's Parse replaces one, and asyncpg parses it again in its
bind-execute (an upgrade must keep that: tests/runner/test_run_now_postgres.py).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # asyncpg itself is imported where it is used: a SQLite server never loads it (idle RSS)
    from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_connection
    from sqlalchemy.engine import Dialect

# asyncpg's isolation names, as Transaction.start() writes them into its BEGIN.
_ISOLATION = {
    None: "",
    "read_committed": " ISOLATION LEVEL READ COMMITTED",
    "read_uncommitted": " ISOLATION LEVEL READ UNCOMMITTED",
    "repeatable_read": " ISOLATION LEVEL REPEATABLE READ",
    "serializable": " ISOLATION LEVEL SERIALIZABLE",
}


def _message(kind: bytes, body: bytes) -> bytes:
    """One frontend message: its type byte, its length (itself included), its body."""
    return kind + struct.pack("!i", len(body) + 4) + body


def _messages(begin: str) -> bytes:
    """Parse, Bind and Execute of ``begin`` as the unnamed statement and
    portal, with no Sync: the statement's own Sync, written next, ends the
    batch (asyncpg binds the unnamed portal afresh each time; a statement
    of its own that is unnamed, with ``statement_cache_size=0``, it parses
    again in the same bind-execute, after this one)."""
    parse = _message(b"P", b"\0" + begin.encode() + b"\0" + struct.pack("!h", 0))
    bind = _message(b"B", b"\0\0" + struct.pack("!hhh", 0, 0, 0))
    execute = _message(b"E", b"\0" + struct.pack("!i", 0))
    return parse + bind + execute


def begin_sql(adapted: AsyncAdapt_asyncpg_connection, dialect: Dialect) -> str | None:
    """The BEGIN the adapter's _start_transaction() would send, or None
    where it sends none (autocommit), or one this module must not write (a
    level other than the connection's default, DEFERRABLE: see above), or
    where asyncpg already has a transaction (its own guard in
    ``Transaction.start``), or where the connection is closed or closing
    (the adapter's own BEGIN then fails as it always has: a lost
    connection, 503)."""
    level = adapted.isolation_level
    default = dialect._isolation_lookup.get(dialect.default_isolation_level)  # type: ignore[attr-defined]
    if level not in (None, default) or level not in _ISOLATION or adapted.deferrable:
        return None
    connection: Any = adapted._connection
    if connection.is_closed() or connection._transport is None or connection._transport.is_closing():
        return None
    if connection.is_in_transaction() or connection._top_xact is not None:
        return None
    return "BEGIN" + _ISOLATION[level] + (" READ ONLY" if adapted.readonly else "")


def write_begin(adapted: AsyncAdapt_asyncpg_connection, begin: str) -> None:
    """Write ``begin`` to the connection, to go with the statement asyncpg
    sends next, and mark the adapter's transaction started (its COMMIT or
    ROLLBACK ends it, whatever the statement's outcome). Call with the
    adapter's ``_execute_mutex`` held, no transaction begun, right before
    that statement's bind-execute, nothing awaited in between."""
    import asyncpg  # type: ignore[import-untyped]  # (loaded already: the connection is asyncpg's)

    assert adapted._transaction is None, "a transaction begun already"
    connection: Any = adapted._connection
    if connection.is_closed() or connection._transport.is_closing():
        # Lost since begin_sql() (the statement's prepare awaited): as
        # asyncpg words it, which the dialect takes for a lost connection.
        raise asyncpg.exceptions.InterfaceError("connection is closed")
    started = connection.transaction(
        isolation=adapted.isolation_level, readonly=adapted.readonly, deferrable=adapted.deferrable
    )
    connection._transport.write(_messages(begin))
    connection._top_xact = started
    started._state = asyncpg.transaction.TransactionState.STARTED
    adapted._transaction = started


async def fetched(adapted: AsyncAdapt_asyncpg_connection, prepared: Any, parameters: tuple[Any, ...]) -> list[Any]:
    """``prepared``'s rows, its bind-execute going right after write_begin()'s
    BEGIN. A failure that came with the batch's answer after the BEGIN
    opened its block (the statement's error; the ReadyForQuery says the
    block is aborted) leaves the block to the adapter's ROLLBACK. Any other
    leaves no block open: asyncpg refusing a parameter before the statement
    went (worded as the server's DataError) leaves the BEGIN unsynced on the
    server, where asyncpg's next exchange would meet its answers; the BEGIN
    itself refused (only a plain one is written: not seen in practice)
    leaves nothing to roll back. The connection is closed then, so that
    SQLAlchemy invalidates it (its ROLLBACK finds it closed; a 503, as a
    lost connection) and it never goes back to the pool."""
    connection: Any = adapted._connection
    try:
        return await prepared.fetch(*parameters)  # type: ignore[no-any-return]
    except Exception:
        if not connection.is_in_transaction():
            connection.terminate()
        raise
