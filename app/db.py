"""Engine and sessionmaker for SQLite (aiosqlite, WAL) and PostgreSQL (asyncpg),
and migrating the schema with Alembic on start. SQLite's process-wide write
lock is here too, with the raw connections written under it; the commits of
collected transactions grouped under that lock are app/sqlite_groups.py's."""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import logging
import math
import re
import sqlite3
import time
import weakref
from collections.abc import Callable, Coroutine, Mapping
from contextlib import suppress
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from sqlalchemy import event, orm, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_connection
from sqlalchemy.engine import URL, Connection, Engine, ExceptionContext, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool, Pool, PoolProxiedConnection, QueuePool
from sqlalchemy.util import await_only as await_
from sqlalchemy.util import greenlet_spawn

from app import eager, held_back, sqlite_driver
from app.wire import jsontext

if TYPE_CHECKING:
    from alembic.config import Config

# Shipped inside the package, so an installed server migrates without the repository.
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

log = logging.getLogger("app.db")

# PostgreSQL LISTEN/NOTIFY channel: "there is work" (a queued run, a file to
# ingest), from API replicas to standalone workers in other processes.
WORK_CHANNEL = "assistants_work"

# Execution options of a write that may go to SQLite with its transaction's
# next statement or COMMIT rather than alone (see sqlite_driver.WRITE_BEHIND):
# ``statement.execution_options(**db.WRITE_BEHIND)``.
WRITE_BEHIND = {sqlite_driver.WRITE_BEHIND: True}
# A statement known to be brief (a few rows found by an index), which a lone
# process's SQLite transaction may run on the event loop's thread, with its
# BEGIN if it is the first (see sqlite_driver.BRIEF): ``.execution_options(**db.BRIEF)``.
BRIEF = {sqlite_driver.BRIEF: True}
# With WRITE_BEHIND: a list that receives the rows the write returns once it
# has run (by its transaction's COMMIT at the latest).
RETURNED_ROWS_TO = sqlite_driver.RETURNED_ROWS_TO
# With WRITE_BEHIND: the rows the write must change, else its transaction
# fails (sqlite_driver.HeldBackWriteMismatch, an IntegrityError).
EXPECT_ROWCOUNT = sqlite_driver.EXPECT_ROWCOUNT
# With EXPECT_ROWCOUNT: the sqlite_driver.HeldBackWriteMismatch subclass its
# transaction fails with then, naming the write.
ROWCOUNT_MISMATCH = sqlite_driver.ROWCOUNT_MISMATCH
# ``hold_back(session, statement, params, options)``: such a write added to
# the SQLite transaction's held-back writes without SQLAlchemy's execution
# (app/held_back.py); False where ``session.execute`` must send it.
hold_back = held_back.hold_back
# ``write_behind(...)``: the same write held back, or else executed; its rowcount (-1: held back).
write_behind = held_back.write_behind
# Session.info key: a SQLite transaction's writes collected before it
# connects (held_back.COLLECTED, Runtime.unit_of_work).
COLLECTED = held_back.COLLECTED
GROUPED = held_back.GROUPED
READS_ELSEWHERE = held_back.READS_ELSEWHERE
# Session.info key: the session's transaction is a RawTransaction's (held_back.RAW).
RAW = held_back.RAW
PG_AUTOCOMMIT = held_back.PG_AUTOCOMMIT
# ``run_now(session, statement, params)``: a statement whose rows are wanted
# now, sent straight to the driver (SQLite's, with the transaction's
# held-back writes; asyncpg's, through SQLAlchemy's adapter: app/held_back.py);
# None where ``session.execute`` must run it.
run_now = held_back.run_now

# Execution options of a PostgreSQL connection whose statements each run
# as a transaction of their own (no BEGIN, no COMMIT: a round trip each;
# issue 17): ``session.connection(execution_options=db.AUTOCOMMIT)`` or
# ``connection.execution_options(**db.AUTOCOMMIT)``. SQLAlchemy resets the
# connection's isolation level when it goes back to the pool.
AUTOCOMMIT: Mapping[str, str] = MappingProxyType({"isolation_level": "AUTOCOMMIT"})  # shared: read-only

# How long a SQLite transaction waits for another writer's lock before
# failing with "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 30_000


class DatabaseURLError(ValueError):
    """A database URL the server cannot use; the message says what to write."""


# The async drivers the server is built on, per backend.
DRIVERS = {"sqlite": "aiosqlite", "postgresql": "asyncpg"}

# asyncpg's connect() options that take numbers. SQLAlchemy hands a
# PostgreSQL URL's query to asyncpg as strings, and asyncpg compares them
# with numbers: ``?statement_cache_size=0`` (the setting pgbouncer's
# transaction mode needs) failed every connection with a TypeError.
ASYNCPG_NUMBER_OPTIONS: Mapping[str, type[int] | type[float]] = MappingProxyType(
    {
        "statement_cache_size": int,
        "max_cached_statement_lifetime": int,
        "max_cacheable_statement_size": int,
        "command_timeout": float,
        "timeout": float,
    }
)


def validate_url(url: str) -> None:
    """Refuse, with the URL to write instead, what create_engine would fail
    on later (and less clearly): a missing async driver above all."""
    try:
        parsed = make_url(url)
    except Exception:  # SQLAlchemy's ArgumentError, or ValueError for a bad port
        raise DatabaseURLError(
            "cannot parse the database URL: write sqlite+aiosqlite:///PATH "
            "or postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DATABASE"
        ) from None
    backend = "postgresql" if parsed.get_backend_name() in ("postgres", "postgresql") else parsed.get_backend_name()
    if backend not in DRIVERS:
        raise DatabaseURLError(
            f"unsupported database {parsed.drivername!r}: use sqlite+aiosqlite:///PATH "
            "or postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DATABASE"
        )
    driver = DRIVERS[backend]
    if parsed.drivername != f"{backend}+{driver}":
        fixed = parsed.set(drivername=f"{backend}+{driver}").render_as_string(hide_password=True)
        raise DatabaseURLError(
            f"the database URL must name the async driver {driver}: "
            f"write {backend}+{driver}:// instead of {parsed.drivername}:// (e.g. {fixed})"
        )
    if backend == "postgresql":
        asyncpg_numbers(parsed)


def asyncpg_numbers(url: URL) -> dict[str, int | float]:
    """The numeric asyncpg options of a PostgreSQL URL's query, as numbers
    (create_engine passes them as connect_args, which take precedence over
    the query's strings); DatabaseURLError for one that is not a number ≥ 0."""
    numbers: dict[str, int | float] = {}
    for name, kind in ASYNCPG_NUMBER_OPTIONS.items():
        given = url.query.get(name)
        if given is None:
            continue
        text = given if isinstance(given, str) else given[-1]  # (repeated: asyncpg would get the last)
        try:
            value = kind(text)
        except ValueError:
            value = -1
        # asyncpg refuses a timeout of 0 (command_timeout) or times out at
        # once (timeout): seconds must be more than 0, and finite.
        if not (0 <= value < math.inf if kind is int else 0 < value < math.inf):  # (NaN: neither)
            what = "a whole number ≥ 0" if kind is int else "a number of seconds > 0"
            raise DatabaseURLError(f"the database URL's {name} must be {what}, not {text!r}")
        numbers[name] = value
    return numbers


