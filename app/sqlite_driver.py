"""SQLAlchemy's aiosqlite adapter, with one thread hop per statement (issue 17).

aiosqlite runs sqlite3 on a thread of its own; every call is a hop there and
back (a queue put, a thread wake-up, a wake-up of the event loop). The stock
adapter makes four for each statement (open a cursor, execute, fetch, close)
and one more for the pool's rollback after every commit: a run's 20-odd
statements cost about 80 hops, a few milliseconds of CPU. Here a statement's
execute, fetch and close go as one call to the sqlite3 thread, and the
rollback is skipped when no transaction is open (sqlite3's own rollback does
nothing then). sqlite3 still never runs on the event loop's thread, so a
statement waiting for SQLite's lock (the busy timeout) freezes nothing.

Built on aiosqlite's queue (``Connection._execute``, ``_conn``), as
SQLAlchemy's adapter is; aiosqlite is pinned in pyproject.toml.

One exception (``OneHopDBAPI(inline_wait_ms=...)``, a poll's reads,
db.create_poll_engine): a read-only connection whose statements run on the
event loop's thread, no hop at all, with SQLite's busy timeout at 0. A WAL
reader takes only a shared read mark and, but in rare cases (another
connection recovering the WAL, a writer in exclusive locking mode), waits for
nobody; there SQLite mostly answers "busy" at once, and the statement is sent
to the connection's own thread to wait as any other would. Not absolute:
SQLite's own short retries while it takes a read mark (walTryBeginRead) sleep
on the calling thread whatever the busy timeout, and a reader can rebuild the
WAL index after a crash; both are rare, and the writer, which opens the file
first at start-up, normally does the rebuilding.

A second exception (``COMMITS_ON_LOOP``): a writer's transaction runs on
the event loop's thread while the process is lone (app/activity.py: one
request and one run at most), when the loop has nothing else to do while it
waits for the hop: a transaction held back to its COMMIT, whole, or one whose
first statement is sent before (a brief one, ``BRIEF``: a run's create on a
thread reads the thread), from that statement on. Its BEGIN IMMEDIATE meets a busy timeout of
0 there (another process's lock: the transaction goes to the thread to wait,
as before); once it holds the write lock no statement of it waits for
another connection. SQLite's automatic WAL checkpoint, whose fsyncs could
take long on a slow disk, is off for the COMMITs made there, left to the
commits that still go to the thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import sqlite3
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import aiosqlite
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
    AsyncAdapt_aiosqlite_dbapi,
    AsyncAdapt_aiosqlite_ss_cursor,
)
from sqlalchemy.util import await_only as await_

from app.activity import ACTIVITY

# What a statement leaves for the cursor: description, rowcount, lastrowid, rows.
_Outcome = tuple[Any, int, int | None, list[Any]]

_T = TypeVar("_T")


class Statement(NamedTuple):
    """A statement for the sqlite3 thread; a held-back one (WRITE_BEHIND)
    may say where its returned rows go and how many rows it must change;
    ``brief`` (BRIEF): a lone process may run it on the event loop's thread."""

    operation: str
    parameters: Any
    many: bool
    rows_to: list[Any] | None = None
    rowcount: int | None = None
    mismatch: type[HeldBackWriteMismatch] | None = None
    brief: bool = False


class HeldBackWriteMismatch(sqlite3.IntegrityError):
    """A held-back write changed another number of rows than it was sent
    with (EXPECT_ROWCOUNT): its transaction fails, as a compare-and-set
    that finds nothing to change must. A subclass given as ROWCOUNT_MISMATCH
    says which write it was."""


class RoutineMismatch(HeldBackWriteMismatch):
    """A miss its writer expects and handles (it retries or reads the row
    again): a stale assistant's defaults, a run moved by someone else. Not
    one of the writes that cannot miss (a miss there is a bug, a warning)."""


def raised_within(error: BaseException, kinds: type[BaseException] | tuple[type[BaseException], ...]) -> bool:
    """Whether ``error`` (a failed COMMIT or statement, as SQLAlchemy wraps
    it: the driver's exception as ``orig``, or as a cause or context) is or
    carries one of ``kinds`` (a ROWCOUNT_MISMATCH subclass, say)."""
    seen: BaseException | None = error
    walked: set[int] = set()  # a chain may loop back on itself
    while seen is not None and id(seen) not in walked:
        if isinstance(seen, kinds):
            return True
        walked.add(id(seen))
        seen = getattr(seen, "orig", None) or seen.__cause__ or seen.__context__
    return False


