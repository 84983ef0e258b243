"""RunLog: writes every run event to the run's event log and hands it to
this process's followers (issue 11; the SQL is app/services/run_events.py).

Two ways in:

- ``append(session, run_id, events)``: events that accompany a state change,
  logged in the change's own transaction, so state and log agree after any
  crash. Followers and taps get them once it commits (Runtime.transaction
  calls ``committed()``).
- ``publish(run_id, events)``: the deltas between commits (message and
  step deltas). They are buffered and written by one flusher task per
  process, all runs' deltas in one multi-row INSERT, at most every
  ``run_events_flush_seconds``: on PostgreSQL within a millisecond when it
  is idle (other processes wait for them), on SQLite only after that pause.
  An append drains the run's buffer first, in its own transaction, so the
  log never has a hole that a later commit could jump; while an executor
  commits a turn (``holding``) the flusher leaves that run's deltas to it.

Sequence numbers are allocated under the run's row lock (``max(seq) + 1``),
so appends to one run commit in order on every engine and across processes
(a run created by the appending transaction needs no lock: nobody else sees
it before that commit).
On SQLite (one process, the embedded default) the deltas reach this
process's followers the moment they are published, with the sequence number
this process will write (every writer of the process shares the counter;
not while an append of the run is uncommitted: see _early_seq),
and an append numbered by that counter goes to SQLite with its
transaction's COMMIT rather than in a hop of its own (``_predict``);
on PostgreSQL they reach every follower once flushed, followers elsewhere
woken by a NOTIFY on ``RUN_EVENTS_CHANNEL`` whose payload is the run id and
this process's token (``origin``: a process skips its own NOTIFYs).
That NOTIFY is sent by the INSERT that logs the events, in their own
transaction, when no other transaction of this process is NOTIFYing
(PostgreSQL commits NOTIFYing transactions one at a time in the whole
database); otherwise by one notifier task per process, after the commits,
coalesced (issue 17: one at a time, a transaction fewer per commit).
The append that logs a run's creation sends none at all: no process can
follow a run before the commit that makes its id known.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app import db, orm, sqlite_groups
from app.bus import Entry, EventBus
from app.cancelling import cancel_and_wait
from app.services import claimed_starts, core_rows, new_rows, run_events, run_state
from app.wire.events import FINAL_RUN_EVENTS, Event

log = logging.getLogger("app.run_log")

RUN_EVENTS_CHANNEL = "assistants_run_events"
# The size of a process's token in its NOTIFYs (RunLog.origin): 12 hex digits.
ORIGIN_BYTES = 6
# Runs whose next sequence number this process remembers (the rest are read
# from the log at their next append).
MAX_TRACKED_RUNS = 10_000
_SESSION_KEY = "run_log"
# In a session's info: its one statement ran in autocommit (append's ``last_statement``).
_AUTOCOMMITTED = "run_log_autocommitted"
# PostgreSQL: the first delta after a pause waits this long before its flush,
# so that an executor whose turn ends at once takes it into its own commit
# (see holding(); issue 17: a transaction per run fewer, a millisecond of a
# stream's first delta).
FIRST_FLUSH_GRACE_SECONDS = 0.001
# In a grouped end's session.info (db.GROUPED): withdrawn before it joined its group (RunLog.joined).
_WITHDRAWN = "run_log_withdrawn"


# A run's buffered deltas, each with the seq it was handed out early with (None: not handed out yet).
_Buffered = list[tuple[int | None, Event]]


@dataclass
class _Flushed:
    """What a flush's transaction did: the deltas it took (``drained``),
    the first seq each run's were written from (``firsts``; a run taken
    but missing had ended: its deltas were dropped), whether its statement
    NOTIFYed other processes itself, and what to raise once its rows are
    handed on (a cancellation or failure that came after its COMMIT)."""

    drained: dict[str, _Buffered] = field(default_factory=dict)
    firsts: dict[str, int] = field(default_factory=dict)
    signalled: bool = False
    raise_after: BaseException | None = None


@dataclass
class _Prediction:
    """An append numbered by this process's counter, its insert held back
    to go with the transaction's COMMIT (SQLite; see RunLog._predict)."""

    first: int  # the seq expected for the batch's first event
    returned: list[Any]  # (run_id, seq) rows the insert wrote, once it has run
    entries: list[Entry]  # what append() returned, corrected in place if the guess was wrong
    # A blind guess (the claim's raw transaction, which reads nothing, for
    # a run whose log this process has not seen yet): corrected quietly.
    guessed: bool = False


@dataclass
class _Unlocked:
    """A grouped end's appends (db.GROUPED), numbered before its transaction
    holds SQLite's write lock: until its group's hop is sent, another
    append of the run (a cancel's, holding the lock) would be numbered after
    it and committed before it. ``withdraw`` takes it out of its group while
    unsent (True; False once sent), set when it joins one (RunLog.joined)."""

    session: AsyncSession
    withdraw: Callable[[], bool] | None = None


@dataclass
class _Pending:
    """What one transaction logged, delivered when it commits."""

    run_id: str
    first: int  # the seq of the batch's first event (buffered deltas included), as this process expects it
    size: int  # events in the batch
    events: list[Event]  # for the taps and the in-process subscribers
    entries: list[Entry]  # for followers
    drained: list[tuple[int | None, Event]] = field(default_factory=list)  # buffered deltas it took
    prediction: _Prediction | None = None
    notified: bool = False  # its INSERT NOTIFYed other processes, or none needs telling (PostgreSQL)


def logged(session: AsyncSession) -> bool:
    """Whether ``session`` logged run events (RunLog.append): its commit's
    outcome decides what committed() or rolled_back() hands on."""
    return bool(session.info.get(_SESSION_KEY))