@functools.cache
def is_sqlite(url: str) -> bool:
    # Remembered: a poll's read asks it per request, and parsing the URL
    # was 4 % of a GET's CPU (issue 17). A process has one or two URLs.
    return make_url(url).get_backend_name() == "sqlite"


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # SQLAlchemy, not the sqlite3 module, opens transactions (see
    # _sqlite_begin): the module's own BEGIN comes only before the first
    # write, which leaves a transaction's reads outside it.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # The busy timeout first, so that even the pragmas below wait for a
    # writer instead of failing with "database is locked". WAL lets readers
    # run while the worker writes; foreign keys make the thread ->
    # messages/runs cascade real.
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class _WriteLock:
    """A first-come, first-served asyncio lock that can also be taken without
    awaiting when free (``try_acquire``): SQLiteWriters.begin runs inside
    SQLAlchemy's greenlet, where awaiting even an uncontended
    ``asyncio.Lock.acquire()`` is a switch to the event loop's side and back
    (issue 17). A release hands the lock straight to the first waiter, so a
    newcomer's ``try_acquire`` never overtakes those queued."""

    def __init__(self) -> None:
        self._held = False
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def try_acquire(self) -> bool:
        if self._held or self._waiters:
            return False
        self._held = True
        return True

    def idle(self) -> bool:
        return not self._held and not self._waiters

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed over, then cancelled before it ran: pass it on
            else:
                with suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        assert self._held, "the SQLite write lock released while not held"
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():  # a cancelled waiter is skipped
                waiter.set_result(None)  # still held: now by that waiter
                return
        self._held = False


class SQLiteWriters:
    """Every SQLite transaction takes the write lock up front (issue 10);
    a unit of held-back writes alone (it reads and checks nothing) takes it
    with the others of its group, for their one hop
    (sqlite_groups.commit_collected).

    A transaction that checks then writes ("no live run on this thread",
    "the run is still requires_action") is then atomic: no other writer runs
    between its check and its write. And it never fails halfway: a deferred
    transaction that read first and writes later gets SQLITE_BUSY at once,
    without waiting, when another writer committed in between, whereas
    BEGIN IMMEDIATE waits for the lock under the busy timeout. SQLite has one
    writer at a time anyway; readers queue behind short writes.

    The transactions of this process queue on an asyncio lock first, in
    order, rather than polling SQLite's lock through the busy handler, whose
    naps grow to 100 ms (15 requests queued behind a held lock took a second
    to drain that way). Other processes still meet the busy timeout.

    So on SQLite, code must never open a transaction while it holds another
    (in the same task): the second would wait for the first, up to the
    timeout, and then fail with "database is locked".
    """

    _HOLDS = "sqlite_write_lock"

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._lock = _WriteLock()

    def begin(self, connection: Connection) -> None:
        # Read before the lock is taken: on a connection invalidated under it,
        # either may reconnect and raise, and a lock taken before would then
        # be held with no record of its holder, for good.
        info = connection.info
        driver: object = connection.connection.dbapi_connection
        if self._HOLDS in info:
            # Still held by this connection's last transaction: its COMMIT
            # failed, which leaves the lock to the rollback, and the
            # Connection's rollback found SQLAlchemy's transaction inactive
            # and sent the driver nothing (the Connection used again, not
            # given back: no reset). That transaction has ended; the lock
            # is handed on, then waited for in turn, not for good.
            self.release(info)
        if not self._lock.try_acquire():
            await_(self.hold())
        holder = object()  # this transaction's hold, not a later one's on the same connection
        info[self._HOLDS] = holder
        if isinstance(driver, sqlite_driver.OneHopConnection):
            # Handed on once the COMMIT or ROLLBACK has run, not before it
            # is sent (see sqlite_driver.OneHopConnection.on_transaction_end).
            driver.on_transaction_end = functools.partial(self.release, info, holder)
            if not driver.transaction_open:
                # Sent with the first statement, as an executed BEGIN would
                # be, without SQLAlchemy's execution around it.
                driver.begin_later("BEGIN IMMEDIATE")
                return
        try:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            self.release(info)
            raise

    async def hold(self) -> None:
        """Take the write lock, waiting in turn: begin(), whose free lock is
        taken without this await, and raw_write_connection() (a group's
        hop, a RawTransaction: transactions SQLAlchemy does not run, whose
        HeldLock frees it once)."""
        if self._lock.try_acquire():
            return
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
            # cancellation that arrives as the lock is granted.
            async with asyncio.timeout(self.timeout):
                await self._lock.acquire()
        except TimeoutError:
            # Worded and typed like SQLite's own refusal, so that it is answered alike.
            refusal = sqlite3.OperationalError("database is locked (by this process's other transactions)")
            raise sa_exc.OperationalError("BEGIN IMMEDIATE", None, refusal) from None

    def idle(self) -> bool:
        """Whether the write lock is free with nobody queued for it (a
        writer that asks now takes it at once)."""
        return self._lock.idle()

    def free(self) -> None:
        self._lock.release()

    def release(self, info: dict[Any, Any], holder: object | None = None) -> None:
        """At the transaction's end, however it ends (commit, rollback, or a
        connection reset, invalidated or closed under it): idempotent. With
        ``holder``, only that transaction's hold is released."""
        held = info.get(self._HOLDS)
        if held is not None and (holder is None or held is holder):
            del info[self._HOLDS]
            self._lock.release()

    def listen(self, engine: AsyncEngine) -> None:
        def at_end(connection: Connection) -> None:
            # Else released by the COMMIT or ROLLBACK itself once it has run
            # (our driver), or, the connection invalidated, by the pool's
            # invalidate event or our driver's close() (_releases_itself).
            if not connection.invalidated and not _releases_itself(connection.connection.dbapi_connection):
                self.release(connection.info)

        def reset(dbapi: Any, record: Any, _state: Any) -> None:
            if isinstance(dbapi, sqlite_driver.OneHopConnection):
                # Freed below: the reset may send the driver no ROLLBACK
                # (a session closed after its failed COMMIT, SQLAlchemy's
                # transaction over), and a pooled connection carries no
                # transaction's callback on (_releases_itself would take
                # it for one still running).
                dbapi.on_transaction_end = None
            self.release(record.info)

        def invalidate(dbapi: Any, record: Any, _exception: Any) -> None:
            if not _releases_itself(dbapi):
                self.release(record.info)

        def close(dbapi: Any, record: Any) -> None:
            if not _releases_itself(dbapi):
                self.release(record.info)

        sync = engine.sync_engine
        event.listen(sync, "begin", self.begin)
        event.listen(sync, "commit", at_end)
        event.listen(sync, "rollback", at_end)
        event.listen(sync.pool, "reset", reset)
        event.listen(sync.pool, "invalidate", invalidate)
        event.listen(sync.pool, "close", close)


def _releases_itself(dbapi: object) -> bool:
    """Whether the driver connection releases its transaction's write lock
    itself (OneHopConnection.on_transaction_end): once its COMMIT or
    ROLLBACK has run, and, closed by the pool, once closed
    (OneHopConnection.close: its thread may still be running the
    transaction's COMMIT, cancelled under it, and SQLite's lock with it).
    The pool's invalidate and close events fire before the close."""
    return isinstance(dbapi, sqlite_driver.OneHopConnection) and dbapi.on_transaction_end is not None


# How every engine writes and reads JSON columns (the asyncpg codecs SQLAlchemy
# sets for json and jsonb included): orjson, issue 17; app/wire/jsontext.py says what differs.
JSON_CODEC: Mapping[str, Any] = MappingProxyType(
    {"json_serializer": jsontext.dumps, "json_deserializer": jsontext.loads}
)


# Each SQLite file engine's write lock, for what takes it with no SQLAlchemy
# transaction (raw_write_connection: a group's hop, a RawTransaction) and
# for collects().
_WRITERS: weakref.WeakKeyDictionary[Engine, SQLiteWriters] = weakref.WeakKeyDictionary()