def _execute(cursor: sqlite3.Cursor, statement: Statement) -> None:
    operation, parameters, many, rows_to, rowcount, mismatch, _brief = statement
    if many:
        cursor.executemany(operation, parameters)
    elif parameters is None:
        cursor.execute(operation)
    else:
        cursor.execute(operation, parameters)
    if rows_to is not None:
        rows_to.extend(cursor.fetchall())
    if rowcount is not None and cursor.rowcount != rowcount:
        raise (mismatch or HeldBackWriteMismatch)(
            f"a held-back write changed {cursor.rowcount} rows, not {rowcount}: {operation}"
        )


def _run(connection: sqlite3.Connection, begin: str | None, earlier: list[Statement], statement: Statement) -> _Outcome:
    """On aiosqlite's thread: the transaction's deferred BEGIN if any, the
    writes held back for this hop (WRITE_BEHIND), then the whole statement,
    its rows read and its cursor closed."""
    cursor = connection.cursor()
    try:
        if begin is not None:
            cursor.execute(begin)
        for held in earlier:
            _execute(cursor, held)
        _execute(cursor, statement)
        description = cursor.description
        rows = cursor.fetchall() if description else []
        return description, cursor.rowcount, cursor.lastrowid, rows
    finally:
        cursor.close()


def _run_waiting(connection: sqlite3.Connection, statement: Statement, wait_ms: int) -> _Outcome:
    """On aiosqlite's thread: an inline connection's statement that SQLite
    found busy, run again with a busy timeout, which is then set back to 0."""
    connection.execute(f"PRAGMA busy_timeout={int(wait_ms)}")
    try:
        return _run(connection, None, [], statement)
    finally:
        # A failed reset (a broken connection) must not hide the statement's own error.
        with contextlib.suppress(sqlite3.Error):
            connection.execute("PRAGMA busy_timeout=0")