def autocommitted(session: AsyncSession) -> bool:
    """Whether ``session``'s one statement ran in autocommit (RunLog.append's
    ``last_statement``): committed already, nothing may follow it."""
    return bool(session.info.get(_AUTOCOMMITTED))


class RunLog:
    def __init__(
        self,
        bus: EventBus,
        sessionmaker: async_sessionmaker[AsyncSession],
        *,
        postgres: bool,
        flush_seconds: float,
    ) -> None:
        self.bus = bus
        self._sessionmaker = sessionmaker
        self.postgres = postgres
        # SQLite: deltas go to followers at once, numbered by this process,
        # while it is the database's only server process (app/sqlite_peers.py).
        self.deliver_early = not postgres
        # Deltas handed out early and not written yet (buffered, or in a
        # transaction that has not committed): another process may write to
        # the run only once there are none.
        self._early_unwritten = 0
        self._all_early_written = asyncio.Event()
        self.flush_seconds = flush_seconds
        self._next: OrderedDict[str, int] = OrderedDict()
        self._buffer: dict[str, list[tuple[int | None, Event]]] = {}
        self._dirty = asyncio.Event()
        # Runs whose executor is in a transaction that logs their buffered
        # deltas itself (see holding()): the flusher leaves them to it.
        self._held: dict[str, int] = {}
        # Runs whose deltas a flush has taken and not yet written (or put
        # back): the future is done when that flush has ended (see holding()).
        self._flushing: dict[str, asyncio.Future[None]] = {}
        # Runs with an append in a transaction that has not ended: their
        # deltas are not numbered early meanwhile (see _early_seq).
        self._appending: dict[str, int] = {}
        # Runs whose grouped end (db.GROUPED) was numbered and not sent yet (see _Unlocked).
        self._unlocked: dict[str, _Unlocked] = {}
        self._flusher: asyncio.Task[None] | None = None
        # PostgreSQL: runs with news for other processes, told by one NOTIFY
        # transaction at a time. A transaction that NOTIFYs holds
        # PostgreSQL's notification lock through its commit (one such commit
        # at a time in the whole database), so at most one writing
        # transaction of this process NOTIFYs itself (the one below: free
        # once its transaction has ended); the rest leave it to the notifier.
        self._notifying_session: weakref.ref[AsyncSession] | None = None
        self._notifier_busy = False
        self._news: set[str] = set()
        self._news_ready = asyncio.Event()
        self._notifier: asyncio.Task[None] | None = None
        self._closing = False  # close() began: news is kept for its own last NOTIFY
        # This process's token in its NOTIFYs' payloads, by which its listener
        # skips them (their events reached its followers at commit).
        self.origin = secrets.token_hex(ORIGIN_BYTES)
        self._signal = run_events.Signal(RUN_EVENTS_CHANNEL, self.origin)
        # PostgreSQL: whether this process's listener for other processes'
        # NOTIFYs is open (run_log.listen).
        self.listening = False
        self.flushes = 0  # counters for the benchmark and /metrics-minded readers
        self.flushed_rows = 0

    # ------------------------------------------------------------ writing

    def publish(self, run_id: str, events: list[Event]) -> None:
        """Deltas between commits: seen by taps at once, logged by the flusher."""
        self.bus.publish(run_id, events)
        buffered = self._buffer.setdefault(run_id, [])
        seq = self._early_seq(run_id, buffered)
        if seq is None:
            buffered.extend((None, event) for event in events)
        else:
            entries = [Entry(seq + offset, event) for offset, event in enumerate(events)]
            self._next[run_id] = seq + len(events)
            self._early_unwritten += len(entries)
            buffered.extend((entry.seq, entry.event) for entry in entries)
            self.bus.deliver(run_id, entries)
        self._wake_flusher()

    def _early_seq(self, run_id: str, buffered: list[tuple[int | None, Event]]) -> int | None:
        """The seq the run's next delta will be logged with, if known now
        (SQLite, this process the only writer). Not while an append of the
        run is uncommitted: the numbers it took are the log's only once it
        commits, and deltas numbered after them would be logged under other
        numbers if it failed (followers saw them with theirs). Nor behind
        deltas without one: the log numbers those when it writes them. Such
        deltas reach followers once written, with the log's numbers."""
        if not self.deliver_early or run_id in self._appending or (buffered and buffered[-1][0] is None):
            return None
        return self._next.get(run_id)

    @asynccontextmanager
    async def holding(self, run_id: str) -> AsyncIterator[None]:
        """Within: ``run_id``'s buffered deltas wait for an append (the
        executor's commit of a turn) rather than go in a flush of their own,
        so a run that ends at once costs no flusher transaction (issue 17)."""
        self._held[run_id] = self._held.get(run_id, 0) + 1
        try:
            flushing = self._flushing.get(run_id)
            if flushing is not None:
                # A flush took the run's deltas before it was held: what is
                # appended within must be numbered after them, so it waits
                # for that flush's end (its statement would wait for the
                # run's row anyway; PostgreSQL's one-statement end, whose
                # snapshot predates that wait, numbered over them and failed
                # into its fallback: review of pgend).
                await asyncio.shield(flushing)
            yield
        finally:
            self._held[run_id] -= 1
            if not self._held[run_id]:
                del self._held[run_id]
            if run_id in self._buffer:  # not appended after all
                self._wake_flusher()

    def discard(self, run_id: str) -> None:
        """Drop ``run_id``'s buffered deltas unwritten: their execution lost
        the run to another worker, whose log they must not enter (call it
        while ``holding`` the run, so the flusher has not taken them). The
        run's next number is learnt from the log again at its next append."""
        self._written(self._buffer.pop(run_id, []))
        self._next.pop(run_id, None)

    async def append(
        self,
        session: AsyncSession,
        run_id: str,
        events: list[Event],
        *,
        run_locked: bool = False,
        inserting: Sequence[orm.Base] = (),
        inserting_only_if: new_rows.OnlyIf | None = None,
        carried_by: run_state.CarriedMove | None = None,
        wake_workers: bool = False,
        last_statement: bool = False,
    ) -> list[Entry]:
        """Log ``events`` (after the run's buffered deltas) in ``session``'s
        transaction; returns their entries. With no events it still learns
        the run's next sequence number (an executor starting a run).
        ``run_locked``: this transaction already holds the run's row lock (it
        updated the row, or read it FOR UPDATE), so on PostgreSQL the lock
        is not asked for again (issue 17: a round trip per append).
        ``inserting``: new rows the events announce, inserted before the
        events or with them (on PostgreSQL by the statement that takes the
        run's lock; with ``run_locked``, up to run_events' limit, in the very
        statement that logs the events, else first, table by table: a new
        run among them counts as locked, nobody else sees it before this
        commit).
        ``inserting_only_if`` (PostgreSQL, with ``run_locked`` and a few
        rows, the new run last): the rows and the events go in only if its
        condition holds, else nothing does and its refusal is raised
        (run_events.insert_with_rows).
        ``carried_by`` (PostgreSQL, with ``run_locked``): the run's move
        (run_state.carried_move), which the events' insert goes in
        (run_events.insert_carrying), sent with it (a move has its event).
        The move's UPDATE takes the row's lock itself, so ``run_locked`` is
        passed even where the row was not locked before (after the claim);
        the numbering then relies on (run_id, seq) refusing a collision.
        ``wake_workers`` (PostgreSQL, with events and no ``carried_by``):
        the statement that logs them also wakes other processes' workers
        (db.notify_work(), delivered at this transaction's commit: issue
        17, no transaction of its own after it).
        ``last_statement``: nothing follows this append in its transaction.
        On PostgreSQL, if nothing preceded it either (a session not begun:
        Runtime.unit_of_work) and it sends one statement (the run locked,
        its few new rows and NOTIFYs in the statement that logs the
        events; a move ``carried_by`` only if it is carried alone, writing
        nothing when it misses), that statement runs in autocommit, its own transaction
        (issue 17: no BEGIN, no COMMIT); it has committed when this returns
        (a refusal of ``inserting_only_if`` wrote nothing)."""
        assert carried_by is None or (events and self.postgres and run_locked), "a move carried by its events"
        # After an autocommitted statement anything more would run as a
        # transaction of its own, not atomic with it.
        assert not autocommitted(session), "an append after the last statement"
        # A hand-off built during its create's round trip (db.gate): its
        # events are numbered and sent once the create has committed.
        if db.GATE in session.info:
            await db.passed(session)
        # PostgreSQL, the run's row locked (or new among ``inserting``): the
        # rows go in the statement that logs the events.
        with_rows = (
            bool(events) and carried_by is None and run_locked and run_events.can_insert_with_rows(session, inserting)
        )
        assert inserting_only_if is None or with_rows, "rows inserted only if, in the events' statement"
        assert not wake_workers or (self.postgres and events and carried_by is None), "woken by the events' statement"
        if (
            last_statement
            and self.postgres
            and run_locked
            and events
            and (carried_by.alone if carried_by is not None else with_rows or not inserting)
            and not session.in_transaction()
        ):
            # The whole transaction is the one statement below: PostgreSQL
            # runs it alone as atomically as between BEGIN and COMMIT. In a
            # unit of work that gives one back (db.PG_AUTOCOMMIT), on a
            # connection checked out raw: the statement goes by run_now
            # (the carried and the with-rows inserts; the plain insert goes
            # by session.execute), without the session's connection,
            # transaction and commit.
            raw = None
            if db.PG_AUTOCOMMIT in session.info and (carried_by is not None or with_rows):
                session.info[db.PG_AUTOCOMMIT] = raw = await db.autocommit_connection(_engine_of(session))
            if raw is None:
                await session.connection(execution_options=db.AUTOCOMMIT)
            session.info[_AUTOCOMMITTED] = True
            db.sending_now()  # the connection held: its one statement goes next, nothing awaited before
        if self.postgres and not run_locked:  # a SQLite transaction holds the write lock already
            await run_events.lock_inserting(session, run_id, inserting)
        elif self.postgres and inserting and not with_rows:  # many rows: by table
            await new_rows.insert_together(session, inserting)
        elif not with_rows:
            for row in inserting:  # each sent with the next statement on SQLite
                await core_rows.insert_row(session, row, write_behind=True)
        grouped = db.GROUPED in session.info
        if db.COLLECTED in session.info and not _creates(events) and not grouped:
            # A SQLite unit still collecting holds no write lock yet: a
            # number predicted now could be taken by another writer before
            # its hop. Connected, it holds the lock (the collected writes
            # handed to its transaction), and the prediction is made under it.
            await session.connection()
        if grouped and self._appending.get(run_id):
            # Another append of the run is uncommitted (a cancel's, under the
            # lock): numbered after it without the lock, this end would be
            # wrong if it rolled back (its deltas, back in the buffer, keep
            # numbers this one's events would take). Nothing taken yet: made
            # again the way that reads, under the lock, after it.
            raise sqlite_groups.Withdrawn("another append of the run is uncommitted")
        self._withdraw_unlocked(run_id, session)
        drained = self._buffer.pop(run_id, [])
        batch = [event for _seq, event in drained] + list(events)
        # ``thread.run.created`` is only ever logged by the transaction
        # that inserts the run (services.runs._queued_events), which is what
        # makes its name mean "created here"; a path logging it for a run
        # that exists already would leave other processes' followers
        # unnudged until their safety poll.
        # PostgreSQL: a run created by this transaction has no followers in
        # other processes to tell (none knows its id before this commit, and
        # one that follows it later reads its log first): no NOTIFY, neither
        # in the insert nor by the notifier (issue 17: a NOTIFYing commit
        # takes the database's notification lock, and wakes every listener).
        unknown_elsewhere = self.postgres and _creates(events)
        predicted = self._predict(run_id, drained, events) if batch else None
        # The claim's raw transaction reads nothing (Runtime.claiming): a
        # run whose log's end this process does not know is guessed to
        # have an empty log (a run inserted without events), the insert
        # numbering it after the log's real end all the same, and the
        # entries corrected at the commit before anyone sees them (_check).
        guessed = predicted is None and bool(events) and not drained and (db.RAW in session.info or grouped)
        if guessed:
            predicted = 1
        prediction = None
        signal: run_events.Signal | None = None
        try:
            if predicted is not None and run_events.can_insert_behind(session, len(batch)):
                # No hop of its own: the insert goes with the COMMIT (issue 17).
                first = predicted
                prediction = _Prediction(first, [], [], guessed)
                await run_events.insert_behind(session, run_id, batch, prediction.returned)
            elif batch and carried_by is not None:
                signal = self._notify_signal(session)
                first = await run_events.insert_carrying(session, run_id, batch, carried_by, signal=signal)
            elif with_rows:
                signal = None if unknown_elsewhere else self._notify_signal(session)
                first = await run_events.insert_with_rows(
                    session, run_id, batch, inserting, signal=signal, wake=wake_workers, only_if=inserting_only_if
                )
            elif batch:
                signal = None if unknown_elsewhere else self._notify_signal(session)
                first = (await run_events.insert(session, {run_id: batch}, signal=signal, wake=wake_workers))[run_id]
            else:  # an executor starting a run: where its deltas will go on
                first = (await run_events.last_seqs(session, [run_id]))[run_id] + 1
        except BaseException:
            # Not registered for rolled_back() yet: the drained deltas go
            # back ahead of any published meanwhile, their numbers (those
            # followers may have seen) with them; the counter is untouched.
            if drained:
                self._put_back(run_id, drained)  # outside holding(), no append may come to take them
            raise
        _rows, undelivered = self._number(run_id, first, drained)
        entries = [Entry(first + len(drained) + offset, event) for offset, event in enumerate(events)]
        if prediction is not None:
            prediction.entries = entries
        self._remember(run_id, first + len(batch))
        pending: list[_Pending] = session.info.setdefault(_SESSION_KEY, [])
        pending.append(
            _Pending(
                run_id,
                first,
                len(batch),
                list(events),
                undelivered + entries,
                drained,
                prediction,
                notified=signal is not None or unknown_elsewhere,
            )
        )
        self._appending[run_id] = self._appending.get(run_id, 0) + 1
        if grouped:
            self._unlocked[run_id] = _Unlocked(session)
        return entries

    async def append_starts(self, session: AsyncSession, starts: Sequence[claimed_starts.Start], owner: str) -> None:
        """PostgreSQL, the claim's transaction: append() of each claimed
        run's start (``run_locked``, its held move carried by its events),
        every run's in one statement (claimed_starts; issue 17: a statement
        per claim, not per run). Each run's buffered deltas go first in its
        batch, as append() drains them; the events reach streams at the
        commit (committed()), as append()'s."""
        assert self.postgres and starts and session.in_transaction(), "in the claim's transaction"
        drained = {start.run.id: self._buffer.pop(start.run.id, []) for start in starts}
        batches = [
            replace(start, events=[event for _seq, event in drained[start.run.id]] + start.events) for start in starts
        ]
        signal = self._notify_signal(session)
        try:
            firsts = await claimed_starts.insert_starting(session, batches, owner, signal=signal)
        except BaseException:
            for run_id, items in drained.items():
                if items:
                    self._put_back(run_id, items)  # as append()'s: ahead of any published meanwhile
            raise
        pending: list[_Pending] = session.info.setdefault(_SESSION_KEY, [])
        for start in starts:
            run, events = start.run, start.events
            first, taken = firsts[run.id], drained[run.id]
            _rows, undelivered = self._number(run.id, first, taken)
            entries = [Entry(first + len(taken) + offset, event) for offset, event in enumerate(events)]
            self._remember(run.id, first + len(taken) + len(events))
            pending.append(
                _Pending(
                    run.id,
                    first,
                    len(taken) + len(events),
                    list(events),
                    undelivered + entries,
                    taken,
                    None,
                    notified=signal is not None,
                )
            )
            self._appending[run.id] = self._appending.get(run.id, 0) + 1

    def _withdraw_unlocked(self, run_id: str, session: AsyncSession) -> None:
        """Before ``session`` numbers an append of ``run_id``: a grouped end
        of the run numbered and not sent yet (_Unlocked) is taken out of its
        group and rolled back here and now (its deltas back in the buffer,
        the counter back), so that this append, which holds the write lock
        or will before its hop, is numbered where the log will have it; the
        end, told sqlite_groups.Withdrawn, is made again the way that reads
        (RunExecution._commit), after this one. Once sent it is left alone
        while its hop holds the lock (the group's task frees it only after
        setting every member's outcome, sqlite_driver._commit_each) and
        once committed; sent and failed (its outcome set, its task not yet
        resumed to roll it back), it is rolled back here too."""
        unlocked = self._unlocked.get(run_id)
        if unlocked is None or unlocked.session is session:
            return
        if unlocked.withdraw is None:
            unlocked.session.info[_WITHDRAWN] = True  # not joined yet: it will not (joined())
        elif not unlocked.withdraw():
            return  # sent: in the lock's holding already, or committed
        self.rolled_back(unlocked.session)

    def joined(self, session: AsyncSession, withdraw: Callable[[], bool]) -> bool:
        """A grouped end's session (db.GROUPED) joins its group; ``withdraw``
        takes it out while unsent (_withdraw_unlocked). False, and nothing
        kept: it was withdrawn before joining, and must not join."""
        if session.info.pop(_WITHDRAWN, False):
            return False
        for entry in self._unlocked.values():
            if entry.session is session:
                entry.withdraw = withdraw
        return True

    def _forget_unlocked(self, session: AsyncSession, run_id: str) -> None:
        """``session``'s append of ``run_id`` ended: no longer to withdraw (_Unlocked)."""
        unlocked = self._unlocked.get(run_id)
        if unlocked is not None and unlocked.session is session:
            del self._unlocked[run_id]

    def appends_unread(self, run_id: str) -> bool:
        """Whether an append of events to ``run_id``'s log in the claim's raw
        transaction (Runtime.claiming), which reads nothing, can be numbered
        without a read: on SQLite, no deltas buffered (the start of a run
        that has not run)."""
        return not self.postgres and not self._buffer.get(run_id)

    def numbers_unread(self, run_id: str) -> bool:
        """Whether an append to ``run_id``'s log in a raw transaction, which
        reads nothing, is numbered without a read: SQLite, this process the
        only writer (``deliver_early``), the first of its buffered deltas
        (if any) numbered already. A delta buffered without a number (an
        append of the run was uncommitted when it was published, or its
        counter was forgotten) leaves the numbering to insert(), a read."""
        buffered = self._buffer.get(run_id)
        return not self.postgres and self.deliver_early and (not buffered or buffered[0][0] is not None)

    def _predict(self, run_id: str, drained: list[tuple[int | None, Event]], events: list[Event]) -> int | None:
        """The seq an append's batch will start at, if this process knows it
        (SQLite): 1 for a run created in this very transaction (its creation
        is among the events), else, where this process is the only writer
        (``deliver_early``), its counter (the buffered deltas' numbers). None:
        the insert tells (a hop of its own). A guess is checked once the
        insert has run (_check); the log's numbers are the database's
        either way."""
        if self.postgres:
            return None
        if drained:
            return drained[0][0] if self.deliver_early else None
        if _creates(events):
            return 1
        return self._next.get(run_id) if self.deliver_early else None

    def _check(self, pending: _Pending) -> int:
        """After the commit: a predicted append's numbers against those its
        insert wrote. They differ only if another process wrote the run's
        log meanwhile (SQLite serving processes sharing a file, which
        streams do not support: README, deployment); the entries not yet
        handed to followers are then renumbered as written. Returns the
        shift (0: the guess was right), which committed() applies to the
        counter once per run."""
        prediction = pending.prediction
        if prediction is None:
            return 0
        written = [int(seq) for _run, seq in prediction.returned]
        if not written:
            log.warning("run %s: no sequence numbers came back from its event log insert", pending.run_id)
            return 0
        shift = min(written) - prediction.first
        if shift == 0:
            return 0
        if not prediction.guessed:
            log.warning(
                "run %s: its event log was written elsewhere; renumbered from %d",
                pending.run_id,
                prediction.first + shift,
            )
        pending.entries = [Entry(entry.seq + shift, entry.event) for entry in pending.entries]
        prediction.entries[:] = [Entry(entry.seq + shift, entry.event) for entry in prediction.entries]
        return shift

    def _notify_signal(self, session: AsyncSession) -> run_events.Signal | None:
        """The signal ``session``'s transaction NOTIFYs itself (PostgreSQL),
        or None: the notifier task tells other processes once it commits."""
        if not self.postgres:
            return None
        holder = self._notifying_session() if self._notifying_session is not None else None
        if holder is not session:
            # A unit of work whose one statement autocommits on a raw
            # connection (pgraw: an end, a hand-off's start) never begins a
            # session transaction, so it holds the slot only until the next
            # unit asks: concurrent ends then NOTIFY each, PostgreSQL
            # serialising their commits. Holding it to their end sent more
            # news the notifier's way, for no gain measured (bench/README,
            # branch pgnews, not merged).
            if self._notifier_busy or (holder is not None and holder.in_transaction()):
                return None
            self._notifying_session = weakref.ref(session)
        return self._signal

    def _number(
        self, run_id: str, first: int, buffered: list[tuple[int | None, Event]]
    ) -> tuple[list[tuple[str, int, Event]], list[Entry]]:
        """The seqs the buffered deltas were written with (from ``first``), and
        the entries followers have not been handed yet (all of them unless
        delivered early)."""
        rows = [(run_id, first + offset, event) for offset, (_seq, event) in enumerate(buffered)]
        if buffered and buffered[0][0] not in (None, first):
            # Only when several processes write one run's log on SQLite, which
            # streams do not support (README, deployment): its followers here
            # may have seen different ids for these deltas.
            log.warning("run %s: its event log was written elsewhere; renumbered from %d", run_id, first)
        undelivered = [
            Entry(seq, event)
            for (_run, seq, event), (predicted, _event) in zip(rows, buffered, strict=True)
            if predicted is None or not self.deliver_early
        ]
        return rows, undelivered

    def _remember(self, run_id: str, next_seq: int) -> None:
        self._next[run_id] = max(next_seq, self._next.get(run_id, 0))
        self._next.move_to_end(run_id)
        while len(self._next) > MAX_TRACKED_RUNS:
            self._next.popitem(last=False)

    def committed(self, session: AsyncSession) -> None:
        """After the transaction commits: taps, subscribers and followers,
        here and (PostgreSQL) in other processes."""
        # The counter is where this transaction's last append for a run
        # predicted its log to end (plus deltas numbered since): only that
        # append's shift moves it (each earlier append of the run was off by
        # the same or less, and adding every shift would count them twice).
        shifts: dict[str, int] = {}
        for pending in session.info.pop(_SESSION_KEY, []):
            self._ended(pending)
            self._forget_unlocked(session, pending.run_id)
            shifts[pending.run_id] = self._check(pending)  # 0 for an append the insert numbered itself
            self._written(pending.drained)
            if pending.events:
                self.bus.publish(pending.run_id, pending.events)
            self.bus.deliver(pending.run_id, pending.entries)
            if (pending.events or pending.drained) and not pending.notified:
                self._tell_others(pending.run_id)
            # After a run's final event nothing is appended but by a new
            # writer, which reads the log: its number is forgotten.
            if pending.entries and pending.entries[-1].event.name in FINAL_RUN_EVENTS:
                self._next.pop(pending.run_id, None)
                shifts.pop(pending.run_id, None)
        for run_id, shift in shifts.items():
            if shift and run_id in self._next:
                self._next[run_id] += shift

    def _put_back(self, run_id: str, items: list[tuple[int | None, Event]], *, wake: bool = True) -> None:
        """Deltas taken from the buffer and not written go back ahead of any
        published since, their numbers (which followers may have seen) with
        them; the flusher is woken for them unless it is the one putting back."""
        self._buffer[run_id] = items + self._buffer.get(run_id, [])
        if wake:
            self._wake_flusher()

    def rolled_back(self, session: AsyncSession) -> None:
        """The transaction failed: the deltas it took go back to the buffer."""
        for pending in reversed(session.info.pop(_SESSION_KEY, [])):
            self._ended(pending)
            self._forget_unlocked(session, pending.run_id)
            if pending.drained:
                self._put_back(pending.run_id, pending.drained)
            if not self.deliver_early or (pending.prediction is not None and pending.prediction.guessed):
                self._next.pop(pending.run_id, None)  # re-read from the log at the next append
            elif self._next.get(pending.run_id) == pending.first + pending.size:
                # The counter goes back to just after the deltas this append
                # took (they keep the numbers followers saw, back in the
                # buffer). No delta was numbered after the append meanwhile
                # (_early_seq); the check guards a counter learnt again since.
                self._next[pending.run_id] = pending.first + len(pending.drained)

    def _ended(self, pending: _Pending) -> None:
        """``pending``'s transaction committed or rolled back."""
        left = self._appending.get(pending.run_id, 0) - 1
        if left > 0:
            self._appending[pending.run_id] = left
        else:
            self._appending.pop(pending.run_id, None)

    def _written(self, items: list[tuple[int | None, Event]]) -> None:
        early = sum(1 for seq, _event in items if seq is not None)
        if early:
            self._early_unwritten -= early
            if self._early_unwritten <= 0:
                self._all_early_written.set()

    # ------------------------------------------------------------ other processes

    async def stop_early_delivery(self) -> None:
        """Another process opened the SQLite database: from now on deltas
        reach followers once written; returns once every delta handed out
        ahead is written, so that no append elsewhere can take its number."""
        self.deliver_early = False
        # Followers waiting as if every append were told to them (a wait of
        # seconds: Runtime.log_news_announced) look again now.
        self.bus.nudge_all()
        while self._early_unwritten > 0:
            self._all_early_written.clear()
            await self.flush()
            if self._early_unwritten > 0:  # in a transaction of this process that has not committed yet
                with suppress(TimeoutError):
                    async with asyncio.timeout(self.flush_seconds):
                        await self._all_early_written.wait()

    def start_early_delivery(self) -> None:
        """This process is the SQLite database's only one again. The next
        sequence numbers it remembers may be stale (others appended): each
        run's is learnt again at its next append."""
        self._next.clear()
        self.deliver_early = True

    def _tell_others(self, run_id: str) -> None:
        if not self.postgres:
            return
        self._news.add(run_id)
        self._news_ready.set()
        if self._closing:  # close() sends the last news itself, and no notifier may outlive it
            return
        if self._notifier is None or self._notifier.done():
            self._notifier = asyncio.get_running_loop().create_task(self._notify_forever(), name="run-log-notifier")

    async def _notify_forever(self) -> None:
        """One NOTIFY transaction at a time for every run with news since
        the last: under load the news of many commits share one."""
        while True:
            await self._news_ready.wait()
            self._news_ready.clear()
            news, self._news = sorted(self._news), set()
            self._notifier_busy = True
            try:
                await self._send_news(news)
            except Exception as error:  # followers elsewhere also poll: a lost signal costs latency only
                log.warning("could not signal new run events to other processes (%s)", error)
            finally:
                self._notifier_busy = False

    async def _send_news(self, run_ids: list[str]) -> None:
        """NOTIFY other processes of news of ``run_ids``: one statement, its
        own transaction (issue 17: no BEGIN, no COMMIT), on a connection
        checked out raw (db.autocommit_connection: no session connection,
        transaction or commit)."""
        async with self._sessionmaker() as session:
            raw = await db.autocommit_connection(_engine_of(session))
            if raw is None:
                await session.connection(execution_options=db.AUTOCOMMIT)
            else:
                session.info[db.PG_AUTOCOMMIT] = raw
            try:
                await run_events.notify(session, self._signal, run_ids)
            finally:
                # (None if run_now declined the statement: given back, the session connected instead.)
                held = session.info.pop(db.PG_AUTOCOMMIT, None)
                if held is not None:
                    await db.give_back_autocommit(_engine_of(session), held)
            if session.in_transaction():  # (connected: not on the raw connection, run_now declined it)
                # No round trip in autocommit; the session then closes without
                # a task of its own (db.Session).
                await session.commit()

    # ------------------------------------------------------------ flushing

    def _wake_flusher(self) -> None:
        self._dirty.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_forever(), name="run-log-flusher")

    async def _flush_forever(self) -> None:
        while True:
            await self._dirty.wait()
            if self.deliver_early:
                # SQLite: followers here have the deltas already, so writing
                # waits for more (a short run's go with its final commit).
                await asyncio.sleep(self.flush_seconds)
            else:
                await asyncio.sleep(FIRST_FLUSH_GRACE_SECONDS)  # see holding()
            self._dirty.clear()
            try:
                await self.flush()
            except Exception as error:  # the buffer is kept; the next round retries
                log.warning("writing run events failed (%s); retrying", error)
                self._dirty.set()
            # On PostgreSQL the first delta after a pause is written at once;
            # the ones that follow it gather for this long (one INSERT for all).
            if not self.deliver_early:
                await asyncio.sleep(self.flush_seconds)

    async def flush(self) -> None:
        """Write every buffered delta, all runs in one transaction."""
        taken: list[str] = []
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            await self._flush(taken, ended)
        finally:
            for run_id in taken:
                if self._flushing.get(run_id) is ended:
                    del self._flushing[run_id]
            ended.set_result(None)

    async def _flush(self, taken: list[str], ended: asyncio.Future[None]) -> None:
        wanted = sorted(run_id for run_id in self._buffer if run_id not in self._held)
        if not wanted:
            return
        if self.postgres:
            flushed = await self._write_postgres(wanted, taken, ended)
        elif (engine := self._raw_flush_engine()) is not None:
            flushed = await self._write_raw(engine, wanted, taken, ended)
        else:
            flushed = await self._write(wanted, taken, ended)
        rows: list[tuple[str, int, Event]] = []
        delivered: list[tuple[str, list[Entry]]] = []
        for run_id, first in flushed.firsts.items():
            numbered, undelivered = self._number(run_id, first, flushed.drained[run_id])
            rows += numbered
            self._remember(run_id, first + len(numbered))
            delivered.append((run_id, undelivered))
        self.flushes += 1
        self.flushed_rows += len(rows)
        for items in flushed.drained.values():
            self._written(items)  # the dropped ones too: nothing is written in their place
        dropped = set(flushed.drained) - set(flushed.firsts)
        if dropped:  # the run ended under its executor (expired, say): late deltas have no place
            log.debug("dropped late deltas of ended runs %s", ", ".join(sorted(dropped)))
        for run_id, entries in delivered:
            self.bus.deliver(run_id, entries)
            if not flushed.signalled:
                self._tell_others(run_id)
        if flushed.raise_after is not None:
            raise flushed.raise_after

    def _drain(self, wanted: list[str], taken: list[str], ended: asyncio.Future[None]) -> dict[str, _Buffered]:
        """Take the buffered deltas of ``wanted`` that no append holds (call
        it with the runs locked: an append running now either went before,
        and drained them, or waits for this flush's commit)."""
        drained = {
            run_id: self._buffer.pop(run_id) for run_id in wanted if run_id in self._buffer and run_id not in self._held
        }
        for run_id, items in drained.items():
            self._flushing[run_id] = ended
            taken.append(run_id)
            if items and items[-1][0] is None:
                # Deltas the log numbers as it writes them (published while
                # an append was uncommitted): the run's counter is behind
                # them until this flush ends, so a delta published meanwhile
                # must not be numbered from it (it would take their numbers).
                # It waits for the log too; the flush's end learns the counter.
                self._next.pop(run_id, None)
        return drained

    async def _write(self, wanted: list[str], taken: list[str], ended: asyncio.Future[None]) -> _Flushed:
        """A flush's transaction through the session, on a SQLite file that
        other processes write too (a lone process's: _write_raw(); on
        PostgreSQL: _write_postgres()): the write lock taken, the runs that
        ended left out, their deltas taken and inserted, committed."""
        flushed = _Flushed()
        session: AsyncSession | None = None
        committed = False
        try:
            async with self._sessionmaker() as session, session.begin():
                live = set(await run_events.lock(session, wanted, live_only=True))
                flushed.drained = self._drain(wanted, taken, ended)
                batches = {
                    run_id: [event for _seq, event in flushed.drained[run_id]]
                    for run_id in sorted(live & set(flushed.drained))
                }
                flushed.firsts = await run_events.insert(session, batches)
                if flushed.drained:  # (close() cancels the flusher: its deltas are not to be written twice)
                    await db.commit_seen_through(session)
                    committed = True
        except BaseException as error:
            self._settle(flushed, error, committed=committed, session=session)
        return flushed

    async def _write_postgres(self, wanted: list[str], taken: list[str], ended: asyncio.Future[None]) -> _Flushed:
        """A flush on PostgreSQL, in one autocommitted statement
        (run_events.flush_postgres: migration 0017's function takes the
        live runs' locks, then numbers and inserts their deltas; issue 17: a
        flush was three round trips, BEGIN with the lock, the insert and
        the COMMIT). The deltas are taken before it is sent: an append of
        one of the runs waits for this flush's end (holding()). Its outcome
        is seen through a cancellation (close() cancels the flusher, then
        flushes again: its deltas must not be written twice)."""
        flushed = _Flushed()
        flushed.drained = self._drain(wanted, taken, ended)
        if not flushed.drained:
            return flushed
        batches = {run_id: [event for _seq, event in items] for run_id, items in flushed.drained.items()}

        async def write() -> dict[str, int]:
            async with self._sessionmaker() as session:
                engine = _engine_of(session)
                # A connection checked out raw, in autocommit (pgraw): no
                # SQLAlchemy Connection, transaction or execution.
                session.info[db.PG_AUTOCOMMIT] = await db.autocommit_connection(engine)
                try:
                    signal = self._notify_signal(session)
                    flushed.signalled = signal is not None
                    return await run_events.flush_postgres(session, batches, signal)
                finally:
                    raw = session.info.pop(db.PG_AUTOCOMMIT, None)
                    if raw is not None:
                        await db.give_back_autocommit(engine, raw)

        work, sending = db.watched(write())
        try:
            flushed.firsts = await db.seen_through(work, "a flush of the run log", sending=sending)
        except BaseException as error:
            written = work.done() and not work.cancelled() and work.exception() is None
            if written:
                flushed.firsts = work.result()
            self._settle(flushed, error, committed=written, session=None)
        return flushed

    async def _write_raw(
        self, engine: AsyncEngine, wanted: list[str], taken: list[str], ended: asyncio.Future[None]
    ) -> _Flushed:
        """_write() on a SQLite file this process alone writes: a raw
        transaction (db.RawTransaction: the write lock, SQLite's lock() of
        every run, with no SQLAlchemy Connection or transaction), whose
        insert of the live runs' deltas goes with BEGIN and COMMIT in one
        thread hop (issue 17: a flush was three hops, a lock's SELECT, the
        insert and the COMMIT, about 1.7 ms of CPU every 20 ms while a
        model streams)."""
        flushed = _Flushed()
        raw = await db.RawTransaction.begin(engine)
        session = self._sessionmaker()
        session.info[db.RAW] = raw.held
        returned: list[Any] = []
        committed = False
        try:
            try:
                flushed.drained = self._drain(wanted, taken, ended)
                batches = {run_id: [event for _seq, event in items] for run_id, items in flushed.drained.items()}
                await run_events.insert_live_behind(session, batches, returned)
                if flushed.drained:
                    # On the thread: run on the loop's (a lone process's
                    # transactions are), it held up the streaming model's
                    # tokens (bench/README: +1.8 ms a run, 50 words 5 ms apart).
                    await raw.commit(session, seen_through=True, on_thread=True)
                    committed = True
            finally:
                try:
                    session.sync_session.close()  # never connected: no I/O
                finally:
                    await raw.end()  # the write lock freed, the connection given back
        except BaseException as error:
            self._settle(flushed, error, committed=committed, session=session)
        for run_id, seq in returned:
            flushed.firsts[run_id] = min(seq, flushed.firsts.get(run_id, seq))
        return flushed

    def _raw_flush_engine(self) -> AsyncEngine | None:
        """The engine of _write_raw(): a SQLite file's, while this process is
        its only writer (deliver_early); else None (_write())."""
        if not self.deliver_early:
            return None
        engine = self._sessionmaker.kw.get("bind")
        return engine if isinstance(engine, AsyncEngine) and db.collects(engine) else None

    def _settle(
        self, flushed: _Flushed, error: BaseException, *, committed: bool, session: AsyncSession | None
    ) -> None:
        """A flush's transaction ended by ``error``: unless its COMMIT had
        committed (before the error, or despite a cancellation), its deltas
        go back to the buffer and ``error`` is raised; if it had, they are
        written, and _flush hands them on before raising it."""
        written = committed or (
            isinstance(error, asyncio.CancelledError)
            and session is not None
            and db.committed_despite_cancellation(session)
        )
        if not written:
            self._put_back_drained(flushed.drained)
            raise error
        flushed.raise_after = error

    def _put_back_drained(self, drained: dict[str, _Buffered]) -> None:
        for run_id, items in drained.items():
            self._put_back(run_id, items, wake=False)  # (this is the flusher)

    async def close(self) -> None:
        """Write what is buffered and stop the flusher and the notifier."""
        self._closing = True
        for task in (self._flusher, self._notifier):
            if task is not None:
                await cancel_and_wait(task)
        with suppress(Exception):
            await self.flush()
        if self._news:
            with suppress(Exception):
                await self._send_news(sorted(self._news))