def writers_of(engine: AsyncEngine) -> SQLiteWriters:
    """A SQLite file engine's write lock (KeyError for any other engine)."""
    return _WRITERS[engine.sync_engine]


def collects(engine: AsyncEngine) -> bool:
    """Whether a transaction on ``engine`` may collect its held-back writes
    until it connects (held_back.COLLECTED): a SQLite file's."""
    return engine.sync_engine in _WRITERS


def _straight_committable(session: AsyncSession) -> tuple[Connection, sqlite_driver.OneHopConnection] | None:
    """The SQLAlchemy connection and driver connection of ``session``'s
    SQLite transaction, if commit_straight() may commit it: connected, no
    savepoint open, nothing for the ORM to flush, no listener of the
    session's commit events (tests inject failures there), the one-hop
    driver's transaction open. None: session.commit() is needed."""
    sync = session.sync_session
    bind = sync.bind
    if not isinstance(bind, Engine) or bind.dialect.name != "sqlite":
        return None
    transaction = sync.get_transaction()
    if transaction is None or not transaction.is_active or sync.get_nested_transaction() is not None:
        return None
    if sync.new or sync.dirty or sync.deleted:
        return None  # a flush first: SQLAlchemy's unit of work
    if sync.dispatch.before_commit or sync.dispatch.after_commit:
        return None  # someone listens for SQLAlchemy's commit (the server does not)
    connection = held_back.connection_of(session, bind)
    if connection is None or connection.closed or connection.invalidated:
        return None
    if connection.get_nested_transaction() is not None or not connection.in_transaction():
        return None
    driver: object = connection.connection.dbapi_connection
    if not isinstance(driver, sqlite_driver.OneHopConnection) or not driver.transaction_open:
        return None
    if driver.inline_wait_ms is not None:
        return None
    return connection, driver


async def commit_straight(
    session: AsyncSession, *, seen_through: bool, undo: Callable[[AsyncSession], None] | None = None
) -> bool:
    """Commit ``session``'s SQLite transaction straight on the driver: its
    held-back writes and COMMIT in one hop awaited here, without
    AsyncSession.commit's greenlet, SQLAlchemy's commit and its events
    (issue 17: a transaction whose writes are all held back or already
    sent straight; the claim's where Runtime.claims_raw() is false, else
    the claim is a RawTransaction, which commits on the driver too).
    SQLAlchemy's transaction is then closed: its ROLLBACK finds nothing
    open (no hop), the connection goes back to the pool. False, nothing done, where session.commit() must (see
    _straight_committable). A failure is SQLAlchemy's error for it
    (held_back.sent: a lost connection invalidated, a cancellation
    invalidating it), everything rolled back on the thread; the session is
    then the caller's to roll back, as after a failed commit. With
    ``seen_through`` the hop is carried through a cancellation as
    commit_seen_through() carries a commit. A failed COMMIT leaves the
    write lock to the caller's rollback (Runtime._roll_back: after it has
    undone the transaction's run log appends); a COMMIT that loses its
    connection calls ``undo`` with the session first (those appends undone),
    as the invalidation that follows hands the lock on (lost_after_undo)."""
    found = _straight_committable(session)
    if found is None:
        return False
    connection, driver = found
    if seen_through:
        committing = _committed_straight(session, connection, driver, undo)
        await commit_noted_through(session, asyncio.ensure_future(committing))
    else:
        await _committed_straight(session, connection, driver, undo)
    return True


async def _committed_straight(
    session: AsyncSession,
    connection: Connection,
    driver: sqlite_driver.OneHopConnection,
    undo: Callable[[AsyncSession], None] | None,
) -> None:
    """commit_straight()'s hop, then SQLAlchemy's transaction closed: both
    seen through together, as session.commit() closes its transaction
    within (a cancellation between them would take a committed transaction
    for a rolled-back one)."""
    # A failed COMMIT leaves the lock to the caller's rollback (driver.rollback()), after
    # Runtime._roll_back has undone its run log appends.
    committing = driver.commit_straight()
    invalidate = connection.invalidate if undo is None else lost_after_undo(session, undo, connection.invalidate)
    await held_back.sent(committing, "COMMIT", None, connection.dialect, invalidate)
    if _pool_takes_back(connection.engine.pool):
        session.sync_session.close()  # into the pool's queue, its reset's ROLLBACK a no-op: no I/O
    else:
        await greenlet_spawn(session.sync_session.close)  # the pool closes it: I/O


def lost_after_undo(
    session: AsyncSession, undo: Callable[[AsyncSession], None], invalidate: Callable[[BaseException | None], None]
) -> Callable[[BaseException | None], None]:
    """``invalidate`` for held_back.sent() of a COMMIT that leaves the write
    lock to its caller (commit_straight()): a lost
    connection's invalidation closes the driver connection, and its close()
    hands the lock on (OneHopConnection.close; or the pool's invalidate
    event) before the caller could undo the transaction's run log appends,
    so ``undo(session)`` runs first (a writer let in before the undo would
    number its appends after the lost ones). Not for a cancellation
    (``None``): the COMMIT may still be running on the thread, and may
    commit; the caller learns which (commit_noted_through)."""

    def lost(error: BaseException | None) -> None:
        try:
            if error is not None:
                undo(session)
        finally:
            invalidate(error)  # even if the undo raised: a lost connection never goes back to the pool

    return lost


async def raw_write_connection(engine: AsyncEngine) -> tuple[PoolProxiedConnection, SQLiteWriters]:
    """A connection checked out of the pool raw, then the write lock: every
    writer's order (a transaction's checkout, then its begin's lock). The
    other way round, the lock's holder could wait for a connection held by
    writers queued for the lock, all of them until the pool's timeout."""
    writers = writers_of(engine)
    pooled = _idle_checkout(engine.sync_engine.pool) or await engine.raw_connection()
    try:
        await writers.hold()
    except BaseException:
        await give_back(engine, pooled)
        raise
    return pooled, writers


class HeldLock:
    """The write lock as one transaction holds it, freed once: by its
    thread's commit (sqlite_driver._told_on: a turn of the loop before the
    committing task resumes; issue 17) or at its end, whichever comes first."""

    __slots__ = ("_held", "_writers")

    def __init__(self, writers: SQLiteWriters) -> None:
        self._writers = writers
        self._held = True

    def free(self) -> None:
        if self._held:
            self._held = False
            self._writers.free()


class RawSessionConnected(RuntimeError):
    """A session whose transaction is a RawTransaction's tried to connect
    (a read, or a statement that is not held back): it would wait for the
    write lock its own transaction holds, so it is refused at once rather
    than after the lock's timeout. The claim reads a prompt that needs a
    read on a WAL reader instead (RunExecution._first_prompt); anywhere
    else in the claim it fails the claim's transaction."""


