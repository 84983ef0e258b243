"""Executes one claimed run until it completes, fails, needs tool outputs, is
cancelled or runs out of tokens (ARCHITECTURE section 4).

Each step is a short transaction followed by publishing its events; the
model is called with no session open. While the model streams, turn.py
writes the rows clients are told about (a message or a step being created);
a turn's results and the run's move go through one method, _commit(), which
is also where every cancellation ends. Status changes go through
services.run_state (via services.runs.close_out for final states).

An answer the built-in offline model has whole at once (LLM.answer_at_once:
in-process, no I/O) needs no streaming: its rows and events wait for the
turn's commit, and a run answered so right after its claim ends in the
claim's own transaction (issue 17). Every other model is streamed with no
transaction open; a streamed answer that arrives whole within
QUICK_ANSWER_SECONDS of its first event (a stub, a cache) is then written as
an instant one is, with the turn's commit (RunExecution._take).

A run picked up ``in_progress`` belonged to a worker that died or shut down:
it is resumed from its last completed tool round (services/run_execution.py
removes what the interrupted model call had written, and the call is made
again). A database error is not the run's fault: it propagates, the run
stays ``in_progress``, and the worker hands it on to be resumed.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, TypedDict

from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app import db, ids, llm, orm, sqlite_groups
from app.llm import offline
from app.observability import logs
from app.runner import markers, prompt
from app.runner.refused import refused_data
from app.runner.tools import BuiltinTool, ToolResult
from app.runner.turn import Pending, RowUpdate, Turn, TurnResult, TurnStopped, write_rows
from app.runtime import Runtime
from app.scripting import RequestContext
from app.services import (
    claimed_starts,
    core_rows,
    model_requests,
    run_defaults,
    run_events,
    run_execution,
    run_state,
    run_steps,
    runs,
)
from app.wire.events import Event

log = logging.getLogger("app.runner")

# A run that keeps calling built-in tools without ever answering is stopped.
MAX_MODEL_CALLS = 64
# How often an executing run re-reads its row for a cancel from another process.
CANCEL_POLL_SECONDS = 0.5
# How long a stopped execution waits for that read to end before cutting it short.
CANCEL_CHECK_GRACE_SECONDS = 1.0
# A streamed answer all of whose events arrive within this of its first is
# taken whole and written with the run's move (RunExecution._take); a longer
# one reaches clients this much later than its first event.
QUICK_ANSWER_SECONDS = 0.005
# A longer answer is streamed however fast it comes: built and written in
# one go it would hold the write lock meanwhile (the offline model's limit).
QUICK_ANSWER_MOST_EVENTS = offline.AT_ONCE_MOST_DELTAS
# Events that end an execution from outside: a cancel, or the reaper ending
# the run (expired past its deadline).
STOPPING_EVENTS = frozenset({"thread.run.cancelling", *(f"thread.run.{status}" for status in run_state.TERMINAL)})


# Where the executor leaves a run (anything else is the API's or the reaper's).
EndStatus = Literal["completed", "incomplete", "failed", "cancelled"]


class LastError(TypedDict):
    """A run's ``last_error`` (wire notes 2.5)."""

    code: Literal["server_error", "rate_limit_exceeded", "invalid_prompt"]
    message: str


@dataclass(frozen=True)
class Move:
    """The run's move that ends a commit of the executor (see _commit)."""

    to: EndStatus | Literal["requires_action"]
    required_action: dict[str, Any] | None = None
    last_error: LastError | None = None
    incomplete_details: dict[str, str] | None = None
    sweep: bool = False  # close the run's open steps and messages to match


# Moves _move_unread() makes without reading the run first.
_UNREAD_MOVES = frozenset({"completed", "incomplete", "requires_action"})


# Runs whose instant answer failed to be written in their claim's
# transaction (RunExecution._finish_at_once), oldest first: taken the
# streamed way from then on. A few, kept for as long as a retry takes.
_NOT_AT_ONCE: dict[str, None] = {}
_NOT_AT_ONCE_REMEMBERED = 1000


def not_at_once(run_id: str) -> None:
    """Take this run the streamed way from now on (see _NOT_AT_ONCE)."""
    _NOT_AT_ONCE[run_id] = None
    while len(_NOT_AT_ONCE) > _NOT_AT_ONCE_REMEMBERED:
        del _NOT_AT_ONCE[next(iter(_NOT_AT_ONCE))]


def _no_completion_left(budget: prompt.Budget) -> bool:
    """Whether the run's max_completion_tokens are spent."""
    return budget.completion_tokens is not None and budget.completion_tokens <= 0


class LeaseLost(Exception):
    """The run stopped being this execution's before its move: another
    worker took it over (this worker's lease lapsed and the run was claimed
    again), or it ended elsewhere (the reaper, or that other worker). The
    execution stops here, its transaction rolled back, and leaves the run
    as it is."""


class _ReaderFailed(Exception):
    """A prompt's read on the WAL reader failed in the claim's raw
    transaction (RunExecution._first_prompt): not the claim's DBAPIError,
    so start_claimed() leaves the run to start() instead of failing the claim."""


class _Unasked(enum.Enum):
    """RunExecution._first_answer before start_claimed() asked the model."""

    UNASKED = enum.auto()


_UNASKED = _Unasked.UNASKED


SERVER_ERROR = LastError(code="server_error", message="The server had an error while processing the run.")
TOO_MANY_CALLS = LastError(code="server_error", message="The run made too many model calls.")


def _missed(error: BaseException) -> bool:
    """A PostgreSQL end's outcome that its retry would have answered: the
    move missed, or its events' numbers collided with an append's (the
    run log's key; PostgreSQL's unique_violation). Any other constraint's
    refusal (a turn's row's foreign key) is worth a warning."""
    if isinstance(error, run_state.TransitionConflict):
        return True
    return (
        isinstance(error, IntegrityError)
        and getattr(error.orig, "pgcode", None) == "23505"
        and "run_events" in str(error.orig)
    )