async def listen(
    engine: AsyncEngine,
    run_log: RunLog,
    retry_seconds: float = 1.0,
    *,
    more: Mapping[str, Callable[[str], None]] | None = None,
    on_listening: Callable[[bool], None] | None = None,
) -> None:
    """Nudge this process's followers of a run whenever another process logs
    events for it (PostgreSQL), until cancelled. Each time the listening
    connection is opened (the first time too) every follower is nudged once
    (a NOTIFY may have been missed while nobody listened), and
    ``run_log.listening`` says whether one is open (followers rely on
    NOTIFYs only then: Runtime.log_news_announced). This process's own
    NOTIFYs (its ``origin`` in their payload) are skipped: their events
    reached its followers at commit. ``more``: other channels heard on the
    same connection (db.listen), ``on_listening`` told as they are."""
    bus = run_log.bus

    def heard(payload: str) -> None:
        run_id, origin = run_events.parse_signal(payload)
        if origin != run_log.origin:
            bus.nudge(run_id)

    def listening(now: bool) -> None:
        run_log.listening = now
        if now:
            bus.nudge_all()
        if on_listening is not None:
            on_listening(now)

    await db.listen(engine, RUN_EVENTS_CHANNEL, heard, on_listening=listening, retry_seconds=retry_seconds, more=more)


def _engine_of(session: AsyncSession) -> Engine:
    bind = session.sync_session.bind
    assert isinstance(bind, Engine), "a session bound to its engine"
    return bind


def _creates(events: list[Event]) -> bool:
    """Whether ``events`` log their run's creation: an append in the
    transaction that inserts the run (services.runs._queued_events)."""
    return any(event.name == "thread.run.created" for event in events)