class RawTransaction:
    """A SQLite write transaction on a connection checked out of the pool
    raw (issue 17: the worker's claim), with no SQLAlchemy Connection,
    transaction or greenlet (but the checkout's): the pool's checkout,
    then the process's write lock, as every writer takes them
    (raw_write_connection); BEGIN IMMEDIATE goes with its first statement. A session marked with it
    (``session.info[RAW] = raw.held``) sends its run_now statements to it
    and holds its writes back on it (held_back.RAW), and never connects
    (SyncSession.get_bind refuses: RawSessionConnected). commit() sends the
    held-back writes and COMMIT in one hop; end() rolls back what is still
    open, frees the lock and gives the connection back, however it ends."""

    def __init__(self, engine: AsyncEngine, pooled: PoolProxiedConnection, writers: SQLiteWriters) -> None:
        driver: object = pooled.dbapi_connection
        assert isinstance(driver, sqlite_driver.OneHopConnection) and not driver.transaction_open, "a raw connection"
        self.engine = engine
        self.pooled = pooled
        self.driver = driver
        self.held = held_back.Raw(driver, pooled.invalidate)
        self._lock = HeldLock(writers)
        # Freed once the COMMIT has run on the thread (commit_straight), as a
        # SQLAlchemy transaction's lock is (SQLiteWriters.begin); else by end().
        driver.on_transaction_end = self._lock.free
        driver.begin_later("BEGIN IMMEDIATE")

    @classmethod
    async def begin(cls, engine: AsyncEngine) -> RawTransaction:
        pooled, writers = await raw_write_connection(engine)
        try:
            return cls(engine, pooled, writers)
        except BaseException:
            writers.free()
            await give_back(engine, pooled)
            raise

    async def commit(
        self,
        session: AsyncSession,
        *,
        seen_through: bool,
        undo: Callable[[AsyncSession], None] | None = None,
        on_thread: bool = False,
    ) -> None:
        """The held-back writes and COMMIT in one hop (rolled back there if
        one fails: SQLAlchemy's error for it, held_back.sent); with
        ``seen_through`` carried through a cancellation as
        commit_seen_through() carries a commit. A failed COMMIT leaves the
        write lock to end(), which the caller calls once it has undone the
        transaction's run log appends; one that loses its connection calls
        ``undo`` with the session first, as its invalidation hands the lock
        on (lost_after_undo). ``on_thread``: on aiosqlite's thread even in a
        lone process (sqlite_driver.OneHopConnection.commit_straight)."""
        committing = self.driver.commit_straight(on_thread=on_thread)
        invalidate = self.pooled.invalidate if undo is None else lost_after_undo(session, undo, self.pooled.invalidate)
        hop = held_back.sent(committing, "COMMIT", None, self.engine.dialect, invalidate)
        if seen_through:
            await commit_noted_through(session, asyncio.ensure_future(hop))
        else:
            await hop

    async def end(self) -> None:
        """After commit() or a failure: what is still open rolled back on
        the connection's thread (a connection that cannot roll back is
        invalidated: closed, its transaction with it), the write lock freed,
        the connection given back."""
        driver = self.driver
        try:
            begun = driver.begin_deferred is None  # the BEGIN went with a statement
            opened = driver.transaction_open
            driver.begin_deferred, driver.held_back, driver.transaction_open = None, [], False
            driver.on_transaction_end = None  # a pooled connection carries no transaction's callback on
            if opened and begun and self.pooled.is_valid:
                await self._rolled_back()
        finally:
            self._lock.free()  # its transaction has ended (or its connection is closed), if not freed at its commit
            await give_back(self.engine, self.pooled)

    async def _rolled_back(self) -> None:
        connection: Any = self.driver._connection  # aiosqlite's
        try:
            if connection._connection is None:
                raise ValueError("no active connection")
            async with self.driver._execute_mutex:
                await connection.rollback()
        except asyncio.CancelledError:
            await greenlet_spawn(self.pooled.invalidate)
            raise
        except Exception as error:
            # The transaction's own failure is the one to raise: this
            # connection, whatever it still holds, is closed instead.
            log.warning("a raw SQLite transaction's ROLLBACK failed (%s); its connection is closed", error)
            await greenlet_spawn(self.pooled.invalidate, error)


def _idle_checkout(pool: Pool) -> PoolProxiedConnection | None:
    """An idle connection checked out of a SQLite file's pool without
    SQLAlchemy's greenlet (issue 17: every writer that checks out raw,
    raw_write_connection: a claim's raw transaction, sqlite_groups.commit_collected()),
    where the checkout does no I/O: the connection the pool hands out next
    is open and not due for a reconnect (no recycling, not invalidated
    since it opened), no pre-ping, no checkout listener (one would run
    outside the greenlet, where it may not do I/O). None otherwise (an
    empty pool, which opens a connection; an invalidated one, which
    reconnects): the greenlet's checkout. The conditions are those of _ConnectionRecord.get_connection
    and the queue's order in SQLAlchemy's pinned version (private
    attributes: an upgrade must check them)."""
    if not isinstance(pool, QueuePool) or pool._pre_ping or pool._recycle > -1 or pool.dispatch.checkout:
        return None
    adapted: Any = pool._pool  # AsyncAdaptedQueue: an asyncio (Lifo)Queue, taken from without awaiting when not empty
    idle = adapted._queue._queue  # LifoQueue: a list, popped from its end; Queue: a deque, from its start
    if not idle:
        return None
    record = idle[-1] if adapted.use_lifo else idle[0]
    if record.dbapi_connection is None:
        return None
    if pool._invalidate_time > record.starttime or record._soft_invalidate_time > record.starttime:
        return None
    return pool.connect()  # that record, as raw_connection() takes it


def _pool_takes_back(pool: Pool) -> bool:
    """Whether a connection given back to ``pool`` goes into its queue (no
    I/O), not closed as an overflow connection (I/O: SQLAlchemy's greenlet)."""
    return isinstance(pool, QueuePool) and pool.checkedin() < pool.size()


async def give_back(engine: AsyncEngine, pooled: PoolProxiedConnection) -> None:
    """``pooled`` back to its pool (its reset sends nothing: no transaction
    is open), or closed if the pool is full (an overflow connection) or it
    was invalidated: a close is I/O, which needs SQLAlchemy's greenlet
    (without it the close fails, logged, and the connection's thread is
    left running)."""
    await _give_back_to(engine.sync_engine.pool, pooled)


async def _give_back_to(pool: Pool, pooled: PoolProxiedConnection) -> None:
    if _pool_takes_back(pool) and pooled.is_valid:
        pooled.close()  # into the pool's queue: no I/O
    else:
        await greenlet_spawn(pooled.close)


async def autocommit_connection(engine: Engine) -> held_back.PostgresRaw | None:
    """A PostgreSQL connection checked out of ``engine``'s pool raw and put
    in autocommit (held_back.PG_AUTOCOMMIT; issue 17: a unit of work that is
    one statement, without a SQLAlchemy Connection, transaction and commit).
    The checkout as the session's: in SQLAlchemy's greenlet, its listeners
    (ConnectionCheck: a ping, a reconnect) and recycling with it. None, the
    connection given back, where it is not asyncpg's at its default level
    with no transaction open (the session's way then). Give it back with
    give_back_autocommit(), however the unit ends. A checkout the database
    refuses (a restart, a failover, too many connections) raises
    SQLAlchemy's error for it as a session's checkout does (Connection's
    constructor: handle_error listeners, connection_invalidated where it is
    lost), never the adapter's: a run's end that meets it leaves the run
    in_progress, to be resumed (execute.py), a create answers as it would.

    ``_transaction`` and ``_isolation_setting`` are the adapter's private
    fields (AsyncAdapt_asyncpg_connection) as SQLAlchemy 2.1.9 has them, as
    is Connection._handle_dbapi_exception_noconnection: a SQLAlchemy upgrade
    must re-check them (tests/runner/test_raw_autocommit.py)."""
    try:
        pooled = await greenlet_spawn(engine.pool.connect)
    except engine.dialect.loaded_dbapi.Error as error:
        Connection._handle_dbapi_exception_noconnection(error, engine.dialect, engine)
    adapted: object = pooled.dbapi_connection
    if (
        not isinstance(adapted, AsyncAdapt_asyncpg_connection)
        or adapted._transaction is not None
        or adapted.isolation_level != adapted._isolation_setting
    ):
        await _give_back_to(engine.pool, pooled)
        return None
    adapted.autocommit = True
    return held_back.PostgresRaw(pooled, adapted)


