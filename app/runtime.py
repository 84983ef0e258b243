"""The Runtime: everything a request or the worker needs, built once per app.

Created by create_app()'s lifespan; reached from routes through
``request.app.state.runtime``. Later issues add the bus, llm, sandbox and
embedder here.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from app import cassettes, db, run_log, sqlite_groups, sqlite_peers
from app.bus import EventBus
from app.cancelling import cancel_and_wait
from app.created_runs import CreatedRuns
from app.llm import LLM, Exchange
from app.observability.metrics import Metrics
from app.retrieval import cache_budget, passing_files
from app.services import api_keys, model_requests, run_defaults, run_execution
from app.settings import Settings
from app.storage import Storage

if TYPE_CHECKING:
    from app.worker import Worker

# close() lets a wake's NOTIFY in flight (one statement) finish for this long, then cancels it.
SIGNALS_CLOSE_SECONDS = 2.0


class Wake(Protocol):
    def __call__(self, *, files: bool = True) -> None:
        """New work: runs, and with ``files`` vector store files to ingest."""


def _flushless_commit_begins(session: AsyncSession, what: str) -> None:
    """The start of raw_writes()' and grouped_writes()' commit, which flush
    nothing: the session's before_commit event fires as session.commit()
    fires it (the server listens to none; tests inject failures there), and
    ORM changes, which would be lost, are refused (``what`` names the
    transaction in the error)."""
    sync = session.sync_session
    if sync.dispatch.before_commit:
        sync.dispatch.before_commit(sync)
    if sync.new or sync.dirty or sync.deleted:
        raise RuntimeError(f"ORM changes in {what}: it flushes nothing")


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    # Read-only transactions (searches, polls, streams' log reads): on SQLite outside the write lock
    # (db.create_read_engine; on PostgreSQL and in-memory SQLite it shares engine's pool).
    read_engine: AsyncEngine
    readers: async_sessionmaker[AsyncSession]
    storage: Storage
    bus: EventBus
    llm: LLM
    metrics: Metrics
    # API key -> project, for the request gate and the console.
    keys: api_keys.KeyRing
    # Every run event, logged (app/run_log.py); built by start().
    run_log: run_log.RunLog
    # Set by the worker when one runs in this process, so new runs start at once.
    wake_worker: Wake | None = None
    # SQLite (a file): polls' reads, on the event loop's thread (db.create_poll_engine).
    poll_engine: AsyncEngine | None = None
    # The worker of this process, if any (its heartbeat and sandboxes feed /readyz and /metrics).
    worker: Worker | None = None
    # Runs created here for that worker, for the held polls that follow (app/api/poll_hold.py).
    created_runs: CreatedRuns = field(default_factory=CreatedRuns)
    _signals: set[asyncio.Task[None]] = field(default_factory=set)
    _closing: bool = False  # close() began: wake() starts no more NOTIFYs
    _listener: asyncio.Task[None] | None = None
    # SQLite: the other server processes on the file (early delivery needs none).
    _peers: sqlite_peers.Peers | None = None

    @classmethod
    async def start(cls, settings: Settings) -> Runtime:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = db.create_engine(settings.resolved_database_url(), settings.database_pool_size)
        await db.migrate(engine)
        cache_budget.set_limit(settings.vector_cache_mib * 1024**2)  # numpy waits for the first vector search
        metrics = Metrics()
        bus = EventBus()
        bus.taps.append(metrics.runs.observe)
        llm = LLM.from_config(settings.llm_config, replaying=settings.llm_replay is not None)
        llm.metrics_observer = metrics.observe_model_call
        sessionmaker = db.create_sessionmaker(engine)
        read_engine = db.create_read_engine(settings.resolved_database_url(), engine)
        passing_files.keep_sets_on(read_engine)
        postgres = not db.is_sqlite(settings.resolved_database_url())
        peers = None if postgres else sqlite_peers.for_url(settings.resolved_database_url())
        if peers is not None:
            await peers.join()  # before this process writes any run's log
        runtime = cls(
            settings=settings,
            engine=engine,
            sessionmaker=sessionmaker,
            read_engine=read_engine,
            readers=db.create_sessionmaker(read_engine),
            storage=Storage(settings.files_dir),
            bus=bus,
            llm=llm,
            metrics=metrics,
            keys=api_keys.KeyRing(engine, settings.api_keys, settings.key_cache_seconds),
            run_log=run_log.RunLog(
                bus, sessionmaker, postgres=postgres, flush_seconds=settings.run_events_flush_seconds
            ),
            poll_engine=db.create_poll_engine(settings.resolved_database_url()),
        )
        bus.taps.append(runtime.created_runs.tap)
        if peers is not None:
            runtime._peers = peers
            runtime.run_log.deliver_early = peers.sole
            peers.watch(runtime.run_log.stop_early_delivery, runtime.run_log.start_early_delivery)
        if postgres:
            # Streams here follow runs that other processes execute.
            # Its connection hears assistants' changes too (run_defaults.vouch).
            listening = run_log.listen(
                engine,
                runtime.run_log,
                more={run_defaults.CHANGES_CHANNEL: run_defaults.heard_change},
                on_listening=run_defaults.listener_hearing(),
            )
            runtime._listener = asyncio.create_task(listening, name="run-events-listener")
        if settings.llm_replay is not None:
            runtime.llm.cassettes = cassettes.Cassettes(settings.llm_replay, "replay")
        elif settings.llm_record is not None:
            runtime.llm.cassettes = cassettes.Cassettes(settings.llm_record, "record")
        if settings.record_model_requests:
            runtime.llm.observer = runtime.record_model_request
        return runtime

    async def record_model_request(self, exchange: Exchange) -> None:
        context = exchange.request.context
        if context is not None and context.on_exchange is not None:
            context.on_exchange(exchange)  # written with the run's next commit
            return
        async with self.transaction() as session:  # completions outside runs (chat completions)
            model_requests.add(session, exchange)

    def run_reservation(self) -> run_execution.Reservation | None:
        """What a run created here is stamped with, so that this process's
        worker executes it (worker.reservation()); None without a worker."""
        return self.worker.reservation() if self.worker is not None else None

    def release_reservation(self, reservation: run_execution.Reservation | None) -> None:
        """run_reservation()'s reservation, its run never written (Worker.release)."""
        if reservation is not None and self.worker is not None:
            self.worker.release(reservation)

    def attach_worker(self, worker: Worker) -> None:
        """The worker of this process: new runs wake it at once."""
        self.worker = worker
        self.wake_worker = worker.wake

    async def close(self) -> None:
        """Stop and release everything; a close() cancelled midway leaves
        none of its wakes' NOTIFYs running and may be called again."""
        self._closing = True
        if self._listener is not None:
            await cancel_and_wait(self._listener)
        if self._signals:
            # A wake's NOTIFY still in flight holds a pooled connection: one
            # left running past the disposes below would be taken back by the
            # disposed pool for good, unclosed.
            try:
                await asyncio.wait(set(self._signals), timeout=SIGNALS_CLOSE_SECONDS)
            finally:  # also when this close() is cancelled in the wait: none runs on alone
                for task in self._signals:
                    task.cancel()
                await asyncio.gather(*self._signals, return_exceptions=True)
        await self.run_log.close()
        await self.llm.aclose()
        if self.read_engine.sync_engine.pool is not self.engine.sync_engine.pool:
            await self.read_engine.dispose()
        if self.poll_engine is not None:
            await self.poll_engine.dispose()
        await self.engine.dispose()
        if self._peers is not None:  # after this process's last write
            await self._peers.close()

    def wakes_by_notify(self) -> bool:
        """Whether new work is signalled to the workers of other processes
        (PostgreSQL, no worker in this one): a transaction that queues work
        may carry the signal itself (run_log.append's ``wake_workers``)
        instead of wake()'s transaction after its commit. Unlike that one,
        which was best effort, the signal is then part of the create's
        commit: a full NOTIFY queue (a listener stuck in a transaction)
        fails the create, as it already fails any append that NOTIFYs."""
        return self.wake_worker is None and self.run_log.postgres

    def wake(self, *, files: bool = True) -> None:
        """There is new work: the worker of this process starts it at once;
        without one (an API replica), PostgreSQL carries the signal to the
        standalone workers (SQLite has no other processes to tell)."""
        if self.wake_worker is not None:
            self.wake_worker(files=files)
        # Not once close() began: a NOTIFY started then could outlive its wait
        # for the others and open a connection on the disposed engine's new
        # pool, which nothing closes. The workers find the work by polling.
        elif not self._closing and not db.is_sqlite(self.settings.resolved_database_url()):
            task = asyncio.get_running_loop().create_task(db.notify_work(self.engine))
            self._signals.add(task)  # keep a reference until it is done
            task.add_done_callback(self._signals.discard)

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncSession]:
        """One read-only transaction, for searches and streams: on SQLite a
        WAL reader beside the writers (it neither takes nor waits for the
        process's write lock), on PostgreSQL a READ ONLY transaction. A write through
        it fails; one snapshot for all its reads."""
        async with self.readers() as session, session.begin():
            yield session

    @asynccontextmanager
    async def reading_statement(self) -> AsyncIterator[AsyncSession]:
        """A session for reads of one statement each (a stream's reads of
        its run's log): on PostgreSQL outside a transaction (autocommit:
        each statement its own snapshot, without BEGIN and COMMIT, a round
        trip each; issue 17), on SQLite reading() itself. Unlike reading()
        on PostgreSQL, not read-only (asyncpg sets that only in a BEGIN):
        for reads only."""
        if not self.run_log.postgres:
            async with self.reading() as session:
                yield session
            return
        async with self.readers() as session:
            await session.connection(execution_options=db.AUTOCOMMIT)
            yield session
            await session.commit()  # no round trip in autocommit; the session then closes at once (db.Session)

    def log_news_announced(self) -> bool:
        """Whether every append to a run's log reaches this process's
        followers through the bus, so that they read the log only as a safety
        net (app/run_follow.py): on PostgreSQL while the listener is open
        (this process's appends are handed over, other processes' NOTIFY, and
        every follower is nudged when the listener opens), and on SQLite
        while this process is the file's only server process (every append
        is its own)."""
        return (self.run_log.postgres and self.run_log.listening) or self.run_log.deliver_early

    @asynccontextmanager
    async def poll_read(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads that write nothing, with no ORM session
        (issue 17: a poll's read). Its statements run outside a transaction
        (autocommit: each sees what was committed when it starts, as in a
        transaction of one statement), which spares the BEGIN and the
        ROLLBACK, a round trip each on PostgreSQL. On SQLite a WAL reader
        (db.create_poll_engine), which neither takes nor waits for this
        process's write lock, so a poll does not queue behind the writers,
        and runs on the event loop's thread (in-memory SQLite: the one
        connection, as any transaction)."""
        if self.poll_engine is not None:
            async with self.poll_engine.connect() as connection:
                yield connection
            return
        if db.is_sqlite(self.settings.resolved_database_url()):
            async with self.read_engine.connect() as connection:
                yield connection
            return
        async with self.engine.connect() as connection:
            yield await connection.execution_options(**db.AUTOCOMMIT)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """One short unit of work: commits on success, rolls back on error.

        Begun and, on SQLite, committed without SQLAlchemy's greenlet where
        nothing needs it (issue 17): the begin does no I/O (the session
        connects at its first statement), and on SQLite every transaction
        with nothing for the ORM to flush (an executor's step or end, a
        lease renewal, a read; the claim's where claims_raw() is false; its
        writes held back, sent straight or executed) commits on the driver
        (db.commit_straight)."""
        async with self.sessionmaker() as session:
            try:
                session.sync_session.begin()  # no connection yet: no I/O
                yield session
                logged = run_log.logged(session)
                begun = session.sync_session.get_transaction()
                if begun is not None and not begun.is_active and logged:
                    # Rolled back within (a failed flush caught there) after
                    # run events were logged: they were never written.
                    # session.commit() says so (PendingRollbackError), and
                    # the events go back as unwritten below, not to streams.
                    await session.commit()
                elif begun is None or not begun.is_active:
                    # Ended or rolled back within, nothing logged: closed as
                    # session.begin()'s block closes it.
                    await session.rollback()
                elif await db.commit_straight(session, seen_through=logged, undo=self.run_log.rolled_back):
                    pass
                elif logged:
                    await db.commit_seen_through(session, undo=self.run_log.rolled_back)
                else:
                    await session.commit()
            except BaseException:
                await self._roll_back(session)
                raise
            self.run_log.committed(session)  # the run events it logged reach streams now

    def claims_raw(self) -> bool:
        """Whether the worker's claim runs as a raw transaction (claiming()):
        on a SQLite file whose run logs this process alone writes (its
        counters number the claim's appends without a read; a run it has
        not seen is guessed and corrected at the commit: RunLog.append),
        with a WAL reader of its own (a prompt that needs a read is read
        there, RunExecution._first_prompt: a file given as a ``file:`` URI
        has none, and its read would wait for the write lock the claim
        holds), and no scripted rule reads a thread's metadata
        (RunExecution._context)."""
        return (
            db.collects(self.engine)
            and self.read_engine is not self.engine
            and self.run_log.deliver_early
            and not self.llm.script.needs_thread_metadata()
        )

    @asynccontextmanager
    async def raw_writes(self) -> AsyncIterator[AsyncSession]:
        """A transaction whose writes are all held back and which reads
        nothing through its session (the worker's claim, claim_and_start;
        an executor's end on SQLite after the claim, RunExecution._write):
        transaction(), or where claims_raw() says so a session whose transaction is a
        db.RawTransaction (issue 17: no SQLAlchemy Connection checked out
        and closed, no SQLAlchemy transaction, no greenlet but the pool
        checkout's). A claim's UPDATE goes with BEGIN IMMEDIATE in one hop
        (run_now); its writes are held back on the raw connection and
        committed with it in one hop (held_back.RAW); it never connects, so
        nothing in it may read through it (a read raises
        db.RawSessionConnected: a prompt that needs one is read on a WAL
        reader, RunExecution._first_prompt). A failure or a cancellation
        rolls it back whole, as transaction()'s; its COMMIT is seen through
        a cancellation when run events were logged."""
        if not self.claims_raw():
            async with self.transaction() as session:
                yield session
            return
        raw = await db.RawTransaction.begin(self.engine)
        session = self.sessionmaker()
        session.info[db.RAW] = raw.held
        try:
            yield session
            _flushless_commit_begins(session, "a raw transaction")
            await raw.commit(session, seen_through=run_log.logged(session), undo=self.run_log.rolled_back)
        except BaseException:
            try:
                try:
                    # Its run log appends undone before end() hands the write
                    # lock on (a failed COMMIT leaves it to end()): a writer let
                    # in first would number its appends after the undone ones.
                    self._ended_badly(session)
                finally:
                    session.sync_session.close()  # no connection: no I/O
            finally:
                await raw.end()  # whatever raised before it: the lock freed, the connection given back
            raise
        try:
            try:
                session.sync_session.close()
            finally:
                await raw.end()
        except BaseException:
            # Cancelled (or failed) giving the connection back after the
            # COMMIT: the events it logged are in the log all the same.
            self.run_log.committed(session)
            raise
        self._flushless_commit_ended(session)

    # The worker's claim's transaction (claim_and_start); the same function, no
    # context manager more around it on the claim's path.
    claiming = raw_writes

    @asynccontextmanager
    async def grouped_writes(self) -> AsyncIterator[AsyncSession]:
        """raw_writes() for a provider run's end (RunExecution._write), where
        claims_raw() says so: its writes are collected without the write
        lock, and go in the group queued for it (sqlite_groups: one hop for
        the ends that queue together, each in its own savepoint, each told
        its own outcome; issue 17: each end was a raw transaction, a hop,
        of its own). Its appends are numbered before the lock is held (RunLog
        numbers them: this process alone writes the run logs), and another
        append of the run withdraws it while its hop is unsent
        (sqlite_groups.Withdrawn: made again, as after a miss). Like
        raw_writes()' session, it never connects (db.RawSessionConnected)
        and flushes nothing; a failure or a cancellation rolls it back whole
        (a cancellation once its hop is sent waits for its outcome)."""
        if not self.claims_raw() or db.writers_of(self.engine).idle():
            # The lock free, nobody queued (one client): a group would be
            # this end alone, its task and futures a loop turn and about
            # 0.1 ms of loop CPU more than the raw transaction, which takes
            # the lock at once (bench/README, branch provgroup).
            async with self.raw_writes() as session:
                yield session
            return
        session = self.sessionmaker()
        session.info[db.COLLECTED] = []
        session.info[db.GROUPED] = True
        try:
            yield session
            _flushless_commit_begins(session, "a grouped end")
            if session.info.get(db.COLLECTED):
                await sqlite_groups.commit_grouped(
                    session, self.engine, functools.partial(self.run_log.joined, session)
                )
        except BaseException:
            session.info.pop(db.COLLECTED, None)  # unsent
            session.sync_session.close()  # never connected: no I/O
            self._ended_badly(session)
            raise
        session.sync_session.close()
        self._flushless_commit_ended(session)

    def _flushless_commit_ended(self, session: AsyncSession) -> None:
        """raw_writes()' and grouped_writes()' commit done: the run events
        it logged reach streams now, and the session's after_commit event
        fires as session.commit() fires it (_flushless_commit_begins)."""
        self.run_log.committed(session)
        sync = session.sync_session
        if sync.dispatch.after_commit:
            sync.dispatch.after_commit(sync)

    @asynccontextmanager
    async def _collecting(self) -> AsyncIterator[AsyncSession]:
        """unit_of_work() on a SQLite file: a session that collects its
        held-back writes while it has not connected. Connected (a read, a
        statement not held back) or with ORM changes to flush, it commits
        as transaction()'s does, the collected writes first in its
        transaction; else sqlite_groups.commit_collected() sends them in one hop."""
        async with self.sessionmaker() as session:
            session.info[db.COLLECTED] = []
            try:
                yield session
                if session.info.get(db.COLLECTED) and session.in_transaction():
                    # Begun without connecting (an ORM add() of a clean row
                    # autobegins): session.commit() would connect nothing,
                    # and the collected writes would be lost unsent.
                    # Connected, its transaction takes them (hand_over).
                    await session.connection()
                if session.in_transaction() or session.new or session.dirty or session.deleted:
                    if run_log.logged(session):
                        await db.commit_seen_through(session, undo=self.run_log.rolled_back)
                    else:
                        await session.commit()
                elif session.info.get(db.COLLECTED):
                    await sqlite_groups.commit_collected_seen_through(session, self.engine)
                assert not session.info.get(db.COLLECTED), "collected writes left unsent"
            except BaseException:
                await self._roll_back(session)
                raise
            self.run_log.committed(session)  # the run events it logged reach streams now

    async def _roll_back(self, session: AsyncSession) -> None:
        """The unit of work raised: the run log told, then its rollback,
        which runs even if the telling fails (the drained deltas go back to
        the buffer whether or not the rollback then fails or is cancelled:
        they would otherwise never be logged, and the run stay appending)."""
        try:
            # Told first: on SQLite the rollback hands the write lock on
            # (a failed COMMIT leaves it to it: db.commit_straight, and
            # session.commit()'s, sqlite_driver.OneHopConnection.commit),
            # and the rollback may yield after that (the session's close: an
            # overflow connection closed at the checkin is I/O), so a writer
            # let in then, before an undo after it, would number its appends
            # after this transaction's (test_grouped_ends' queued-cancel
            # test, connected). The undo does no I/O.
            self._ended_badly(session)
        finally:
            if session.in_transaction():
                await session.rollback()

    def _ended_badly(self, session: AsyncSession) -> None:
        """The unit of work raised: the run log told, before its rollback or
        RawTransaction.end() hands SQLite's write lock on (_roll_back,
        raw_writes; grouped_writes holds no lock): its appends undone
        (RunLog.rolled_back: the counters back, the deltas back in the
        buffer), or, its COMMIT seen through a cancellation and committed
        (db.committed_despite_cancellation), logged as committed. A second
        call finds nothing to do (a COMMIT that lost its connection has
        undone them already: db.lost_after_undo)."""
        if db.committed_despite_cancellation(session):
            self.run_log.committed(session)
        else:
            self.run_log.rolled_back(session)

    @asynccontextmanager
    async def unit_of_work(self) -> AsyncIterator[AsyncSession]:
        """transaction(), for work that may turn out to be a single
        statement (issue 17). On PostgreSQL the session is begun by its
        first statement rather than up front, so that a unit whose first
        statement is also its last (run_log.append's ``last_statement``)
        runs it outside a transaction block (autocommit): PostgreSQL then
        runs it in an implicit transaction of its own, all or nothing, its
        NOTIFYs delivered when it ends, without the BEGIN and the COMMIT (a
        round trip each). A unit of more statements is one transaction, as
        transaction()'s: BEGIN goes, a round trip of its own, before its
        first statement. On SQLite a transaction is already one thread hop;
        on a SQLite file the unit's held-back writes are collected until
        something connects its session (held_back.COLLECTED): a unit of
        held-back writes alone (a new thread and its run) never does, and is
        committed as one function on aiosqlite's thread, without the
        session's connection, transaction or commit (issue 17)."""
        if not self.run_log.postgres:
            if not db.collects(self.engine):
                async with self.transaction() as session:
                    yield session
                return
            async with self._collecting() as session:
                yield session
            return
        async with self.sessionmaker() as session:
            # Its one autocommitted statement may go on a connection checked
            # out raw (run_log.append; issue 17), given back below.
            session.info[db.PG_AUTOCOMMIT] = None
            try:
                try:
                    yield session
                    if run_log.autocommitted(session):
                        # Its one statement has committed: nothing may follow it
                        # (no ORM flush either), and nothing may raise after it:
                        # the except below would take committed events for
                        # rolled back. (A cancellation while that statement is in
                        # flight is such an unknown outcome too, taken for a
                        # rollback: a create's run may exist, its events not
                        # handed on here, the worker here finding it at its poll.)
                        assert not (session.new or session.dirty or session.deleted), "a statement after the last"
                        if session.info[db.PG_AUTOCOMMIT] is None or session.in_transaction():
                            await session.commit()  # no round trip after an autocommitted statement
                        else:
                            self._raw_autocommitted(session)
                    elif run_log.logged(session):
                        await db.commit_seen_through(session)
                    else:
                        await session.commit()
                finally:
                    raw = session.info.pop(db.PG_AUTOCOMMIT, None)
                    if raw is not None:
                        await db.give_back_autocommit(self.engine.sync_engine, raw)
            except BaseException:
                self._ended_badly(session)
                raise
            self.run_log.committed(session)  # the run events it logged reach streams now

    @staticmethod
    def _raw_autocommitted(session: AsyncSession) -> None:
        """A unit of work whose one statement autocommitted on a raw
        connection (db.PG_AUTOCOMMIT): nothing to commit, the session never
        connected; its commit events fire as session.commit() fired them
        (the server listens to none; tests inject failures), as raw_writes()'s."""
        _flushless_commit_begins(session, "an autocommitted unit of work")
        sync = session.sync_session
        if sync.dispatch.after_commit:
            sync.dispatch.after_commit(sync)