class RunExecution:
    def __init__(
        self, runtime: Runtime, run_id: str, builtins: dict[str, BuiltinTool] | None = None, *, owner: str
    ) -> None:
        self.runtime = runtime
        self.run_id = run_id
        # The worker whose lease this execution runs under: every move it
        # makes requires that lease still on the run (run_state.transition).
        self.owner = owner
        self.builtins = builtins or {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        # Built-in tool results of this execution, by tool type (for decorate()).
        self.results: dict[str, list[ToolResult]] = {}
        # Model-request log entries of this execution's calls, written by the next commit.
        self._exchanges: list[llm.Exchange] = []
        self.context = RequestContext(run_id=run_id, on_exchange=self._exchanges.append)
        # The run and its first prompt, when start_claimed() started it.
        self._started: tuple[orm.Run, list[dict[str, Any]]] | None = None
        # The run as this execution last wrote it (see _move_unread).
        self._run: orm.Run | None = None
        # self._run's wire object as its last event sent it (its start's), when
        # this execution has one: the run's end is sent as this object with
        # the fields the end sets (_moved_event; issue 17). None: made anew.
        self._wire: dict[str, Any] | None = None
        # The first model call's outcome when start_claimed() asked for an
        # instant answer and could not use it here: _answer() takes it
        # rather than asking (and logging a model request) twice; None when
        # the model said it must be streamed (not asked again either).
        self._first_answer: list[llm.Event] | llm.LLMError | _Unasked | None = _UNASKED
        # The first model call, opened before the run's task took it
        # (open_first_call); _answer() takes its reading.
        self._open_call: _OpenCall | None = None
        # The claim's transaction, while an instant answer is committed in it.
        self._claim_session: AsyncSession | None = None
        # The run's move to in_progress, made in memory by start_claimed()
        # and not written yet: the run's next move writes it too (issue 17).
        self._held_start: run_state.HeldMove | None = None
        # Ended in the claim's transaction (start_claimed): nothing left to execute.
        self.finished = False
        # PostgreSQL, a run handed without a claim (start_handed): the
        # hand-off's condition, which the instant answer's one statement
        # checks in place of the lease.
        self._handed: run_state.HandedFrom | None = None
        # SQLite, a run handed back (hand_off): the WAL reader its earlier
        # messages were read on, whose snapshot its first prompt's reads
        # share (_first_prompt), rather than begin another.
        self.prompt_reader: AsyncSession | None = None

    async def _load(self) -> orm.Run | None:
        async with self.runtime.transaction() as session:
            return await session.get(orm.Run, self.run_id)

    async def _cancel_requested(self) -> bool:
        try:
            run = await self._load()
        except DBAPIError as error:
            # Not a reason to stop the run: the model call goes on, and its
            # own writes will tell if the database is really gone.
            log.warning("run %s: checking for a cancel failed (%s)", self.run_id, error)
            return False
        # Taken over by another worker (this one stalled past its lease):
        # stop now; the commit that follows finds it so and writes nothing.
        taken_over = run is not None and run.lease_owner != self.owner  # (none: released, claimable again)
        return run is None or run.status != "in_progress" or taken_over

    async def _commit(self, pending: Pending, move: Move | None = None, *, checked: bool = False) -> None:
        """The one place that writes a turn's results: the turn's rows and,
        with ``move``, the run's move out of the executor's hands, in one
        transaction, with its events logged; they are streamed once it commits.
        (After the claim, a first attempt whose move is checked last (on
        PostgreSQL one statement, on SQLite at the COMMIT) may fail and roll
        back whole; the transaction is then made again, reading the run.)

        This is also the one cancellation path: a run found ``cancelling``
        ends ``cancelled`` whatever ``move`` said (its open steps and
        messages swept). A move finding the run ended elsewhere (expired by
        the reaper) or in another worker's lease raises LeaseLost: nothing
        of the transaction stays. So does a commit with no move that is
        ``checked`` (the end of a built-in tools' round, which may have taken
        long enough for either)."""
        unread = move is not None and self._movable_unread(move)
        postgres = self.runtime.run_log.postgres
        # PostgreSQL, in the claim's transaction: the claim locked the run's
        # row and returned its status, so the move cannot miss; it goes in
        # the events' insert, with the turn's rows (issue 17: one round trip).
        carried = unread and postgres and self._claim_session is not None
        if unread and postgres and not carried:
            # After the claim the same (a turn's new rows and its updated
            # ones: a message written mid-answer), but the move
            # may miss (cancelling, ended, in another lease, its metadata
            # changed), and the statement may number the events before an
            # append that committed while it waited for the run's row (its
            # snapshot predates the lock). The statement is its own
            # transaction (autocommit: no BEGIN, no COMMIT; issue 17), its
            # writes made only if the move is: a miss writes nothing, a
            # collision fails it whole, and the end is made again the way
            # that reads the run first. Its outcome is seen through a
            # cancellation (a commit in flight: what it wrote must reach
            # streams, and its deltas must not be written again). The run's
            # buffered deltas stay held across both attempts: between them
            # the flusher must not write them into the log of a run another
            # worker may have taken over.
            async with self.runtime.run_log.holding(self.run_id):
                alone = self._write(pending, move, carried=True, unread=True, checked=checked)
                try:
                    work, sending = db.watched(alone)
                    # A miss or a collision is answered below; if a cancel comes first, it wrote nothing.
                    await db.seen_through(work, f"run {self.run_id}'s end", sending=sending, expected=_missed)
                    return
                except (run_state.TransitionConflict, IntegrityError):
                    self._run = None  # as it stands, known again only by a read
                await self._write(pending, move, carried=False, unread=False, checked=checked)
            return
        if unread and self._ends_held_back():
            # SQLite after the claim: the move is sent with the COMMIT, with
            # the turn's rows and the events (issue 17: the end in one
            # thread hop), so its miss (cancelling, ended, in another
            # lease, its metadata changed) is seen there: the transaction
            # rolled back whole, the end is made again the way that reads
            # the run first, as a miss seen before the commit is. The run's
            # buffered deltas stay held across both attempts (put back by
            # the rollback, not flushed between them).
            async with self.runtime.run_log.holding(self.run_id):
                try:
                    await self._write(pending, move, carried=False, unread=True, checked=checked)
                    return
                except IntegrityError as error:
                    if not run_state.moved_elsewhere(error):
                        raise
                    self._run = None  # as it stands, known again only by a read
                except sqlite_groups.Withdrawn:
                    # Grouped (Runtime.grouped_writes), another append of the
                    # run (a cancel's) came before its hop: nothing was
                    # written, its deltas are in that append; made again reading.
                    self._run = None
                except db.RawSessionConnected:
                    # The raw or grouped end met a read after all (its log's
                    # numbering needed one: another process opened the file
                    # while it waited for the write lock). It sent nothing
                    # and put its deltas back: made again the way that
                    # reads. Any other cause is a write that cannot be held
                    # back, a bug: said, though the run still ends.
                    if self.runtime.run_log.deliver_early:
                        log.warning(
                            "run %s: its end met a read on a raw or grouped transaction", self.run_id, exc_info=True
                        )
                    self._run = None  # its move made in memory only; known again by a read
                await self._write(pending, move, carried=False, unread=False, checked=checked)
            return
        await self._write(pending, move, carried=carried, unread=unread, checked=checked)

    def _ends_held_back(self) -> bool:
        """Whether an unread move's compare-and-set waits for the COMMIT
        (run_state.transition's ``unchanged``): SQLite, after the claim
        (whose transaction holds the row: the move cannot miss there), the
        start written already (a held start rolled back with a missed move
        would be lost)."""
        return not self.runtime.run_log.postgres and self._claim_session is None and self._held_start is None

    async def _write(self, pending: Pending, move: Move | None, *, carried: bool, unread: bool, checked: bool) -> None:
        """_commit()'s transaction: the move carried by the events' insert (_carried_move) or not."""
        events = list(pending.events)
        # SQLite after the claim, the move checked at the COMMIT: every
        # write is held back and nothing is read, so the claim's raw
        # transaction serves (issue 17: no SQLAlchemy Connection checked out
        # and begun through the greenlet, nor its session transaction: 0.38M
        # instructions, about 0.3 ms of loop CPU, a provider run's end;
        # bench/README, provcpu). A miss fails its COMMIT
        # as it fails transaction()'s (RunMoved), and the end made again
        # reading the run (unread=False) takes transaction().
        writes_only = unread and self._ends_held_back() and self.runtime.run_log.numbers_unread(self.run_id)
        async with (
            self._transaction(carried, writes_only=writes_only) as session,
            self.runtime.run_log.holding(self.run_id),
        ):
            if self._held_start is not None and not unread:
                await self._write_held_start(session)  # before the run is read
            if carried:
                await self._carried_move(session, pending, move, events)
            else:
                await self._write_and_move(session, pending, move, events, unread=unread, checked=checked)
        self._exchanges.clear()  # recorded: only once committed

    async def _write_and_move(
        self,
        session: AsyncSession,
        pending: Pending,
        move: Move | None,
        events: list[Event],
        *,
        unread: bool,
        checked: bool,
    ) -> None:
        """_commit()'s writes and move, but for a move carried by the events'
        insert (_carried_move: PostgreSQL's unread moves, whose writes go in
        that one statement)."""
        # Core statements, each sent with the next one on SQLite (issue 17).
        for row in pending.inserts:
            await core_rows.insert_row(session, row, write_behind=True)
        await write_rows(session, pending.rows)
        for exchange in self._exchanges:
            await core_rows.insert_row(session, model_requests.row(exchange), write_behind=True)
        moved = await self._move_unread(session, move) if move is not None and unread else None
        if moved is not None:
            events += moved
            await self.runtime.run_log.append(session, self.run_id, events, run_locked=True)  # by the UPDATE
        else:
            await self._move_read(session, move, events, checked=checked)

    async def _carried_move(
        self, session: AsyncSession, pending: Pending, move: Move | None, events: list[Event]
    ) -> None:
        """_commit()'s move on PostgreSQL: the turn's rows, the run's move
        and its events in one statement, each write a statement built once
        per shape (issue 17). Outside the claim's transaction the move also
        requires the run's metadata unchanged (run_state.carried_move)."""
        assert move is not None and self._run is not None
        # After the claim the statement is the whole transaction: its writes
        # are made only if the run moves (run_state.carried_move's
        # ``unchanged``); so is a handed run's, which is its claim too.
        alone = self._claim_session is None or self._handed is not None
        guard = run_state.MOVED_CTE if alone else None
        writes = [core_rows.insert_write(row, f"w{i}_", guard=guard) for i, row in enumerate(pending.inserts)]
        writes += [
            core_rows.update_write(change.row, change.keys, f"u{i}_", guard=guard)
            for i, change in enumerate(pending.rows)
        ]
        requests = [model_requests.row(exchange) for exchange in self._exchanges]
        writes += [core_rows.insert_write(row, f"m{i}_", guard=guard) for i, row in enumerate(requests)]
        name, carried = run_state.carried_move(
            self._run,
            move.to,
            held=self._held_start,
            lease_owner=self.owner,
            alongside=writes,
            unchanged=alone,
            handed=self._handed,
            **self._move_fields(move),
        )
        self._held_start = None
        events.append(self._moved_event(name, self._run))
        await self.runtime.run_log.append(
            session, self.run_id, events, run_locked=True, carried_by=carried, last_statement=alone
        )

    async def _write_held_start(self, session: AsyncSession) -> None:
        assert self._held_start is not None and self._run is not None
        held, self._held_start = self._held_start, None
        await run_state.write_held(session, self._run, held, lease_owner=self.owner)

    @asynccontextmanager
    async def _transaction(self, carried: bool, *, writes_only: bool = False) -> AsyncIterator[AsyncSession]:
        """_commit()'s transaction: its own, or the claim's (see
        _claim_session); after the claim, a ``carried`` move's is its one
        statement (Runtime.unit_of_work), and one that only holds writes
        back (``writes_only``: reads nothing, flushes nothing) a raw one
        where the claim's is (Runtime.raw_writes)."""
        if self._claim_session is not None:
            yield self._claim_session
            return
        if writes_only:
            async with self.runtime.grouped_writes() as session:
                yield session
            return
        async with self.runtime.unit_of_work() if carried else self.runtime.transaction() as session:
            yield session

    async def _move_read(
        self, session: AsyncSession, move: Move | None, events: list[Event], *, checked: bool = False
    ) -> None:
        """``_commit``'s path for a move that needs the run read first (and
        for no move at all): the run's row locked (with a move, or
        ``checked``), its events appended to ``events`` and logged."""
        # Locked (PostgreSQL), so a concurrent cancel waits for this move
        # instead of making its compare-and-set fail.
        run = (
            await session.get(orm.Run, self.run_id, with_for_update=True, populate_existing=True)
            if move is not None or checked
            else None
        )
        if run is None:
            pass
        elif run.status in run_state.TERMINAL:
            # Ended elsewhere (expired by the reaper, or finished by the
            # worker that took it over): its log has its last event, so this
            # turn's rows and events must not follow it.
            self._abandon(f"run {self.run_id} already ended ({run.status})")
        elif run.lease_owner != self.owner:
            self._abandon(f"run {self.run_id} was taken over by another worker")
        elif move is None:
            pass  # still this execution's: only the rows and events of the turn
        elif run.status == "cancelling" or move.to == "cancelled":
            events += await runs.close_out(session, run, "cancelled", usage=self._usage(), lease_owner=self.owner)
        elif move.to == "requires_action":
            name = await run_state.transition(
                session,
                run,
                "requires_action",
                required_action=move.required_action,
                usage=self._usage(),
                lease_owner=self.owner,
            )
            events.append(Event.of(name, runs.to_wire(run)))
        else:
            events += await runs.close_out(
                session,
                run,
                move.to,
                last_error=dict(move.last_error) if move.last_error else None,
                incomplete_details=move.incomplete_details,
                usage=self._usage(),
                sweep=move.sweep,
                lease_owner=self.owner,
            )
        # Streamed once committed; the run's row was locked above when read.
        await self.runtime.run_log.append(session, self.run_id, events, run_locked=run is not None)

    def _abandon(self, reason: str) -> None:
        """The run is no longer this execution's (in another worker's lease,
        or ended): raise LeaseLost, its deltas not yet logged dropped (called
        within the commit, while the flusher leaves them to it: the log must
        not get them)."""
        self.runtime.run_log.discard(self.run_id)
        raise LeaseLost(reason)

    def _movable_unread(self, move: Move) -> bool:
        """Whether _move_unread() may make ``move``: not when it needs the
        run read first (a sweep, a cancel) or the run is no longer
        ``in_progress`` as this execution last wrote it."""
        run = self._run
        return not (run is None or move.sweep or move.to not in _UNREAD_MOVES or run.status != "in_progress")

    async def _move_unread(self, session: AsyncSession, move: Move) -> list[Event] | None:
        """The usual move (the answer done, or tool outputs required; see
        _movable_unread), made without reading the run first (issue 17), on
        SQLite (PostgreSQL's is carried by the events' insert, _carried_move):
        a compare-and-set from ``in_progress`` held back to the COMMIT. In
        the claim's transaction it cannot miss (the row is that
        transaction's); after it, it also requires the run's metadata as
        this execution holds it (nothing else of the run changes under an
        execution), so the event carries the run as a read would have, and
        a miss (cancelling, ended by the reaper, in another worker's lease,
        metadata changed) fails the COMMIT: _commit then makes the end again
        reading the run (LeaseLost if it ended or changed hands). None, the
        run unchanged, if the move was not held back after all and missed."""
        run = self._run
        assert run is not None
        # Not added to the session: the move is a Core UPDATE and the run
        # takes its values by set_committed_value (run_state._set), so the
        # session has nothing to flush or read for it (issue 17: the add and
        # the session's close taking it back out cost about 0.08 ms of the
        # instant answer's 1.2 on SQLite). Nor is it refreshed by a missed
        # move's re-read (_move_read reads a new instance), or expired by a
        # rollback: the execution ends after its move, and nothing reads
        # self._run after it.
        # SQLite, in the claim's transaction: the row has been this
        # transaction's since the claim returned it, so the move cannot miss
        # and the row is as this execution holds it: no RETURNING, and the
        # UPDATE goes with the COMMIT (issue 17: a thread hop fewer).
        known = self._claim_session is not None and not self.runtime.run_log.postgres
        # SQLite after the claim: held back too, but checked at the COMMIT
        # against the run as this execution holds it (see _commit).
        unchanged = self._ends_held_back()
        try:
            name = await run_state.transition(
                session,
                run,
                move.to,
                refresh=not (known or unchanged),
                locked=known,
                unchanged=unchanged,
                lease_owner=self.owner,
                held=self._held_start,
                **self._move_fields(move),
            )
        except run_state.TransitionConflict:
            # (Never while the start is held: the claim's transaction holds the row.)
            assert self._held_start is None
            return None
        self._held_start = None
        return [self._moved_event(name, run)]

    def _moved_event(self, name: str, run: orm.Run) -> Event:
        """The event of an unread move of ``run`` (self._run), just made:
        the run as a read would give it now (the move is made only if
        nothing else of the run changed: see _move_unread, _carried_move),
        so, when this execution holds the run's object as its last event
        sent it (self._wire) and the move set only its own fields, that
        object with those fields (issue 17: the run not validated and
        dumped a third time); else the run validated and dumped."""
        keys = run_state.moved_keys(run)
        if self._wire is None or keys is None:  # (resumed by start(); a move that read the row back)
            event = Event.of(name, runs.to_wire(run))
        else:
            event = runs.moved_event(name, self._wire, run, keys)
        assert isinstance(event.data, dict)
        self._wire = event.data  # as self._run now stands
        return event

    def _move_fields(self, move: Move) -> dict[str, Any]:
        """What an unread move writes besides its status and stamps."""
        fields: dict[str, Any] = {"usage": self._usage()}
        if move.required_action is not None:
            fields["required_action"] = move.required_action
        if move.last_error is not None:
            fields["last_error"] = dict(move.last_error)
        if move.incomplete_details is not None:
            fields["incomplete_details"] = move.incomplete_details
        return fields

    async def _context(self, session: AsyncSession, run: orm.Run) -> RequestContext:
        """Who the model answers, for scripted offline rules; the thread is
        read only when some rule matches on its metadata."""
        metadata: dict[str, str] = {}
        if self.runtime.llm.script.needs_thread_metadata():
            thread = await session.get(orm.Thread, run.thread_id)
            metadata = dict(thread.metadata_) if thread is not None else {}
        return RequestContext(self.run_id, run.thread_id, run.assistant_id, metadata, self._exchanges.append)

    async def _end(
        self,
        to: EndStatus,
        pending: Pending | None = None,
        *,
        last_error: LastError | None = None,
        incomplete_details: dict[str, str] | None = None,
    ) -> None:
        """Close the run out in final status ``to`` (LeaseLost if it already
        ended or changed hands).
        With ``pending`` the turn finished normally: nothing is left open to
        sweep; without, its open steps and messages are closed to match."""
        move = Move(to, last_error=last_error, incomplete_details=incomplete_details, sweep=pending is None)
        await self._commit(pending or Pending(), move)

    def _usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    async def start(self) -> tuple[orm.Run, list[dict[str, Any]]] | None:
        """queued -> in_progress (or picking up an in_progress run whose worker
        died), and the first prompt, in one transaction; None if the run is
        not ours to execute."""
        chat: list[dict[str, Any]] = []
        events: list[Event] = []
        async with self.runtime.transaction() as session:
            run = await session.get(orm.Run, self.run_id)
            if run is None or run.lease_owner != self.owner:
                return None  # taken over since the claim
            if run.status == "cancelling":
                events = await runs.close_out(session, run, "cancelled", lease_owner=self.owner)
            elif run.status == "queued" and run_execution.is_past_deadline(run):
                events = await runs.close_out(session, run, "expired", lease_owner=self.owner)  # claimed too late
            elif run.status == "in_progress":
                # Resumed: the interrupted model call is issued again; the
                # client sees the run go on as if nothing happened.
                usage = await run_execution.resume_point(session, run)
                # What the dead worker's stream left open is closed first (issue 11).
                events = await run_events.close_abandoned(session, run.id)
                self.prompt_tokens, self.completion_tokens = usage.prompt_tokens, usage.completion_tokens
                log.info("resuming run %s from its last committed step", run.id)
                self.context = await self._context(session, run)
                chat = await prompt.build(session, self.runtime.storage, self.runtime.llm, run, self._budget(run))
            elif run.status != "queued":
                return None
            else:
                usage_so_far = run.usage or {}
                self.prompt_tokens = usage_so_far.get("prompt_tokens", 0)
                self.completion_tokens = usage_so_far.get("completion_tokens", 0)
                # A run that never ran (no usage recorded yet) has no steps to read.
                has_steps = run.usage is not None
                moved = await run_state.transition(session, run, "in_progress", lease_owner=self.owner)
                events = [self._opened(Event.of(moved, runs.to_wire(run)))]
                self.context = await self._context(session, run)
                chat = await prompt.build(
                    session, self.runtime.storage, self.runtime.llm, run, self._budget(run), has_steps=has_steps
                )
            # Also with no events: the log learns where this run's deltas go on.
            await self.runtime.run_log.append(session, run.id, events)
        return (run, chat) if run.status == "in_progress" else None

    async def start_claimed(
        self,
        session: AsyncSession,
        run: orm.Run,
        starts: list[claimed_starts.Start] | None = None,
        queued: dict[str, Any] | None = None,
    ) -> None:
        """Start a run just claimed, in the claim's own transaction (issue 17:
        one transaction fewer per run): queued -> in_progress and its first
        prompt, as start() does. Only a queued run on time is started here;
        any other (resumed, cancelled or expired before it began) or one
        whose prompt cannot be built here (or, in the claim's raw
        transaction, whose log has buffered deltas) is left to start() in
        execute().
        Nothing is written for the run before its prompt is built, so a run
        left to start() leaves nothing behind in the shared transaction.
        ``starts`` (PostgreSQL): a start that is not an instant answer is
        added there, for claim_and_start to write every run's in one
        statement (RunLog.append_starts), rather than written here.
        ``queued``: see _start_held."""
        events = await self._start_held(session, run, queued)
        if events is None:
            return
        assert self._started is not None
        if await self._finish_at_once(session, run, self._started[1], events):
            return
        if starts is not None and self._held_start is not None and claimed_starts.batchable(self._held_start):
            starts.append(claimed_starts.Start(run, self._held_start, events))
            self._held_start = None
            return
        carried = None
        if self._held_start is not None and self.runtime.run_log.postgres:
            # The start goes in the events' insert (issue 17: a round trip fewer).
            carried = run_state.carried_held(run, self._held_start, lease_owner=self.owner)
            self._held_start = None
        elif self._held_start is not None:
            await self._write_held_start(session)  # SQLite: sent with the events' insert
        await self.runtime.run_log.append(session, run.id, events, run_locked=True, carried_by=carried)

    async def start_handed(
        self, session: AsyncSession, run: orm.Run, handed: run_state.HandedFrom, queued: dict[str, Any] | None = None
    ) -> bool:
        """PostgreSQL: start ``run``, handed to this worker without a claim
        (hand_off), in one statement in ``session`` (Runtime.unit_of_work:
        autocommitted, no BEGIN, no COMMIT; issue 17), whose compare-and-set
        is ``handed``'s (the claim it replaces) and whose writes are made
        only if it moves the run: with an instant answer the run's start,
        its end, the turn's rows and the events (``finished``); else its
        start alone, the lease its worker's (a provider's run: its execution
        then goes on as a claimed one's, run()). Its miss (the run claimed,
        cancelled, changed since the create) or its events' numbering
        colliding with an append committed first raises
        run_execution.HandOffLost, nothing written. False, nothing written,
        when the run is not started so (not a queued run on time, its
        prompt not built here): the worker's claim takes it as any run.
        ``queued``: see _start_held."""
        events = await self._start_held(session, run, queued)
        if events is None or self._started is None:
            return False
        self._handed = handed
        try:
            if await self._finish_at_once(session, run, self._started[1], events):
                return True
        finally:
            self._handed = None
        assert self._held_start is not None
        carried = run_state.carried_handed_start(run, self._held_start, handed)
        self._held_start = None
        try:
            await self.runtime.run_log.append(
                session, run.id, events, run_locked=True, carried_by=carried, last_statement=True
            )
        except Exception as error:
            if _missed(error):  # as _finish_at_once's: nothing written, the tick's claim takes the run
                raise run_execution.HandOffLost(f"run {run.id} was not as created: {error}") from error
            raise
        return True

    async def take_started(
        self, session: AsyncSession, run: orm.Run, started: dict[str, Any] | None = None, *, may_read: bool = True
    ) -> bool:
        """Go on with ``run``, which its create inserted started
        and leased to this execution's worker (Worker.prepare's fold; issue
        17): its first prompt, built as start_claimed() builds it, its
        execution then going on as a claimed run's (run()). Nothing is
        written. A prompt that cannot be built here (or whose read fails)
        leaves the run to start(), which finds it in_progress under this
        lease, builds the prompt again and, meeting the same failure, fails
        the run as it fails a claimed one's (SERVER_ERROR); start()'s resume
        branch logs its "resuming run" line then, as expected there.
        ``may_read`` False (``session`` never connects: db.READS_ELSEWHERE):
        a prompt that needs a read is not read elsewhere either; False is
        returned, nothing taken, for the caller to try again on a session
        that may read. True otherwise."""
        try:
            context, chat = await self._first_context_and_prompt(session, run, may_read=may_read)
        except db.RawSessionConnected:
            if not may_read:
                return False
            log.debug("run %s: its first prompt is left to start()", run.id, exc_info=True)
            return True
        except Exception:  # (a DBAPIError too: start() reads again, in its own transaction)
            log.debug("run %s: its first prompt is left to start()", run.id, exc_info=True)
            return True
        self.context = context
        self._started = (run, chat)
        self._run = run
        # The object its create sent its start as: ``run`` is that row, value
        # for value (run_execution.handed_run), and nothing has moved it since.
        self._wire = started
        return True

    def open_first_call(
        self, call_out: asyncio.Future[None] | None = None, ahead_of: asyncio.Future[None] | None = None
    ) -> None:
        """Send the run's first model call now, before the run's task takes
        it (issue 17): a folded run, taken by take_started(), so the run is
        this worker's, leased and in_progress once its create has committed,
        and the call is the one the run's task would make first. The
        worker's hand-off and the run's task then start while the model
        answers, where the call went out only once the task reached
        _answer(). ``ahead_of`` (PostgreSQL): the create's commit, not done
        yet; the call is sent while the create's statement is out (the
        assistant's defaults vouched for: take_started), for a provider over
        the network only (LLM.calls_ahead), and no more than the answer's
        first event is read until that commit (_read_into's gate: a
        cassette's recording, made at the Finish, waits for it). A create
        that fails or is refused (its defaults changed by a change that
        raced it, its thread's messages changed meanwhile) cancels the call
        (discard_first_call): one provider call asked for and dropped, rare,
        for the commit's wait (a WAL flush) taken off every folded run's
        answer. Its request and reading are taken by _loop() and
        _answer(); the reader is the one _take() starts for any call (the
        idle limit, LLM.stream's metrics and model-request exchange). Not
        opened (left to the run's task as before): no prompt built here, an
        observer other than the Runtime's own (_may_answer_at_once: the
        reading path is taken only then), a budget the first call cannot be
        made within (_loop() ends the run). An execution that ends, or a
        task that is cancelled, before taking it closes it
        (discard_first_call). ``call_out`` is done once the call's request
        has gone out (its reader's first step ended), for the create
        waiting on it (Worker.answer_after); left as it is if no call is
        opened."""
        if (
            self._started is None
            or self._open_call is not None
            or self._first_answer is not _UNASKED
            or not self._may_answer_at_once()
        ):
            return
        run, chat = self._started
        if ahead_of is not None and not self.runtime.llm.calls_ahead(run.model):
            return  # (opened once the create has committed, by the worker)
        budget = self._budget(run)
        if _no_completion_left(budget) or self._over_prompt_budget(run, budget, chat):
            return
        request = self._chat_request(run, budget, chat)
        stream = _idle_limited(self.runtime.llm.stream(request), self.runtime.settings.model_idle_timeout_seconds)
        arrived: asyncio.Queue[llm.Event | _StreamEnd] = asyncio.Queue()
        hand_over = _HandOver()
        reader = asyncio.ensure_future(_read_for(self.run_id, stream, arrived, call_out, ahead_of, hand_over))
        self._open_call = _OpenCall(request, arrived, reader, stream, hand_over)

    def discard_first_call(self) -> None:
        """Close the first call open_first_call() opened, if nothing took it:
        its reader cancelled, which closes the provider's response (no retry,
        nothing written: its exchange goes with this execution)."""
        opened, self._open_call = self._open_call, None
        if opened is not None:
            opened.reader.cancel()

    async def _start_held(
        self, session: AsyncSession, run: orm.Run, queued: dict[str, Any] | None = None
    ) -> list[Event] | None:
        """start_claimed()'s start, held (run_state.hold) for the run's next
        move to write, with its first prompt: the start's events; None, the
        run left to start(), if it is not a queued run on time or its prompt
        is not built here. ``queued`` (a hand-off's): the object the run's
        create sent it queued as; ``run`` is that row, value for value
        (run_execution.handed_run), and the hand-off's compare-and-set
        requires it unchanged since (still queued, never started, its
        metadata as created; a miss writes nothing of this), so the start's
        event is that object with the fields the start set (issue 17)."""
        if run.status != "queued" or run_execution.is_past_deadline(run):
            return None
        if db.RAW in session.info and not self.runtime.run_log.appends_unread(run.id):
            return None  # its start's append would read the log: the raw claim's session reads nothing
        try:
            context, chat = await self._first_context_and_prompt(session, run)
        except DBAPIError:
            raise  # the claim's transaction is lost: the runs stay claimable
        except Exception:  # start() meets it again, in its own transaction, and fails the run
            return None
        # The claim's UPDATE locked the run's row and returned its status:
        # the move is held, for the run's end to write if it comes in this
        # transaction (an instant answer), else written after.
        moved, self._held_start = run_state.hold(run, "in_progress")
        self.context = context
        self._started = (run, chat)
        self._run = run
        if queued is None:
            return [self._opened(Event.of(moved, runs.to_wire(run)))]
        return [self._opened(runs.moved_event(moved, queued, run, tuple(self._held_start.values)))]

    def _opened(self, start: Event) -> Event:
        """``start``, the run's start's event, whose object is the run's as
        this execution goes on with it (self._wire)."""
        assert isinstance(start.data, dict)
        self._wire = start.data
        return start

    async def _first_context_and_prompt(
        self, session: AsyncSession, run: orm.Run, *, may_read: bool = True
    ) -> tuple[RequestContext, list[dict[str, Any]]]:
        """A run taken to execute without start() (start_claimed()'s held
        start, take_started()'s folded one): its usage so far counted on, its
        context and first prompt built in ``session``; each caller decides
        what a failure here leaves to start()."""
        usage_so_far = run.usage or {}
        self.prompt_tokens = usage_so_far.get("prompt_tokens", 0)
        self.completion_tokens = usage_so_far.get("completion_tokens", 0)
        context = await self._context(session, run)
        return context, await self._first_prompt(session, run, may_read=may_read)

    async def _first_prompt(
        self, session: AsyncSession, run: orm.Run, *, may_read: bool = True
    ) -> list[dict[str, Any]]:
        """The run's first prompt, read in the claim's transaction; in its
        raw transaction (Runtime.claiming), which reads nothing, a prompt
        that needs a read (a thread longer than the claim's prefetch, a run
        queued again with steps, input files) is read by a WAL reader
        instead. That reader sees what the claim's transaction sees of it:
        the transaction holds the write lock, so nothing has committed since
        the reader's snapshot, and it has written nothing the prompt reads
        (the claim's lease stamps; its other runs' rows, in other threads).
        Not ``may_read``: such a prompt raises db.RawSessionConnected."""
        budget = self._budget(run)
        has_steps = run.usage is not None
        storage, llm = self.runtime.storage, self.runtime.llm
        if self.prompt_reader is None:
            try:
                return await prompt.build(session, storage, llm, run, budget, has_steps=has_steps)
            except db.RawSessionConnected:
                if not may_read:
                    raise
        try:
            if self.prompt_reader is not None:  # (a run handed back has steps: read, not tried on ``session``)
                return await prompt.build(self.prompt_reader, storage, llm, run, budget, has_steps=has_steps)
            async with self.runtime.reading() as reader:
                return await prompt.build(reader, storage, llm, run, budget, has_steps=has_steps)
        except DBAPIError as error:
            # The reader's failure says nothing of the claim's connection:
            # the run is left to start(), the claim's other runs go on.
            raise _ReaderFailed(f"run {run.id}: its prompt's read failed ({error})") from error

    async def _finish_at_once(
        self, session: AsyncSession, run: orm.Run, chat: list[dict[str, Any]], started: list[Event]
    ) -> bool:
        """A run whose model has its whole answer at once (the offline
        model, uncued) ends in the claim's transaction (issue 17: one
        transaction per run): ``started`` (its move to in_progress), the
        answer's rows and events and the run's move, all in one append.
        False, with nothing written, when the answer must be taken as
        execute() takes it (streamed, calling built-in tools, over a
        budget, or failed: a failure is kept for execute())."""
        if not self._may_answer_at_once() or run.id in _NOT_AT_ONCE:
            return False
        budget = self._budget(run)
        if _no_completion_left(budget) or self._over_prompt_budget(run, budget, chat):
            return False
        request = self._chat_request(run, budget, chat)
        turn = self._turn(run)
        whole: list[llm.Event] | None = None
        try:
            whole = await self.runtime.llm.answer_at_once(request)
            if whole is None or self._calls_builtin(whole):
                self._first_answer = whole
                return False
            turn.at_once = True
            result = await turn.consume(_replay(whole))
        except llm.LLMError as error:
            self._first_answer = error
            return False
        except Exception:  # execute() meets it again and ends the run as it does (asking again if the asking failed)
            log.exception("run %s: its instant answer could not be taken in the claim's transaction", run.id)
            self._first_answer = _UNASKED if whole is None else whole  # (None: the asking itself failed)
            return False
        self.prompt_tokens += result.usage.prompt_tokens
        self.completion_tokens += result.usage.completion_tokens
        result.pending.events[:0] = started
        self._claim_session = session
        try:
            more = await self._after_turn(run, result, budget)
        except Exception as error:
            if self._handed is not None and _missed(error):
                # A handed run's one statement (carried alone) missed its
                # compare-and-set or collided with an append committed
                # first: it wrote nothing, and refused nothing of the answer
                # (the claim that takes the run answers it at once again).
                raise run_execution.HandOffLost(f"run {run.id} was not as created: {error}") from error
            # A DBAPIError: the claim's transaction is lost, the runs stay
            # claimable; only a failure of the data, not of the database,
            # would come back with every claim of this run, holding the
            # claim's other runs back. Any other: the claim's transaction is
            # in no state to commit: it is rolled back, every run of the
            # claim claimable again. This one's answer is then written by
            # execute(), in a transaction of its own, where the same failure
            # fails it alone (not claimed and failing here again and again).
            if not isinstance(error, DBAPIError) or refused_data(error):
                not_at_once(run.id)
            raise
        finally:
            self._claim_session = None
        assert not more, "an answer with no built-in call ends the turn"
        self.finished = True
        return True

    async def execute(self) -> None:
        if self.finished:
            return
        try:
            await self._execute()
        except LeaseLost as lost:
            # Quietly, as a lost compare-and-set: the run is someone else's.
            log.warning("%s; this execution stops without its last writes", lost)
        finally:
            opened = self._open_call
            if opened is not None:  # ended before its first answer was taken
                self.discard_first_call()
                await _until_ended(opened.reader)

    async def _execute(self) -> None:
        try:
            started = self._started or await self.start()
            if started is None:
                return
            self._run = started[0]
            await self._loop(*started)
        except run_state.TransitionConflict:
            await self._end("cancelled")  # only a cancel moves a run under its executor (else LeaseLost)
        except LeaseLost:
            raise
        except DBAPIError as error:
            if not refused_data(error):
                # The database failed us (connection dropped, locked too
                # long): the run is not at fault. It stays in_progress and is
                # resumed from its last committed step once the worker
                # releases (or loses) the lease.
                raise
            # The data of the run itself was refused (a value the database
            # cannot store, refused.py): a resumed run would meet it again,
            # and again call the model, until the run expires. It fails (its
            # end writes none of what was refused).
            log.exception("run %s: the database refused its data", self.run_id)
            await self._end("failed", last_error=SERVER_ERROR)
        except Exception:
            log.exception("run %s failed unexpectedly", self.run_id)
            await self._end("failed", last_error=SERVER_ERROR)

    def _budget(self, run: orm.Run) -> prompt.Budget:
        return prompt.Budget(
            prompt_tokens=None if run.max_prompt_tokens is None else run.max_prompt_tokens - self.prompt_tokens,
            completion_tokens=None
            if run.max_completion_tokens is None
            else run.max_completion_tokens - self.completion_tokens,
        )

    async def _request(
        self, run: orm.Run, budget: prompt.Budget, chat: list[dict[str, Any]] | None
    ) -> llm.ChatRequest | None:
        if chat is None:
            async with self.runtime.transaction() as session:
                chat = await prompt.build(session, self.runtime.storage, self.runtime.llm, run, budget)
        if self._over_prompt_budget(run, budget, chat):
            await self._end("incomplete", incomplete_details={"reason": "max_prompt_tokens"})
            return None
        return self._chat_request(run, budget, chat)

    def _over_prompt_budget(self, run: orm.Run, budget: prompt.Budget, chat: list[dict[str, Any]]) -> bool:
        """Whether the prompt is longer than the run's max_prompt_tokens leave."""
        return (
            budget.prompt_tokens is not None and self.runtime.llm.count_tokens(run.model, chat) > budget.prompt_tokens
        )

    def _chat_request(self, run: orm.Run, budget: prompt.Budget, chat: list[dict[str, Any]]) -> llm.ChatRequest:
        tools = prompt.chat_tools(run.tools, self.builtins)
        choice = run.tool_choice if run.tool_choice != "none" else "none"
        return llm.ChatRequest(
            model=run.model,
            messages=chat,
            tools=tools if choice != "none" else [],
            tool_choice=prompt.chat_tool_choice(choice, tools, self.builtins) if choice != "none" else None,
            parallel_tool_calls=run.parallel_tool_calls,
            temperature=run.temperature,
            top_p=run.top_p,
            max_tokens=budget.completion_tokens,
            response_format=run.response_format if isinstance(run.response_format, dict) else None,
            reasoning_effort=run.reasoning_effort,
            context=self.context,
        )

    async def _loop(self, run: orm.Run, first_chat: list[dict[str, Any]]) -> None:
        chat: list[dict[str, Any]] | None = first_chat
        for _ in range(MAX_MODEL_CALLS):
            budget = self._budget(run)
            if _no_completion_left(budget):
                await self._end("incomplete", incomplete_details={"reason": "max_completion_tokens"})
                return
            opened = self._open_call
            request = opened.request if opened is not None else await self._request(run, budget, chat)
            chat = None  # later model calls see what this one added
            if request is None:
                return
            result = await self._call(run, request)
            if result is None:
                return
            self.prompt_tokens += result.usage.prompt_tokens
            self.completion_tokens += result.usage.completion_tokens
            if not await self._after_turn(run, result, budget):
                return
        await self._end("failed", last_error=TOO_MANY_CALLS)

    async def _answer(self, turn: Turn, request: llm.ChatRequest) -> TurnResult:
        """The model's answer. One the model has whole at once (the offline
        model, uncued) is taken in one go, its rows and events left for the
        turn's commit, when it calls no built-in tool (those stream their
        progress while they run, so their step must be written first)."""
        opened, self._open_call = self._open_call, None
        if opened is not None:
            return await self._consume(turn, opened)
        first, self._first_answer = self._first_answer, _UNASKED
        if isinstance(first, llm.LLMError):
            raise first
        whole = first if not isinstance(first, _Unasked) else None
        if isinstance(first, _Unasked) and self._may_answer_at_once():
            whole = await self.runtime.llm.answer_at_once(request)
        if whole is None:
            return await self._consume(turn, self.runtime.llm.stream(request))
        if self._calls_builtin(whole):
            return await self._consume(turn, _replay(whole))
        turn.at_once = True
        return await turn.consume(_replay(whole))

    def _may_answer_at_once(self) -> bool:
        """Whether an instant answer may be taken in one go: only while the
        model-request observer is none or the Runtime's own, which hands a
        run's exchange to the run (no I/O). Any other (a test's hook, a
        diagnostic) may write or wait once the answer is complete, even on
        the run's row: the answer is then streamed, its message opened
        first, as from any model."""
        observer = self.runtime.llm.observer
        return observer is None or observer == self.runtime.record_model_request

    def _calls_builtin(self, answer: Sequence[object]) -> bool:
        return any(isinstance(event, llm.ToolCallDelta) and event.name in self.builtins for event in answer)

    async def _consume(self, turn: Turn, source: AsyncIterator[llm.Event] | _OpenCall) -> TurnResult:
        """The model's answer, unless a cancel arrives first (even while the
        model is silent). The answer is taken in this task, not one of its own
        (issue 17: a task, its start, the wait for its end and the gather of
        its outcome fewer per model call): the cancel watch stops it by
        cancelling this task, and that cancel is taken back here as
        ``asyncio.timeout`` takes its own back (TurnStopped, or the
        CancelledError of a cancel from outside as well)."""
        stream = (
            source
            if isinstance(source, _OpenCall)
            else _idle_limited(source, self.runtime.settings.model_idle_timeout_seconds)
        )
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()  # cancels of this task's before the answer (the watch's come on top)
        watch = _CancelWatch(task, self._cancel_requested)
        failure: BaseException | None = None
        try:
            with self.runtime.bus.watch(self.run_id, watch.on_event):
                try:
                    result = await self._take(turn, stream)
                except BaseException as error:  # the watch's cancel among them: sorted out below
                    failure = error
                finally:
                    watch.close()  # no cancel of this task's from here on
            delivered = isinstance(failure, asyncio.CancelledError)
            if watch.stopped or (task.cancelling() > cancelling and not delivered):
                # the watch's cancel, or one from outside that the answer swallowed
                await _cancel_taken_back(task, cancelling, delivered=delivered, stopped=watch.stopped)
            if failure is not None:
                raise failure
            return result
        finally:
            failure = None  # (no cycle through its traceback, which holds this frame)
            await watch.until_checked()  # cancelled again meanwhile: the row's read still ends with it

    async def _take(self, turn: Turn, stream: AsyncGenerator[llm.Event, None] | _OpenCall) -> TurnResult:
        """A streamed answer, taken whole when the model sends all of it
        (QUICK_ANSWER_MOST_EVENTS deltas at most, and its Finish) within QUICK_ANSWER_SECONDS of its
        first event (a stub, a cache, a one-chunk reply): its rows and events
        then wait for the turn's commit as an instant answer's do, one
        transaction fewer (no opening of its own, no delta flush). Otherwise
        what came is replayed and the rest streamed: the first events reach
        clients at most that much later. The stream is read by a task of its
        own (an async generator whose read is cut short by a timeout cannot
        go on); nothing is published before the choice is made. A call
        opened early (open_first_call) is that reader already under way.
        Streamed, the answer is read on in this task once the reader has
        handed the stream over after its next event (_HandOver)."""
        if isinstance(stream, _OpenCall):
            arrived, reader, hand_over, stream = stream.arrived, stream.reader, stream.hand_over, stream.stream
        elif not self._may_answer_at_once():
            return await turn.consume(stream)
        else:
            arrived, hand_over = asyncio.Queue(), _HandOver()
            reader = asyncio.ensure_future(_read_into(stream, arrived, hand_over=hand_over))
        try:
            gathered = [await arrived.get()]
            whole = await _gather_quickly(gathered, arrived)
            turn.at_once = whole and not self._calls_builtin(gathered)
            if isinstance(gathered[-1], (llm.Finish, _StreamEnd)):
                return await turn.consume(_arrivals(gathered, arrived))
            # Streamed: read in this task from the reader's next event on.
            hand_over.asked = True
            return await turn.consume(_arrivals(gathered, arrived, stream))
        except BaseException:
            reader.cancel()  # (a normal end leaves it past the Finish, closing the stream)
            raise
        finally:
            await _until_ended(reader)
            if hand_over.handed:
                # Read in this task since: closed here, however the turn
                # ended (past its Finish the stream waits at its last yield,
                # as the reader's read never left it; a cancel may come
                # before the reader's last word is taken from the queue).
                await stream.aclose()

    def _turn(self, run: orm.Run) -> Turn:
        return Turn(
            self.runtime,
            run,
            builtins=self.builtins,
            decorate=lambda content: self._decorate(run, content),
            leading=self._leading_parts,
            targets=markers.run_targets(self.builtins, self.results),
        )

    async def _call(self, run: orm.Run, request: llm.ChatRequest) -> TurnResult | None:
        turn = self._turn(run)
        try:
            result = await self._answer(turn, request)
            if any(call["type"] in self.builtins for call in result.calls):
                await self._run_builtins(run, turn, result)
            return result
        except TurnStopped:
            await turn.save_partial()
            await self._end("cancelled")
        except llm.LLMError as error:
            await turn.save_partial()
            await self._end("failed", last_error=LastError(code=error.code, message=error.message))
        return None

    def _leading_parts(self) -> list[dict[str, Any]]:
        """Parts built-in tools made that no message has carried yet."""
        return [part for results in self.results.values() for result in results for part in result.message_parts]

    def _decorate(self, run: orm.Run, content: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for tool_type, results in self.results.items():
            content = self.builtins[tool_type].decorate(self.runtime, run, content, results)
        return content

    async def _run_builtins(self, run: orm.Run, turn: Turn, result: TurnResult) -> None:
        """Execute the turn's built-in tool calls (no session held while they
        run), record their outputs in the step and stream them as deltas."""
        step = result.tool_step
        assert step is not None
        internal = dict(step.internal or {})
        # A new list: the step's committed step_details holds the old one, and
        # changing that in place would hide the change from the ORM.
        result.calls = list(result.calls)
        for index, call in enumerate(result.calls):
            tool = self.builtins.get(call["type"])
            if tool is None:
                continue
            arguments = result.arguments.get(call["id"], "")
            outcome = await tool.execute(self.runtime, run, call["id"], arguments, turn.publisher(call["id"]))
            result.calls[index] = outcome.call
            self.results.setdefault(call["type"], []).append(outcome)
            internal[call["id"]] = {"arguments": arguments or "{}", "output": outcome.output}
        step.step_details = {"type": "tool_calls", "tool_calls": list(result.calls)}
        step.internal = internal  # written with the step's completion (_after_turn)

    async def _after_turn(self, run: orm.Run, result: TurnResult, budget: prompt.Budget) -> bool:
        """Record the turn's outcome; True if the model must be called again."""
        functions = [call for call in result.calls if call["type"] == "function"]
        if functions:
            await self._require_action(functions, result.pending)
            return False
        if result.calls:
            await self._complete_step(result.tool_step, result.pending)
            return True  # only built-in tools were called: the model goes on
        if result.finish_reason == "length" and budget.completion_tokens is not None:
            await self._end("incomplete", result.pending, incomplete_details={"reason": "max_completion_tokens"})
        else:
            await self._end("completed", result.pending)
        return False

    async def _complete_step(self, step: orm.RunStep | None, pending: Pending) -> None:
        """A round of built-in tools is done: its step (with the tools'
        outputs) completes, and the model is called again."""
        if step is None:
            return
        step.status, step.completed_at = "completed", ids.now()
        keys = ("status", "completed_at", "step_details", "internal")  # the tools' outputs too (_run_builtins)
        pending.add([RowUpdate(step, keys)], [Event.of("thread.run.step.completed", run_steps.to_wire(step))])
        # The tools may have run long: the run may have ended or changed hands meanwhile.
        await self._commit(pending, checked=True)

    async def _require_action(self, calls: list[dict[str, Any]], pending: Pending) -> None:
        required = {
            "type": "submit_tool_outputs",
            "submit_tool_outputs": {
                "tool_calls": [
                    {
                        "id": c["id"],
                        "type": "function",
                        "function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                    }
                    for c in calls
                ]
            },
        }
        await self._commit(pending, Move("requires_action", required_action=required))


async def _replay(events: list[llm.Event]) -> AsyncIterator[llm.Event]:
    for event in events:
        yield event


@dataclass(frozen=True)
class _StreamEnd:
    """The end of a stream read by _read_into: ``error`` if it failed;
    ``handed_over`` if the reader stopped reading, its stream left to the
    turn's task (_HandOver)."""

    error: BaseException | None = None
    handed_over: bool = False


class _HandOver:
    """Asked (by the turn's task, once the answer turns out to be streamed)
    of a stream's reader: after the event it reads next, stop reading and
    leave the stream open, for the turn's task to read on (_arrivals).

    The reader task is there for the first events (the quick answer's
    gathering is cut short by a timeout, which an async generator's read
    cannot survive; a call opened before its run's task). Past them, each
    token went through it: its wake-up, the queue, then the turn's task's
    wake-up, two steps of the loop a token where one does (issue 17: a
    streamed answer's server CPU grows by each token's)."""

    __slots__ = ("asked", "handed")

    def __init__(self) -> None:
        self.asked = False
        self.handed = False  # the reader stopped: the stream is the turn task's to read and close


async def _read_into(
    stream: AsyncGenerator[llm.Event, None],
    arrived: asyncio.Queue[llm.Event | _StreamEnd],
    gate: asyncio.Future[None] | None = None,
    hand_over: _HandOver | None = None,
) -> None:
    """The stream's events into ``arrived``, up to its Finish (nothing is
    read after it, as a turn stops there), then an end: a failure too, so
    that nobody waits on ``arrived`` for ever (a CancelledError from inside
    the stream, not this task's own cancel, becomes a server error). With
    ``gate``, nothing after the first event is read until it is done (a
    call asked for before its run's create committed: a cassette's
    recording takes the answer at its Finish); a gate cancelled (the create
    failed) ends the read as this task's cancel would. Once ``hand_over`` is
    asked, the next event is followed by the end that says so
    (``handed_over``), the stream left open: the turn's task reads on, and
    closes it."""
    try:
        try:
            async for event in stream:
                arrived.put_nowait(event)
                if isinstance(event, llm.Finish):
                    break
                if gate is not None:
                    if not gate.done():
                        await asyncio.shield(gate)
                    gate.result()  # (cancelled: the create failed)
                    gate = None
                if hand_over is not None and hand_over.asked:
                    hand_over.handed = True
                    arrived.put_nowait(_StreamEnd(handed_over=True))
                    return
        finally:
            if hand_over is None or not hand_over.handed:
                await stream.aclose()
    except asyncio.CancelledError:
        arrived.put_nowait(_StreamEnd(llm.LLMError("server_error", "The model stream was interrupted.")))
        raise
    except Exception as error:  # raised by _arrivals where the stream failed
        arrived.put_nowait(_StreamEnd(error))
    else:
        if hand_over is None or not hand_over.handed:
            arrived.put_nowait(_StreamEnd())


async def _read_for(
    run_id: str,
    stream: AsyncGenerator[llm.Event, None],
    arrived: asyncio.Queue[llm.Event | _StreamEnd],
    call_out: asyncio.Future[None] | None,
    gate: asyncio.Future[None] | None,
    hand_over: _HandOver,
) -> None:
    """_read_into for a call opened before the run's task (open_first_call):
    its lines name the run, as the run's task's do (run()). ``call_out`` is
    done in the loop's next turn after this task's first step, which sends
    the request and stops at the wait for the answer's head."""
    logs.bind_run(run_id)
    if call_out is not None:
        asyncio.get_running_loop().call_soon(_set_done, call_out)
    await _read_into(stream, arrived, gate, hand_over)


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@dataclass(frozen=True, eq=False)
class _OpenCall:
    """A model call opened before the run's task took it (open_first_call):
    its request, and the reader queueing its events."""

    request: llm.ChatRequest
    arrived: asyncio.Queue[llm.Event | _StreamEnd]
    reader: asyncio.Task[None]
    stream: AsyncGenerator[llm.Event, None]  # the reader's, until it hands it over
    hand_over: _HandOver


async def _gather_quickly(
    gathered: list[llm.Event | _StreamEnd], arrived: asyncio.Queue[llm.Event | _StreamEnd]
) -> bool:
    """Add to ``gathered`` what arrives within QUICK_ANSWER_SECONDS, up to the
    stream's Finish; whether the whole answer came (QUICK_ANSWER_MOST_EVENTS
    at most). Only a wait for what has not arrived yet is limited: what the
    reader queued already (an answer read in one go) is taken with no timer."""
    deadline = asyncio.get_running_loop().time() + QUICK_ANSWER_SECONDS
    while not isinstance(gathered[-1], (llm.Finish, _StreamEnd)):
        if len(gathered) > QUICK_ANSWER_MOST_EVENTS:
            return False
        if not arrived.empty():
            gathered.append(arrived.get_nowait())
            continue
        try:
            async with asyncio.timeout_at(deadline):
                gathered.append(await arrived.get())
        except TimeoutError:
            return False
    return isinstance(gathered[-1], llm.Finish)


async def _cancel_taken_back(task: asyncio.Task[Any], cancelling: int, *, delivered: bool, stopped: bool) -> NoReturn:
    """An answer in ``task`` (RunExecution._consume) ended by a cancel: the
    cancel watch's (``stopped``), taken back, or one from outside that the
    answer swallowed (a library's cleanup catching it). It ends in
    TurnStopped, or in a CancelledError if ``task`` was cancelled from
    outside (its count above ``cancelling`` once the watch's is taken back):
    the worker stopping, or the lease lost, must still stop the run. Not
    ``delivered`` (the answer ended otherwise, having swallowed it, or before
    it reached an await), a pending cancel is let through first, here, rather
    than at the executor's next await."""
    if not delivered:
        with suppress(asyncio.CancelledError):
            await asyncio.sleep(0)
    if (task.uncancel() if stopped else task.cancelling()) > cancelling:
        raise asyncio.CancelledError
    raise TurnStopped


async def _until_ended(task: asyncio.Task[Any]) -> None:
    """Wait for ``task`` to end; cancelled meanwhile, cancel it too, still
    wait, then be cancelled (nothing of it left running unobserved)."""
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True
            task.cancel()
    if cancelled:
        if not task.cancelled():
            task.exception()  # its failure is this cancellation's to drop, not left "never retrieved"
        raise asyncio.CancelledError


async def _arrivals(
    gathered: list[llm.Event | _StreamEnd],
    arrived: asyncio.Queue[llm.Event | _StreamEnd],
    stream: AsyncGenerator[llm.Event, None] | None = None,
) -> AsyncIterator[llm.Event]:
    """The stream again: what _take gathered, then what arrives; with
    ``stream`` (its reader asked to hand it over), once the reader has
    handed it over, read here, in the turn's task (_take closes it). A
    CancelledError out of the stream that is not this task's own cancel is
    the server error the reader made it."""
    for item in gathered:
        if isinstance(item, _StreamEnd):
            if item.error is not None:
                raise item.error
            return
        yield item
    while not isinstance(item := await arrived.get(), _StreamEnd):
        yield item
    if item.error is not None:
        raise item.error
    if not item.handed_over:
        return
    assert stream is not None
    task = asyncio.current_task()
    cancelling = task.cancelling() if task is not None else 0
    try:
        async for event in stream:
            yield event
    except asyncio.CancelledError:
        if task is None or task.cancelling() > cancelling:
            raise  # this task's own cancel (the cancel watch's, or from outside)
        raise llm.LLMError("server_error", "The model stream was interrupted.") from None


class _CancelWatch:
    """Stops a model's answer (cancels the task taking it) once the run is being
    cancelled or has ended elsewhere: in this process the cancel arrives on
    the bus (``on_event``, a bus watch: no task of its own, where a watcher
    task made two tasks and four loop iterations per answer, issue 17); from
    elsewhere, through the row, read every CANCEL_POLL_SECONDS (a deadline,
    not a wait per event: the run's own deltas must not put it off)."""

    def __init__(self, task: asyncio.Task[Any], cancel_requested: Callable[[], Awaitable[bool]]) -> None:
        self.task = task  # the executor's own, taking the answer (RunExecution._consume)
        self.cancel_requested = cancel_requested
        self.loop = asyncio.get_running_loop()
        self.stopped = False
        self.closed = False  # no more reads, no more cancels: the answer is ending
        self.check: asyncio.Future[bool] | None = None  # the row's read, while in flight
        self.timer: asyncio.TimerHandle | None = self.loop.call_later(CANCEL_POLL_SECONDS, self._check)

    def on_event(self, event: Event) -> None:
        # Once closed, not again: a second cancel of the answer would raise
        # its cancelling() count, which its timeouts read.
        if not self.closed and event.name in STOPPING_EVENTS:
            self._stop()

    def _stop(self) -> None:
        self.stopped = True
        self.close()
        self.task.cancel()

    def _check(self) -> None:
        self.timer = None
        self.check = asyncio.ensure_future(self.cancel_requested())
        self.check.add_done_callback(self._checked)

    def _checked(self, check: asyncio.Future[bool]) -> None:
        self.check = None
        # A failed read stops the answer, as the watcher task's failure did
        # (retrieved whatever happens: the answer's end may have made it moot).
        failed = check.cancelled() or check.exception() is not None
        if self.closed:  # (a read ending after close() arms no timer: no read after the answer)
            return
        if failed or check.result():
            self._stop()
        else:
            self.timer = self.loop.call_later(CANCEL_POLL_SECONDS, self._check)

    def close(self) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    async def until_checked(self) -> None:
        """Wait for a row read in flight to end rather than cut it short (its
        connection would be dropped), CANCEL_CHECK_GRACE_SECONDS at most: a
        read left running after its execution kept a connection past the
        Runtime's close, which the pool disposed of meanwhile then took back
        for good, unclosed (an asyncpg ResourceWarning at garbage collection)."""
        check = self.check
        if check is None:
            return
        try:
            await asyncio.wait({check}, timeout=CANCEL_CHECK_GRACE_SECONDS)
        finally:
            if not check.done():
                check.cancel()
                await asyncio.wait({check})


class _IdleWatch:
    """The idle limit of _idle_limited: one timer for the whole stream,
    moved on lazily, where ``asyncio.timeout`` per event made, ordered and
    cancelled a timer for each (about 10 per streamed answer, issue 17).

    ``waiting()`` notes when a wait for the next event starts and which task
    waits; the timer, when it fires, either finds that wait older than
    ``seconds`` and cancels the task (``expired``), or sets itself for the
    moment the current wait would be. A wait that ends in time costs one
    clock read and the task's cancel count."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.loop = asyncio.get_running_loop()
        self.task: asyncio.Task[Any] | None = None  # the task waiting, None between waits
        self.since = 0.0
        self.cancelling = 0  # the task's cancel requests before the wait (as asyncio.timeout counts them)
        self.expired = False
        self.timer: asyncio.TimerHandle | None = None

    def waiting(self) -> None:
        self.task = asyncio.current_task()
        self.since = self.loop.time()
        if self.task is not None:
            self.cancelling = self.task.cancelling()
        if self.timer is None:
            self.timer = self.loop.call_at(self.since + self.seconds, self._check)

    def _check(self) -> None:
        self.timer = None
        if self.task is None:
            return  # not waiting: the next wait sets the timer again
        due = self.since + self.seconds
        if self.loop.time() >= due:
            self.expired = True
            self.task.cancel()
        else:
            self.timer = self.loop.call_at(due, self._check)

    def arrived(self) -> None:
        """The wait ended in time (a cancel of the limit's that the stream
        swallowed is taken back)."""
        task, self.task = self.task, None
        if self.expired and task is not None:
            self.expired = False
            task.uncancel()

    def timed_out(self) -> bool:
        """On a CancelledError out of the wait: whether it is the limit's
        own (then taken back from the task), not a cancel from outside."""
        task, self.task = self.task, None
        return self.expired and task is not None and task.uncancel() <= self.cancelling

    def close(self) -> None:
        self.task = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


async def _idle_limited(stream: AsyncIterator[llm.Event], seconds: float) -> AsyncGenerator[llm.Event, None]:
    """``stream``, failing with a clear error once the model sends nothing
    for ``seconds`` (a stalled provider must not hold a run and its worker
    slot until the run expires). Closed, it closes ``stream`` at once (the
    provider's response, the call's metrics), not at garbage collection."""
    iterator = aiter(stream)
    watch = _IdleWatch(seconds)
    try:
        while True:
            watch.waiting()
            try:
                item = await anext(iterator)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if watch.timed_out():
                    raise llm.LLMError(
                        "server_error", f"The model sent nothing for {seconds:g} seconds; the run was stopped."
                    ) from None
                raise
            finally:
                # Between waits the time is the consumer's own, not the model's.
                # Also on the ways out without an event (the stream ended or
                # raised on the limit's cancel): the cancel is taken back, as
                # asyncio.timeout takes it back on every exit.
                watch.arrived()
            yield item
    finally:
        watch.close()
        if isinstance(iterator, AsyncGenerator):
            await iterator.aclose()


async def run(execution: RunExecution) -> None:
    """Execute ``execution`` (started by start_claimed() or not) in this task."""
    logs.bind_run(execution.run_id)  # every line this task logs from here on names the run
    await execution.execute()


async def claim_and_start(
    runtime: Runtime,
    owner: str,
    limit: int,
    lease_seconds: float,
    builtins: dict[str, BuiltinTool],
    executing: Collection[str] = (),
) -> list[RunExecution]:
    """Claim up to ``limit`` runs for ``owner`` (none of ``executing``, the
    runs ``owner`` executes already) and start them, all in one
    transaction; the executions not ``finished`` in it (an instant answer
    ends its run there) go on with run()."""
    executions = []
    # PostgreSQL: the claimed runs' starts, written together after the loop
    # (issue 17: one statement for the claim's starts, not one per run).
    starts: list[claimed_starts.Start] | None = [] if runtime.run_log.postgres else None
    try:
        async with runtime.claiming() as session:
            for claimed in await run_execution.claim_runs(session, owner, limit, lease_seconds, executing):
                execution = RunExecution(runtime, claimed.id, builtins, owner=owner)
                await execution.start_claimed(session, claimed, starts)
                executions.append(execution)
            if starts:
                await runtime.run_log.append_starts(session, starts, owner)
    except DBAPIError as error:
        # Refused in the claim or at its COMMIT (SQLite sends held-back
        # writes then): by one of the answers written in the claim, which
        # then go the streamed way, each in transactions of its own, rather
        # than fail every claim of them all.
        if refused_data(error):
            for execution in executions:
                if execution.finished:
                    not_at_once(execution.run_id)
        raise
    return executions


async def hand_off(
    runtime: Runtime,
    owner: str,
    created: orm.Run,
    lease_seconds: float,
    builtins: dict[str, BuiltinTool],
    committed: asyncio.Future[None] | None = None,
    sent: asyncio.Future[None] | None = None,
) -> RunExecution:
    """Claim and start ``created``, a run this process's API has just
    created reserved for ``owner`` with its earlier messages noted
    (run_execution.handable), from its own row: no claim statement (issue
    17). SQLite: one transaction whose first statement is the claim's
    compare-and-set for this one run (run_execution.claim_handed), held
    back to the COMMIT with the rest on a raw transaction (otherwise sent
    with the transaction's first statement that connects); an instant answer
    ends the run in it, the whole worker side of the run then one thread
    hop. A run queued again by its tool outputs (Worker.hand's hand-back,
    SQLite only) has its earlier messages read first, by a WAL reader on
    whose snapshot its prompt is read too (a thread longer than the claim's
    prefetch: HandOffLost, before anything is sent), the compare-and-set
    requiring them unchanged and the run started (run_execution._HAND_BACK).
    A miss (HandOffLost, run_execution: at the COMMIT, or at the
    statement that carried it) fails the transaction, rolled back whole,
    and the run is the workers' to claim as any other, as after any other
    failure here. The execution, unless ``finished``, goes on with run().
    PostgreSQL: _hand_off_postgres (no transaction: one statement, the
    run's start or, with an instant answer, its whole worker side), built
    while the create's statement is out when ``committed`` is given (done
    once the create has committed; cancelled if it failed), ``sent`` done
    once its statement goes (db.gate's ``passed_to``)."""
    if runtime.run_log.postgres:
        return await _hand_off_postgres(runtime, owner, created, lease_seconds, builtins, committed, sent)
    assert committed is None, "a hand-off built ahead on PostgreSQL only"
    if created.started_at is None:
        return await _hand_off_sqlite(runtime, owner, created, lease_seconds, builtins)
    # Queued again by its tool outputs (Worker.hand's hand-back): its earlier
    # messages read first, by a WAL reader, for its prompt and for the
    # compare-and-set, which requires them unchanged at the COMMIT; its
    # prompt's other reads (its steps, its messages) on the same snapshot.
    async with runtime.reading() as reader:
        if not await run_execution.note_resumed(reader, created):
            raise run_execution.HandOffLost(f"run {created.id}: its thread is longer than a hand-off takes")
        return await _hand_off_sqlite(runtime, owner, created, lease_seconds, builtins, reader)


async def _hand_off_sqlite(
    runtime: Runtime,
    owner: str,
    created: orm.Run,
    lease_seconds: float,
    builtins: dict[str, BuiltinTool],
    prompt_reader: AsyncSession | None = None,
) -> RunExecution:
    """hand_off() on SQLite, its earlier messages noted (run_execution.handable)."""
    execution: RunExecution | None = None
    try:
        async with runtime.claiming() as session:
            run = await run_execution.claim_handed(session, created, owner, lease_seconds)
            execution = RunExecution(runtime, run.id, builtins, owner=owner)
            execution.prompt_reader = prompt_reader
            try:
                await execution.start_claimed(session, run, queued=runs.queued_wire(created))
            finally:
                execution.prompt_reader = None  # (it closes with the caller's block)
    except DBAPIError as error:
        # As claim_and_start: an instant answer the database refused goes
        # the streamed way once claimed again, in transactions of its own.
        # A lost compare-and-set refused nothing of the answer: the tick's
        # claim answers it at once again.
        refused = refused_data(error) and not run_execution.hand_off_lost(error)
        if refused and execution is not None and execution.finished:
            not_at_once(execution.run_id)
        raise
    assert execution is not None
    return execution


async def take_started(
    runtime: Runtime,
    owner: str,
    created: orm.Run,
    builtins: dict[str, BuiltinTool],
    committed: asyncio.Future[None],
    call_out: asyncio.Future[None] | None = None,
    vouched: run_defaults.Vouch | None = None,
) -> RunExecution:
    """The execution of ``created``, a run its create inserts already
    started, leased to ``owner`` (Worker.prepare's fold: a run whose
    answer is not instant, a provider's; issue 17, no statement of the
    hand-off's own). On PostgreSQL its first prompt is built while the
    create's statement is out, on a session that never connects (one that
    needs a read is built again on a session gated until the create has
    committed: db.gate), and its first model call sent then too
    (open_first_call's ``ahead_of``; ``call_out`` done once it is out) if
    the assistant's defaults the run was made from are ``vouched`` for
    still (run_defaults.still_vouched: the create's check can find them
    stale only through a change that raced it); returns once ``committed``
    is done, the execution to go on with run() under ``owner``'s lease; a
    create that failed (``committed`` cancelled) cancels this and that
    call, nothing written. On SQLite it is
    called once the create has committed (Worker._take_handed), and its
    prompt built on a session that never connects (db.READS_ELSEWHERE: a
    read it needs goes to a WAL reader, RunExecution._first_prompt, which
    neither takes nor waits for the write lock; a prefetched prompt reads
    nothing; no session begun, no gate: 0.3-0.5 ms of loop CPU less than
    Runtime.reading's, run_timeline)."""
    run = run_execution.handed_run(created, owner, created.lease_expires_at or 0.0)
    started = runs.started_in_create_wire(created)
    execution = RunExecution(runtime, run.id, builtins, owner=owner)
    if not runtime.run_log.postgres:
        assert committed.done(), "SQLite's fold is taken once its create has committed"
        committed.result()  # (a create that failed: its cancellation)
    try:
        # First on a session that never connects: the prompt of a run whose
        # create noted its thread's messages reads nothing (issue 17: on
        # PostgreSQL no session begun, gated or committed, 0.1-0.2 ms of loop
        # CPU a run, bench/README). SQLite's, built once the create has
        # committed, reads what it needs on a WAL reader; PostgreSQL's, built
        # while the create's statement is out, may read only through a gated
        # session, which sees the create's rows once committed.
        postgres = runtime.run_log.postgres
        session = runtime.sessionmaker()
        session.info[db.READS_ELSEWHERE] = True
        try:
            taken = await execution.take_started(session, run, started, may_read=not postgres)
        finally:
            session.sync_session.close()  # never connected: no I/O
        if not taken:
            async with runtime.unit_of_work() as session:
                db.gate(session, committed)
                await execution.take_started(session, run, started)
    except Exception:  # (its session's end) as take_started's failures: left to start()
        log.debug("run %s: its first prompt's session failed; left to start()", run.id, exc_info=True)
        execution = RunExecution(runtime, run.id, builtins, owner=owner)
    if committed.done():
        committed.result()  # (a create that failed: its cancellation)
        return execution
    if run_defaults.still_vouched(vouched):
        execution.open_first_call(call_out, ahead_of=committed)
    try:
        await asyncio.shield(committed)  # (a cancelled wait leaves the gate as it is)
    except BaseException:  # the create failed, or this hand-off is cancelled: no run to answer
        execution.discard_first_call()
        raise
    return execution


async def _hand_off_postgres(
    runtime: Runtime,
    owner: str,
    created: orm.Run,
    lease_seconds: float,
    builtins: dict[str, BuiltinTool],
    committed: asyncio.Future[None] | None,
    sent: asyncio.Future[None] | None = None,
) -> RunExecution:
    """hand_off() on PostgreSQL: no claim, no transaction. The run as the
    claim would leave it (run_execution.handed_run), started in one
    autocommitted statement whose compare-and-set is the hand-off's
    (RunExecution.start_handed): with an instant answer the start, the end,
    the turn's rows and the events (issue 17, the whole worker side one
    round trip); else the start, its lease and its events, the execution
    then going on as a claimed one's (a provider's run: its call, its turn,
    its end). Its miss or collision raises run_execution.HandOffLost,
    nothing written; a run that cannot start so raises it too, nothing
    written: either way the run is left, reserved for ``owner``, to the
    worker's claim. The statement's outcome is seen through a cancellation
    of the caller (what it wrote reaches streams; db.seen_through).
    With ``committed`` (the hand-off begun before its create was sent:
    Worker.prepare) it is built meanwhile, on the create's values (the row
    the create inserts is ``created``'s, nothing of it computed by the
    database), every statement of its session gated until the create has
    committed (db.gate): its reads and its compare-and-set see the
    committed run, and a create that failed cancels it, nothing sent."""
    run = run_execution.handed_run(created, owner, time.time() + lease_seconds)
    execution = RunExecution(runtime, run.id, builtins, owner=owner)

    async def answer() -> bool:
        async with runtime.unit_of_work() as session:
            if committed is not None:
                db.gate(session, committed, passed_to=sent)
            check = run_execution.hand_off_check(created, owner)
            return await execution.start_handed(session, run, check, runs.queued_wire(created))

    work, sending = db.watched(answer())
    what = f"run {run.id}'s hand-off"
    if not await db.seen_through(work, what, sending=sending, expected=run_execution.hand_off_lost):
        raise run_execution.HandOffLost(f"run {run.id} is not started by its hand-off: claimed instead")
    return execution