async def give_back_autocommit(engine: Engine, raw: held_back.PostgresRaw) -> None:
    """autocommit_connection()'s connection back at its default level (no
    transaction is open in autocommit: nothing to send), to its pool; closed
    if it was invalidated (lost, or its statement cancelled: held_back.sent)."""
    raw.adapted.autocommit = False
    await _give_back_to(engine.pool, raw.pooled)


def create_engine(url: str, pool_size: int | None = None) -> AsyncEngine:
    if is_sqlite(url):
        database = make_url(url).database
        in_memory = not database or database == ":memory:"  # (no name: SQLite's in-memory database too)
        if not in_memory:
            Path(str(database)).parent.mkdir(parents=True, exist_ok=True)
        # One thread hop per statement instead of four (app/sqlite_driver.py).
        # Up to SQLITE_CONNECTIONS kept once opened: a transaction checks its
        # connection out before it queues for the write lock, so under load
        # (16 clients, the executor's runs) more than the default pool's 5
        # are out at once, and each overflow connection was opened and
        # closed again (a thread, the file, its pragmas: 0.3 per run).
        if in_memory:
            engine = create_async_engine(url, poolclass=NullPool, module=sqlite_driver.OneHopDBAPI(), **JSON_CODEC)
        else:
            engine = create_async_engine(
                url,
                pool_size=SQLITE_CONNECTIONS,
                max_overflow=SQLITE_WRITER_OVERFLOW,
                pool_use_lifo=True,  # the last used connection's page cache is the warm one
                module=sqlite_driver.OneHopDBAPI(),
                **JSON_CODEC,
            )
        event.listen(engine.sync_engine, "connect", _sqlite_connect)
        event.listen(engine.sync_engine, "before_cursor_execute", sqlite_driver.hold_back_marked_writes)
        event.listen(engine.sync_engine, "handle_error", _undone_at_error)
        # Before the write lock's listeners: the undo first.
        event.listen(engine.sync_engine, "rollback", _undone_at_rollback)
        writers = SQLiteWriters(timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)
        writers.listen(engine)
        if not in_memory:  # a file: a pool to check a connection out of (RawTransaction, sqlite_groups)
            _WRITERS[engine.sync_engine] = writers
        return engine
    # Up to ``pool_size`` connections (default POSTGRES_CONNECTIONS), all
    # kept once opened: an
    # overflow connection (opened above the pool's size, closed at check-in)
    # cost a backend's start, the connection's set-up queries and a prepare
    # of every statement it then ran (issue 17: 16 runs at a time opened one
    # every two runs with 10 kept and 20 overflow). (use_lifo left a
    # connection unreturned after backends were terminated: tests/api/
    # test_races_faults.py.) Recycling bounds a connection's age.
    engine = create_async_engine(
        url,
        pool_size=pool_size if pool_size is not None else POSTGRES_CONNECTIONS,
        max_overflow=0,
        pool_recycle=300,
        connect_args=asyncpg_numbers(make_url(url)),
        **JSON_CODEC,
    )
    ConnectionCheck(ping_after_idle_seconds=PING_AFTER_IDLE_SECONDS).listen(engine)
    return engine