def _is_busy(error: sqlite3.OperationalError) -> bool:
    # SQLITE_BUSY and its extended codes (_RECOVERY, _SNAPSHOT, _TIMEOUT).
    return (getattr(error, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_BUSY


def _commit(
    connection: sqlite3.Connection,
    begin: str | None,
    earlier: list[Statement],
    told: Callable[[], object] | None = None,
) -> None:
    """On aiosqlite's thread: what the transaction still holds back, then
    COMMIT; on failure rolled back here, so that SQLite's lock is gone by the
    time the next transaction of this process is let in. Committed, ``told``
    (_told_on) is called."""
    try:
        if earlier:
            _begin(connection, begin, earlier)
        connection.commit()
    except BaseException:
        if connection.in_transaction:
            connection.rollback()
        raise
    if told is not None:
        told()


def _commit_on_loop(
    connection: sqlite3.Connection, begin: str, earlier: list[Statement], settings: tuple[int, int]
) -> bool:
    """On the event loop's thread (OneHopConnection._commits_here): a whole
    transaction, ``begin`` (BEGIN IMMEDIATE), ``earlier``, COMMIT, rolled
    back here on failure (its error raised), as _commit does on aiosqlite's
    thread. False if another process holds SQLite's write lock: nothing has
    run (_begun_on_loop), and the caller sends the same job to the thread,
    which waits under the timeout. ``settings``: the connection's own busy
    timeout and checkpoint threshold (_commit_begun_on_loop)."""
    if not _begun_on_loop(connection, begin, settings):
        return False
    _commit_begun_on_loop(connection, earlier, settings)
    return True


def _begun_on_loop(connection: sqlite3.Connection, begin: str, settings: tuple[int, int]) -> bool:
    """On the event loop's thread: ``begin`` (BEGIN IMMEDIATE), under a busy
    timeout of 0 (the loop never waits for a lock; ``settings[0]``, the
    connection's own, set back after it). False if another process holds
    SQLite's write lock: the BEGIN is answered "busy" at once, nothing has
    run, and the caller sends it to the thread to wait there."""
    connection.execute("PRAGMA busy_timeout=0")
    try:
        connection.execute(begin)
    except sqlite3.OperationalError as error:
        if _is_busy(error) and not connection.in_transaction:
            return False
        raise
    finally:
        # A failed reset (a broken connection) must not hide the BEGIN's own error.
        with contextlib.suppress(sqlite3.Error):
            connection.execute(f"PRAGMA busy_timeout={int(settings[0])}")
    return True


def _commit_begun_on_loop(connection: sqlite3.Connection, earlier: list[Statement], settings: tuple[int, int]) -> None:
    """On the event loop's thread, in a transaction begun there
    (_begun_on_loop, which holds the write lock: nothing here waits for
    another connection): ``earlier``, COMMIT, rolled back here on failure
    (its error raised), as _commit does on aiosqlite's thread. SQLite's
    automatic WAL checkpoint (a copy to the database file and two fsyncs,
    and a wait for readers under the busy timeout) is off for this COMMIT,
    its busy timeout 0 (``settings``, the connection's own, set back after
    it): the checkpoint runs in a commit on the thread
    (_LOOP_COMMITS_BETWEEN_THREAD_COMMITS)."""
    busy_timeout_ms, autocheckpoint_pages = settings
    connection.execute("PRAGMA busy_timeout=0")
    connection.execute("PRAGMA wal_autocheckpoint=0")
    try:
        _commit(connection, None, earlier)
    finally:
        # A failed reset (a broken connection) must not hide the commit's own error.
        with contextlib.suppress(sqlite3.Error):
            connection.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            connection.execute(f"PRAGMA wal_autocheckpoint={int(autocheckpoint_pages)}")


def _told_on(callback: Callable[[], None]) -> Callable[[], object]:
    """``callback`` for a commit on aiosqlite's thread to call once it has
    committed: called on the running event loop ahead of the hop's answer,
    which aiosqlite posts once the commit returns (issue 17: the write lock
    handed on a turn of the loop earlier than by the committing task once it
    has resumed)."""
    return functools.partial(asyncio.get_running_loop().call_soon_threadsafe, callback)


def _commit_each(
    connection: sqlite3.Connection, begin: str, transactions: list[list[Statement]], told: Callable[[], object]
) -> list[Exception | None]:
    """On aiosqlite's thread: several collected transactions as one (issue
    17: sqlite_groups.commit_collected's group), ``begin``, then each in a savepoint of
    its own, COMMIT: each one's failure (its error, a DB-API one or
    another raised by a statement, such as a parameter's binding; else
    None), a failing one rolled back to its savepoint alone, as it would
    have been alone;
    all committed, ``told`` called (_told_on); else the group's task frees
    the lock once each has its outcome. An error that ends SQLite's
    transaction whole (it rolls back on some I/O, full-disk or busy
    errors), a failing savepoint statement or COMMIT fails them all:
    everything rolled back here, the error raised."""
    failures: list[Exception | None] = []
    try:
        cursor = connection.cursor()
        try:
            cursor.execute(begin)
            for statements in transactions:
                cursor.execute("SAVEPOINT collected")
                try:
                    for statement in statements:
                        _execute(cursor, statement)
                except Exception as error:
                    # A statement-level failure (a constraint, or a parameter
                    # that cannot be bound: OverflowError for an int beyond 64
                    # bits, UnicodeEncodeError) leaves the transaction open:
                    # its own is undone alone. One that ended it fails all.
                    if not connection.in_transaction:
                        raise
                    cursor.execute("ROLLBACK TO collected")
                    failures.append(error)
                else:
                    failures.append(None)
                cursor.execute("RELEASE collected")
        finally:
            cursor.close()
        connection.commit()
    except BaseException:
        if connection.in_transaction:
            connection.rollback()
        raise
    if not any(failures):
        # Only when all committed: a failed one's caller undoes what it
        # took in memory (RunLog.rolled_back: the log's counter, deltas
        # back in the buffer) once told, and the next holder of the lock
        # must not number before that (the group's task frees the lock
        # after setting every outcome).
        told()
    return failures


# The execution option that lets a write go to SQLite with the transaction's
# next statement or its COMMIT instead of a hop of its own (issue 17): for
# INSERTs and UPDATEs whose outcome (rowcount, lastrowid) nobody reads and
# whose failure may surface at that later statement (it still fails the
# transaction). PostgreSQL ignores it.
WRITE_BEHIND = "sqlite_write_behind"
# With WRITE_BEHIND: a list that receives the rows the write returns
# (RETURNING) once it has run, by the time its transaction commits.
RETURNED_ROWS_TO = "sqlite_returned_rows_to"
# With WRITE_BEHIND: the number of rows the write must change, else it fails
# (HeldBackWriteMismatch) and its transaction with it: a compare-and-set
# whose caller knows it cannot miss, checked all the same.
EXPECT_ROWCOUNT = "sqlite_expect_rowcount"
# With EXPECT_ROWCOUNT: the HeldBackWriteMismatch subclass raised instead,
# by which the caller knows its own write's failure at the COMMIT.
ROWCOUNT_MISMATCH = "sqlite_rowcount_mismatch"
# The execution option of a statement known to be brief (a few rows found
# by an index, such as a run's create reading its thread): in a lone
# process's writer transaction it runs on the event loop's thread, and a
# transaction it begins is begun there (COMMITS_ON_LOOP). A statement
# without it always goes to aiosqlite's thread: its cost is not known (a
# delete's cascade, a scan), and the loop must not wait for it.
BRIEF = "sqlite_brief"


def hold_back_marked_writes(
    _connection: Any, cursor: Any, _statement: str, _parameters: Any, context: Any, _executemany: bool
) -> None:
    """A ``before_cursor_execute`` listener: marks the cursor of a statement
    executed with WRITE_BEHIND or BRIEF (app/db.py registers it)."""
    if isinstance(cursor, OneHopCursor) and context is not None:
        options = context.execution_options
        cursor.brief = bool(options.get(BRIEF))
        if options.get(WRITE_BEHIND):
            cursor.write_behind = True
            cursor.rows_to = options.get(RETURNED_ROWS_TO)
            cursor.expect_rowcount = options.get(EXPECT_ROWCOUNT)
            cursor.mismatch = options.get(ROWCOUNT_MISMATCH)


# A lone process's commit (app/activity.py: one request and one run at
# most) runs on the event loop's thread, which would otherwise sit idle
# for the hop to aiosqlite's thread and back (issue 17: about 0.1 ms of
# wake-ups a commit, two commits a run, and their CPU): only a transaction
# sent whole (its BEGIN IMMEDIATE not sent yet) and small (this many rows
# at most: a run's create or end, not a file's postings), on a connection
# with nothing in flight on its thread. When the process serves more, its
# commits stay on the thread, which then runs SQLite beside the loop.
LOOP_COMMIT_MOST_ROWS = 64
# False: every commit goes to aiosqlite's thread (the tests of that path set it).
COMMITS_ON_LOOP = True
# Commits on the loop's thread run no WAL checkpoint (_commit_on_loop);
# after this many, the next eligible one goes to the thread all the same,
# where SQLite checkpoints once the WAL has passed its threshold (a run
# writes ~40 pages; the threshold is 1,000).
_LOOP_COMMITS_BETWEEN_THREAD_COMMITS = 8
_IMMEDIATE_BEGINS = frozenset({"BEGIN IMMEDIATE", "BEGIN EXCLUSIVE"})


def _rows(statements: list[Statement]) -> int:
    return sum(len(statement.parameters) if statement.many else 1 for statement in statements)


# Statements that open a transaction, deferred to the transaction's first statement.
_BEGINS = frozenset({"BEGIN", "BEGIN IMMEDIATE", "BEGIN DEFERRED", "BEGIN EXCLUSIVE"})
# Savepoint statements whose outcome nobody reads: inside a transaction they
# go with the next statement or the COMMIT (``session.begin_nested()`` around
# one INSERT is then one hop, not three). ROLLBACK TO SAVEPOINT goes at once.
_SAVEPOINT_STATEMENTS = ("SAVEPOINT ", "RELEASE SAVEPOINT ")


class OneHopCursor(AsyncAdapt_aiosqlite_cursor):
    """A buffered cursor: each execute is one hop and leaves every row here."""

    __slots__ = (
        "_arraysize",
        "_outcome_description",
        "_outcome_lastrowid",
        "_outcome_rowcount",
        "brief",
        "expect_rowcount",
        "mismatch",
        "rows_to",
        "write_behind",
    )

    def __init__(self, adapt_connection: Any) -> None:  # no aiosqlite cursor is opened
        self._adapt_connection = adapt_connection
        self._connection = adapt_connection._connection
        self._cursor = None  # type: ignore[assignment]
        self._soft_closed_memoized = {}  # type: ignore[assignment]
        self._rows = collections.deque()
        self._outcome_description: Any = None
        self._outcome_rowcount = -1
        self._outcome_lastrowid: int | None = None
        self._arraysize = 1
        self.write_behind = False  # the next statement may wait for the next hop
        self.brief = False  # the next statement is BRIEF
        self.rows_to: list[Any] | None = None  # with write_behind: RETURNED_ROWS_TO
        self.expect_rowcount: int | None = None  # with write_behind: EXPECT_ROWCOUNT
        self.mismatch: type[HeldBackWriteMismatch] | None = None  # with write_behind: ROWCOUNT_MISMATCH

    @property
    def description(self) -> Any:
        return self._outcome_description

    @property
    def rowcount(self) -> int:
        return self._outcome_rowcount

    @property
    def lastrowid(self) -> int:
        return self._outcome_lastrowid  # type: ignore[return-value]

    @property
    def arraysize(self) -> int:
        return self._arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._arraysize = value

    async def _async_soft_close(self) -> None:
        """Nothing to close: the statement's cursor closed on the sqlite3 thread."""

    def close(self) -> None:
        self._rows.clear()

    async def _execute_async(self, operation: Any, parameters: Any) -> Any:
        await self._send(operation, parameters, many=False)

    async def _executemany_async(self, operation: Any, seq_of_parameters: Any) -> Any:
        await self._send(operation, seq_of_parameters, many=True)

    async def _send(self, operation: Any, parameters: Any, *, many: bool) -> None:
        adapted: OneHopConnection = self._adapt_connection  # type: ignore[assignment]
        bare = not many and parameters in (None, ())
        if bare and operation in _BEGINS and not adapted.transaction_open:
            # Sent with the transaction's first statement (one hop fewer per
            # transaction); SQLite takes the lock before that statement runs.
            adapted.begin_deferred = operation
            adapted.transaction_open = True
            self._set_outcome(None, -1, None, [])
            return
        statement = Statement(operation, parameters, many, brief=self.brief)
        self.brief = False
        if self.write_behind:
            self.write_behind = False
            statement = statement._replace(rows_to=self.rows_to, rowcount=self.expect_rowcount, mismatch=self.mismatch)
            self.rows_to = self.expect_rowcount = self.mismatch = None
            if adapted.transaction_open:  # inside a transaction: only there may it wait
                adapted.held_back.append(statement)
                self._set_outcome(None, -1, None, [])
                return
        elif (
            bare
            and adapted.transaction_open
            and operation.startswith(_SAVEPOINT_STATEMENTS)
            and not (operation.startswith("SAVEPOINT ") and adapted.held_back)
        ):
            # A SAVEPOINT behind held-back writes goes at once with them: one
            # of them failing must fail the begin_nested() outside the nested
            # block, not its first statement, whose handler would then roll
            # back to a savepoint SQLite never saw ("no such savepoint").
            adapted.held_back.append(statement)
            self._set_outcome(None, -1, None, [])
            return
        if adapted.inline_wait_ms is not None:
            connection: aiosqlite.Connection = self._connection  # type: ignore[assignment]
            self._set_outcome(*await self._run_inline(adapted, connection, statement))
            return
        self._set_outcome(*await adapted.send(statement))

    async def _run_inline(
        self, adapted: OneHopConnection, connection: aiosqlite.Connection, statement: Statement
    ) -> _Outcome:
        """The statement on this thread (an inline connection: no hop); if
        SQLite is busy, again on the connection's thread with a timeout."""
        begin, adapted.begin_deferred = adapted.begin_deferred, None
        earlier, adapted.held_back = adapted.held_back, []
        wait_ms = adapted.inline_wait_ms
        assert wait_ms is not None
        try:
            return _run(connection._conn, begin, earlier, statement)
        except sqlite3.OperationalError as error:
            # Outside a transaction a busy statement did nothing: safe to send again.
            if not _is_busy(error) or begin is not None or earlier or connection._conn.in_transaction:
                raise
        async with adapted._execute_mutex:
            outcome: _Outcome = await connection._execute(  # type: ignore[no-untyped-call]
                _run_waiting, connection._conn, statement, wait_ms
            )
        return outcome

    def _set_outcome(self, description: Any, rowcount: int, lastrowid: int | None, rows: list[Any]) -> None:
        self._outcome_description, self._outcome_rowcount, self._outcome_lastrowid = description, rowcount, lastrowid
        self._rows = collections.deque(rows)


def _begin(connection: sqlite3.Connection, begin: str | None, earlier: list[Statement]) -> None:
    cursor = connection.cursor()
    try:
        if begin is not None:
            cursor.execute(begin)
        for held in earlier:
            _execute(cursor, held)
    finally:
        cursor.close()


class ServerSideCursor(AsyncAdapt_aiosqlite_ss_cursor):
    """SQLAlchemy's streaming cursor (``session.stream()``), which sends a
    deferred BEGIN (and held-back writes) first: its statement must run
    inside the transaction, after them."""

    __slots__ = ()

    async def _execute_async(self, operation: Any, parameters: Any) -> Any:
        adapted: OneHopConnection = self._adapt_connection  # type: ignore[assignment]
        if adapted.begin_deferred is not None or adapted.held_back:
            connection: aiosqlite.Connection = self._connection  # type: ignore[assignment]
            async with adapted._execute_mutex:
                begin, adapted.begin_deferred = adapted.begin_deferred, None
                earlier, adapted.held_back = adapted.held_back, []
                await connection._execute(_begin, connection._conn, begin, earlier)  # type: ignore[no-untyped-call]
        return await super()._execute_async(operation, parameters)


class OneHopConnection(AsyncAdapt_aiosqlite_connection):
    __slots__ = (
        "begin_deferred",
        "held_back",
        "inline_wait_ms",
        "loop_commits",
        "on_loop",
        "on_transaction_end",
        "own_settings",
        "transaction_open",
    )

    _cursor_cls = OneHopCursor
    _ss_cursor_cls = ServerSideCursor

    def __init__(self, dbapi: Any, connection: Any) -> None:
        super().__init__(dbapi, connection)
        # A BEGIN not sent yet: it goes with the next statement.
        self.begin_deferred: str | None = None
        # From the transaction's BEGIN (sent or not) to its COMMIT or ROLLBACK.
        self.transaction_open = False
        # Writes of this transaction not sent yet (WRITE_BEHIND): they go,
        # in order, with the next statement or the COMMIT.
        self.held_back: list[Statement] = []
        # Called once the transaction's COMMIT or ROLLBACK has run on the
        # sqlite3 thread (or failed): app/db.py's SQLiteWriters hands the
        # write lock on only then. SQLAlchemy's commit and rollback events
        # fire *before* the statement is sent, and a transaction let in then
        # met SQLite's lock still held and slept in its busy handler (naps of
        # 1 to 100 ms; issue 17).
        self.on_transaction_end: Callable[[], None] | None = None
        # Set for an inline connection (its statements run on the caller's
        # thread; busy: sent to its own thread to wait this long).
        self.inline_wait_ms: int | None = None
        # Commits made on the loop's thread since the last one sent to
        # aiosqlite's (_commits_here), and the busy timeout and WAL
        # checkpoint threshold _commit_on_loop sets back (read once).
        self.loop_commits = 0
        self.own_settings: tuple[int, int] | None = None
        # This transaction's BEGIN IMMEDIATE ran on the event loop's thread
        # with its first statement (send(): a lone process's transaction
        # that reads, briefly, before it writes): while the process stays
        # lone, its brief statements (BRIEF), its COMMIT and its ROLLBACK
        # run there too (_stays_here()).
        self.on_loop = False

    def _commits_here(self, begin: str | None, earlier: list[Statement]) -> bool:
        """Whether this transaction, its BEGIN IMMEDIATE (``begin``) not sent
        yet, begins on the event loop's thread with ``earlier`` (its COMMIT's
        whole job, or a brief first statement: send()), and commits there
        (LOOP_COMMIT_MOST_ROWS): small, nothing in flight on the
        connection's thread, the process lone; not every time
        (_LOOP_COMMITS_BETWEEN_THREAD_COMMITS)."""
        if (
            not COMMITS_ON_LOOP
            or begin not in _IMMEDIATE_BEGINS
            or self.inline_wait_ms is not None
            or not self._stays_here(earlier)
        ):
            return False
        if self.loop_commits >= _LOOP_COMMITS_BETWEEN_THREAD_COMMITS:
            self.loop_commits = 0
            return False
        self.loop_commits += 1
        return True

    def _committed_on_loop(self, begin: str, earlier: list[Statement]) -> bool:
        """_commit_on_loop() of this connection: False if it is to go to the thread after all."""
        return _commit_on_loop(self._sqlite(), begin, earlier, self._settings())

    def _stays_here(self, statements: list[Statement]) -> bool:
        """Whether ``statements`` may run on the loop's thread: small,
        nothing in flight on the connection's thread (a hop cancelled midway
        invalidates its connection instead: held_back.sent), the process
        lone. For a transaction begun there (``on_loop``), else they go to
        the thread, as any transaction's (its lock held: they wait for
        nothing there either); _commits_here() asks it of a BEGIN's."""
        return not self._execute_mutex.locked() and ACTIVITY.lone() and _rows(statements) <= LOOP_COMMIT_MOST_ROWS

    def _sqlite(self) -> sqlite3.Connection:
        adapted: aiosqlite.Connection = self._connection  # type: ignore[assignment]
        return adapted._conn

    def _settings(self) -> tuple[int, int]:
        """The connection's own busy timeout and WAL checkpoint threshold,
        which the loop's thread sets aside for a BEGIN or a COMMIT (read once)."""
        if self.own_settings is None:
            connection = self._sqlite()
            busy_timeout = connection.execute("PRAGMA busy_timeout").fetchone()[0]
            self.own_settings = (busy_timeout, connection.execute("PRAGMA wal_autocheckpoint").fetchone()[0])
        return self.own_settings

    def begin_later(self, operation: str) -> None:
        """Open a transaction whose BEGIN (``operation``) goes with its first
        statement, as a BEGIN executed through SQLAlchemy would (OneHopCursor),
        without that execution's cursor, context and events (issue 17: about
        a tenth of a one-statement transaction's CPU; app/db.py's
        SQLiteWriters.begin). Only outside a transaction (``transaction_open``
        false): a BEGIN inside one is SQLite's to refuse, sent as usual."""
        self.begin_deferred = operation
        self.transaction_open = True

    async def send(self, statement: Statement) -> _Outcome:
        """``statement`` in one hop to the sqlite3 thread, after the
        transaction's deferred BEGIN and held-back writes: its outcome, its
        rows read and its cursor closed there. A BEGIN or held-back write
        that fails (SQLite busy past its timeout, a constraint) fails this
        statement, and with it the transaction, as it would have alone.
        The cursor's execute, and app/held_back.py's run_now() without a
        cursor (issue 17); not for an inline connection. A brief statement
        (BRIEF) of a lone process's transaction runs on the event loop's
        thread instead, no hop (``on_loop``)."""
        begin = self.begin_deferred
        # A lone process's transaction whose first statement, brief, is sent
        # before its COMMIT (issue 17: a run's create on a thread reads the
        # thread first): begun here, the hop to the thread and back saved for
        # it and, while the process stays lone, for its COMMIT and its other
        # brief statements. (If another process holds the lock, the BEGIN,
        # still to run, goes to the thread with the statement, and waits there.)
        if (
            statement.brief
            and begin is not None
            and self._commits_here(begin, [*self.held_back, statement])
            and _begun_on_loop(self._sqlite(), begin, self._settings())
        ):
            self.begin_deferred = None
            self.on_loop = True
        if self.on_loop and statement.brief and self._stays_here([*self.held_back, statement]):
            earlier, self.held_back = self.held_back, []
            return _run(self._sqlite(), None, earlier, statement)
        connection: aiosqlite.Connection = self._connection  # type: ignore[assignment]
        async with self._execute_mutex:
            begin, self.begin_deferred = self.begin_deferred, None
            earlier, self.held_back = self.held_back, []
            outcome: _Outcome = await connection._execute(  # type: ignore[no-untyped-call]
                _run, connection._conn, begin, earlier, statement
            )
        return outcome

    async def commit_now(self, begin: str, statements: list[Statement], committed: Callable[[], None]) -> None:
        """A whole transaction in one hop, outside SQLAlchemy's: ``begin``,
        ``statements``, COMMIT; rolled back there if any fails (its error
        raised here). ``committed`` is called on the event loop once the
        thread has committed, ahead of this coroutine's return (_told_on).
        Only on a connection in no transaction (checked out of the pool
        raw: sqlite_groups.commit_collected)."""
        await self._outside(_commit, begin, statements, committed)

    async def commit_each(
        self, begin: str, transactions: list[list[Statement]], committed: Callable[[], None]
    ) -> list[Exception | None]:
        """commit_now() of several transactions as one, in one hop: each
        one's failure (None: written), as _commit_each() runs them; a
        failure of them all raised here."""
        return await self._outside(_commit_each, begin, transactions, committed)

    async def _outside(self, run: Callable[..., _T], begin: str, payload: object, committed: Callable[[], None]) -> _T:
        """``run(connection, begin, payload, told)`` on aiosqlite's thread, a
        transaction outside SQLAlchemy's (commit_now, commit_each), its
        outcome; ``committed`` told on the loop (_told_on)."""
        assert not self.transaction_open and not self.held_back, "a transaction of SQLAlchemy's is open"
        if run is _commit and self._commits_here(begin, payload) and self._committed_on_loop(begin, payload):  # type: ignore[arg-type]
            committed()
            return None  # type: ignore[return-value]
        connection: aiosqlite.Connection = self._connection  # type: ignore[assignment]
        told = _told_on(committed)
        async with self._execute_mutex:
            outcome: _T = await connection._execute(run, connection._conn, begin, payload, told)  # type: ignore[no-untyped-call]
        return outcome

    async def commit_straight(self, *, on_thread: bool = False) -> None:
        """The transaction's COMMIT, awaited on the event loop: the held-back
        writes and COMMIT in one hop, rolled back there if one fails, the
        raw error raised (held_back.sent words it as SQLAlchemy would). The
        body of commit() too, which runs it through SQLAlchemy's greenlet;
        app/db.py's commit_straight and RawTransaction.commit call it
        without (issue 17). The transaction is over either way. The write
        lock is handed on (on_transaction_end) once the thread has committed,
        ahead of this coroutine's return (_told_on). A failed COMMIT leaves
        it to the caller's rollback() (or the pool's reset) or
        db.RawTransaction.end(), which Runtime calls once it has undone the
        transaction's run log appends (a writer let in before would number
        its appends after the failed ones'); a COMMIT
        that lost its connection is invalidated (held_back.sent; SQLAlchemy
        for commit()), whose close() hands the lock on, after the undo
        (db.lost_after_undo; db.commit_seen_through's ``undo``). A cancellation hands
        nothing on here: the COMMIT may still be running on the thread, and
        SQLite's lock with it, so the hand-on is left to what waits for the
        thread: held_back.sent's invalidation, whose close() runs after it
        and calls on_transaction_end then. ``on_thread``: a transaction held
        back to its COMMIT goes to the thread even where a lone process's
        would run on the loop's (COMMITS_ON_LOOP): the run log's flush,
        made while a model streams, when the loop has its tokens to read."""
        began_on_loop = self.on_loop
        job = self._commit_job()
        if job is not None:
            sqlite, begin, earlier = job
            if began_on_loop and self._stays_here(earlier):
                # (A failure is left to the caller's rollback, as below.)
                _commit_begun_on_loop(sqlite, earlier, self._settings())
                self._ended()
                return
            if not on_thread and self._commits_here(begin, earlier) and self._committed_on_loop(begin, earlier):  # type: ignore[arg-type]
                self._ended()
                return
            connection: aiosqlite.Connection = self._connection  # type: ignore[assignment]
            # No callback to post (a wake-up of the loop per commit) when no one is to be told.
            told = None if self.on_transaction_end is None else _told_on(self._told())
            async with self._execute_mutex:
                await connection._execute(_commit, *job, told)  # type: ignore[no-untyped-call]
        self._ended()

    def _told(self) -> Callable[[], None]:
        """What commit_straight() calls on the loop once its thread has
        committed: the transaction's on_transaction_end, if it is still
        this transaction's (_ended() has not called it)."""
        ending = self.on_transaction_end

        def told() -> None:
            if ending is not None and self.on_transaction_end is ending:
                self.on_transaction_end = None
                ending()

        return told

    def _commit_job(self) -> tuple[sqlite3.Connection, str | None, list[Statement]] | None:
        """The transaction, no longer open, as the arguments of the _commit
        that ends it; None if nothing of it ran (its BEGIN not sent: nothing
        to commit). A connection closed under a transaction that ran
        something (its BEGIN sent, or writes held back) raises "no active
        connection", as a lost connection does (SQLAlchemy invalidates it):
        what the transaction did is lost, never reported committed."""
        opened = self.transaction_open
        begin, earlier = self._ending()
        if begin is not None and not earlier:
            return None
        connection: aiosqlite.Connection = self._connection  # type: ignore[assignment]
        if connection._connection is None:
            if opened or earlier:
                raise ValueError("no active connection")
            return None
        return connection._conn, begin, earlier

    def _ended(self) -> None:
        callback, self.on_transaction_end = self.on_transaction_end, None
        if callback is not None:
            callback()

    def _ending(self) -> tuple[str | None, list[Statement]]:
        """The transaction's deferred BEGIN and held-back writes, taken for
        its COMMIT: it is no longer open."""
        begin, self.begin_deferred = self.begin_deferred, None
        earlier, self.held_back = self.held_back, []
        self.transaction_open = False
        self.on_loop = False
        return begin, earlier

    def commit(self) -> None:
        try:
            if self.inline_wait_ms is None:
                # A failed COMMIT (session.commit(), a Connection's commit)
                # leaves the write lock to the rollback, or the pool's reset
                # when the connection is given back without one (its reset
                # event frees it: db.SQLiteWriters.listen): Runtime undoes a
                # logged transaction's run log appends first (_roll_back). A
                # writer let in at the failure would number its appends after
                # the failed ones.
                await_(self.commit_straight())
                return
            try:  # an inline connection: on this thread
                job = self._commit_job()
                if job is not None:
                    _commit(*job)
            finally:
                self._ended()
        except Exception as error:
            self._handle_exception(error)

    def close(self) -> None:
        try:
            super().close()
        finally:
            # What was sent has run (or the thread is stopped): a transaction
            # still open, its commit cancelled under it, hands the write lock
            # on only now (the pool's invalidate and close events, which fire
            # before the close, leave it to this; app/db.py's SQLiteWriters).
            self._ended()

    def terminate(self) -> None:
        try:
            super().terminate()
        finally:
            self._ended()  # as close()

    def rollback(self) -> None:
        # The pool rolls back every connection it gets back, even after a
        # commit; sqlite3 does nothing then, so neither does the hop.
        here = self.on_loop and self._stays_here([])
        self.begin_deferred = None
        self.held_back = []
        self.transaction_open = False
        self.on_loop = False
        connection: aiosqlite.Connection = self._connection  # type: ignore[assignment]
        try:
            if connection._connection is not None and connection.in_transaction:
                if self.inline_wait_ms is not None or here:
                    connection._conn.rollback()
                else:
                    super().rollback()
        finally:
            self._ended()


class OneHopDBAPI(AsyncAdapt_aiosqlite_dbapi):
    """The DB-API module handed to create_async_engine(module=...). With
    ``inline_wait_ms``, its connections run their statements on the calling
    thread (for read-only connections with a busy timeout of 0: see the
    module's docstring), waiting that long on their own thread when busy."""

    def __init__(self, inline_wait_ms: int | None = None) -> None:
        super().__init__(aiosqlite, sqlite3)
        self.inline_wait_ms = inline_wait_ms

    def connect(self, *arg: Any, **kw: Any) -> OneHopConnection:
        # Opened on aiosqlite's thread, used on the event loop's too: an
        # inline connection's statements, another's lone commits
        # (_commits_here), each only while nothing runs on its thread.
        kw["check_same_thread"] = False
        connection = aiosqlite.connect(*arg, **kw)
        connection._thread.daemon = True  # as SQLAlchemy's adapter: never blocks the interpreter's exit
        adapted = OneHopConnection(self, await_(connection))
        adapted.inline_wait_ms = self.inline_wait_ms
        return adapted
