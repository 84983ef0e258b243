"""Runs: create (and create thread-and-run), retrieve, list, update, cancel,
submit_tool_outputs, and closing a run out in a final state.

Functions that change a run return the events to publish; the caller
publishes them after its transaction commits (never before: a listener must
be able to read what an event announces).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Insert, Row, Table, and_, bindparam, inspect, select, true
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import make_transient_to_detached

from app import db, errors, ids, orm
from app.services import (
    core_rows,
    messages,
    new_rows,
    pagination,
    row_reads,
    run_defaults,
    run_execution,
    run_state,
    run_steps,
    thread_lock,
    threads,
    tool_resources,
)
from app.services.common import metadata_or_empty, require_id
from app.services.projects import Project
from app.wire.common import ListPage, response_format_to_wire, tool_to_wire
from app.wire.events import Event
from app.wire.runs import Run, RunCreate, RunUpdate, SubmitToolOutputs, ThreadAndRunCreate
from app.wire.threads import ThreadCreate

DEFAULT_TRUNCATION: dict[str, Any] = {"type": "auto", "last_messages": None}


def _tool_choice_to_wire(body: RunCreate | ThreadAndRunCreate, tools: list[dict[str, Any]]) -> Any:
    choice = body.tool_choice
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        return choice
    wire = choice.model_dump()
    if wire["type"] == "function":
        names = {tool["function"]["name"] for tool in tools if tool["type"] == "function"}
        if wire["function"]["name"] not in names:
            raise errors.invalid(
                f"Invalid 'tool_choice': function '{wire['function']['name']}' is not one of the run's tools.",
                param="tool_choice",
            )
    return wire


async def _new_run(
    session: AsyncSession,
    project: Project,
    thread_id: str,
    body: RunCreate | ThreadAndRunCreate,
    *,
    expires_in: int,
    additional_instructions: str | None = None,
    reservation: run_execution.Reservation | None = None,
    assistant: run_defaults.AssistantDefaults | None = None,
) -> orm.Run:
    """The new run, from ``body`` and its assistant's defaults (read unless
    given: remembered, run_defaults). A check of the request against
    remembered defaults that fails may have met stale ones (changed by
    another process): StaleDefaults, and the caller makes the run again
    from a fresh read, which answers the error if it still holds (or the
    assistant's 404)."""
    remembered = assistant is not None
    if assistant is None:
        assistant = await run_defaults.read(session, project, body.assistant_id)
    tools = [tool_to_wire(tool) for tool in body.tools] if body.tools is not None else list(assistant.tools)
    instructions = body.instructions if body.instructions is not None else (assistant.instructions or "")
    if additional_instructions:
        instructions = f"{instructions}\n\n{additional_instructions}" if instructions else additional_instructions
    seq = ids.next_seq()
    created_at = ids.seconds(seq)
    return core_rows.record(
        orm.Run,
        id=ids.new_id(ids.RUN, seq),
        seq=seq,
        created_at=created_at,
        thread_id=thread_id,
        assistant_id=assistant.id,
        status="queued",
        expires_at=created_at + expires_in,
        model=body.model or assistant.model,
        instructions=instructions,
        tools=tools,
        metadata_=metadata_or_empty(body.metadata),
        temperature=_pick(body.temperature, _pick(assistant.temperature, 1.0)),
        top_p=_pick(body.top_p, _pick(assistant.top_p, 1.0)),
        max_prompt_tokens=body.max_prompt_tokens,
        max_completion_tokens=body.max_completion_tokens,
        truncation_strategy=body.truncation_strategy.model_dump() if body.truncation_strategy else DEFAULT_TRUNCATION,
        tool_choice=_checked(
            lambda: _tool_choice_to_wire(body, tools), assistant if remembered and body.tools is None else None
        ),
        parallel_tool_calls=_pick(body.parallel_tool_calls, True),
        response_format=response_format_to_wire(body.response_format)
        if body.response_format is not None
        else (assistant.response_format or "auto"),
        reasoning_effort=body.reasoning_effort or assistant.reasoning_effort,
        lease_owner=reservation.owner if reservation else None,
        lease_expires_at=reservation.until if reservation else None,
    )


def _checked(check: Callable[[], Any], remembered: run_defaults.AssistantDefaults | None) -> Any:
    """``check()``, whose refusal is StaleDefaults when it judged the
    request against ``remembered`` defaults (see _new_run)."""
    try:
        return check()
    except errors.APIError:
        if remembered is None:
            raise
        raise run_defaults.StaleDefaults(remembered.id) from None


def _pick(override: Any, default: Any) -> Any:
    """A run field: the request's override if given, else the assistant's."""
    return override if override is not None else default


def started_in_create_event(queued: Event, run: orm.Run) -> Event:
    """``thread.run.in_progress`` for ``run``, started in its create after
    ``queued`` (its ``thread.run.queued``) was made: the queued object with
    the fields start_in_create() set as the run now holds them (nothing else
    has changed since), rather than the run validated and dumped a second
    time in the same create (issue 17). The same JSON as
    ``Event.of("thread.run.in_progress", to_wire(run))``: each field the
    start sets is a string, an integer, None or a JSON object, which Run's
    JSON dump sends as it is."""
    assert isinstance(queued.data, dict) and queued.data["id"] == run.id, "the run's own queued event"
    event = moved_event("thread.run.in_progress", queued.data, run, run_state.started_in_create_keys(run))
    # For the run's execution (Worker.prepare's fold holds this instance):
    # its end starts from the object its start was sent as.
    inspect(run).info[_STARTED_WIRE] = event.data
    return event


# Where started_in_create_event() keeps the started run's object (InstanceState.info).
_STARTED_WIRE = "runs.started_in_create_wire"


def started_in_create_wire(run: orm.Run) -> dict[str, Any] | None:
    """The object ``run``'s create sent its start as (started_in_create_event), if it did."""
    wire: dict[str, Any] | None = inspect(run).info.get(_STARTED_WIRE)
    return wire


def moved_event(name: str, before: dict[str, Any], run: orm.Run, keys: tuple[str, ...]) -> Event:
    """The event ``name`` carrying ``run`` after a move that set exactly the
    attributes ``keys``, from ``before``, the run's wire object as it stood
    just before that move (issue 17: not validated and dumped again). The
    same JSON as ``Event.of(name, to_wire(run))``, key order included, as
    long as ``before`` is: each value a move sets (run_state._values: the
    status, the stamps, None, usage's integers, required_action's,
    last_error's and incomplete_details' plain JSON objects) is one Run's
    JSON dump sends as it is."""
    assert before["id"] == run.id, "the run's own object"
    moved = tuple((field, attribute) for field, attribute in _RUN_FIELDS if attribute in keys)
    # A copy: an event's data is never changed once made.
    return Event(name, {**before, **row_reads.values(run, moved)})


def _queued_events(run: orm.Run) -> list[Event]:
    """A new run's opening events, logged only by the transaction that
    inserts it: run_log.append reads ``thread.run.created`` as "created
    here" (no NOTIFY on PostgreSQL, numbered from 1 on SQLite). Their
    object is kept on the run's instance (queued_wire())."""
    events = Event.each(("thread.run.created", "thread.run.queued"), to_wire(run))
    inspect(run).info[_QUEUED_WIRE] = events[-1].data
    return events


# Where _queued_events() keeps the new run's object (InstanceState.info).
_QUEUED_WIRE = "runs.queued_wire"


def queued_wire(run: orm.Run) -> dict[str, Any] | None:
    """The object ``run``'s create sent it queued as, if this instance is
    the one its create made (a hand-off starts from it: execute.hand_off)."""
    wire: dict[str, Any] | None = inspect(run).info.get(_QUEUED_WIRE)
    return wire


async def create(
    session: AsyncSession,
    project: Project,
    thread_id: str,
    body: RunCreate,
    *,
    expires_in: int,
    reservation: run_execution.Reservation | None = None,
    remembered: bool = True,
    unwritten: new_rows.Unwritten | None = None,
) -> tuple[orm.Run, list[Event]]:
    """A run on an existing thread, made from its assistant's
    ``remembered`` defaults if any (run_defaults, checked by its INSERT:
    StaleDefaults), else from a read. On PostgreSQL, given ``unwritten``
    and ``remembered`` (a first attempt), the run and its additional
    messages (a few) are left to it, for the caller to insert with the
    events (run_log.append's ``inserting``: issue 17, the same statement),
    under the live-run index and the remembered defaults (_live_only_if);
    a refusal that finds no live run is StaleDefaults, and the caller makes
    the run again (from a fresh read, ``remembered`` False: the way that
    inserts the run first). With no additional messages the live run is
    not read first either: the refusal finds it (issue 17: a round trip).
    On SQLite the run's INSERT goes with the COMMIT (remembered defaults
    that changed fail it: run_defaults.is_stale, the caller makes the run
    again)."""
    postgres = session.bind is not None and session.bind.dialect.name == "postgresql"
    rows: list[orm.Base] = []
    together = postgres and unwritten is not None and remembered
    if together and len(body.additional_messages or ()) >= new_rows.MAX_ROWS_TOGETHER:
        together = False  # more rows than one statement takes (run_events.can_insert_with_rows)
    # Messages are checked (their files) and may write (a thread's store):
    # not on a thread that has a live run, as before.
    unread = together and not body.additional_messages
    # For this process's worker: the thread's last messages are read with
    # its owner (SQLite: and its live run; PostgreSQL: under the thread's
    # lock, which the insert's condition then checks them against), no
    # statement more, so that the run may be handed to the worker with its
    # row (issue 17; run_execution.note_read). PostgreSQL only where the
    # insert goes with the events (``together``: its condition).
    handing = reservation is not None and (together or not postgres)
    last_messages = live_run = None
    if postgres:
        if handing:
            last_messages = await thread_lock.lock_owned_thread(session, project, thread_id, _LOCKED_LAST_MESSAGES)
        else:
            await thread_lock.lock_owned_thread(session, project, thread_id)
        if not unread:
            live_run = await thread_lock.live_run(session, thread_id)
    elif handing:
        live_run, last_messages = await thread_lock.live_run_and_value_of_owned_thread(
            session, project, thread_id, _LIVE_RUN_AND_LAST_MESSAGES
        )
    else:
        live_run = await thread_lock.live_run_of_owned_thread(session, project, thread_id)
    if live_run is not None:
        raise errors.thread_has_active_run(thread_id, live_run)
    added: list[orm.Message] = []
    # additional_messages come before the run (the executor reads messages older than the run).
    for message in body.additional_messages or []:
        message_row = await messages.build(session, project, thread_id, message)
        added.append(message_row)
        if together:
            rows.append(message_row)
        else:
            await core_rows.insert_row(session, message_row, write_behind=True)  # sent with the next statement
    assistant = run_defaults.remembered(project, body.assistant_id) if remembered else None
    try:
        run = await _new_run(
            session,
            project,
            thread_id,
            body,
            expires_in=expires_in,
            additional_instructions=body.additional_instructions,
            reservation=reservation,
            assistant=assistant,
        )
    except errors.APIError:
        # A busy thread is answered first, as when the live run was read before.
        if unread and (live_run := await thread_lock.live_run(session, thread_id)) is not None:
            raise errors.thread_has_active_run(thread_id, live_run) from None
        raise
    if together and unwritten is not None:
        unwritten.rows += [*rows, run]
        read = run_execution.note_read(run, last_messages, added) if handing else None
        unwritten.only_if = _live_only_if(run, body.assistant_id, assistant, read)
    elif postgres:
        await _insert_live_postgres(session, run, assistant)
    elif assistant is not None:
        # SQLite: the read of the thread's live run above took the write lock,
        # held to the COMMIT: no other run of the thread can go live before
        # it (only a run's create makes one live: on an existing thread,
        # such as this one, it reads first under the same lock; a new
        # thread's create makes its run on its own new thread). So
        # the run's INSERT is held back to the COMMIT, as a new thread's is:
        # no savepoint for a live-run conflict that cannot come (issue 17:
        # SAVEPOINT, INSERT and RELEASE were three thread hops per run).
        await run_defaults.insert_checked(session, run, assistant)
    else:
        await core_rows.insert_row(session, run, write_behind=True)
    if handing and not postgres:
        run_execution.note_read(run, last_messages, added)
    return run, _queued_events(run)


# SQLite: the thread's owner, its live run and its last messages, one statement.
_LIVE_RUN_AND_LAST_MESSAGES = thread_lock.with_column(run_execution.thread_last_messages("sqlite"))
# PostgreSQL: the thread's owner and its last messages, the thread locked.
_LOCKED_LAST_MESSAGES = thread_lock.locked_with_column(run_execution.thread_last_messages("postgresql"))


# PostgreSQL: a new run's rows go in only where the live-run index holds no
# run of its thread (as _live_insert's ON CONFLICT), and, made from
# remembered defaults, only while its assistant has them (run_defaults); a
# run noted for a hand-off (runs.create's ``read``), only while its
# thread's messages before it are still those its create read.
_LIVE_RUN_INDEX = new_rows.Unique(("thread_id",), orm.LIVE_RUN)
_AS_READ = run_state.earlier_unchanged(
    "read_count",
    "read_seqs",
    thread=bindparam("read_thread_id", type_=orm.Message.__table__.c.thread_id.type),
    before=bindparam("read_run_seq", type_=orm.Message.__table__.c.seq.type),
)
_NO_LIVE_RUN = new_rows.Condition(true(), unless_in=_LIVE_RUN_INDEX)
_NO_LIVE_RUN_AND_UNCHANGED = new_rows.Condition(run_defaults.UNCHANGED.clause, unless_in=_LIVE_RUN_INDEX)
_NO_LIVE_RUN_AS_READ = new_rows.Condition(_AS_READ, unless_in=_LIVE_RUN_INDEX)
_NO_LIVE_RUN_AND_UNCHANGED_AS_READ = new_rows.Condition(
    and_(run_defaults.UNCHANGED.clause, _AS_READ), unless_in=_LIVE_RUN_INDEX
)


def _live_only_if(
    run: orm.Run,
    assistant_id: str,
    assistant: run_defaults.AssistantDefaults | None,
    read: list[int] | None = None,
) -> new_rows.OnlyIf:
    """The condition of create()'s rows left to the events' statement. Its
    refusal is answered as _insert_live_postgres answers a miss: the live
    run in the way (this transaction holds the thread's lock, which keeps
    other creators out, not the worker: the run named may end meanwhile,
    but it was live when read),
    or else StaleDefaults, the run made again by the caller from a fresh
    read (the defaults changed, the run in the way has ended since, or the
    thread's messages were not as ``read``).

    ``read``: the seqs of the thread's messages before the run as the
    create's lock statement read them (run_execution.note_read, for a
    hand-off). That statement's snapshot was taken before its lock was
    granted: a message written by the lock's holder while it waited is not
    among them, and the run, handed with that history (or, folded, sent it
    as its first prompt), would answer without it. This statement's
    snapshot is taken under the lock, so it sees the thread as the run is
    inserted on it (its own additional messages, inserted beside it, are
    not counted: they were not read)."""

    async def refused(session: AsyncSession) -> Exception:
        # Its id alone (not the run), under the lock create() already holds: a round trip.
        winner = await thread_lock.live_run(session, run.thread_id)
        if winner is not None:
            return errors.thread_has_active_run(run.thread_id, winner)
        return run_defaults.StaleDefaults(assistant_id)

    parameters = {} if assistant is None else run_defaults.guard_parameters(assistant)
    if read is None:
        condition = _NO_LIVE_RUN if assistant is None else _NO_LIVE_RUN_AND_UNCHANGED
    else:
        condition = _NO_LIVE_RUN_AS_READ if assistant is None else _NO_LIVE_RUN_AND_UNCHANGED_AS_READ
        parameters = {
            **parameters,
            "read_thread_id": run.thread_id,
            "read_run_seq": run.seq,
            "read_count": len(read),
            "read_seqs": read,
        }
    return new_rows.OnlyIf(condition, parameters, refused)


@functools.cache
def _live_insert(columns: tuple[str, ...], checked: bool) -> Insert:
    """PostgreSQL: the run's INSERT for these columns, adding no row (and
    raising nothing) where the live-run index already holds a run of its
    thread, or, ``checked``, where its assistant no longer has the
    remembered defaults (run_defaults.UNCHANGED); returns the id it added.
    Built once per (set of columns, checked or not)."""
    table = orm.Run.__table__
    assert isinstance(table, Table)
    values = [bindparam(column, type_=table.c[column].type) for column in columns]
    guarded = select(*values).where(run_defaults.UNCHANGED.clause) if checked else select(*values)
    return (
        postgresql.insert(table)
        .from_select(list(columns), guarded)
        .on_conflict_do_nothing(index_elements=[table.c.thread_id], index_where=orm.LIVE_RUN)
        .returning(table.c.id)
    )


async def _insert_live_postgres(
    session: AsyncSession, run: orm.Run, assistant: run_defaults.AssistantDefaults | None
) -> None:
    """Insert a new live run on PostgreSQL (checked against ``assistant``,
    its remembered defaults, if given). The thread's lock taken before it
    makes a conflict rare (it takes a writer that skipped the lock); the
    live-run index makes it impossible. Its refusal is an
    INSERT that adds no row, not an error, so no savepoint is needed to go
    on in the transaction after it (issue 17: SAVEPOINT and RELEASE, two
    round trips per run created on a thread). Made from remembered
    defaults (``assistant``), the same INSERT checks them (no read of the
    assistant: a round trip): no row and no live run in the way is
    StaleDefaults, and the caller makes the run again from a fresh read."""
    values = core_rows.values(run)
    parameters = values if assistant is None else {**values, **run_defaults.guard_parameters(assistant)}
    statement = _live_insert(tuple(values), assistant is not None)
    for _attempt in range(3):
        if (await session.execute(statement, parameters)).first() is not None:
            return
        winner = await thread_lock.active_run(session, run.thread_id)
        if winner is not None:
            raise errors.thread_has_active_run(run.thread_id, winner.id)
        if assistant is not None:  # changed, or the run in the way has ended since: read it again
            raise run_defaults.StaleDefaults(assistant.id)
        # The run that was in the way has ended since: try again.
    raise errors.thread_has_active_run(run.thread_id, "(a run that has just ended)")


async def create_thread_and_run(
    session: AsyncSession,
    project: Project,
    body: ThreadAndRunCreate,
    *,
    expires_in: int,
    reservation: run_execution.Reservation | None = None,
    remembered: bool = True,
    unwritten: new_rows.Unwritten | None = None,
) -> tuple[orm.Thread, orm.Run, list[Event]]:
    """A new thread and its run, made from its assistant's ``remembered``
    defaults if any (run_defaults: checked by the run's INSERT, no read;
    StaleDefaults or AssistantChanged if they changed, nothing written). A
    new thread has no live run to conflict with, so the run needs no check
    nor savepoint, and its rows go together: on SQLite held back to the
    COMMIT; on PostgreSQL in one statement (new_rows), or, given
    ``unwritten``, not at all: they are added to it, with their condition,
    for the caller to insert with the events (run_log.append's
    ``inserting``: the same statement, issue 17)."""
    rows: list[orm.Base] = []
    thread = await threads.create(session, project, body.thread or ThreadCreate(), inserting=rows)
    postgres = session.bind is not None and session.bind.dialect.name == "postgresql"
    # PostgreSQL checks remembered defaults only in the statement of the
    # run's rows and events (a few rows: run_events.can_insert_with_rows).
    checkable = not postgres or (unwritten is not None and len(rows) < new_rows.MAX_ROWS_TOGETHER)
    assistant = run_defaults.remembered(project, body.assistant_id) if remembered and checkable else None
    run = await _new_run(
        session, project, thread.id, body, expires_in=expires_in, reservation=reservation, assistant=assistant
    )
    run.tool_resources = (
        await tool_resources.to_stored(session, project, body.tool_resources) if body.tool_resources else None
    )
    if reservation is not None:  # for this process's worker: it may be handed its row (issue 17)
        run_execution.note_earlier(run, [row for row in rows if isinstance(row, orm.Message)])
    if postgres:
        if unwritten is not None:
            unwritten.rows += [*rows, run]
            unwritten.only_if = run_defaults.only_if(assistant) if assistant is not None else None
        else:
            await new_rows.insert_together(session, [*rows, run])
    else:
        for row in rows:  # before the run, which references them
            await core_rows.insert_row(session, row, write_behind=True)
        if assistant is not None:
            await run_defaults.insert_checked(session, run, assistant)
        else:
            await core_rows.insert_row(session, run, write_behind=True)
    events = [Event.of("thread.created", threads.to_wire(thread)), *_queued_events(run)]
    return thread, run, events


async def get(session: AsyncSession, project: Project, thread_id: str, run_id: str) -> orm.Run:
    """The run, if its thread is the project's (a run belongs to its thread's project)."""
    run: orm.Run = (await _found(session, project, thread_id, run_id, _RUN_IN_PROJECT))[0]
    return run


async def _found(session: AsyncSession, project: Project, thread_id: str, run_id: str, statement: Any) -> Row[Any]:
    """The row ``statement`` (_RUN_IN_PROJECT, _RUN_ROW) reads of the
    project's run; 404 for a run or a thread it does not have."""
    require_id("thread_id", thread_id, ids.THREAD)
    require_id("run_id", run_id, ids.RUN)
    # One query; the thread is looked up only to word a miss.
    found = await session.execute(statement, {"run_id": run_id, "thread_id": thread_id, "project_id": project.id})
    row = found.first()
    if row is None:
        await threads.get(session, project, thread_id)
        raise errors.not_found("run", run_id)
    return row


# get()'s read, built once with bound parameters as _RUN_ROW below (issue
# 17: building it per call, its comparisons and their coercions, was half
# of a submit_tool_outputs' read of its run).
_RUN_IN_PROJECT = (
    select(orm.Run)
    .join(orm.Thread, orm.Thread.id == orm.Run.thread_id)
    .where(
        orm.Run.id == bindparam("run_id"),
        orm.Run.thread_id == bindparam("thread_id"),
        orm.Thread.project_id == bindparam("project_id"),
    )
)


# Every column of a run, labelled with its attribute name (``metadata_``),
# so a row reads like an orm.Run: the polling path's read builds no ORM
# instance. Built once with bound parameters: SQLAlchemy memoizes a
# statement's cache key on the statement, so a poll neither rebuilds nor
# re-keys it (about a tenth of a poll's CPU when built per call).
_RUN_ROW = (
    select(*(attr.columns[0].label(attr.key) for attr in inspect(orm.Run).column_attrs))
    .join(orm.Thread, orm.Thread.id == orm.Run.thread_id)
    .where(
        orm.Run.id == bindparam("run_id"),
        orm.Run.thread_id == bindparam("thread_id"),
        orm.Thread.project_id == bindparam("project_id"),
    )
)


async def get_row(connection: AsyncConnection, project: Project, thread_id: str, run_id: str) -> RunRow:
    """``get`` with one Core SELECT on a connection (Runtime.poll_read: no
    session, no write lock), for reads that only answer the run (a poll);
    the same checks and errors."""
    require_id("thread_id", thread_id, ids.THREAD)
    require_id("run_id", run_id, ids.RUN)
    found = await connection.execute(_RUN_ROW, {"run_id": run_id, "thread_id": thread_id, "project_id": project.id})
    run = found.first()
    if run is None:
        async with AsyncSession(bind=connection) as session:  # words the miss as get() does
            await threads.get(session, project, thread_id)
        raise errors.not_found("run", run_id)
    return run


async def list_(
    session: AsyncSession, project: Project, thread_id: str, params: pagination.PageParams
) -> ListPage[Any]:
    await threads.get(session, project, thread_id)
    query = select(orm.Run).where(orm.Run.thread_id == thread_id)
    rows, has_more = await pagination.fetch_page(session, query, orm.Run.seq, params, ids.RUN)
    return pagination.page([to_wire(row) for row in rows], has_more)


async def update(session: AsyncSession, project: Project, thread_id: str, run_id: str, body: RunUpdate) -> orm.Run:
    run = await get(session, project, thread_id, run_id)
    if body.metadata is not None:
        run.metadata_ = dict(body.metadata)
    return run


def _lease_is_live(run: orm.Run) -> bool:
    """A worker executes the run (a reservation is not that: see run_execution.RESERVED)."""
    return (
        run.lease_owner is not None
        and not run_execution.is_reservation(run.lease_owner)
        and (run.lease_expires_at or 0) > time.time()
    )


async def cancel(session: AsyncSession, project: Project, thread_id: str, run_id: str) -> tuple[Run, list[Event]]:
    """Returns the run as the client sees it (``cancelling``) and the events."""
    # The run, and (closed out here) its steps and messages, by index: brief
    # (a lone process's SQLite transaction then runs on the event loop's thread).
    await db.brief_on_sqlite(session)

    async def rule(run: orm.Run) -> tuple[Run, list[Event]]:
        if run.status not in run_state.CANCELLABLE:
            raise errors.cannot_cancel(run.status)
        executing = run.status == "in_progress" or _lease_is_live(run)
        events = [Event.of(await run_state.transition(session, run, "cancelling"), to_wire(run))]
        answer = to_wire(run)
        if not executing:
            # Nobody is executing it, so nobody else will finish the cancel.
            events += await close_out(session, run, "cancelled")
        return answer, events

    return await run_state.apply(await get(session, project, thread_id, run_id), rule)


def _pending_call_ids(run: orm.Run) -> list[str]:
    calls = ((run.required_action or {}).get("submit_tool_outputs") or {}).get("tool_calls") or []
    return [call["id"] for call in calls]


async def submit_tool_outputs(
    session: AsyncSession,
    project: Project,
    thread_id: str,
    run_id: str,
    body: SubmitToolOutputs,
    reservation: run_execution.Reservation | None = None,
) -> tuple[orm.Run, list[Event]]:
    """The outputs of the calls ``run_id`` waits for: its tool_calls steps
    completed, the run queued again, kept for ``reservation``'s worker (this
    process's, as a create keeps a new run: its stream and its polls are
    answered from this process's bus, a poll with no read of its row)."""
    outputs = {item.tool_call_id: _output_text(item.output) for item in body.tool_outputs}
    # Its statements read and write the run, its waiting steps and its
    # events by index, a few rows each: brief (a lone process's SQLite
    # transaction then runs on the event loop's thread, no hop).
    await db.brief_on_sqlite(session)

    async def rule(run: orm.Run) -> tuple[orm.Run, list[Event]]:
        status = run.status
        if status == "requires_action" and run.expires_at is not None and run.expires_at <= ids.now():
            status = "expired"  # the reaper is about to record it; it is over either way
        if status != "requires_action":
            raise errors.tool_outputs_refused(status)
        expected = _pending_call_ids(run)
        given = [output.tool_call_id for output in body.tool_outputs]
        if sorted(given) != sorted(expected) or len(set(given)) != len(given):
            raise errors.invalid(f"Expected tool outputs for call_ids {expected!r}, got {given!r}")
        queued = Event.of(await run_state.transition(session, run, "queued", reservation=reservation), to_wire(run))
        return run, [*await _complete_tool_steps(session, run, outputs), queued]

    return await run_state.apply(await _record(session, project, thread_id, run_id), rule)


async def _record(session: AsyncSession, project: Project, thread_id: str, run_id: str) -> orm.Run:
    """get()'s run as a detached record (core_rows.record, as a claim's run:
    its columns read by one Core SELECT, _RUN_ROW), not an ORM instance
    loaded into the session: its moves are run_state.transition's UPDATEs,
    never a flush (issue 17: see run_steps._COLUMNS for what this saves)."""
    row = await _found(session, project, thread_id, run_id, _RUN_ROW)
    run = core_rows.record(orm.Run, **row._mapping)
    make_transient_to_detached(run)
    return run


# The columns submit_tool_outputs completes a waiting step's.
_STEP_COMPLETED = ("step_details", "status", "completed_at")


async def _complete_tool_steps(session: AsyncSession, run: orm.Run, outputs: dict[str, str]) -> list[Event]:
    """The waiting tool_calls steps, completed with the submitted outputs
    (read as records, each written by its own UPDATE: on SQLite held back
    to the COMMIT)."""
    events: list[Event] = []
    for step in await run_steps.records_in_progress(session, run.id):
        if step.type != "tool_calls":
            continue
        details = dict(step.step_details)
        details["tool_calls"] = [_with_output(call, outputs) for call in details.get("tool_calls", [])]
        step.__dict__.update(step_details=details, status="completed", completed_at=ids.now())
        await core_rows.update_row(session, step, _STEP_COMPLETED, write_behind=True)
        events.append(Event.of("thread.run.step.completed", run_steps.to_wire(step)))
    return events


def _output_text(output: Any) -> str:
    return output if isinstance(output, str) else json.dumps(output)


def _with_output(call: dict[str, Any], outputs: dict[str, str]) -> dict[str, Any]:
    if call.get("type") != "function" or call.get("id") not in outputs:
        return call
    return {**call, "function": {**call["function"], "output": outputs[call["id"]]}}


_STEP_END = {"cancelled": "cancelled", "failed": "failed", "expired": "expired"}
_MESSAGE_REASON = {"cancelled": "run_cancelled", "failed": "run_failed", "expired": "run_expired"}


async def close_out(
    session: AsyncSession,
    run: orm.Run,
    to: str,
    *,
    last_error: dict[str, Any] | None = None,
    incomplete_details: dict[str, Any] | None = None,
    usage: dict[str, int] | None = None,
    sweep: bool = True,
    lease_owner: str | None = None,
) -> list[Event]:
    """End ``run`` in final status ``to`` together with its unfinished steps and
    messages (cancelled/failed/expired steps; incomplete messages). An
    executor that closed everything itself passes ``sweep=False``, and its
    worker as ``lease_owner`` (see run_state.transition)."""
    events: list[Event] = []
    now = ids.now()
    if to == "cancelled" and run.status != "cancelling":
        cancelling = await run_state.transition(session, run, "cancelling", lease_owner=lease_owner)
        events.append(Event.of(cancelling, to_wire(run)))
    if sweep:
        events += await _sweep(session, run, to, now, last_error)
    fields: dict[str, Any] = {}
    if last_error is not None:
        fields["last_error"] = last_error
    if incomplete_details is not None:
        fields["incomplete_details"] = incomplete_details
    if usage is not None:
        fields["usage"] = usage
    events.append(
        Event.of(await run_state.transition(session, run, to, lease_owner=lease_owner, **fields), to_wire(run))
    )
    return events


async def _sweep(
    session: AsyncSession, run: orm.Run, to: str, now: int, last_error: dict[str, Any] | None
) -> list[Event]:
    """Close the run's unfinished steps and messages to match its ending."""
    events: list[Event] = []
    for step in await run_steps.in_progress(session, run.id):
        step_status = _STEP_END.get(to, "completed")
        step.status = step_status
        setattr(step, f"{step_status}_at", now)
        if to == "failed":
            step.last_error = last_error
        events.append(Event.of(f"thread.run.step.{step_status}", run_steps.to_wire(step)))
    query = select(orm.Message).where(orm.Message.run_id == run.id, orm.Message.status == "in_progress")
    for message in (await session.scalars(query)).all():
        message.status = "incomplete"
        message.incomplete_at = now
        message.incomplete_details = {"reason": _MESSAGE_REASON.get(to, "max_tokens")}
        events.append(Event.of("thread.message.incomplete", messages.to_wire(message)))
    return events


# A run as read by get_row(): its columns by attribute name.
RunRow = Row[Any]


_RUN_FIELDS = row_reads.fields(Run.model_fields)


def to_wire(run: orm.Run | RunRow) -> Run:
    # Validated from one dict (issue 17: the keyword constructor's own work
    # was half the validation's cost).
    return Run.model_validate(row_reads.values(run, _RUN_FIELDS))