def create_read_engine(url: str, engine: AsyncEngine) -> AsyncEngine:
    """The engine of read-only transactions (searches, streams' log reads;
    polls too, except on a SQLite file: create_poll_engine), beside ``engine``.

    On SQLite every transaction of ``engine`` takes the process's write lock
    (SQLiteWriters), so a search would queue behind ingestion's writes and
    hold the lock while it waits for its query's embedding. Here, instead:
    connections of their own, opened read-only (a write through one fails
    with "attempt to write a readonly database"; their temp schema stays
    writable, for the keyword tokenizer's scratch tables), each transaction a
    deferred BEGIN: a WAL reader's snapshot, beside the writer, taking no lock.
    On PostgreSQL the same pool, each transaction begun READ ONLY (asyncpg
    sends it with its BEGIN: no extra round trip). An in-memory SQLite
    database exists only on its own connection: ``engine`` itself serves.
    """
    if not is_sqlite(url):
        return engine.execution_options(postgresql_readonly=True)
    readonly = _sqlite_readonly_url(url)
    if readonly is None:
        return engine
    # Kept open up to SQLITE_READERS: streams and searches read here at once, and
    # with the default pool (5 kept) 16 streaming clients opened and closed an
    # overflow connection (a thread, the file, its pragmas) every few reads.
    reader = create_async_engine(
        readonly,
        module=sqlite_driver.OneHopDBAPI(),
        pool_size=SQLITE_READERS,
        max_overflow=SQLITE_READERS,
        pool_use_lifo=True,
        **JSON_CODEC,
    )
    event.listen(reader.sync_engine, "connect", _sqlite_read_connect)
    # Sent with the transaction's first statement (sqlite_driver.OneHopCursor).
    event.listen(reader.sync_engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN DEFERRED"))
    return reader


def _sqlite_readonly_url(url: str) -> URL | None:
    """A SQLite file's URL opened read-only; None for a database that lives
    only on its own connection (in memory, or a URI given as is)."""
    parsed = make_url(url)
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return parsed.set(
        database="file:" + quote(str(Path(database).resolve())),
        query={**parsed.query, "mode": "ro", "uri": "true"},
    )


def create_poll_engine(url: str) -> AsyncEngine | None:
    """SQLite (a file): the engine of a poll's reads (Runtime.poll_read),
    whose statements run on the event loop's thread, no hop to a connection
    thread and back (sqlite_driver's inline connections; issue 17: the two
    hops were a third of a GET's CPU). Read-only connections of their own,
    outside any transaction (each statement its own WAL snapshot, as
    PostgreSQL's autocommit polls), SQLite's busy timeout 0: in the rare case
    a WAL reader must wait, the statement waits on the connection's thread
    instead, up to SQLITE_BUSY_TIMEOUT_MS. None where create_read_engine has
    no engine of its own (PostgreSQL, in-memory SQLite)."""
    readonly = _sqlite_readonly_url(url) if is_sqlite(url) else None
    if readonly is None:
        return None
    poller = create_async_engine(
        readonly,
        module=sqlite_driver.OneHopDBAPI(inline_wait_ms=SQLITE_BUSY_TIMEOUT_MS),
        pool_size=SQLITE_POLLERS,
        max_overflow=SQLITE_POLLERS,
        pool_use_lifo=True,
        **JSON_CODEC,
    )
    event.listen(poller.sync_engine, "connect", _sqlite_poll_connect)
    return poller


def _sqlite_poll_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # no BEGIN: no "begin" listener either
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=0")  # never wait on the event loop's thread
    cursor.close()


def _sqlite_read_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # transactions are begun by the "begin" event, as for writers
    cursor = dbapi_connection.cursor()
    # A WAL reader waits only in rare cases (another connection recovering the WAL).
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


# SQLite connections (writers) a process keeps open once opened.
SQLITE_CONNECTIONS = 32

# SQLite connections (writers) a process may open beyond those for a burst
# (closed when returned): they only queue for the write lock.
SQLITE_WRITER_OVERFLOW = 32

# SQLite read-only connections a process keeps open once opened (as many
# again may open for a burst, closed when returned).
SQLITE_READERS = 32
# ... and kept for polls (create_poll_engine; as many again for a burst).
# A poll's statement runs on the event loop's thread, but its connection
# goes back to the pool in a task of its own (SQLAlchemy's AsyncConnection
# shields its close), a turn of the loop later: every poll that reads in
# that turn checks out another. With 2 kept, 16 clients' reads opened and
# closed an overflow connection (a thread, the file, its pragmas) every few
# reads (issue 17, bench/README.md, branch ``cpu16``).
SQLITE_POLLERS = 16

# The most SQLite connections a process has open at once, each with two
# file descriptors (the database and its WAL): app/api/limits.py keeps them
# free of client connections.
SQLITE_MOST_CONNECTIONS = SQLITE_CONNECTIONS + SQLITE_WRITER_OVERFLOW + 2 * SQLITE_READERS + 2 * SQLITE_POLLERS

# The most PostgreSQL connections a process opens unless told otherwise
# (Settings.database_pool_size; a transaction waits for one beyond).
POSTGRES_CONNECTIONS = 30

# A PostgreSQL connection unused for this long is pinged before it is handed out.
PING_AFTER_IDLE_SECONDS = 10.0


class ConnectionCheck:
    """Every PostgreSQL connection handed out by the pool is alive, so that
    after a dropped connection (a server restart, pg_terminate_backend, a
    failover) the next request reconnects instead of failing (issue 10).

    SQLAlchemy's ``pool_pre_ping`` did this with three round trips per
    transaction (BEGIN, an empty query, ROLLBACK; bench/connection_check.py).
    Here: a connection whose socket the event loop has seen closed (what a
    terminated backend or a restarted server leaves) is replaced at no cost,
    and only one unused for ``ping_after_idle_seconds`` (where a silent
    network drop may hide) is pinged; a failed ping replaces it too (issue 17).
    """

    _CHECKED_IN = "checked_in_at"

    def __init__(self, ping_after_idle_seconds: float) -> None:
        self.ping_after_idle_seconds = ping_after_idle_seconds

    def checkout(self, dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if dbapi_connection.driver_connection.is_closed():
            raise sa_exc.DisconnectionError("the connection was closed")  # the pool opens a new one
        checked_in_at = record.info.get(self._CHECKED_IN)
        if checked_in_at is not None and time.monotonic() - checked_in_at > self.ping_after_idle_seconds:
            try:
                dbapi_connection.ping()
            except Exception as error:
                raise sa_exc.DisconnectionError(f"the connection failed a ping: {error}") from error

    def checkin(self, _dbapi_connection: Any, record: Any) -> None:
        record.info[self._CHECKED_IN] = time.monotonic()

    def listen(self, engine: AsyncEngine) -> None:
        pool = engine.sync_engine.pool
        event.listen(pool, "checkout", self.checkout)
        event.listen(pool, "checkin", self.checkin)


class SyncSession(orm.Session):
    """The server's sessions' sync side: one that collected SQLite writes
    before it connected hands them to its transaction as it begins
    (held_back.COLLECTED), and drops them when that transaction is rolled
    back, as a rollback drops the writes held back on its connection."""

    def get_bind(self, *args: Any, **kwargs: Any) -> Any:
        # Every connection a session makes asks for its bind here first.
        if RAW in self.info or GROUPED in self.info or READS_ELSEWHERE in self.info:
            raise RawSessionConnected("a raw transaction's session may not connect (a read, or a write not held back)")
        return super().get_bind(*args, **kwargs)

    def rollback(self) -> None:
        # Also with no transaction begun (collecting needs none), where the
        # event below does not fire.
        collected: list[sqlite_driver.Statement] | None = self.info.get(COLLECTED)
        if collected:
            collected.clear()
        super().rollback()


def _drop_collected(session: orm.Session, previous: orm.SessionTransaction) -> None:
    # Any rollback of the session's outermost transaction: session.rollback()
    # and a ``session.begin()`` block that raised alike (a savepoint's is not
    # one: collected writes were handed over before a savepoint could begin).
    collected: list[sqlite_driver.Statement] | None = session.info.get(COLLECTED)
    if collected and previous.parent is None and not previous.nested:
        collected.clear()


event.listen(SyncSession, "after_begin", held_back.hand_over)
event.listen(SyncSession, "after_soft_rollback", _drop_collected)


class Session(AsyncSession):
    """The server's AsyncSession: closed without a task of its own when it
    holds no transaction (issue 17).

    ``async with session:`` closes the session in a new task, shielded, so
    that a cancellation cannot abandon the close halfway (a connection not
    yet back in its pool). Once ``session.begin()``'s block has ended (the
    services' transactions: Runtime.transaction), its commit or rollback has
    already given the connection back, and the close only forgets the
    session's objects: no I/O, nothing to abandon, so it runs at once; the
    task, its shield and their turns of the event loop were about a tenth
    of a one-statement transaction's CPU. A session still in a transaction
    is closed as before."""

    sync_session_class = SyncSession

    async def __aexit__(self, type_: Any, value: Any, traceback: Any) -> None:
        if self.sync_session.in_transaction():
            await super().__aexit__(type_, value, traceback)
            return
        self.sync_session.close()  # no transaction, no connection: no I/O (an await here would raise)


_COMMITTED = "committed despite a cancellation"
# How long a cancelled caller waits for its COMMIT's outcome. A COMMIT
# normally ends in milliseconds; one that hangs (a synchronous standby
# down, a connection black-holed) is then abandoned, its outcome unknown
# and taken for a rollback, as any failed transaction's.
COMMIT_OUTCOME_WAIT_SECONDS = 10.0

T = TypeVar("T")


class Sending:
    """Whether a unit of work (watched()) may have sent its statement: until
    it has, it can have done nothing."""

    sent = False


_SENDING: contextvars.ContextVar[Sending | None] = contextvars.ContextVar("sending", default=None)


async def brief_on_sqlite(session: AsyncSession) -> None:
    """Mark every statement of ``session``'s SQLite transaction brief
    (BRIEF, on its connection): for a unit of work whose statements are all
    index lookups and writes of a few rows (submit_tool_outputs, a cancel), so that a
    lone process runs it on the event loop's thread (issue 17). Called
    before its first statement, it connects the session as that statement
    would; a session connected already (a caller read first) is left as it
    is, unmarked. Nothing on PostgreSQL."""
    bind = session.sync_session.bind
    if not isinstance(bind, Engine) or bind.dialect.name != "sqlite":
        return
    transaction = session.sync_session.get_transaction()
    # (Its connections: SQLAlchemy's own attribute, the version pinned in
    # pyproject.toml. Marked once connected, SQLAlchemy would warn and ignore it.)
    if transaction is None or not transaction._connections:
        await session.connection(execution_options=BRIEF)


def sending_now() -> None:
    """Called by a watched() unit of work once it holds its connection, with
    nothing to await before its statement goes (run_log.append's
    autocommitted statement): from here a cancellation waits for its
    outcome. (Not an engine's before_cursor_execute listener: the first one
    puts every statement of the engine through SQLAlchemy's event dispatch.)"""
    sending = _SENDING.get()
    if sending is not None:
        sending.sent = True


# session.info's key of a gated session (gate()): the future that lets its
# statements go.
GATE = "gate"
# ... and of the future gate() is told to complete once they are let go.
GATE_PASSED = "gate passed"


def gate(session: AsyncSession, opened: asyncio.Future[None], passed_to: asyncio.Future[None] | None = None) -> None:
    """Hold every statement of ``session`` until ``opened`` is done (issue
    17, a hand-off built during its create's round trip: its reads and its
    statement must see the committed run, and nothing goes before the create
    has committed). Its ORM executions wait in a listener of this session
    alone (SQLAlchemy's do_orm_execute, run on the session's greenlet, where
    await_only() awaits); run_log.append waits before it takes a connection
    (passed()). A gate cancelled (the create failed) fails what waited on it
    with the cancellation, nothing sent. ``passed_to`` is done when a
    statement is first let through (the create that opened the gate waits
    for it, then answers while that statement is out: Worker.answer_after)."""
    session.info[GATE] = opened
    if passed_to is not None:
        session.info[GATE_PASSED] = passed_to

    def wait(_state: orm.ORMExecuteState) -> None:
        if not opened.done() or opened.cancelled():
            # One way through the gate for the listener and run_log.append
            # (passed(): a closed gate raises its cancellation).
            await_(passed(session))
        else:
            _let_through(session)

    event.listen(session.sync_session, "do_orm_execute", wait)


async def passed(session: AsyncSession) -> None:
    """Returns once ``session``'s gate (gate()), if any, has opened; raises
    the cancellation of a gate closed for good."""
    opened: asyncio.Future[None] | None = session.info.get(GATE)
    if opened is None:
        return
    if opened.done():
        opened.result()  # (a gate closed for good raises its cancellation)
    else:
        await asyncio.shield(opened)  # (a cancelled waiter leaves the gate as it is)
    _let_through(session)


def _let_through(session: AsyncSession) -> None:
    """A statement of ``session`` goes through its open gate: gate()'s
    ``passed_to`` done, the first time."""
    passed_to: asyncio.Future[None] | None = session.info.pop(GATE_PASSED, None)
    if passed_to is not None and not passed_to.done():
        passed_to.set_result(None)


def watched(work: Coroutine[Any, Any, T]) -> tuple[asyncio.Future[T], Sending]:
    """``work`` in a task of its own, for seen_through(), with what tells
    whether it has come to send its statement (sending_now(); before, a
    cancellation need not wait for it: it may be waiting for a pool's
    connection). Started eagerly (app/eager.py): its statement goes in the
    caller's turn of the loop, not after whatever the loop queued meanwhile."""
    sending = Sending()
    context = contextvars.copy_context()
    context.run(_SENDING.set, sending)
    return eager.start(work, context), sending


# A logged session's undo of its run log appends (Runtime: RunLog.rolled_back),
# for its session.commit() to run if it fails there, before the write lock
# is handed on (_undone_at_error, _undone_at_rollback); set in that commit's
# task alone (commit_seen_through), and cleared once it fails.
_UNDO_AT_FAILURE: contextvars.ContextVar[tuple[AsyncSession, Callable[[AsyncSession], None]] | None] = (
    contextvars.ContextVar("undo_at_failure", default=None)
)


def _undone_at_error(context: ExceptionContext) -> None:
    """A SQLite engine's handle_error listener: a statement (the flush's)
    or the COMMIT of a session.commit() given an ``undo``
    (commit_seen_through) that fails undoes the session's run log appends
    now, while the transaction still holds the write lock. SQLAlchemy then
    rolls the connection back inside session.commit() (a flush's failure),
    whose driver rollback hands the lock on, or invalidates a lost one,
    whose close() hands it on (OneHopConnection.close; even if the undo
    raises: its error is raised instead), either before the caller could
    undo them (a writer let in first would number its appends after the
    failed ones); the caller's undo then finds nothing left to do. Not for
    a cancellation (SQLAlchemy takes one for a lost connection: the task
    abandoned by seen_through()): its COMMIT may still commit, and the
    caller judges (committed_despite_cancellation)."""
    pending = _UNDO_AT_FAILURE.get()
    if pending is None:
        return
    # Once, whatever failed: not again at the rollback that follows
    # (_undone_at_rollback), and not inherited by a task the undo starts
    # (the run log's flusher, woken for the deltas put back).
    _UNDO_AT_FAILURE.set(None)
    if isinstance(context.original_exception, Exception):
        session, undo = pending
        undo(session)


def _undone_at_rollback(_connection: Connection) -> None:
    """A SQLite engine's rollback listener (it fires before the driver's
    ROLLBACK, which hands the write lock on): a session.commit() given an
    ``undo`` whose transaction is rolled back inside it without a database
    error, which handle_error never sees (the flush's StaleDataError, an
    error raised by a flush or before_commit hook), undoes the session's
    run log appends first, as _undone_at_error does. (A failed COMMIT
    fires no rollback: its error did; nor does a session.commit() that
    succeeds.)"""
    pending = _UNDO_AT_FAILURE.get()
    if pending is not None:
        _UNDO_AT_FAILURE.set(None)  # once; not inherited by a task the undo starts
        session, undo = pending
        undo(session)


async def commit_seen_through(session: AsyncSession, undo: Callable[[AsyncSession], None] | None = None) -> None:
    """``session.commit()``, carried to its end even if the calling task is
    cancelled while it is in flight, so that the caller learns what it did.
    With ``undo``, a failure inside it (on SQLite: a failed flush or
    COMMIT, a lost connection; not a cancellation) calls ``undo(session)``
    before the rollback or the invalidation hands the write lock on
    (_undone_at_error, _undone_at_rollback).

    A cancellation (a lost lease, shutdown) that reaches a task awaiting its
    COMMIT does not stop the COMMIT: SQLite's thread runs it anyway, and
    PostgreSQL may already have it. Told only "cancelled", a caller that
    logged run events would hand back as unwritten the deltas the commit in
    fact wrote (written twice later) and keep from streams the events it
    committed. So the commit runs in a task of its own (seen_through()); on
    a cancellation, ``committed_despite_cancellation(session)`` then says
    whether it committed. A task per commit: used only where the outcome
    matters."""
    if undo is None:
        commit = asyncio.ensure_future(session.commit())
    else:
        context = contextvars.copy_context()  # the commit's task's alone
        context.run(_UNDO_AT_FAILURE.set, (session, undo))
        commit = asyncio.get_running_loop().create_task(session.commit(), context=context)
    await commit_noted_through(session, commit)


# PostgreSQL's deadlock_detected: it failed this transaction to break a
# cycle of lock waits; made again, it waits for the others instead.
_DEADLOCK_DETECTED = "40P01"


def deadlock_detected(error: sa_exc.DBAPIError) -> bool:
    """Whether PostgreSQL failed ``error``'s transaction as a deadlock's victim."""
    return getattr(error.orig, "sqlstate", None) == _DEADLOCK_DETECTED


def routine_miss(error: BaseException) -> bool:
    """seen_through()'s ``expected`` for a COMMIT: a held-back
    compare-and-set that missed routinely (stale run defaults, a run moved:
    its writer retries or reads again) is only noted; a write that cannot
    miss and did is a bug, and warned of."""
    return sqlite_driver.raised_within(error, sqlite_driver.RoutineMismatch)


async def commit_noted_through(
    session: AsyncSession,
    commit: asyncio.Future[None],
    sending: Sending | None = None,
    expected: Callable[[BaseException], bool] = routine_miss,
) -> None:
    """seen_through() of ``commit``, ``session``'s, noted on the session if
    it committed despite a cancellation (committed_despite_cancellation());
    ``expected`` as seen_through's, routine_miss() unless told."""
    try:
        await seen_through(commit, "a cancelled transaction's COMMIT", sending=sending, expected=expected)
    except asyncio.CancelledError:
        if commit.done() and not commit.cancelled() and commit.exception() is None:
            session.info[_COMMITTED] = True
        raise


async def seen_through(
    work: asyncio.Future[T],
    what: str,
    *,
    sending: Sending | None = None,
    expected: Callable[[BaseException], bool] = lambda _error: False,
) -> T:
    """``work``'s outcome, carried to its end even if the caller is
    cancelled meanwhile: a unit of work whose outcome the caller must know
    (commit_seen_through(); a statement that commits alone). On a
    cancellation this waits for ``work`` (up to COMMIT_OUTCOME_WAIT_SECONDS:
    an enclosing asyncio.timeout is late by as much; then ``work`` is
    cancelled, its outcome unknown) and then raises the cancellation; with
    ``sending`` (watched()'s), only once it has sent a statement: before,
    it is cancelled at once (it has done nothing, and may be waiting for a
    connection as long as the pool's timeout). ``what`` names the work in
    the log: its failure is a warning, but for one ``expected`` says its
    caller would have handled, which is only noted."""
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        if sending is not None and not sending.sent and not work.done():
            await _stopped(work)
            raise
        deadline = time.monotonic() + COMMIT_OUTCOME_WAIT_SECONDS
        while not work.done() and time.monotonic() < deadline:
            with suppress(asyncio.CancelledError):  # re-raised below, once the outcome is known
                await asyncio.wait({work}, timeout=deadline - time.monotonic())
        if not work.done():
            log.warning("%s did not end within %g s; abandoned", what, COMMIT_OUTCOME_WAIT_SECONDS)
            await _stopped(work)
        elif not work.cancelled() and (error := work.exception()) is not None:
            log.log(logging.DEBUG if expected(error) else logging.WARNING, "%s failed (%s)", what, error)
        raise


async def _stopped(work: asyncio.Future[Any]) -> None:
    """``work`` cancelled, once its cancellation has unwound (the session's
    work first: its connection back in the pool)."""
    work.cancel()
    while not work.done():
        with suppress(asyncio.CancelledError):
            await asyncio.wait({work})


def committed_despite_cancellation(session: AsyncSession) -> bool:
    """After commit_seen_through() raised a cancellation: whether its commit
    had committed."""
    return bool(session.info.pop(_COMMITTED, False))


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, class_=Session, expire_on_commit=False)


def _alembic_config(connection: Connection) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


_REVISION_LINE = re.compile(r"^(down_revision|revision)\s*=\s*(?:['\"]([^'\"]+)['\"]|None)", re.MULTILINE)


def head_revision() -> str:
    """The newest migration's id, read from the revision files' own
    ``revision`` / ``down_revision`` lines: the one no other file names as
    its parent (tests/ops/test_migration_head.py holds it to alembic's)."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (MIGRATIONS_DIR / "versions").glob("*.py"):
        for name, value in _REVISION_LINE.findall(path.read_text(encoding="utf-8")):
            if value:
                (revisions if name == "revision" else parents).add(value)
    (head,) = revisions - parents
    return head


async def _stamped_revisions(engine: AsyncEngine) -> list[str]:
    """What alembic_version holds; nothing on a database never migrated."""
    try:
        return [str(row[0]) for row in await read_rows(engine, "SELECT version_num FROM alembic_version", {})]
    except (sa_exc.DBAPIError, sqlite3.Error):  # no such table yet
        return []


async def schema_is_current(engine: AsyncEngine) -> bool:
    """Whether the schema is at the newest revision, found without importing alembic."""
    return await _stamped_revisions(engine) == [head_revision()]


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest revision (idempotent). A database already
    there is left alone without importing alembic, which would stay resident:
    about 10 MiB of an idle server's memory (issue 17)."""
    if await schema_is_current(engine):
        return
    from alembic import command

    async with engine.begin() as connection:
        await connection.run_sync(lambda sync: command.upgrade(_alembic_config(sync), "head"))


async def read_rows(engine: AsyncEngine, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    """A small read outside SQLAlchemy's transactions. On SQLite those begin by
    taking the write lock (SQLiteWriters), so a read on the request path (the
    API key lookup) would queue behind every writer; a plain read in WAL mode
    does not. ``sql`` uses ``:name`` parameters, which both drivers accept
    here (sqlite3 natively, PostgreSQL through SQLAlchemy's text())."""
    async with engine.connect() as connection:
        if connection.dialect.name != "sqlite":
            return [tuple(row) for row in (await connection.execute(text(sql), params)).all()]
        raw = (await connection.get_raw_connection()).driver_connection
        assert raw is not None
        # One hop to aiosqlite's thread, not three (execute, fetch, close).
        return [tuple(row) for row in await raw.execute_fetchall(sql, params)]


async def notify_work(engine: AsyncEngine) -> None:
    """Wake the workers of other processes (PostgreSQL only; best effort:
    they also poll, so a lost signal only costs latency)."""
    try:
        async with engine.connect() as connection:
            # One statement, its own transaction (issue 17: no BEGIN, no COMMIT).
            alone = await connection.execution_options(**AUTOCOMMIT)
            await alone.execute(text("SELECT pg_notify(:channel, '')"), {"channel": WORK_CHANNEL})
    except Exception:
        log.warning("could not signal the workers; they will find the work by polling", exc_info=True)


async def listen_for_work(engine: AsyncEngine, on_work: Callable[[], None], retry_seconds: float = 1.0) -> None:
    """Call ``on_work`` on every signal from notify_work(), until cancelled;
    the listening connection is re-opened after a failure."""
    await listen(engine, WORK_CHANNEL, lambda _payload: on_work(), retry_seconds=retry_seconds)


# A listening connection is asked for a reply after this long without
# news of its end, and given this long to answer: a connection that died
# without a word (a half-open TCP connection after a partition or a
# failover) would otherwise be listened on for ever, hearing nothing.
LISTENER_CHECK_SECONDS = 10.0
LISTENER_REPLY_SECONDS = 5.0
LISTENER_CHECK = "SELECT 1"


async def listen(
    engine: AsyncEngine,
    channel: str,
    on_notify: Callable[[str], None],
    *,
    on_listening: Callable[[bool], None] | None = None,
    retry_seconds: float = 1.0,
    more: Mapping[str, Callable[[str], None]] | None = None,
) -> None:
    """Call ``on_notify(payload)`` for every PostgreSQL NOTIFY on ``channel``
    until cancelled, and each of ``more``'s for its own channel, on the same
    connection. The listening connection is checked now and then, and
    re-opened after a failure. ``on_listening(True)`` runs each time it
    listens (the first time too), ``on_listening(False)`` each time it
    stops: notifications sent while nobody listened are lost, so whoever
    relies on them must look again."""
    handlers = {channel: on_notify, **(more or {})}
    while True:
        try:
            async with engine.connect() as connection:
                raw = await connection.get_raw_connection()
                listener = raw.driver_connection  # the asyncpg connection
                assert listener is not None
                closed = asyncio.Event()
                listener.add_termination_listener(lambda *_args, done=closed: done.set())
                for name, handler in handlers.items():
                    await listener.add_listener(
                        name, lambda _connection, _pid, _channel, payload, heard=handler: heard(str(payload))
                    )
                try:
                    if on_listening is not None:
                        on_listening(True)
                    await _until_lost(listener, closed)
                finally:
                    if on_listening is not None:
                        on_listening(False)
                    # Ended without a word, or answered nothing: dropped, not
                    # returned to the pool (a reset would wait on it too).
                    # Cancelled too: back in the pool it would still LISTEN,
                    # and hand the callback notifications meant for nobody.
                    await connection.invalidate()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("listening on %s failed; retrying", channel, exc_info=True)
        await asyncio.sleep(retry_seconds)


async def _until_lost(listener: Any, closed: asyncio.Event) -> None:
    """Returns once the listening connection has ended or no longer answers."""
    while not closed.is_set():
        with suppress(TimeoutError):
            async with asyncio.timeout(LISTENER_CHECK_SECONDS):
                await closed.wait()
            return
        try:
            async with asyncio.timeout(LISTENER_REPLY_SECONDS):
                await listener.fetchval(LISTENER_CHECK)
        except Exception:  # no reply in time, or an error: listen again on a new connection
            log.warning("the listening connection did not answer; opening another", exc_info=True)
            return
