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

Only where the adapter's BEGIN would be the plain one this module writes
(read committed or another named level; not in autocommit). It follows
private steps of SQLAlchemy's adapter (``_transaction``, ``isolation_level``,
``readonly``, ``deferrable``) and of asyncpg (``Connection._transport``,
``_top_xact``, ``Transaction._state``) as the pinned versions have them: an
upgrade must check them against ``AsyncAdapt_asyncpg_connection.
_start_transaction`` and ``asyncpg.transaction.Transaction.start``.
"""

from __future__ import annotations

import struct
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_connection

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
    batch (asyncpg parses its statements into named ones, and binds the
    unnamed portal afresh each time)."""
    parse = _message(b"P", b"\0" + begin.encode() + b"\0" + struct.pack("!h", 0))
    bind = _message(b"B", b"\0\0" + struct.pack("!hhh", 0, 0, 0))
    execute = _message(b"E", b"\0" + struct.pack("!i", 0))
    return parse + bind + execute


def begin_sql(adapted: AsyncAdapt_asyncpg_connection) -> str | None:
    """The BEGIN the adapter's _start_transaction() would send, or None
    where it sends none (autocommit) or one this module does not write, or
    where the connection is closed or closing (the adapter's own BEGIN then
    fails as it always has: a lost connection, 503)."""
    level = adapted.isolation_level
    if level == "autocommit" or level not in _ISOLATION:
        return None
    connection: Any = adapted._connection
    if connection.is_closed() or connection._transport is None or connection._transport.is_closing():
        return None
    return (
        "BEGIN"
        + _ISOLATION[level]
        + (" READ ONLY" if adapted.readonly else "")
        + (" DEFERRABLE" if adapted.deferrable else "")
    )


def write_begin(adapted: AsyncAdapt_asyncpg_connection, begin: str) -> None:
    """Write ``begin`` to the connection, to go with the statement asyncpg
    sends next, and mark the adapter's transaction started (its COMMIT or
    ROLLBACK ends it, whatever the statement's outcome). Call with the
    adapter's ``_execute_mutex`` held, no transaction begun, right before
    that statement's bind-execute, nothing awaited in between."""
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
    BEGIN. A failure that came with the batch's answer (the server's error,
    its ReadyForQuery saying the block is aborted) leaves the block to the
    adapter's ROLLBACK. One without it (asyncpg refusing a parameter before
    the statement went, which it words as the server's DataError) leaves that
    BEGIN unsynced on the server, where asyncpg's next exchange would meet
    its answers: the connection is closed then, so that SQLAlchemy
    invalidates it (its ROLLBACK finds it closed) and it never goes back to
    the pool."""
    connection: Any = adapted._connection
    try:
        return await prepared.fetch(*parameters)  # type: ignore[no-any-return]
    except Exception:
        if not connection.is_in_transaction():
            connection.terminate()
        raise
